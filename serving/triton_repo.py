"""A Triton Inference Server model repository for an engine folder, in the layout Triton reads:

    REPO/visprune-triton.json          the marker: what wrote the repository, for which engine (Triton skips files)
    REPO/<model>/config.pbtxt          Python backend, the tensors below, dynamic batching
    REPO/<model>/1/model.py            one line: serving.server's `TritonPythonModel` (Pipeline over the engine)
    REPO/<model>/engine/               the engine folder (`visprune export-triton`; `visprune serve` points at it)

`visprune export-triton` writes one for NVIDIA's tritonserver containers; `visprune serve` writes one into a
temporary folder and runs it on the tritonserver that nvidia-pytriton bundles (serving/server.py), so the
model that the tests serve is the model that is deployed.

The model's tensors. Every input has Triton's batch dimension first: a request of n rows asks n questions.

    input   image           BYTES  the encoded image file: PNG, JPEG, anything Pillow reads      required
    input   prompt          BYTES  UTF-8: a question, or a full prompt with exactly one <image>   required
    input   max_new_tokens  INT32  most tokens to generate                                       default 32
    input   temperature     FP32   0: greedy; above 0: sampled                                   default 0
    input   top_k           INT32  sample among the k most likely tokens (0: all)                default 0
    input   top_p           FP32   sample within this probability mass                           default 1
    input   seed            INT64  makes a sampled answer repeatable                             default none
    input   stop            BYTES  UTF-8: the answer ends before this text ("": none)            default none
    output  text            BYTES  UTF-8: the answer

Triton's config marks every input optional, so that a request without an image or prompt reaches the model
and gets visprune's own error with a Hint (Triton's would have none); the model enforces the required two.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visprune.artifacts import tool_versions
from visprune.errors import ConfigError
from visprune.manifests.schema_ids import TRITON_REPO as TRITON_REPO_SCHEMA
from visprune.outputs import ArtifactKind, check_output, replacing

SERVE_HINT = "Install the serving extra: pip install -e '.[serve]' (nvidia-pytriton, tritonclient; NumPy 1.x)."


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # model_config.proto's DataType
    numpy_type: str  # what tritonclient's InferInput.set_data_from_numpy wants for it


INPUTS = (TensorSpec("image", "TYPE_STRING", "object"), TensorSpec("prompt", "TYPE_STRING", "object"),
          TensorSpec("max_new_tokens", "TYPE_INT32", "int32"), TensorSpec("temperature", "TYPE_FP32", "float32"),
          TensorSpec("top_k", "TYPE_INT32", "int32"), TensorSpec("top_p", "TYPE_FP32", "float32"),
          TensorSpec("seed", "TYPE_INT64", "int64"), TensorSpec("stop", "TYPE_STRING", "object"))
REQUIRED_INPUTS = ("image", "prompt")
OUTPUT = TensorSpec("text", "TYPE_STRING", "object")
ENGINE_PARAMETER = "engine_dir"  # config.pbtxt parameter: the engine folder, relative to the model's folder
MARKER, SCHEMA = TRITON_REPO_SCHEMA.file, TRITON_REPO_SCHEMA.name
TRITON_REPO = ArtifactKind("Triton model repository", (TRITON_REPO_SCHEMA,), (MARKER, "*"), "visprune export-triton")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Triton's Python backend imports this file and takes its `TritonPythonModel`; the logic stays in the package.
MODEL_PY = '''"""Triton Python-backend model written by `visprune export-triton`: a visprune engine behind Triton.
Needs visprune installed in the Python that runs the backend (README: Serve)."""

from serving.server import TritonPythonModel  # noqa: F401  (Triton looks this name up)
'''


@dataclass(frozen=True)
class ModelSettings:
    """How Triton schedules the model: requests per batch (`max_batch`, also the most rows one request may
    carry), how long a request may wait for others to join its batch, whether to batch at all, and how many
    copies of the pipeline (processes) serve it."""

    name: str = "visprune"
    max_batch: int = 8
    max_queue_delay_us: int = 10_000
    dynamic_batching: bool = True
    instances: int = 1

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.name):
            raise ConfigError(f"Model name {self.name!r} is not one Triton accepts.",
                              "Use letters, digits, '.', '_' and '-', e.g. --model-name visprune.")
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--instances", self.instances, 1),
                                   ("--max-queue-delay-us", self.max_queue_delay_us, 0)):
            if value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}.", f"Pass e.g. {flag} {least + 1}.")


def config_text(settings: ModelSettings, engine: str) -> str:
    """config.pbtxt (model_config.proto's ModelConfig in protobuf text format): Python backend, the module doc's
    tensors, one CPU-kind instance group (the pipeline places itself on the device its engine was built for).
    Written by hand, so that writing a repository needs neither tritonclient nor protobuf (the tests parse it
    with tritonclient's compiled proto)."""
    lines = [f"name: {_quoted(settings.name)}", 'backend: "python"', f"max_batch_size: {settings.max_batch}"]
    for tensor in INPUTS:
        lines += _block("input", [f"name: {_quoted(tensor.name)}", f"data_type: {tensor.triton_type}", "dims: 1",
                                  "optional: true"])
    lines += _block("output", [f"name: {_quoted(OUTPUT.name)}", f"data_type: {OUTPUT.triton_type}", "dims: 1"])
    lines += _block("instance_group", [f"count: {settings.instances}", "kind: KIND_CPU"])
    if settings.dynamic_batching:
        lines += _block("dynamic_batching", [f"max_queue_delay_microseconds: {settings.max_queue_delay_us}"])
    lines += _block("parameters", [f"key: {_quoted(ENGINE_PARAMETER)}",
                                   *_block("value", [f"string_value: {_quoted(engine)}"])])
    return "\n".join(lines) + "\n"


def _block(name: str, fields: list[str]) -> list[str]:
    return [f"{name} {{", *(f"  {line}" for line in fields), "}"]


def _quoted(text: str) -> str:
    """A text-format string literal (UTF-8 left as it is; the escapes protobuf's parser reads)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def export_triton(engine_dir: Path, out: Path, settings: ModelSettings | None = None,
                  force: bool = False) -> Path:
    """Write a model repository at `out` with a copy of `engine_dir` inside (staged, then renamed into place);
    returns the model's folder. An existing `out` that is not such a repository is kept unless `force`."""
    from visprune.manifests.engine_set import read_engine_set

    settings = settings or ModelSettings()
    read_engine_set(Path(engine_dir))  # a missing or broken engine fails here, before anything is written
    check_output(Path(out), TRITON_REPO, inputs=[Path(engine_dir)], force=force or _is_our_repository(Path(out)))
    with replacing(Path(out)) as staging:
        write_repository(staging, Path(engine_dir), settings, copy_engine=True)
    return Path(out) / settings.name


def _is_our_repository(out: Path) -> bool:
    """A repository this command wrote that holds nothing else (no model added next to ours): replacing it loses
    nothing, so it needs no --force."""
    try:
        record = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return record.get("schema") == SCHEMA and {p.name for p in out.iterdir()} <= {MARKER, record.get("model")}


def write_repository(repo: Path, engine_dir: Path, settings: ModelSettings, copy_engine: bool) -> Path:
    """Fill the (new or empty) folder `repo`; `copy_engine` False: the config names `engine_dir` by its absolute
    path instead of holding a copy (serving an engine in place)."""
    model = repo / settings.name
    (model / "1").mkdir(parents=True)
    if copy_engine:
        shutil.copytree(engine_dir, model / "engine")
    engine = "engine" if copy_engine else str(Path(engine_dir).resolve())
    (model / "config.pbtxt").write_text(config_text(settings, engine))
    (model / "1" / "model.py").write_text(MODEL_PY)
    record = {"schema": SCHEMA, "model": settings.name, "engine": engine,
              "versions": tool_versions("nvidia-pytriton", "tritonclient")}
    (repo / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return model


def engine_dir_of(model_dir: Path, parameters: dict[str, Any]) -> Path:
    """The engine folder a model's config names (Triton's parameters as the Python backend passes them)."""
    return Path(model_dir) / parameters[ENGINE_PARAMETER]["string_value"]  # an absolute value replaces model_dir
