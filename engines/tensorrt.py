"""TensorRT engines from the ONNX set (TensorRT 10.x and 11.x), built through Polygraphy's TensorRT loaders.

Kept thin on purpose: TensorRT cannot be installed on our CPU machines, so the build is Polygraphy's
(`NetworkFromOnnxPath`, `CreateConfig` with one `Profile`, `EngineBytesFromNetwork`), which tracks TensorRT's API
across versions, and everything that can be computed without TensorRT (profiles, KV capacities, compatibility
checks) lives in plain functions with CPU tests.

Precision comes from the ONNX graphs: TensorRT 11 networks are always strongly typed, and on TensorRT 10 we ask for
STRONGLY_TYPED (11.x still has the flag, deprecated and ignored, so it is asked for there too), so a float16 export
(with its float32 softmax and scoring islands) builds a float16 engine on both and no builder precision flag
(removed in 11) is used. TF32 stays off unless `build --allow-tf32`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engines.profiles import derive_profiles, kv_capacity
from visprune.artifacts import atomic_write_bytes, tool_versions
from visprune.errors import ArtifactMismatchError, BackendUnavailableError, EngineBuildError
from visprune.manifests.engine_set import EngineManifest
from visprune.manifests.onnx_set import OnnxSetManifest
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
    profiles = derive_profiles(onnx_set, config.max_prompt_tokens, config.max_new_tokens, config.max_batch)
    cache = staging / "timing.cache"
    if config.timing_cache and Path(config.timing_cache).exists():
        shutil.copy(config.timing_cache, cache)
    for graph in GRAPH_NAMES:  # each build starts from the cache the previous one grew
        plan = _build_plan(trt, onnx_dir / f"{graph}.onnx", profiles[graph], config, cache, tf32)
        atomic_write_bytes(staging / f"{graph}.plan", plan)
    if config.timing_cache:  # the shared cache grows with every build, so later builds skip the measured tactics
        atomic_write_bytes(Path(config.timing_cache), cache.read_bytes())
    return {
        "tensorrt_version": trt.__version__, "gpu": gpu, "precision": onnx_set.dtype, "strongly_typed": True,
        "limits": {"max_prompt_tokens": config.max_prompt_tokens, "max_new_tokens": config.max_new_tokens,
                   "max_batch": config.max_batch},
        "profiles": profiles, "kv_capacity": kv_capacity(onnx_set, config.max_prompt_tokens, config.max_new_tokens),
        "tools": tool_versions("tensorrt", "polygraphy"),
    }


def polygraphy_profile(graph_profiles: dict[str, Any]):
    """Polygraphy's optimization profile for one graph's {input: {"min", "opt", "max"}} (engines/profiles.py)."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, shapes in graph_profiles.items():
        profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    return profile


def _build_plan(trt, onnx_path: Path, graph_profiles: dict[str, Any], config, timing_cache: Path,
                tf32: bool) -> bytes:
    """One serialized engine through Polygraphy's loaders: the ONNX parser on a strongly typed network (TensorRT
    11's only mode, asked for on 10), one optimization profile, TF32 only if allowed, the timing cache loaded from
    and saved to `timing_cache`."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    profile = polygraphy_profile(graph_profiles)
    limits = {trt.MemoryPoolType.WORKSPACE: int(config.workspace_gib * 2**30)} if config.workspace_gib else None
    build_config = CreateConfig(profiles=[profile], tf32=tf32, memory_pool_limits=limits,
                                builder_optimization_level=config.builder_optimization_level,
                                load_timing_cache=str(timing_cache) if timing_cache.exists() else None)
    # True on 10 and on 11.x (which keeps the flag, deprecated and ignored: its networks are always strongly
    # typed); a TensorRT that drops the flag is strongly typed anyway
    typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed)  # resolves external data beside the file
    try:
        with polygraphy_errors() as errors:
            return bytes(EngineBytesFromNetwork(network, config=build_config, save_timing_cache=str(timing_cache))())
    except PolygraphyException as e:
        details = "".join(f"\n  {line}" for line in errors[:MAX_REPORTED_ERRORS])
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path.name}: {str(e).strip().splitlines()[-1]}{details}",
            "A parser error: run `visprune export` again (it lints for TensorRT) and report it if it persists. "
            "Out of GPU memory: free the GPU, lower --max-prompt-tokens / --max-new-tokens, or cap --workspace-gib. "
            "--verbose shows TensorRT's log.") from e


MAX_REPORTED_ERRORS = 10


@contextmanager
def polygraphy_errors():
    """The ERROR messages Polygraphy logs while the block runs, in a list filled when it ends. Its ONNX loader logs
    each per-node parser error and then raises only "Could not parse ONNX correctly"; its log file is the one hook
    it offers. A log file the user set is left alone (the list stays empty)."""
    from polygraphy.logger import G_LOGGER

    errors: list[str] = []
    if G_LOGGER.log_file:
        yield errors
        return
    with tempfile.TemporaryDirectory(prefix="visprune-polygraphy-") as folder:
        log = Path(folder) / "polygraphy.log"
        G_LOGGER.log_file = str(log)
        try:
            yield errors
        finally:
            G_LOGGER.log_file = None
            errors += _error_messages(log.read_text() if log.exists() else "")


def _error_messages(log: str) -> list[str]:
    """The "[E] ..." messages of a Polygraphy log, a multi-line one joined (its further lines are indented)."""
    messages: list[str] = []
    in_error = False
    for line in log.splitlines():
        if line.startswith("[E] "):
            messages.append(line[4:].strip())
            in_error = True
        elif in_error and line.startswith(" ") and messages:
            messages[-1] += " " + line.strip()
        else:
            in_error = False
    return messages
