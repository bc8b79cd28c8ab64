"""`build_engine`: from an ONNX set to an engine folder the runtime loads, for one of three backends.

- onnxruntime: ORT applies its graph optimizations once for the chosen device (CPU, or CUDA with onnxruntime-gpu)
  and the optimized graphs are saved; the session must really get the providers asked for.
- tensorrt: one serialized engine per graph with optimization profiles from `max_prompt_tokens` /
  `max_new_tokens` and a timing cache (engines/tensorrt.py).
- pytorch: no graphs; the folder records the model and recipe the runtime rebuilds the pruned model from, so the
  same pruned model runs in PyTorch (eager or torch.compile) on CPU or CUDA.

Every folder also holds the token embeddings and the processor (the runtime's host side), and `engine.json`:
the backend's facts, the hash of the upstream ONNX manifest and that manifest itself.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from engines.profiles import kv_capacity, prompt_length_range
from visprune.artifacts import sha256_file, tool_versions
from visprune.errors import ArtifactMismatchError, BackendUnavailableError, ConfigError
from visprune.backends import AUTO, BACKEND_CHOICES, TARGET_BACKENDS
from visprune.dtypes import torch_dtype
from visprune.manifests.common import digest_files, sealed, write_model
from visprune.manifests.engine_set import ENGINE_FILE, EngineManifest
from visprune.manifests.onnx_set import MANIFEST_FILE as ONNX_MANIFEST_FILE
from visprune.manifests.onnx_set import ANYRES_NEWLINE_FILE, OnnxSetManifest, read_onnx_set
from visprune.outputs import ENGINE_SET, check_output, replacing
from visprune.tensor_names import GRAPH_NAMES

DEFAULT_BACKEND = AUTO  # `build` and `pipeline` alike
DEVICES = ("cpu", "cuda")
# "extended" optimizations are portable across machines; "all" adds layout changes for this CPU only.
OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
HOST_FILES = ("embed_tokens.npy", "processor")
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of a graph and its weights above which the optimized graph's weights go
# to a side file (ONNX protobufs cap at 2 GB)
ORT_CUDA_HINT = ("For CUDA install onnxruntime-gpu instead of onnxruntime on a GPU host with CUDA 12 (README 'GPU "
                 "hosts'); if it is installed, its CUDA libraries did not load (see ONNX Runtime's log with "
                 "--verbose). Or build with --device cpu.")
# A set exported for onnxruntime uses opset-23 Attention. ORT 1.23 has only a CPU Attention-23 kernel (the session
# quietly runs it on the CPU) and 1.24's CUDA kernel throws on a bool mask ("Boolean attn_mask is not supported
# yet"); the CUDA kernel takes the masks our exports have written from 1.25 (onnxruntime PRs #27428, #27542).
ORT_CUDA_ATTENTION_MIN = (1, 25)
ORT_ATTENTION_HINT = ('`pip install "onnxruntime-gpu>=1.25"`, or export with `--target tensorrt` (no Attention op), '
                      "or build with --device cpu.")
# What ORT's CUDA provider runs on the CPU on purpose: shape arithmetic fed by Shape's host-side output stays on the
# host instead of crossing to the GPU and back (onnxruntime fallback_cpu_capability.cc, GetCpuPreferredNodes). Such
# a node is one of these ops with only index-typed outputs (ORT profile type names); a Reshape or Gather of float
# activations on the CPU is real work that left the GPU.
HOST_SIDE_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape", "Reshape", "Unsqueeze", "Squeeze",
                           "Concat", "Gather", "Slice", "Cast", "Range", "Add", "Sub", "Mul", "Div", "Equal", "Less",
                           "Greater", "Not", "Where", "Min", "Max", "Expand"})
INDEX_TYPES = frozenset({"int64", "int32", "bool"})


@dataclass(frozen=True)
class BuildConfig:
    """How to build an engine folder. TensorRT always runs on CUDA; `device` applies to the other backends."""

    VERSION = 4
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKEND_CHOICES, "device": DEVICES,
                                                     "optimization_level": tuple(OPT_LEVELS)}

    backend: str = DEFAULT_BACKEND
    device: str = "cpu"
    optimization_level: str = "extended"  # ONNX Runtime graph optimizations
    max_prompt_tokens: int = 1024  # TensorRT profiles: whole prompt, image tokens included
    max_new_tokens: int = 256
    max_batch: int = 8  # TensorRT profiles: requests per batch (ONNX Runtime and PyTorch take any batch)
    workspace_gib: float | None = None  # TensorRT workspace limit (None: TensorRT's default, the GPU's memory)
    builder_optimization_level: int = 3  # TensorRT 0-5
    timing_cache: Path | None = None  # a TensorRT timing cache file to start from (shared between builds)
    intra_op_threads: int = 0  # ONNX Runtime: threads per session; 0: one per core the loading process may use
    # ONNX Runtime: intra-op threads spin after a run. Off by default: each graph has its own session and pool, and
    # one session's spinning threads slowed the next one's run by ~25 ms on 2 cores (bench/results/engine_speed.md)
    spinning: bool = False
    # PyTorch backend (runtime/static_torch_runner.py): torch.compile the prefill and decode modules (None: on CUDA
    # only; inductor's CPU compile of a large model takes minutes), replay them as CUDA graphs, and the prompt
    # buckets (None: runtime.static_torch_runner.default_buckets up to max_prompt_tokens)
    torch_compile: bool | None = None
    cuda_graphs: bool = True
    prompt_buckets: tuple[int, ...] | None = None
    allow_tf32: bool = False  # CUDA: let float32 matmuls and convolutions round their inputs to TF32

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"Unknown backend {self.backend!r}.", f"Use one of: {', '.join(BACKEND_CHOICES)}.")
        if self.device not in DEVICES:
            raise ConfigError(f"Unknown device {self.device!r}.", f"Use one of: {', '.join(DEVICES)}.")
        if self.optimization_level not in OPT_LEVELS:
            raise ConfigError(f"Unknown optimization level {self.optimization_level!r}.",
                              f"Use one of: {', '.join(OPT_LEVELS)}.")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, not {self.max_batch}.", "Pass e.g. 8.")
        if self.intra_op_threads < 0:
            raise ConfigError(f"--intra-op-threads {self.intra_op_threads} is negative.",
                              "Use 0 (one per available core) or a positive count.")
        if self.prompt_buckets is not None and (not self.prompt_buckets or min(self.prompt_buckets) < 1):
            raise ConfigError(f"--prompt-buckets {self.prompt_buckets} must list positive prompt lengths.",
                              "Pass e.g. --prompt-buckets 640,704,1024 (the largest is --max-prompt-tokens).")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ConfigError(f"TensorRT builder optimization level {self.builder_optimization_level} is not in 0-5.",
                              "Use 3 (TensorRT's default) or 5 for the longest search.")

    def session_options(self) -> dict[str, Any]:
        """The ONNX Runtime serving choices an engine records (engine.json `session_options`)."""
        return {"intra_op_threads": self.intra_op_threads, "spinning": self.spinning}

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        fields["prompt_buckets"] = list(self.prompt_buckets) if self.prompt_buckets else None
        return {"version": self.VERSION, **fields}


def build_engine(config: BuildConfig, onnx_dir: Path, out_dir: Path, force: bool = False) -> EngineManifest:
    """Build an engine folder for `config.backend` from the ONNX set in `onnx_dir`; returns its manifest.

    `out_dir` is checked before any work (visprune/outputs.py; `force` replaces what is not an engine); the ONNX
    set's files are verified against its manifest; the engine is staged and swapped in when complete.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    check_output(out_dir, ENGINE_SET, inputs=[onnx_dir, config.timing_cache], force=force)
    onnx_set = read_onnx_set(onnx_dir, verify=True)
    if config.backend == AUTO:  # TensorRT only for a set written for it
        backend = auto_backend()
        config = replace(config, backend=backend if backend in TARGET_BACKENDS[onnx_set.target] else "onnxruntime")
    check_anyres_backend(onnx_set, config.backend)
    if config.backend in ("tensorrt", "pytorch"):  # bad limits before any work: re-exporting would not help either
        prompt_length_range(onnx_set, config.max_prompt_tokens, config.max_new_tokens)
    if config.backend == "tensorrt":
        from engines.tensorrt import import_tensorrt

        import_tensorrt()
    if config.backend == "pytorch":
        from engines.torch_static import check_torch_device

        check_torch_device(config.device)
    check_target(onnx_set, config.backend, onnx_dir)
    build_graphs = {"onnxruntime": _build_onnxruntime, "tensorrt": _build_tensorrt, "pytorch": _build_pytorch}
    with replacing(out_dir) as staging:
        backend_facts = build_graphs[config.backend](config, onnx_dir, onnx_set, staging)
        for name in HOST_FILES + ((ANYRES_NEWLINE_FILE,) if onnx_set.anyres else ()):
            (shutil.copytree if (onnx_dir / name).is_dir() else shutil.copy)(onnx_dir / name, staging / name)
        manifest = sealed(
            EngineManifest, backend=config.backend, **backend_facts,
            upstream={"onnx_dir": str(onnx_dir.resolve()),
                      "manifest_sha256": sha256_file(onnx_dir / ONNX_MANIFEST_FILE)},
            onnx_set=onnx_set, config=config.to_dict(), files=digest_files(staging, exclude=(ENGINE_FILE,)))
        write_model(staging / ENGINE_FILE, manifest)
    return manifest


def check_anyres_backend(onnx_set: OnnxSetManifest, backend: str) -> None:
    """LLaVA-NeXT sets (N per image, a dynamic dim) build for ONNX Runtime only so far: TensorRT needs N in its
    profiles and the static PyTorch engine a CUDA graph per N bucket, neither of which is written yet."""
    if onnx_set.anyres is not None and backend != "onnxruntime":
        raise ConfigError(f"This ONNX set is a LLaVA-NeXT one (N per image); the {backend} backend does not take "
                          "it yet.", "Build it with `visprune build --backend onnxruntime`.")


def check_target(onnx_set: OnnxSetManifest, backend: str, onnx_dir: Path) -> None:
    """ArtifactMismatchError unless `backend` runs the ops of the set's export target (visprune/backends.py)."""
    if backend not in TARGET_BACKENDS[onnx_set.target]:
        raise ArtifactMismatchError(
            f"{onnx_dir} was exported for {onnx_set.target} (opset-23 Attention, RMSNormalization and "
            f"RotaryEmbedding ops), which the {backend} backend does not build.",
            f"Export again with `visprune export ... --target {backend}`.")


def auto_backend() -> str:
    """TensorRT where it is installed and a GPU is visible, else ONNX Runtime."""
    from engines.tensorrt import gpu_identity, import_tensorrt

    try:
        import_tensorrt()
        gpu_identity()
    except BackendUnavailableError:
        return "onnxruntime"
    return "tensorrt"


def _build_onnxruntime(config: BuildConfig, onnx_dir: Path, onnx_set: OnnxSetManifest,
                       staging: Path) -> dict[str, Any]:
    import onnxruntime as ort

    providers = ORT_PROVIDERS[config.device]
    tf32 = uses_tf32(config.device, config.allow_tf32)
    if providers[0] not in ort.get_available_providers():
        raise BackendUnavailableError(f"This onnxruntime has no {providers[0]} (it offers "
                                      f"{ort.get_available_providers()}).", ORT_CUDA_HINT)
    check_ort_cuda_attention(onnx_set.target, config.device)
    for graph in GRAPH_NAMES:
        session = _optimize(onnx_dir / f"{graph}.onnx", staging / f"{graph}.onnx", config,
                            ort_providers(providers, tf32))
        check_session_providers(session, providers)
    return {"device": config.device, "providers": providers, "tf32": tf32, "onnxruntime_version": ort.__version__,
            "optimization_level": config.optimization_level, "session_options": config.session_options(),
            "tools": tool_versions("onnxruntime", "onnxruntime-gpu")}


def _build_tensorrt(config: BuildConfig, onnx_dir: Path, onnx_set: OnnxSetManifest, staging: Path) -> dict[str, Any]:
    from engines.tensorrt import build_tensorrt_plans

    tf32 = uses_tf32("cuda", config.allow_tf32) and onnx_set.dtype == "float32"
    return {"device": "cuda", "tf32": tf32, **build_tensorrt_plans(config, onnx_dir, onnx_set, staging, tf32)}


def _build_pytorch(config: BuildConfig, onnx_dir: Path, onnx_set: OnnxSetManifest, staging: Path) -> dict[str, Any]:
    """The static-shape PyTorch engine (engines/torch_static.py): its shapes recorded; when compiled, every call
    compiled (and captured) now as a load will, and torch.compile's cache saved beside engine.json, so a load
    compiles from that cache and a request never compiles."""
    import time

    from engines.torch_static import COMPILE_CACHE_FILE, save_compile_cache

    shapes = static_shapes(config, onnx_set)
    compile = config.device == "cuda" if config.torch_compile is None else config.torch_compile
    tf32 = uses_tf32(config.device, config.allow_tf32) and onnx_set.dtype == "float32"
    start = time.perf_counter()
    if compile:
        _compile_static_engine(onnx_set, config.device, shapes, config.cuda_graphs, tf32)
        save_compile_cache(staging / COMPILE_CACHE_FILE)
    return {"device": config.device, "torch_compile": compile, "tf32": tf32,
            "static_shapes": {"prompt_buckets": list(shapes.prompt_buckets), "batch_sizes": list(shapes.batch_sizes),
                              "cuda_graphs": config.cuda_graphs and config.device == "cuda"},
            "limits": {"max_prompt_tokens": shapes.prompt_buckets[-1], "max_new_tokens": config.max_new_tokens,
                       "max_batch": shapes.batch_sizes[-1]},
            "kv_capacity": kv_capacity(onnx_set, shapes.prompt_buckets[-1], config.max_new_tokens),
            "compile_seconds": round(time.perf_counter() - start, 2) if compile else None,
            "tools": tool_versions("torch", "transformers", "triton")}


def static_shapes(config: BuildConfig, onnx_set: OnnxSetManifest):
    """The buckets and batch sizes a PyTorch engine is built for; ConfigError for buckets outside the limits."""
    from engines.torch_static import StaticShapes, default_batch_sizes, default_buckets

    shortest, longest = prompt_length_range(onnx_set, config.max_prompt_tokens, config.max_new_tokens)
    buckets = tuple(sorted(set(config.prompt_buckets))) if config.prompt_buckets else default_buckets(shortest, longest)
    if buckets[0] < shortest or buckets[-1] > longest:
        raise ConfigError(f"--prompt-buckets {','.join(map(str, buckets))} must lie within {shortest} (the shortest "
                          f"prompt) and --max-prompt-tokens {longest}.",
                          f"Pass buckets between {shortest} and {longest}, or raise --max-prompt-tokens.")
    return StaticShapes(buckets, default_batch_sizes(config.max_batch), config.max_new_tokens)


def _compile_static_engine(onnx_set: OnnxSetManifest, device: str, shapes, cuda_graphs: bool, tf32: bool) -> None:
    """Load the model and make every call of the engine, as loading it will (this compiles and captures them)."""
    import torch

    from engines.torch_static import StaticTorchEngine, engine_recipe
    from visprune.models import load_llava
    from visprune.models.llava import EMBEDDED_MODELS

    model = onnx_set.model.name if onnx_set.model.name in EMBEDDED_MODELS else onnx_set.model.path
    bundle = load_llava(model, device=device, dtype=torch_dtype(onnx_set.dtype))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    StaticTorchEngine(bundle.model, engine_recipe(onnx_set), onnx_set.prompt.image_start, device, shapes,
                      compile=True, cuda_graphs=cuda_graphs)


def _optimize(source: Path, target: Path, config: BuildConfig, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[config.optimization_level])
    options.optimized_model_filepath = str(target)
    if graph_bytes(source) > EXTERNAL_DATA_ABOVE:  # a protobuf caps at 2 GB: weights go to `<graph>.onnx.data`
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{target.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return open_ort_session(source, providers, options,
                            hint="The file is corrupt or truncated; export the set again with `visprune export`.")


def serving_session_options(recorded: dict[str, Any] | None) -> dict[str, Any]:
    """An engine's recorded ONNX Runtime choices resolved for this process (None: an engine from before they were
    recorded gets today's defaults). 0 threads becomes one per core this process may use: ORT's own default
    counts the machine's physical cores, not those a container or `taskset` leaves it."""
    import os

    chosen = recorded or BuildConfig().session_options()
    return {**chosen, "intra_op_threads": chosen["intra_op_threads"] or len(os.sched_getaffinity(0))}


def ort_session_options(chosen: dict[str, Any]):
    """ORT SessionOptions carrying resolved serving choices (`serving_session_options`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = chosen["intra_op_threads"]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if chosen["spinning"] else "0")
    return options


def graph_bytes(path: Path) -> int:
    """A graph's size with its external data (`<name>.data` or `<name>.onnx.data` beside it, as exporters write)."""
    siblings = (path.with_name(path.name + ".data"), path.with_suffix(".data"))
    return path.stat().st_size + sum(p.stat().st_size for p in set(siblings) if p.is_file())


def uses_tf32(device: str, allowed: bool) -> bool:
    """TF32 only where asked for: ONNX Runtime's CUDA provider, TensorRT and cuDNN turn it on by default, and an
    fp32 engine must compute what its fp32 reference computes unless the user accepts the difference."""
    return allowed and device.startswith("cuda")


def ort_providers(names: list[str], tf32: bool) -> list:
    """The session's providers, CUDA with TF32 set explicitly (its default is on)."""
    return [(name, {"use_tf32": str(int(tf32))}) if name == "CUDAExecutionProvider" else name for name in names]


def check_session_providers(session, requested: list[str]) -> None:
    """onnxruntime-gpu silently falls back to CPU when CUDA cannot load; an engine must get what it asked for."""
    import onnxruntime as ort

    got = session.get_providers()
    if got[0] != requested[0]:
        available = ort.get_available_providers()
        raise BackendUnavailableError(
            f"ONNX Runtime gave the session {got}, not {requested[0]} (this onnxruntime offers {available}).",
            ORT_CUDA_HINT)


def check_ort_cuda_attention(target: str, device: str, version: str | None = None) -> None:
    """BackendUnavailableError unless this ONNX Runtime (`version`: onnxruntime's own when None) runs a set of
    `target` on `device`: opset-23 Attention (target onnxruntime) on CUDA needs ORT >= 1.25 (ORT_CUDA_ATTENTION_MIN).
    Build and open both call it, so an engine built elsewhere is refused where it would run on the CPU."""
    if device != "cuda" or target != "onnxruntime":
        return
    if version is None:
        import onnxruntime as ort

        version = ort.__version__
    if _release(version) < ORT_CUDA_ATTENTION_MIN:
        raise BackendUnavailableError(
            f"onnxruntime {version} cannot run this set's opset-23 Attention on CUDA: it needs "
            f"{'.'.join(map(str, ORT_CUDA_ATTENTION_MIN))} or later (1.23 runs Attention on the CPU, 1.24's CUDA "
            "kernel rejects a bool mask).",
            ORT_ATTENTION_HINT)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "1.25.0", "1.25.0.dev20260301" or "1.24.2+cu128"; (0, 0) when
    it has none (treated as too old)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


@dataclass(frozen=True)
class PlacedNode:
    """A node of one ORT session run and what its outputs were (ORT profile type names: "float", "int64", ...)."""

    name: str
    op_type: str
    output_types: tuple[str, ...]


def node_placement(model_path: Path, providers: list, feeds: dict[str, Any]) -> dict[str, list[PlacedNode]]:
    """Provider -> the nodes it ran, from one profiled run of a session on `model_path` with `providers` (as
    InferenceSession takes them) and `feeds`. `get_providers()` only says which providers a session has; ORT
    places each node itself and can put a node it has no CUDA kernel for on the CPU without a word. Profiling
    must be on when the session is created, so this opens its own; the profile file is removed."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="visprune-placement-") as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = open_ort_session(Path(model_path), providers, options)
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    placement: dict[str, list[PlacedNode]] = {}
    for event in events:  # one "<node>_kernel_time" event per node run carries its provider (fences carry none)
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            types = tuple(t for shape in args.get("output_type_shape", []) for t in shape)
            node = PlacedNode(event["name"].removesuffix("_kernel_time"), args.get("op_name", ""), types)
            placement.setdefault(args["provider"], []).append(node)
    return placement


def check_node_placement(placement: dict[str, list[PlacedNode]], device: str) -> None:
    """BackendUnavailableError when a CUDA session ran real work on the CPU: any CPU node but ORT's own host-side
    shape arithmetic (HOST_SIDE_OPS with index-typed outputs). CPU sessions pass."""
    if device != "cuda":
        return
    moved = [node for node in placement.get("CPUExecutionProvider", []) if not _host_side(node)]
    if moved:
        ops = ", ".join(sorted({node.op_type for node in moved}))
        names = ", ".join(node.name for node in moved[:5]) + (", ..." if len(moved) > 5 else "")
        raise BackendUnavailableError(
            f"ONNX Runtime ran {len(moved)} nodes of a CUDA session on the CPU ({ops}: {names}), usually ops "
            "this onnxruntime has no CUDA kernel for.", f"A newer ONNX Runtime has more CUDA kernels: {ORT_ATTENTION_HINT}")


def _host_side(node: PlacedNode) -> bool:
    return node.op_type in HOST_SIDE_OPS and bool(node.output_types) and set(node.output_types) <= INDEX_TYPES


def open_ort_session(path: Path, providers: list[str], options=None, hint: str = ""):
    """An ONNX Runtime session for `path`, with ORT's load failures turned into ArtifactMismatchError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for corrupt or invalid models
        raise ArtifactMismatchError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}", hint) from e
