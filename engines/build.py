"""`build_engine`: from an ONNX set to an engine folder the runtime loads.

For ONNX Runtime a build is: check the ONNX set's manifest, let ORT apply its graph optimizations once and save
the optimized models, copy the embeddings and processor, and write an engine manifest that records the
providers, the ORT version, the optimization level and the hash of the upstream manifest.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visprune.artifacts import (
    ENGINE_SET_SCHEMA,
    GRAPH_NAMES,
    GRAPH_SET_FILES,
    ONNX_SET_SCHEMA,
    atomic_directory,
    atomic_write_json,
    read_manifest,
    sha256_file,
    tool_versions,
)
from visprune.errors import ArtifactMismatchError, ConfigError

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
        for graph in GRAPH_NAMES:
            _optimize(onnx_dir / f"{graph}.onnx", staging / f"{graph}.onnx", config)
        shutil.copy(onnx_dir / "embed_tokens.npy", staging / "embed_tokens.npy")
        shutil.copytree(onnx_dir / "processor", staging / "processor")
        manifest = {
            "schema": ENGINE_SET_SCHEMA[0], "schema_version": ENGINE_SET_SCHEMA[1],
            "backend": config.backend, "providers": list(config.providers),
            "onnxruntime_version": ort.__version__, "optimization_level": config.optimization_level,
            "upstream": {"onnx_dir": str(onnx_dir.resolve()), "manifest_sha256": sha256_file(onnx_dir / "manifest.json")},
            "onnx_set": onnx_manifest, "config": {"version": config.VERSION, **asdict(config)},
            "tools": tool_versions("onnxruntime"),
        }
        atomic_write_json(staging / "engine.json", manifest)
    return manifest


def read_onnx_set_manifest(onnx_dir: Path) -> dict[str, Any]:
    return read_manifest(onnx_dir, "manifest.json", ONNX_SET_SCHEMA, GRAPH_SET_FILES, "ONNX set",
                         "Export it again with `visprune export ...`.")


def load_engine_manifest(engine_dir: Path) -> dict[str, Any]:
    return read_manifest(engine_dir, "engine.json", ENGINE_SET_SCHEMA, GRAPH_SET_FILES, "engine",
                         "Build it again with `visprune build --onnx DIR --out DIR`.")


def _optimize(source: Path, target: Path, config: BuildConfig) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[config.optimization_level])
    options.optimized_model_filepath = str(target)
    open_ort_session(source, list(config.providers), options,
                     hint="The file is corrupt or truncated; export the set again with `visprune export`.")


def open_ort_session(path: Path, providers: list[str], options=None, hint: str = ""):
    """An ONNX Runtime session for `path`, with ORT's load failures turned into ArtifactMismatchError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for corrupt or invalid models
        raise ArtifactMismatchError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}", hint) from e
