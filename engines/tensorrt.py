"""TensorRT engines from the ONNX set, through the TensorRT Python API (10.x and 11.x).

Kept thin on purpose: TensorRT cannot be installed on our CPU machines, so everything here follows the documented
API calls one to one (shared/reference/deploy_constraints.md §3.5-3.7) and everything that can be computed without
TensorRT (profiles, KV capacities, compatibility checks) lives in plain functions with CPU tests.

Precision comes from the ONNX graphs: TensorRT 11 networks are always strongly typed, and on TensorRT 10 we ask for
STRONGLY_TYPED, so a float16 export (with its float32 softmax and scoring islands) builds a float16 engine on both
and no builder precision flag (removed in 11) is used.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from engines.profiles import derive_profiles, kv_capacity
from visprune.artifacts import atomic_write_bytes, tool_versions
from visprune.errors import ArtifactMismatchError, BackendUnavailableError, EngineBuildError
from visprune.manifests import EngineManifest, OnnxSetManifest
from visprune.tensor_names import GRAPH_NAMES

INSTALL_HINT = ("On a host with an NVIDIA GPU: `pip install tensorrt` (TensorRT 10 or 11; see README 'GPU hosts'), "
                "or use --backend onnxruntime (any machine) or --backend pytorch.")


def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailableError saying how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(f"TensorRT is not installed in this Python environment ({e}).",
                                      INSTALL_HINT) from e
    return tensorrt


def gpu_identity(device_index: int = 0) -> dict[str, str]:
    """Name and compute capability of the CUDA GPU engines are built for and run on."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device_index)
            return {"name": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return _gpu_identity_from_nvidia_smi(device_index)


def _gpu_identity_from_nvidia_smi(device_index: int) -> dict[str, str]:
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", f"--id={device_index}", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
        result = subprocess.run(query, capture_output=True, text=True)
        if result.returncode == 0 and "," in result.stdout:
            name, capability = (part.strip() for part in result.stdout.strip().split(",", 1))
            return {"name": name, "compute_capability": capability}
    raise BackendUnavailableError("No CUDA GPU is visible on this machine.",
                                  "TensorRT engines are built and run on an NVIDIA GPU; use --backend onnxruntime here.")


def check_engine_compatible(manifest: EngineManifest, tensorrt_version: str, gpu: dict[str, str],
                            engine_dir: Any) -> None:
    """A TensorRT plan runs only under the TensorRT version and on the GPU model it was built with."""
    built, problems = manifest, []
    if built.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {built.tensorrt_version}, this machine has {tensorrt_version}")
    if built.gpu.compute_capability != gpu["compute_capability"] or built.gpu.name != gpu["name"]:
        problems.append(f"GPU {built.gpu.name} (compute capability {built.gpu.compute_capability}), "
                        f"this machine has {gpu['name']} ({gpu['compute_capability']})")
    if problems:
        raise ArtifactMismatchError(f"The TensorRT engine in {engine_dir} was built for {'; '.join(problems)}.",
                                    "Rebuild it on this machine: `visprune build --backend tensorrt --onnx "
                                    f"{built.upstream.get('onnx_dir', 'DIR')} --out DIR`.")


def build_tensorrt_plans(config, onnx_dir: Path, onnx_set: OnnxSetManifest, staging: Path,
                         tf32: bool = False) -> dict[str, Any]:
    """Write vision/prefill/decode.plan and timing.cache into `staging`; returns the manifest facts."""
    trt = import_tensorrt()
    gpu = gpu_identity()
    profiles = derive_profiles(onnx_set, config.max_prompt_tokens, config.max_new_tokens)
    logger = trt.Logger(trt.Logger.WARNING)
    cache = Path(config.timing_cache).read_bytes() if config.timing_cache and Path(config.timing_cache).exists() else b""
    for graph in GRAPH_NAMES:
        plan, cache = _build_plan(trt, logger, onnx_dir / f"{graph}.onnx", profiles[graph], config, cache, tf32)
        atomic_write_bytes(staging / f"{graph}.plan", plan)
    atomic_write_bytes(staging / "timing.cache", cache)
    if config.timing_cache:  # the shared cache grows with every build, so later builds skip the measured tactics
        atomic_write_bytes(Path(config.timing_cache), cache)
    return {
        "tensorrt_version": trt.__version__, "gpu": gpu, "precision": onnx_set.dtype, "strongly_typed": True,
        "limits": {"max_prompt_tokens": config.max_prompt_tokens, "max_new_tokens": config.max_new_tokens},
        "profiles": profiles, "kv_capacity": kv_capacity(onnx_set, config.max_prompt_tokens, config.max_new_tokens),
        "tools": tool_versions("tensorrt"),
    }


def network_flags(trt) -> int:
    """STRONGLY_TYPED where the flag exists (TensorRT 10; in 11 it is the only mode)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def _build_plan(trt, logger, onnx_path: Path, graph_profiles: dict[str, Any], config,
                timing_cache: bytes, tf32: bool = False) -> tuple[bytes, bytes]:
    """One serialized engine, and the timing cache after building it."""
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "\n".join(f"  - {parser.get_error(i)}" for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}",
                               "Run `visprune export` again (it lints for TensorRT); if it persists, report it "
                               "with this list and your TensorRT version.")
    build_config = builder.create_builder_config()
    build_config.builder_optimization_level = config.builder_optimization_level
    if not tf32:  # TensorRT enables TF32 by default; cleared, float32 layers compute in float32
        build_config.clear_flag(trt.BuilderFlag.TF32)
    if config.workspace_gib:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for name, shapes in graph_profiles.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    build_config.add_optimization_profile(profile)
    cache = build_config.create_timing_cache(timing_cache)
    build_config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, build_config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path.name} (see TensorRT's log above).",
            "Running out of GPU memory is the usual cause: free the GPU, lower --max-prompt-tokens / "
            "--max-new-tokens, or cap --workspace-gib. --verbose shows TensorRT's full log.")
    return bytes(plan), bytes(cache.serialize())
