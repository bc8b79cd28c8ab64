"""The pruned LLaVA language model as plain-tensor modules: what the exporter traces, and the PyTorch reference.

A recipe's fixed keep counts baked in. At a layer that prunes, after its attention, the method's selection
(exporter/selection.py, named in visprune/methods.py) picks which visual tokens survive: FitPrune (pruning_methods.md
§1.5) scores a_u = a_s * a_c from that layer's head-max attention probabilities, FastV (§2.2) the last prompt
token's head-mean attention, random a fixed seeded score per image index, DART the duplication with key-norm
pivots. The survivors keep their original order; the rest leave the residual stream. AdaptPrune (§3) cuts after
the whole layer instead: its soft NMS reads the next layer's keys of every token's output. A pre-LLM method (DivPrune,
VisionZip) selects once before the first layer, from the input embeddings' image span (or the vision graph's
`image_scores`), so every layer sees fewer tokens. The layer's KV cache is taken before pruning, so cache lengths
shrink layer by layer; kept tokens keep their original RoPE positions, and decode positions continue from the
unpruned length.

Only fixed shapes depend on the recipe (TopK with constant K, Gather), so the graphs stay static-shape apart
from the batch and the text length. A batch row is pads | prefix (P tokens, per row) | image (N) | text (T, per
row): rows are left-padded to one length, so every row's last token is the last position and pruning (which
removes image rows only) never moves a pad. Pads are masked as keys; each pad query sees only itself.

Shape legend: B batch, S sequence, P tokens before the image, N visual tokens, n visual tokens present,
K kept, T text tokens after the image, H heads, Hkv key/value heads, Dh head dim, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from calibrate.recipe import Recipe, counts_at
from exporter import selection
from visprune.methods import METHODS
from visprune.models.llava import LanguageModelShape
from visprune.models.decoder import (
    EAGER,
    Kernels,
    attend,
    attend_cached,
    finish_layer,
    pad_blocked,
    padded_causal_blocked,
    rms_norm,
)


def surviving_rows(select: Callable, view: selection.SelectionInputs, seq: int, keep: int):
    """Rows [B, S - n + keep] that survive when `select` keeps `keep` of the n visual tokens present, and their
    image indices [B, keep]. Output slot j of a row whose image starts at p: j before the image, then the kept image
    rows in their original order, then the text shifted by the n - keep removed."""
    n = view.visual_ids.shape[1]
    best = select(view, keep)
    ascending = torch.topk(best, keep, dim=1, largest=False, sorted=True).values  # original order, no Sort op
    slots = torch.arange(seq - n + keep, device=best.device).unsqueeze(0)  # [1, S']
    p = view.image_starts[:, None]  # [B, 1]
    image_rows = p + torch.gather(ascending, 1, (slots - p).clamp(0, keep - 1).expand(best.shape[0], -1))
    rows = torch.where(slots < p, slots, torch.where(slots < p + keep, image_rows, slots + (n - keep)))
    return rows, torch.gather(view.visual_ids, 1, ascending)


@dataclass(frozen=True)
class Regions:
    """The per-layer pieces the prefill and decode loops call. An engine swaps in compiled versions (regional
    compilation): one compile of a piece serves all 32 layers of a 7B model and every prompt length, where a
    whole-model compile unrolls every layer and, with pruning's many lengths, ran past 3 minutes at 7B."""

    attend: Callable = attend
    attend_cached: Callable = attend_cached
    finish: Callable = finish_layer
    survivors: Callable = surviving_rows


class PrunedLlamaPrefill(nn.Module):
    """inputs_embeds [B, S, D] (and, for methods scored in the vision tower, image_scores [B, N]) -> logits [B, V]
    (last position), present K/V per layer, kept indices per pruning point ([B, K], 0-based within the image,
    ascending; a pre-LLM method's selection comes first)."""

    def __init__(self, llava: nn.Module, recipe: Recipe, image_start: int, kernels: Kernels = EAGER):
        super().__init__()
        self.kernels = kernels
        lm = llava.model.language_model
        self.layers, self.norm, self.rotary = lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = llava.lm_head
        self.removed = list(recipe.removed)
        self.removed_before_llm = recipe.removed_before_llm
        self.num_visual = recipe.num_visual_tokens
        self.recipe = recipe
        # LLaVA-NeXT: N is per image (the visual_mask input's length); counts follow the recipe's budget policy
        self.anyres = recipe.budget_policy != "fixed"
        max_visual = max(recipe.num_visual_tokens, LanguageModelShape.from_config(llava.config).num_visual_tokens)
        self.image_start = image_start
        self.regions = Regions()
        self.scores_seen: list | None = None  # a reference sets a list: each score-based selection's scores
        spec = METHODS[recipe.method]
        self.select = partial(getattr(selection, spec.selection), **spec.params) if spec.selection else None
        self.attention_rows = spec.attention_rows or None
        self.reads_hidden = spec.reads_hidden
        self.cut_after_layer = spec.cuts_after_layer
        if spec.needs_seed:  # one fixed score per image index; nested random subsets layer by layer
            scores = torch.rand(max_visual, generator=torch.Generator().manual_seed(recipe.seed))
            self.register_buffer("random_scores", scores.to(self.lm_head.weight.device), persistent=False)
        else:
            self.random_scores = None

    def forward(self, inputs_embeds: torch.Tensor, image_starts: torch.Tensor | None = None,
                pad_lengths: torch.Tensor | None = None, image_scores: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None):
        """`image_starts` [B]: each row's image offset (default: the template's); `pad_lengths` [B]: each row's
        left padding (default: none, plain causal attention); `visual_mask` [B, N] (LLaVA-NeXT): its length is the
        image's N, which sets the counts (`calibrate.recipe.counts_at`, traced as expressions of N)."""
        batch, seq, _ = inputs_embeds.shape
        num_visual = visual_mask.shape[1] if self.anyres else self.num_visual
        removed_before_llm, removed_at = counts_at(self.recipe, num_visual)  # traced on N for a NeXT recipe
        device, hidden = inputs_embeds.device, inputs_embeds
        if image_starts is None:
            image_starts = torch.full((batch,), self.image_start, dtype=torch.long, device=device)
        positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)  # [B, S]
        if pad_lengths is not None:  # real tokens count from 0 after the pads; pads sit at 0
            positions = (positions - pad_lengths[:, None]).clamp(min=0)
        visual_ids = torch.arange(num_visual, device=device).unsqueeze(0).expand(batch, -1)  # [B, N]
        presents, kept = [], []
        if self.removed_before_llm:  # pre-LLM: the image span shrinks before any layer sees it
            view = self._view(image_starts, visual_ids, hidden, image_scores=image_scores)
            visual_ids, (hidden, positions) = self._cut(view, removed_before_llm, kept, hidden, positions)
        blocked = None
        for i, layer in enumerate(self.layers):
            removed = removed_at[i] if self.removed[i] else 0  # the recipe's pruning layers, whatever N
            if blocked is None and pad_lengths is not None:  # once per KV stage: it changes only where rows go
                blocked = padded_causal_blocked(hidden.shape[1], pad_lengths)
            prunes = bool(self.removed[i])
            columns = selection.visual_positions(image_starts, visual_ids.shape[1]) if prunes else None  # [B, n]
            context, probs, key, value = self.regions.attend(
                layer, self.rotary, hidden, positions, blocked, causal=True, kernels=self.kernels,
                probs=self.attention_rows if prunes else None, columns=columns)
            presents += [key, value]
            if self.removed[i] and not self.cut_after_layer:  # the normalized input only for a selection that reads it (DART)
                normed = rms_norm(layer.input_layernorm, hidden, self.kernels) if self.reads_hidden else hidden
                view = self._view(image_starts, visual_ids, normed, probs, key, rows=columns)
                visual_ids, (hidden, context, positions) = self._cut(view, removed, kept, hidden, context, positions)
                blocked = None
            hidden = self.regions.finish(layer, hidden, context, self.kernels)
            if self.removed[i] and self.cut_after_layer:  # AdaptPrune: the next layer's raw keys of this layer's output
                next_keys = self.layers[i + 1].self_attn.k_proj(hidden)
                view = self._view(image_starts, visual_ids, hidden, probs, rows=columns, next_keys=next_keys)
                visual_ids, (hidden, positions) = self._cut(view, removed, kept, hidden, positions)
                blocked = None
        logits = self.lm_head(rms_norm(self.norm, hidden[:, -1], self.kernels))  # left padding: -1 is every row's last
        return logits, presents, kept

    def _cut(self, view: selection.SelectionInputs, removed: int, kept: list, *tensors: torch.Tensor):
        """The selection's survivors of `tensors` ([B, S, ...] each) and their image indices (appended to `kept`)."""
        rows, visual_ids = self.regions.survivors(self.select, view, tensors[0].shape[1],
                                                  view.visual_ids.shape[1] - removed)
        kept.append(visual_ids)
        return visual_ids, [_take_rows(t, rows) for t in tensors]

    def _view(self, image_starts, visual_ids, hidden, probs=None, key=None, image_scores=None, rows=None,
              next_keys=None):
        return selection.SelectionInputs(image_starts, visual_ids, hidden, probs, key, self.random_scores,
                                         image_scores, self.scores_seen, rows, next_keys, self.num_visual)

class LlamaDecodeStep(nn.Module):
    """One token: inputs_embeds [B, 1, D], position_ids [B, 1], pad_lengths [B] (or None), past K/V per layer ->
    logits [B, V], presents."""

    def __init__(self, llava: nn.Module, kernels: Kernels = EAGER):
        super().__init__()
        self.kernels = kernels
        lm = llava.model.language_model
        self.layers, self.norm, self.rotary = lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = llava.lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, pad_lengths: torch.Tensor | None,
                past: list[torch.Tensor]):
        """`pad_lengths` [B]: each row's left padding, whose cache entries the token must not see."""
        hidden, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            past_kv = (past[2 * i], past[2 * i + 1])
            blocked = None if pad_lengths is None else pad_blocked(past_kv[0].shape[2] + 1, pad_lengths)
            context, _, key, value = attend(layer, self.rotary, hidden, position_ids, blocked, past_kv,
                                            kernels=self.kernels, probs=None)
            presents += [key, value]
            hidden = finish_layer(layer, hidden, context, self.kernels)
        return self.lm_head(rms_norm(self.norm, hidden[:, -1], self.kernels)), presents


class StaticCacheDecodeStep(nn.Module):
    """One token against static per-layer cache buffers (no concatenation, nothing allocated per step):
    inputs_embeds [B, 1, D], position_ids [B, 1], pad_lengths [B], cache_position [1] (the token's slot in an
    unpruned cache: the padded prompt length plus the steps so far), cache [K, V per layer, each
    [B, Hkv, C_layer, Dh]] -> logits [B, V]. Layer i's cache lacks the `shift[i]` visual tokens pruned before
    it, so the token goes to slot cache_position - shift[i] there."""

    def __init__(self, llava: nn.Module, shift: list[int], kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        lm = llava.model.language_model
        self.layers, self.norm, self.rotary = lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = llava.lm_head
        self.shift = list(shift)
        self.regions = Regions()

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, pad_lengths: torch.Tensor,
                cache_position: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        hidden = inputs_embeds
        for i, layer in enumerate(self.layers):
            context = self.regions.attend_cached(layer, self.rotary, hidden, position_ids,
                                                 (cache[2 * i], cache[2 * i + 1]), cache_position - self.shift[i],
                                                 pad_lengths, self.kernels)
            hidden = self.regions.finish(layer, hidden, context, self.kernels)
        return self.lm_head(rms_norm(self.norm, hidden[:, -1], self.kernels))


def _take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor [B, S, ...] gathered along S at rows [B, S']."""
    index = rows.view(*rows.shape, *([1] * (tensor.dim() - 2))).expand(*rows.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, index)
