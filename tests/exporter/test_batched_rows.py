"""Batched prefill and decode with rows of different layouts: each row's own text before the image (a system
prompt, a chat history) and its own text length, left-padded to one length. A batch must compute what the same
requests compute one by one (fp32: logits within 1e-4, identical kept indices and tokens), for every kind of
selection: FitPrune (every probability row, its cross term over the row's own text), FastV (the last row), DART
(keys), DivPrune and VisionZip (pre-LLM), random."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from calibrate.recipe import Recipe
from calibrate.stage import budget_recipe
from exporter.pruned_lm import LlamaDecodeStep, PrunedLlamaPrefill
from visprune.methods import METHODS
from visprune.models.decoder import EAGER, ONNX_OPS, SDPA

from conftest import TINY_RECIPE_60

PREFIXES, TEXTS = (4, 11, 7), (9, 3, 14)  # three rows: P and T differ, so both pads and image offsets differ
NEW_TOKENS = 3


def recipe_for(name: str, shape) -> Recipe:
    if name == "fitprune":
        return Recipe("fitprune", 576, TINY_RECIPE_60)
    return replace(budget_recipe(shape, 0.6, name), seed=3 if METHODS[name].needs_seed else None)


def rows_of(hidden: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p + 576 + t, hidden, generator=generator) for p, t in zip(PREFIXES, TEXTS)]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, S, D], image_starts [B], pad_lengths [B]); pads hold garbage on purpose."""
    seq = max(len(r) for r in rows)
    pads = torch.tensor([seq - len(r) for r in rows])
    embeds = torch.stack([torch.cat([torch.full((seq - len(r), r.shape[1]), 7.0), r]) for r in rows])
    return embeds, pads + torch.tensor(PREFIXES), pads


def decode_tokens(decode, logits, past, positions, pads, embed):
    """Greedy tokens and their logits for NEW_TOKENS steps."""
    tokens, all_logits = [], [logits]
    for step in range(NEW_TOKENS):
        token = logits.argmax(-1)
        tokens.append(token)
        logits, past = decode(embed(token)[:, None], (positions + step)[:, None], pads, past)
        all_logits.append(logits)
    return torch.stack(tokens, 1), all_logits


@pytest.mark.parametrize("kernels", [EAGER, SDPA, ONNX_OPS], ids=lambda k: k.name)
@pytest.mark.parametrize("name", ["fitprune", "fastv", "dart", "divprune", "visionzip", "random"])
def test_a_batch_of_different_layouts_equals_its_rows_one_by_one(tiny, name, kernels):
    recipe = recipe_for(name, tiny.shape)
    rows = rows_of(tiny.shape.hidden_size)
    scores = torch.rand(len(rows), 576, generator=torch.Generator().manual_seed(1)) if METHODS[name].vision_score else None
    embed = tiny.model.get_input_embeddings()
    decode = LlamaDecodeStep(tiny.model, kernels)
    embeds, starts, pads = left_padded(rows)
    with torch.no_grad():
        prefill = PrunedLlamaPrefill(tiny.model, recipe, PREFIXES[0], kernels)
        logits, past, kept = prefill(embeds, starts, pads, scores)
        positions = torch.tensor([len(r) for r in rows])
        tokens, batch_logits = decode_tokens(decode, logits, past, positions, pads, embed)
        for b, row in enumerate(rows):
            one = PrunedLlamaPrefill(tiny.model, recipe, PREFIXES[b], kernels)
            row_logits, row_past, row_kept = one(row[None], image_scores=None if scores is None else scores[b:b + 1])
            row_tokens, row_step_logits = decode_tokens(decode, row_logits, row_past,
                                                        positions[b:b + 1], None, embed)
            assert [k[b].tolist() for k in kept] == [k[0].tolist() for k in row_kept]
            assert tokens[b].tolist() == row_tokens[0].tolist()
            for got, want in zip(batch_logits, row_step_logits):
                assert (got[b] - want[0]).abs().max() <= 1e-4
