"""Tracing the three graphs to ONNX with the dynamo exporter: vision, pruned prefill, decode.

Dynamic dims get example sizes of at least 2 (torch.export specialises 0 and 1) and no derived expressions
are declared: each KV stage of the decode graph has its own independent length dim, `past_len_s{stage}`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from calibrate.recipe import Recipe
from exporter.pruned_lm import LlamaDecodeStep, PrunedLlamaPrefill
from visprune.manifests.onnx_set import kv_stages_of, recipe_io_names
from visprune.methods import METHODS
from visprune.models.decoder import EAGER, ONNX_OPS, SDPA, Kernels
from visprune.models.llava import LanguageModelShape
from visprune.tensor_names import (
    BATCH_DIM,
    IMAGE_SCORES,
    IMAGE_STARTS,
    INPUTS_EMBEDS,
    PAD_LENGTHS,
    PIXEL_VALUES,
    POSITION_IDS,
    SEQ_DIM,
    VISUAL_DIM,
    VISUAL_MASK,
    past_len_dim,
)

KERNELS = {"onnxruntime": ONNX_OPS, "tensorrt": SDPA}  # by export target (exporter/config.py TARGETS)
EXAMPLE_BATCH = 2
EXAMPLE_TEXT = 12  # text tokens after the image in the example prompt, fewer if --max-seq leaves less room


class VisionFeatures(nn.Module):
    """pixel_values [B, 3, H, W] -> image_features [B, N, D]: tower output at the feature layer, CLS dropped
    under the "default" strategy, then the projector. With `cls_scores`, also image_scores [B, N] float32: the
    [CLS] query's attention to each patch in the feature layer, heads summed (VisionZip's dominant-token score)."""

    def __init__(self, llava: nn.Module, cls_scores: bool = False):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.layer = llava.config.vision_feature_layer
        self.drop_cls = llava.config.vision_feature_select_strategy == "default"
        self.cls_scores = cls_scores

    def forward(self, pixel_values: torch.Tensor):
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        hidden = states[self.layer]
        features = self.projector(hidden[:, 1:] if self.drop_cls else hidden)
        if not self.cls_scores:
            return features
        return features, self._cls_attention(states[self.layer - 1])

    def _cls_attention(self, entering: torch.Tensor) -> torch.Tensor:
        """[B, N]: the feature layer's [CLS] attention row (patches only), from the states entering it; only the
        one query row is computed, so the tower keeps whatever attention kernel it has."""
        tower = getattr(self.tower, "vision_model", self.tower)  # transformers 5's CLIPVisionModel has no wrapper
        layers = tower.encoder.layers
        # hidden_states[i + 1] is layers[i]'s output, so the feature layer's states come from layers[i - 1]
        layer = layers[self.layer % (len(layers) + 1) - 1]
        attn, x = layer.self_attn, layer.layer_norm1(entering)
        heads, batch = attn.num_heads, x.shape[0]
        q = attn.q_proj(x[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)  # [B, H, 1, Dh]
        k = attn.k_proj(x).view(batch, x.shape[1], heads, -1).transpose(1, 2)  # [B, H, 1 + N, Dh]
        probs = torch.softmax((q @ k.transpose(2, 3)).float() * attn.scale, dim=-1)  # [B, H, 1, 1 + N]
        return probs[:, :, 0, 1:].sum(dim=1)


def export_vision(llava: nn.Module, recipe: Recipe, out: Path, opset: int) -> None:
    size = llava.config.vision_config.image_size
    example = torch.zeros(EXAMPLE_BATCH, 3, size, size, dtype=llava.dtype)
    inputs, outputs = recipe_io_names("vision", recipe)
    _export(VisionFeatures(llava, cls_scores=METHODS[recipe.method].vision_score), (example,), out, opset, inputs,
            outputs, {PIXEL_VALUES: {0: Dim(BATCH_DIM)}})


def export_prefill(llava: nn.Module, recipe: Recipe, image_start: int, max_seq: int, out: Path, opset: int,
                   kernels: Kernels = EAGER) -> None:
    shape = LanguageModelShape.from_config(llava.config)
    fewest, most = shape.visual_token_range or (recipe.num_visual_tokens,) * 2  # LLaVA-NeXT: N per image
    example_n = most if shape.anyres else recipe.num_visual_tokens
    example_len = image_start + example_n + example_text(image_start, example_n, max_seq)
    batch = Dim(BATCH_DIM)
    visual = {0: batch, 1: Dim(VISUAL_DIM, min=fewest, max=most)} if shape.anyres else {0: batch}
    examples = {  # name: (example, dynamic dims); any text before the image, at least one token after it
        INPUTS_EMBEDS: (torch.zeros(EXAMPLE_BATCH, example_len, shape.hidden_size, dtype=llava.dtype),
                        {0: batch, 1: Dim(SEQ_DIM, min=fewest + 1, max=max_seq)}),
        IMAGE_STARTS: (torch.full((EXAMPLE_BATCH,), image_start), {0: batch}),
        PAD_LENGTHS: (torch.zeros(EXAMPLE_BATCH, dtype=torch.long), {0: batch}),
        IMAGE_SCORES: (torch.zeros(EXAMPLE_BATCH, example_n), visual),
        VISUAL_MASK: (torch.ones(EXAMPLE_BATCH, example_n, dtype=torch.long), visual),
    }
    inputs, outputs = recipe_io_names("prefill", recipe)
    module = _ByName(PrunedLlamaPrefill(llava, recipe, image_start, kernels), inputs)
    _export(module, tuple(examples[name][0] for name in inputs), out, opset, inputs, outputs,
            [tuple(examples[name][1] for name in inputs)])  # one entry: the forward's *tensors


class _ByName(nn.Module):
    """The module called with the graph's inputs by name (the forward's parameters carry the tensors' names),
    so a graph can take any subset of the optional inputs without None placeholders, which cost torch.export
    the dims' names."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module, self.names = module, list(names)

    def forward(self, *tensors: torch.Tensor):
        return self.module(**dict(zip(self.names, tensors)))


def export_decode(llava: nn.Module, recipe: Recipe, image_start: int, max_seq: int, out: Path, opset: int,
                  kernels: Kernels = EAGER) -> None:
    text = llava.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    example_len = image_start + recipe.num_visual_tokens + example_text(image_start, recipe.num_visual_tokens, max_seq)
    stage_of = kv_stages_of(recipe.removed)
    dims = [Dim(past_len_dim(s), min=1, max=max_seq) for s in range(max(stage_of) + 1)]
    lengths = [example_len - recipe.removed_before_llm - sum(recipe.removed[:layer]) for layer in range(recipe.num_layers)]
    past = [torch.zeros(EXAMPLE_BATCH, kv_heads, lengths[layer], head_dim, dtype=llava.dtype)
            for layer in range(recipe.num_layers) for _ in ("key", "value")]
    embeds = torch.zeros(EXAMPLE_BATCH, 1, text.hidden_size, dtype=llava.dtype)
    positions = torch.full((EXAMPLE_BATCH, 1), example_len, dtype=torch.long)
    batch = Dim(BATCH_DIM)
    past_shapes = [{0: batch, 2: dims[stage_of[layer]]} for layer in range(recipe.num_layers) for _ in range(2)]
    inputs, outputs = recipe_io_names("decode", recipe)
    pads = torch.zeros(EXAMPLE_BATCH, dtype=torch.long)
    _export(LlamaDecodeStep(llava, kernels), (embeds, positions, pads, past), out, opset, inputs, outputs,
            {INPUTS_EMBEDS: {0: batch}, POSITION_IDS: {0: batch}, PAD_LENGTHS: {0: batch}, "past": past_shapes})


def example_text(image_start: int, num_visual: int, max_seq: int) -> int:
    """Text tokens after the image in the example inputs. An example longer than a dynamic dim's max fails
    torch.export, so a small --max-seq shortens it; one slot stays free for the decode step's own token."""
    room = max_seq - image_start - num_visual - 1
    return max(1, min(EXAMPLE_TEXT, room))


def _export(module: nn.Module, args: tuple, out: Path, opset: int, input_names: list[str],
            output_names: list[str], dynamic_shapes: dict) -> None:
    """torch.onnx.export(dynamo=True) with its progress chatter kept off the user's terminal."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
    onnx_logger.setLevel(level)
    program.save(str(out), external_data=_needs_external_data(module))


def _needs_external_data(module: nn.Module) -> bool:
    """ONNX protobufs cap at 2 GB: bigger models keep their weights in a side file."""
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return size > 1_800_000_000
