"""`build_engine`: from an ONNX set to an engine folder the runtime loads.

For ONNX Runtime a build is: check the ONNX set's manifest, let ORT apply its graph optimizations once and save
the optimized models, copy the embeddings and processor, and write an engine manifest that records the
providers, the ORT version, the optimization level and the hash of the upstream manifest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visprune.artifacts import atomic_directory, atomic_write_json, sha256_file, tool_versions
from visprune.errors import ArtifactMismatchError, ConfigError

ENGINE_SCHEMA = "visprune.engine_set"
ENGINE_SCHEMA_VERSION = 1
ONNX_SET_SCHEMA, ONNX_SET_SCHEMA_VERSION = "visprune.onnx_set", 1
GRAPHS = ("vision", "prefill", "decode")
BACKENDS = ("onnxruntime",)
# "extended" optimizations are portable across machines; "all" adds layout changes for this CPU only.
OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class BuildConfig:
    VERSION = 1

    backend: str = "onnxruntime"
    optimization_level: str = "extended"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            hint = ("TensorRT engines are not available in this version; use --backend onnxruntime."
                    if self.backend == "tensorrt" else f"Use one of: {', '.join(BACKENDS)}.")
            raise ConfigError(f"Unknown backend {self.backend!r}.", hint)
        if self.optimization_level not in OPT_LEVELS:
            raise ConfigError(f"Unknown optimization level {self.optimization_level!r}.",
                              f"Use one of: {', '.join(OPT_LEVELS)}.")


def build_engine(config: BuildConfig, onnx_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Build an ONNX Runtime engine folder from `onnx_dir`; returns the engine manifest."""
    import onnxruntime as ort

    onnx_dir = Path(onnx_dir)
    onnx_manifest = read_onnx_set_manifest(onnx_dir)
    with atomic_directory(Path(out_dir)) as staging:
        for graph in GRAPHS:
            _optimize(onnx_dir / f"{graph}.onnx", staging / f"{graph}.onnx", config)
        shutil.copy(onnx_dir / "embed_tokens.npy", staging / "embed_tokens.npy")
        shutil.copytree(onnx_dir / "processor", staging / "processor")
        manifest = {
            "schema": ENGINE_SCHEMA, "schema_version": ENGINE_SCHEMA_VERSION,
            "backend": config.backend, "providers": list(config.providers),
            "onnxruntime_version": ort.__version__, "optimization_level": config.optimization_level,
            "upstream": {"onnx_dir": str(onnx_dir.resolve()), "manifest_sha256": sha256_file(onnx_dir / "manifest.json")},
            "onnx_set": onnx_manifest, "config": {"version": config.VERSION, **asdict(config)},
            "tools": tool_versions("onnxruntime"),
        }
        atomic_write_json(staging / "engine.json", manifest)
    return manifest


def read_onnx_set_manifest(onnx_dir: Path) -> dict[str, Any]:
    """The ONNX set's manifest after checking its schema and that every file it names is there."""
    manifest = _read_json(onnx_dir / "manifest.json", "ONNX set", "Export it with `visprune export`.")
    if (manifest.get("schema"), manifest.get("schema_version")) != (ONNX_SET_SCHEMA, ONNX_SET_SCHEMA_VERSION):
        raise ArtifactMismatchError(f"{onnx_dir} is not a visprune ONNX set of schema version {ONNX_SET_SCHEMA_VERSION}.",
                                    "Export it again with this version: `visprune export ...`.")
    _require_files(onnx_dir, [f"{g}.onnx" for g in GRAPHS] + ["embed_tokens.npy", "processor"],
                   "Export again with `visprune export`; the folder is incomplete.")
    return manifest


def load_engine_manifest(engine_dir: Path) -> dict[str, Any]:
    engine_dir = Path(engine_dir)
    manifest = _read_json(engine_dir / "engine.json", "engine", "Build it with `visprune build --onnx DIR --out DIR`.")
    if (manifest.get("schema"), manifest.get("schema_version")) != (ENGINE_SCHEMA, ENGINE_SCHEMA_VERSION):
        raise ArtifactMismatchError(f"{engine_dir} is not a visprune engine of schema version {ENGINE_SCHEMA_VERSION}.",
                                    "Rebuild it with this version: `visprune build ...`.")
    _require_files(engine_dir, [f"{g}.onnx" for g in GRAPHS] + ["embed_tokens.npy", "processor"],
                   "Rebuild the engine with `visprune build`; the folder is incomplete.")
    return manifest


def _optimize(source: Path, target: Path, config: BuildConfig) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[config.optimization_level])
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), options, providers=list(config.providers))
    except Exception as e:  # ORT raises its own exception types for corrupt or invalid models
        raise ArtifactMismatchError(f"ONNX Runtime cannot load {source}: {str(e).splitlines()[0]}",
                                    "The file is corrupt or truncated; export the set again with `visprune export`.") from e


def _read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactMismatchError(f"No {what} manifest at {path}.", hint) from e
    except ValueError as e:
        raise ArtifactMismatchError(f"The {what} manifest {path} is not valid JSON ({e}).", hint) from e


def _require_files(folder: Path, names: list[str], hint: str) -> None:
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise ArtifactMismatchError(f"{folder} lacks {', '.join(missing)}.", hint)
