"""The PyTorch engine's compiled calls: the pruned model at static shapes, compiled before any request and
replayed as CUDA graphs (runtime/static_torch_runner.py adapts it to the runtime's Runner interface).

Eager PyTorch at batch 1 is launch-bound on a GPU: a pruned 7B prefill launches ~2600 kernels whose host cost
exceeds the GEMM time pruning saves. So the engine fixes every shape up front, like TensorRT's profiles:

- prompts are left-padded up to a *prompt bucket* and batches filled up to a *batch size*, both recorded in
  engine.json (`static_shapes`); padding is free for the model, which already takes left-padded rows;
- the per-layer pieces (attention half, cached attention, output projection and MLP, the selection) are
  `torch.compile`d once (regional compilation: the same compiled code serves every layer, pruned length and
  bucket; fullgraph, so no graph break and no host synchronisation inside), and each (bucket, batch size) prefill
  and each batch size's decode step is captured once as a CUDA graph at load, so a request copies its inputs into
  static buffers and replays one graph;
- decode writes each token's key and value in place into static per-layer buffers sized for that layer's
  pruned length (gpt-fast's pattern), so no step allocates or concatenates.

Why torch.compile with a saved cache rather than AOTInductor packages: an AOTInductor `.pt2` carries its weights,
so one package per stage and bucket would hold a 7B model's 13.5 GB several times over (or depend on sharing
constants between packages at load), and its C++ wrapper compile adds minutes per package at 7B. Here one
dynamic-shape compile of each piece serves every bucket (a 7B set builds in 76 s on an H200), CUDA-graph capture
fixes each bucket's shapes at load, and
torch.compile's portable cache, saved at build, turns the load-time compile into cache hits. Nothing compiles at
request time.

Shape legend: B_s batch size (static), S_b prompt bucket, N visual tokens, D hidden, V vocabulary, K kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from calibrate.recipe import Recipe
from exporter.pruned_lm import PrunedLlamaPrefill, Regions, StaticCacheDecodeStep
from visprune.errors import BackendUnavailableError, PromptError
from visprune.manifests.onnx_set import OnnxSetManifest
from visprune.methods import METHODS
from visprune.models.decoder import SDPA, Kernels

COMPILE_CACHE_FILE = "compile_cache.bin"


@dataclass(frozen=True)
class StaticShapes:
    """The shapes an engine runs at: padded prompt lengths, batch sizes, and the most tokens a request makes."""

    prompt_buckets: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    max_new_tokens: int

    def bucket(self, length: int) -> int:
        """The smallest bucket that holds a prompt of `length` tokens."""
        fitting = [b for b in self.prompt_buckets if b >= length]
        if not fitting:
            raise PromptError(f"The prompt has {length} tokens; this engine was built for at most "
                              f"{self.prompt_buckets[-1]}.",
                              "Shorten the prompt, or rebuild with a larger `visprune build --max-prompt-tokens`.")
        return fitting[0]

    def batch_size(self, rows: int) -> int:
        """The smallest batch size that holds `rows` requests."""
        fitting = [b for b in self.batch_sizes if b >= rows]
        if not fitting:
            raise PromptError(f"A batch of {rows} requests is more than the {self.batch_sizes[-1]} this engine takes.",
                              "Send smaller batches (Pipeline splits them), or rebuild with a larger --max-batch.")
        return fitting[0]


def engine_recipe(onnx_set: OnnxSetManifest) -> Recipe:
    """The recipe an ONNX set was exported with, from its manifest (all the pruned model needs)."""
    summary = onnx_set.recipe
    return Recipe(summary.method, summary.num_visual_tokens, list(summary.removed), seed=summary.seed,
                  removed_before_llm=summary.removed_before_llm, budget_policy=summary.budget_policy)


def default_buckets(shortest: int, longest: int) -> tuple[int, ...]:
    """Prompt buckets from the shortest prompt: +32, +64, +128, ... tokens of text, and `longest` itself. Text after
    the image is short in most requests, so the small buckets waste little; each bucket costs one CUDA graph per
    batch size."""
    buckets, room = [], 32
    while shortest - 1 + room < longest:
        buckets.append(shortest - 1 + room)
        room *= 2
    return (*buckets, longest)


def default_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch 1 (a single request: what latency is measured at) and the full batch a server fills."""
    return tuple(sorted({1, max_batch}))


def cache_shift(recipe: Recipe) -> list[int]:
    """Per layer, the visual tokens its cache lacks: pruned before the LLM or at an earlier layer (a layer's cache
    is taken before its own pruning)."""
    shift, total = [], recipe.removed_before_llm
    for removed in recipe.removed:
        shift.append(total)
        total += removed
    return shift


class GraphCall:
    """`fn` captured as a CUDA graph at fixed input buffers: a call copies its inputs in and replays the graph, one
    launch for a whole prefill or decode step. The outputs are the graph's own buffers, valid until the next
    replay of any graph of the engine (callers copy them out at once)."""

    def __init__(self, fn: Callable, example: list[torch.Tensor | None], pool: Any):
        self.inputs = [None if t is None else t.clone() for t in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiling, autotuning and the allocator's first pass stay out of capture
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor | None):
        for static, new in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(new)
        self.graph.replay()
        return self.outputs


class DirectCall:
    """The same call without a CUDA graph (CPU, or cuda_graphs off); a compiled one runs once when made, so that
    compilation happens at load and not at the first request."""

    def __init__(self, fn: Callable, example: list[torch.Tensor | None], warm: bool):
        self.fn = fn
        if warm:
            fn(*example)

    def __call__(self, *inputs):
        return self.fn(*inputs)


class StaticTorchEngine:
    """The pruned model's prefill and decode at `shapes` on `device`, as calls made (compiled, captured) up front.

    `prefill(size, bucket, embeds [B_s, S_b, D], image_starts [B_s], pad_lengths [B_s], image_scores [B_s, N] or
    None)` -> (logits [B_s, V], kept [B_s, K] per pruning point) and fills batch size `size`'s cache buffers;
    `decode(size, embeds [B_s, 1, D], position_ids [B_s, 1], pad_lengths [B_s], cache_position [1])` -> logits.
    One generation at a time per batch size: the buffers are the engine's."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, image_start: int, device: str, shapes: StaticShapes,
                 compile: bool, cuda_graphs: bool, kernels: Kernels = SDPA):
        check_torch_device(device)
        self.model, self.device, self.shapes, self.dtype = model, device, shapes, model.dtype
        self.compiled, self.cuda_graphs = compile, cuda_graphs and device.startswith("cuda")
        self.image_start, self.num_visual = image_start, recipe.num_visual_tokens
        self.vision_score = METHODS[recipe.method].vision_score
        self.prefill_module = PrunedLlamaPrefill(model, recipe, image_start, kernels).eval()
        self.decode_module = StaticCacheDecodeStep(model, cache_shift(recipe), kernels).eval()
        self.capacity = [shapes.prompt_buckets[-1] + shapes.max_new_tokens - s for s in cache_shift(recipe)]
        self.caches = {size: self._allocate_cache(size) for size in shapes.batch_sizes}
        self.calls = self._prepare_calls()

    def prefill(self, size: int, bucket: int, *inputs: torch.Tensor | None):
        return self.calls["prefill", bucket, size](*inputs)

    def decode(self, size: int, *inputs: torch.Tensor) -> torch.Tensor:
        return self.calls["decode", size](*inputs)

    def cache_bytes(self, size: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.caches[size])

    def _prepare_calls(self) -> dict[tuple, GraphCall | DirectCall]:
        """One prefill call per (bucket, batch size) and one decode call per batch size, compiled (and on CUDA
        captured) now."""
        # one memory pool for every graph: they never run at once, and each keeps its outputs referenced
        pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        make = partial(GraphCall, pool=pool) if self.cuda_graphs else partial(DirectCall, warm=self.compiled)
        if self.compiled:
            self.prefill_module.regions = self.decode_module.regions = compiled_regions()
        prefill, decode = self.prefill_module, self.decode_module
        calls: dict[tuple, Any] = {}
        with torch.no_grad():
            for size in self.shapes.batch_sizes:
                for bucket in self.shapes.prompt_buckets:
                    calls["prefill", bucket, size] = make(self._prefill_into(prefill, size),
                                                          self._prefill_example(size, bucket))
                calls["decode", size] = make(self._decode_into(decode, size), self._decode_example(size))
        return calls

    def _prefill_into(self, prefill: Callable, size: int) -> Callable:
        cache = self.caches[size]

        def run(embeds, image_starts, pad_lengths, scores):
            logits, presents, kept = prefill(embeds, image_starts, pad_lengths, scores)
            for buffer, present in zip(cache, presents):  # the prompt's keys and values into the static buffers
                buffer[:, :, :present.shape[2]].copy_(present)
            return logits, kept
        return run

    def _decode_into(self, decode: Callable, size: int) -> Callable:
        cache = self.caches[size]
        return lambda embeds, positions, pads, cache_position: decode(embeds, positions, pads, cache_position, cache)

    def _prefill_example(self, size: int, bucket: int) -> list[torch.Tensor | None]:
        hidden = self.model.config.text_config.hidden_size
        starts = torch.full((size,), self.image_start, dtype=torch.long, device=self.device)
        scores = torch.zeros(size, self.num_visual, device=self.device) if self.vision_score else None
        embeds = torch.zeros(size, bucket, hidden, dtype=self.dtype, device=self.device)
        return [embeds, starts, torch.zeros_like(starts), scores]

    def _decode_example(self, size: int) -> list[torch.Tensor]:
        hidden = self.model.config.text_config.hidden_size
        position = torch.full((size, 1), self.shapes.prompt_buckets[0], dtype=torch.long, device=self.device)
        return [torch.zeros(size, 1, hidden, dtype=self.dtype, device=self.device), position,
                torch.zeros(size, dtype=torch.long, device=self.device), position[0]]

    def _allocate_cache(self, size: int) -> list[torch.Tensor]:
        text = self.model.config.text_config
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return [torch.zeros(size, heads, capacity, head_dim, dtype=self.dtype, device=self.device)
                for capacity in self.capacity for _ in ("key", "value")]


def compiled_regions() -> Regions:
    """The prefill's and decode's per-layer pieces under torch.compile. fullgraph: a graph break would mean a host
    round trip inside, which a CUDA graph cannot hold; dynamic: one compile serves every layer's length, every
    bucket and every batch size above 1. The glue between pieces (row gathers) runs eagerly, inside the same
    CUDA graph."""
    configure_dynamo()
    compiled = partial(torch.compile, fullgraph=True, dynamic=True)
    return Regions(**{name: compiled(getattr(Regions, name)) for name in Regions.__dataclass_fields__})


def configure_dynamo() -> None:
    """Process-wide torch.compile settings the engine needs. specialize_float: under dynamic shapes dynamo would
    lift float attributes (RMSNorm's epsilon, attention's scaling) to host scalars read with .item() at every call;
    they are constants. cache_size_limit: a process that builds several engines (a benchmark) compiles the
    selection once per method and keep count."""
    torch._dynamo.config.specialize_float = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def check_torch_device(device: str) -> None:
    """BackendUnavailableError for a CUDA device where this PyTorch sees no GPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"Device {device} was asked for, but this PyTorch sees no CUDA GPU.",
                                      "Use --device cpu, or install PyTorch's CUDA build on a GPU host (README).")


def save_compile_cache(path: Path) -> bool:
    """Write what torch.compile compiled in this process (its portable cache artifacts) to `path`; False if none."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return False
    path.write_bytes(saved[0])
    return True


def load_compile_cache(path: Path) -> None:
    """Seed torch.compile's caches from a build's saved artifacts (a different torch or GPU only misses them)."""
    if path.is_file():
        torch.compiler.load_cache_artifacts(path.read_bytes())
