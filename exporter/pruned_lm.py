"""The pruned LLaVA language model as plain-tensor modules: what the exporter traces, and the PyTorch reference.

FitPrune inference (pruning_methods.md §1.5) with a recipe's fixed per-layer keep counts baked in: at a layer
that prunes, after its attention, each visual token is scored a_u = a_s * a_c from that layer's head-max
attention probabilities (self: the current visual rows, cross: the rows after the image; float32), the top
keep_l survive in their original order, and the rest leave the residual stream. The baselines change only the
score: FastV (§2.2) the last prompt token's head-mean attention, random a fixed seeded score per image index. The layer's KV cache is taken
before pruning, so cache lengths shrink layer by layer; kept tokens keep their original RoPE positions, and
decode positions continue from the unpruned length.

Only fixed shapes depend on the recipe (TopK with constant K, Gather), so the graphs stay static-shape apart
from the text length. Batch rows share one layout: prefix (P tokens) | image (N) | text (T, dynamic).

Shape legend: B batch, S sequence, P tokens before the image, N visual tokens, n visual tokens present,
K kept, T text tokens after the image, H heads, Hkv key/value heads, Dh head dim, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from calibrate.recipe import Recipe
from visprune.models.decoder import attend, causal_blocked, finish_layer


class PrunedLlamaPrefill(nn.Module):
    """inputs_embeds [B, S, D] -> logits [B, V] (last position), present K/V per layer, kept indices per
    pruning layer ([B, keep_l], 0-based within the image, ascending)."""

    def __init__(self, llava: nn.Module, recipe: Recipe, image_start: int):
        super().__init__()
        lm = llava.model.language_model
        self.layers, self.norm, self.rotary = lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = llava.lm_head
        self.removed = list(recipe.removed)
        self.num_visual = recipe.num_visual_tokens
        self.image_start = image_start
        self.method = recipe.method
        if recipe.method == "random":  # one fixed score per image index; nested random subsets layer by layer
            scores = torch.rand(recipe.num_visual_tokens, generator=torch.Generator().manual_seed(recipe.seed))
            self.register_buffer("random_scores", scores.to(self.lm_head.weight.device), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor):
        batch, seq, _ = inputs_embeds.shape
        hidden = inputs_embeds
        positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, seq)  # [B, S]
        visual_ids = torch.arange(self.num_visual, device=hidden.device).unsqueeze(0).expand(batch, -1)  # [B, n]
        presents, kept = [], []
        for layer, removed in zip(self.layers, self.removed):
            context, probs, key, value = attend(layer, self.rotary, hidden, positions,
                                                blocked=causal_blocked(hidden.shape[1], hidden.device))
            presents += [key, value]
            if removed:
                rows, visual_ids = self._surviving_rows(probs, visual_ids, visual_ids.shape[1] - removed)
                kept.append(visual_ids)
                hidden, context, positions = (_take_rows(t, rows) for t in (hidden, context, positions))
            hidden = finish_layer(layer, hidden, context)
        logits = self.lm_head(self.norm(hidden[:, -1]))
        return logits, presents, kept

    def _surviving_rows(self, probs: torch.Tensor, visual_ids: torch.Tensor, keep: int):
        """Rows [B, S'] that survive keeping the `keep` best-scored visual tokens, and their image indices."""
        p, n = self.image_start, visual_ids.shape[1]
        best = torch.topk(self._scores(probs, visual_ids), keep, dim=1, largest=True, sorted=True).indices
        ascending = torch.topk(best, keep, dim=1, largest=False, sorted=True).values  # original order, no Sort op
        seq = probs.shape[-1]
        prefix = torch.arange(p, device=probs.device).unsqueeze(0).expand(probs.shape[0], p)
        text = torch.arange(p + n, seq, device=probs.device).unsqueeze(0).expand(probs.shape[0], -1)
        rows = torch.cat([prefix, ascending + p, text], dim=1)
        return rows, torch.gather(visual_ids, 1, ascending)

    def _scores(self, probs: torch.Tensor, visual_ids: torch.Tensor) -> torch.Tensor:
        """[B, n] score of each visual token present; probs [B, H, S, S] float32."""
        p, n = self.image_start, visual_ids.shape[1]
        if self.method == "fastv":
            return probs.mean(dim=1)[:, -1, p:p + n]  # the last prompt token's row, heads averaged
        if self.method == "random":
            return self.random_scores[visual_ids]
        visual_cols = probs.amax(dim=1)[:, :, p:p + n]  # [B, S, n], heads combined by max
        a_self = visual_cols[:, p:p + n].sum(dim=1) / n
        a_cross = visual_cols[:, p + n:].sum(dim=1)  # 1/T does not change the ranking
        return a_self * a_cross


class LlamaDecodeStep(nn.Module):
    """One token: inputs_embeds [B, 1, D], position_ids [B, 1], past K/V per layer -> logits [B, V], presents."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        lm = llava.model.language_model
        self.layers, self.norm, self.rotary = lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = llava.lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, past: list[torch.Tensor]):
        hidden, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            context, _, key, value = attend(layer, self.rotary, hidden, position_ids,
                                            past=(past[2 * i], past[2 * i + 1]))  # one new token: sees all
            presents += [key, value]
            hidden = finish_layer(layer, hidden, context)
        return self.lm_head(self.norm(hidden[:, -1])), presents


def _take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor [B, S, ...] gathered along S at rows [B, S']."""
    index = rows.view(*rows.shape, *([1] * (tensor.dim() - 2))).expand(*rows.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, index)
