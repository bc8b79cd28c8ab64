"""The PyTorch engine behind the runtime's Runner interface: host arrays in and out, requests padded to the
engine's static shapes (engines/torch_static.py says why the shapes are static and how the calls are made).

A batch of B requests, S tokens long, runs as the smallest recorded batch size B_s >= B (filler rows repeat the
first request and are dropped) and the smallest prompt bucket S_b >= S (extra left padding, which the model
masks like any other). The decode steps of that batch reuse the batch size's cache buffers; the `CacheState`
handed back as `past` says where they are.

Shape legend: B batch, S prompt length, S_b prompt bucket, B_s batch size, N visual tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from calibrate.recipe import Recipe
from engines.torch_static import (
    COMPILE_CACHE_FILE,
    StaticShapes,
    StaticTorchEngine,
    check_torch_device,
    engine_recipe,
    load_compile_cache,
)
from exporter.graphs import VisionFeatures
from runtime.runner_api import PrefillOutput, RowLayout, VisionOutput
from runtime.torch_runner import engine_bundle, vision_features
from visprune.errors import PromptError
from visprune.manifests.engine_set import EngineManifest
from visprune.methods import METHODS
from visprune.models import LlavaBundle
from visprune.models.decoder import SDPA, Kernels
from visprune.tensor_names import pruning_layers

@dataclass(frozen=True)
class CacheState:
    """What a prefill hands to the decode steps of its batch: its batch size's buffers, the bucket, the padding it
    added, the rows asked for and the steps taken. `epoch` catches a later prefill that reused the buffers."""

    batch_size: int
    bucket: int
    extra_pad: int
    rows: int
    step: int
    epoch: int


class StaticTorchRunner:
    backend = "pytorch"

    def __init__(self, bundle: LlavaBundle, recipe: Recipe, image_start: int, device: str, shapes: StaticShapes,
                 compile: bool, cuda_graphs: bool, tf32: bool = False, kernels: Kernels = SDPA):
        check_torch_device(device)
        if device.startswith("cuda"):  # process-wide switches; cuDNN's is on by default (the vision tower's conv)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        model = bundle.model.to(device)
        self.bundle, self.device, self.dtype = bundle, device, model.dtype
        self.vision = VisionFeatures(model, cls_scores=METHODS[recipe.method].vision_score).eval()
        self.engine = StaticTorchEngine(model, recipe, image_start, device, shapes, compile, cuda_graphs, kernels)
        self.shapes, self.pruning_layers = shapes, pruning_layers(recipe.removed, recipe.removed_before_llm)
        self.session_facts = {"kernels": kernels.name, "torch_compile": compile,
                              "cuda_graphs": self.engine.cuda_graphs}
        self.epochs = dict.fromkeys(shapes.batch_sizes, 0)

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest) -> "StaticTorchRunner":
        """The engine folder's model and recipe at its recorded shapes; the compile cache saved at build makes the
        load-time compile a cache hit."""
        onnx_set = manifest.onnx_set
        bundle = engine_bundle(engine_dir, manifest)
        load_compile_cache(Path(engine_dir) / COMPILE_CACHE_FILE)
        static = manifest.static_shapes
        shapes = StaticShapes(tuple(static.prompt_buckets), tuple(static.batch_sizes), manifest.limits.max_new_tokens)
        return cls(bundle, engine_recipe(onnx_set), onnx_set.prompt.image_start, manifest.device, shapes,
                   bool(manifest.torch_compile), static.cuda_graphs, manifest.tf32)

    @torch.no_grad()
    def image_features(self, pixel_values: np.ndarray) -> VisionOutput:
        return vision_features(self.vision, pixel_values, self.device, self.dtype)

    @torch.no_grad()
    def prefill(self, inputs_embeds: np.ndarray, layout: RowLayout,
                image_scores: np.ndarray | None = None) -> PrefillOutput:
        rows, length, hidden = inputs_embeds.shape
        bucket, size = self.shapes.bucket(length), self.shapes.batch_size(rows)
        extra = bucket - length
        embeds = np.zeros((rows, bucket, hidden), dtype=inputs_embeds.dtype)
        embeds[:, extra:] = inputs_embeds
        scores = None if image_scores is None else self._tensor(_filled(image_scores, size), torch.float32)
        logits, kept = self.engine.prefill(size, bucket, self._tensor(_filled(embeds, size)),
                                           self._ints(_filled(layout.image_starts + extra, size)),
                                           self._ints(_filled(layout.pad_lengths + extra, size)), scores)
        self.epochs[size] += 1
        state = CacheState(size, bucket, extra, rows, 0, self.epochs[size])
        kept_by_layer = {layer: k[:rows].cpu().numpy() for layer, k in zip(self.pruning_layers, kept)}
        return PrefillOutput(logits[:rows].float().cpu().numpy(), state, kept_by_layer)

    @torch.no_grad()
    def decode(self, inputs_embeds: np.ndarray, positions: np.ndarray, layout: RowLayout,
               past: CacheState) -> tuple[np.ndarray, CacheState]:
        self._check_state(past)
        size = past.batch_size
        logits = self.engine.decode(size, self._tensor(_filled(inputs_embeds, size)),
                                    self._ints(_filled(np.asarray(positions)[:, None], size)),
                                    self._ints(_filled(layout.pad_lengths + past.extra_pad, size)),
                                    self._ints(np.array([past.bucket + past.step])))
        return logits[:past.rows].float().cpu().numpy(), replace(past, step=past.step + 1)

    def kv_bytes(self, past: CacheState) -> int:
        """The bytes of the cache buffers the batch runs in (allocated once, at full capacity)."""
        return self.engine.cache_bytes(past.batch_size)

    def _check_state(self, past: CacheState) -> None:
        if past.epoch != self.epochs[past.batch_size]:
            raise PromptError("This generation's cache was reused by a later prefill on the same engine.",
                              "Run one generation at a time per engine (Pipeline calls do), or open a second engine.")
        if past.step >= self.shapes.max_new_tokens - 1:
            raise PromptError(f"More than {self.shapes.max_new_tokens} new tokens were asked of an engine built for "
                              f"{self.shapes.max_new_tokens}.",
                              "Lower --max-new-tokens, or rebuild with a larger `visprune build --max-new-tokens`.")

    def _ints(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.int64), device=self.device)

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype or self.dtype)


def _filled(array: np.ndarray, size: int) -> np.ndarray:
    """`array` [B, ...] with rows B..size-1 repeating row 0 (filler rows whose outputs are dropped)."""
    array = np.asarray(array)
    return array if len(array) == size else np.concatenate([array, np.repeat(array[:1], size - len(array), 0)])
