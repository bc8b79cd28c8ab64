"""The pruned model in PyTorch, eager or `torch.compile`d, on CPU or CUDA.

It is the parity reference and the GPU path that runs wherever PyTorch does. It runs the very modules the
exporter traces (exporter/pruned_lm.py), so its semantics are the engines' semantics by construction.

Shape legend: B batch, S prompt length (left-padded), N visual tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from calibrate.recipe import Recipe, check_recipe_fits, unpruned_recipe
from engines.torch_static import engine_recipe
from exporter.graphs import VisionFeatures
from exporter.pruned_lm import LlamaDecodeStep, PrunedLlamaPrefill
from runtime.runner_api import PrefillOutput, RowLayout, VisionOutput
from visprune.dtypes import torch_dtype
from visprune.errors import ArtifactMismatchError, BackendUnavailableError
from visprune.manifests.engine_set import EngineManifest
from visprune.models import LlavaBundle, load_llava
from visprune.methods import METHODS
from visprune.models.decoder import EAGER, SDPA, Kernels
from visprune.models.llava import EMBEDDED_MODELS
from visprune.tensor_names import pruning_layers



def engine_bundle(engine_dir: Path, manifest: EngineManifest) -> LlavaBundle:
    """The checkpoint an engine folder was exported from, at its dtype; ArtifactMismatchError if it changed since."""
    onnx_set = manifest.onnx_set
    model = onnx_set.model.name if onnx_set.model.name in EMBEDDED_MODELS else onnx_set.model.path
    bundle = load_llava(model, device="cpu", dtype=torch_dtype(onnx_set.dtype))
    if bundle.fingerprint != onnx_set.model.fingerprint:
        raise ArtifactMismatchError(f"The checkpoint at {model} no longer matches the one {engine_dir} was built "
                                    "from.", "Export and build again from the checkpoint you have now.")
    return bundle


def vision_features(vision, pixel_values: np.ndarray, device: str, dtype: torch.dtype) -> VisionOutput:
    """The vision module's features (and VisionZip's score) for host pixel values, back on the host."""
    out = vision(torch.from_numpy(pixel_values).to(device, dtype))
    features, scores = out if isinstance(out, tuple) else (out, None)
    return VisionOutput(features.float().cpu().numpy(), None if scores is None else scores.cpu().numpy())


class TorchRunner:
    backend = "pytorch"

    def __init__(self, bundle: LlavaBundle, recipe: Recipe, image_start: int, device: str = "cpu",
                 compile: bool = False, tf32: bool = False, kernels: Kernels = EAGER):
        """`kernels`: EAGER (Hugging Face's eager math: the reference parity and accuracy compare against) or SDPA
        (fused attention wherever a layer needs no probabilities: flash / memory-efficient on CUDA; engines)."""
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"Device {device} was asked for, but this PyTorch sees no CUDA GPU.",
                                          "Use device cpu, or install PyTorch's CUDA build on a GPU host (README).")
        if device.startswith("cuda"):  # process-wide switches; cuDNN's is on by default (the vision tower's conv)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        self.bundle, self.device, self.compiled = bundle, device, compile
        model = bundle.model.to(device)
        self.dtype = model.dtype
        self.vision = VisionFeatures(model, cls_scores=METHODS[recipe.method].vision_score).eval()
        prefill = PrunedLlamaPrefill(model, recipe, image_start, kernels).eval()
        decode = LlamaDecodeStep(model, kernels).eval()
        self.session_facts = {"kernels": kernels.name, "torch_threads": torch.get_num_threads()}
        # dynamic=True: one graph for every prompt length and KV length instead of a recompile per shape
        self.prefill_model = prefill
        self.prefill_module = torch.compile(prefill, dynamic=True) if compile else prefill
        self.decode_module = torch.compile(decode, dynamic=True) if compile else decode
        self.image_start, self.num_visual = image_start, recipe.num_visual_tokens
        self.pruning_layers = pruning_layers(recipe.removed, recipe.removed_before_llm)

    @classmethod
    def from_model(cls, model: str, recipe: Recipe | None = None, image_start: int | None = None,
                   device: str = "cpu", dtype: str = "float32", compile: bool = False) -> "TorchRunner":
        """Load `model` ('tiny' or a checkpoint folder) and prune it as `recipe` says (None: unpruned)."""
        from exporter.export import template_image_start

        bundle = load_llava(model, device="cpu", dtype=torch_dtype(dtype))
        if recipe is not None:
            check_recipe_fits(recipe, bundle.shape, bundle.fingerprint)
        image_start = template_image_start(bundle) if image_start is None else image_start
        return cls(bundle, recipe or unpruned_recipe(bundle.shape), image_start, device, compile)

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest) -> "TorchRunner":
        onnx_set = manifest.onnx_set
        return cls(engine_bundle(engine_dir, manifest), engine_recipe(onnx_set), onnx_set.prompt.image_start,
                   manifest.device, bool(manifest.torch_compile), manifest.tf32, SDPA)

    @torch.no_grad()
    def image_features(self, pixel_values: np.ndarray) -> VisionOutput:
        return vision_features(self.vision, pixel_values, self.device, self.dtype)

    @torch.no_grad()
    def prefill(self, inputs_embeds: np.ndarray, layout: RowLayout,
                image_scores: np.ndarray | None = None) -> PrefillOutput:
        scores = None if image_scores is None else torch.from_numpy(image_scores).to(self.device, torch.float32)
        seen = self.prefill_model.scores_seen = [] if not self.compiled else None
        mask = None if layout.visual_mask is None else self._ints(layout.visual_mask)
        logits, presents, kept = self.prefill_module(self._tensor(inputs_embeds), self._ints(layout.image_starts),
                                                     self._ints(layout.pad_lengths), scores, mask)
        kept_by_layer = {layer: k.cpu().numpy() for layer, k in zip(self.pruning_layers, kept)}
        num_visual = self.num_visual if mask is None else mask.shape[1]
        return PrefillOutput(logits.float().cpu().numpy(), presents, kept_by_layer,
                             self._scores_by_layer(seen, num_visual) if seen else None)

    def _scores_by_layer(self, seen: list, num_visual: int) -> dict[int, np.ndarray] | None:
        """Each pruning point's selection scores per image index [B, N] (NaN: not present there), or None where
        a selection is not score-based (DART, DivPrune: greedy)."""
        if len(seen) != len(self.pruning_layers):
            return None
        out = {}
        for layer, (ids, scores) in zip(self.pruning_layers, seen):
            full = torch.full((ids.shape[0], num_visual), float("nan"), device=scores.device)
            out[layer] = full.scatter(1, ids, scores).cpu().numpy()
        return out

    @torch.no_grad()
    def decode(self, inputs_embeds: np.ndarray, positions: np.ndarray, layout: RowLayout,
               past: list[torch.Tensor]):
        logits, presents = self.decode_module(self._tensor(inputs_embeds), self._ints(positions)[:, None],
                                              self._ints(layout.pad_lengths), past)
        return logits.float().cpu().numpy(), presents

    def kv_bytes(self, past: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in past)

    def _ints(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.int64), device=self.device)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)
