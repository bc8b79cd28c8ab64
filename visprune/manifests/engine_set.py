"""The engine folder's manifest (`engine.json`, written by `visprune build`), its schema and its one reader.

It records the backend's facts, the hash of the upstream ONNX manifest and that manifest itself (sealed too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from visprune.backends import BACKENDS
from visprune.errors import ArtifactMismatchError
from visprune.manifests import schema_ids
from visprune.manifests.common import (
    check_artifact_kind,
    FileDigest,
    PosInt,
    RelativeFile,
    Sha256,
    Strict,
    check_files,
    model_dump,
    read_sealed,
    seal,
)
from visprune.manifests.onnx_set import OnnxSetManifest

SCHEMA = schema_ids.ENGINE_SET
ENGINE_FILE = SCHEMA.file
ENGINE_HINT = "Build it again with `visprune build --onnx DIR --out DIR`."


class GpuIdentity(Strict):
    name: str
    compute_capability: str


class Limits(Strict):
    max_prompt_tokens: PosInt
    max_new_tokens: PosInt
    max_batch: PosInt = 1


class StaticShapesRecord(Strict):
    """The PyTorch engine's fixed shapes (runtime/static_torch_runner.py): prompts padded to a bucket, batches
    filled to a size; one compiled, CUDA-graph-captured prefill per (bucket, size) and one decode per size."""

    prompt_buckets: Annotated[list[PosInt], Field(min_length=1)]
    batch_sizes: Annotated[list[PosInt], Field(min_length=1)]
    cuda_graphs: bool

    @model_validator(mode="after")
    def _ascending(self) -> "StaticShapesRecord":
        for name in ("prompt_buckets", "batch_sizes"):
            values = getattr(self, name)
            if values != sorted(set(values)):
                raise ValueError(f"{name} must be strictly ascending")
        return self


class EngineManifest(Strict):
    schema_: Literal[SCHEMA.name] = Field(SCHEMA.name, alias="schema")
    schema_version: Literal[SCHEMA.version] = SCHEMA.version
    backend: Literal[BACKENDS]
    device: Literal["cpu", "cuda"]
    upstream: dict[str, str]  # onnx_dir, manifest_sha256
    onnx_set: OnnxSetManifest
    config: dict[str, Any]
    tools: dict[str, str]
    files: dict[RelativeFile, FileDigest]
    manifest_sha256: Sha256
    tf32: bool  # float32 matmuls and convolutions may run in TF32 (CUDA, only when built with --allow-tf32)
    # onnxruntime
    providers: list[str] | None = None
    onnxruntime_version: str | None = None
    optimization_level: str | None = None
    session_options: dict[str, Any] | None = None  # intra_op_threads (0: one per core the process may use), spinning
    # tensorrt
    tensorrt_version: str | None = None
    gpu: GpuIdentity | None = None
    precision: str | None = None
    strongly_typed: bool | None = None
    limits: Limits | None = None
    profiles: dict[str, Any] | None = None
    kv_capacity: list[PosInt] | None = None
    # pytorch
    torch_compile: bool | None = None
    static_shapes: StaticShapesRecord | None = None
    compile_seconds: float | None = None

    @model_validator(mode="after")
    def _backend_facts_present(self) -> "EngineManifest":
        needed = {"onnxruntime": ("providers", "onnxruntime_version"),
                  "tensorrt": ("tensorrt_version", "gpu", "limits", "profiles", "kv_capacity"),
                  "pytorch": ("torch_compile", "static_shapes", "limits", "kv_capacity")}[self.backend]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.backend} engine needs {', '.join(missing)}")
        if self.kv_capacity is not None and len(self.kv_capacity) != self.onnx_set.num_layers:
            raise ValueError("kv_capacity needs one length per layer")
        if self.providers is not None and not self.providers:
            raise ValueError("providers is empty")
        if self.static_shapes and (self.static_shapes.prompt_buckets[-1] != self.limits.max_prompt_tokens or
                                   self.static_shapes.batch_sizes[-1] != self.limits.max_batch):
            raise ValueError("static_shapes' largest bucket and batch size must be the limits")
        return self



def read_engine_set(engine_dir: Path, verify: bool = False) -> EngineManifest:
    """The engine's manifest after checking its schema, seal, fields, the embedded ONNX-set manifest's seal, and
    its files (sizes at every load; hashes at the first load of these files or with `verify`)."""
    from visprune.outputs import ENGINE_SET

    check_artifact_kind(engine_dir, ENGINE_SET, ENGINE_HINT)
    manifest = read_sealed(EngineManifest, engine_dir, SCHEMA, "engine", ENGINE_HINT)
    if manifest.onnx_set.manifest_sha256 != seal(model_dump(manifest.onnx_set))["manifest_sha256"]:
        raise ArtifactMismatchError(f"The ONNX-set manifest inside {Path(engine_dir) / ENGINE_FILE} was edited.",
                                    f"Do not edit manifests; {ENGINE_HINT[0].lower()}{ENGINE_HINT[1:]}")
    check_files(engine_dir, manifest.files, manifest.manifest_sha256, "engine", ENGINE_HINT, verify)
    return manifest
