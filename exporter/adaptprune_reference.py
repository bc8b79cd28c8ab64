"""AdaptPrune's selection as its reference code runs it (bzluan/AdaptPrune, `adaptprune.py`; read in
pruning_methods.md §3): the transformers model's own attention and hidden states, one image at a time, and a
Python loop of greedy soft-NMS steps that syncs with the host at every pick. It is the yardstick for the unrolled
in-graph selection (exporter/selection.py `adaptprune`), in tests and benchmarks; no engine runs it.

Two choices differ from the reference, each behind a flag that restores it:
- `allow_repick`: the reference lowers a pick's score to ~0 and relies on that; once every remaining score is 0 its
  arg-max takes an index again (a duplicate, a token kept twice). We mask picks out instead.
- the reference runs layer K-1 a second time to get its attention, which appends that layer's keys and values to
  the cache twice (FastV #46's defect); here, as in our graphs, the one forward gives attention and cache alike.

Shape legend: B batch, S sequence, N visual tokens (a side x side grid), K kept, D hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_kept(model, inputs_embeds: torch.Tensor, image_start: int, num_visual: int, keep: int, layer: int,
                   params: dict, allow_repick: bool = False) -> list[list[int]]:
    """Per batch row, the image indices AdaptPrune keeps when it prunes before `layer` (K), ascending:
    `inputs_embeds` [B, S, D] whose image spans [image_start, image_start + num_visual)."""
    lm = model.model.language_model
    out = lm(inputs_embeds=inputs_embeds, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[layer - 1]  # [B, H, S, S] layer K-1's probabilities
    entering = out.hidden_states[layer]  # [B, S, D] the raw hidden states entering layer K
    side, span = math.isqrt(num_visual), slice(image_start, image_start + num_visual)
    kept = []
    for b in range(inputs_embeds.shape[0]):
        attention_map = attention.mean(dim=1)[b][-1][span].view(side, side)
        attention_map = attention_map * gaussian_mask(side, params["prior_sigma"])
        keys = F.normalize(lm.layers[layer].self_attn.k_proj(entering[b, span, :]), p=2, dim=-1)  # [N, Hkv*Dh]
        picks = soft_nms_loop(attention_map, keys, params["distance_limit"], params["distance_sigma"],
                              params["similarity_sigma"], keep, allow_repick)
        kept.append(sorted(picks))
    return kept


def gaussian_mask(size: int, sigma: float) -> torch.Tensor:
    """[size, size]: the reference's centre prior, maximum 1."""
    coords = torch.linspace(-size // 2, size // 2, size)
    x, y = torch.meshgrid(coords, coords, indexing="ij")
    gaussian = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return gaussian / gaussian.max()


def soft_nms_loop(scores: torch.Tensor, keys: torch.Tensor, distance_limit: float, distance_sigma: float,
                  similarity_sigma: float, max_output_size: int, allow_repick: bool = False) -> list[int]:
    """The reference's `adapt_nms_2d`: `scores` [side, side], `keys` [N, Hkv*Dh] L2-normalised -> picked indices
    (row-major into the grid), in the order picked."""
    grid_size = scores.size(0)
    grid_x, grid_y = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    keep, scores_copy = [], scores.clone()
    picked = torch.zeros(grid_size, grid_size, dtype=torch.bool)
    for _ in range(max_output_size):
        candidates = scores_copy if allow_repick else scores_copy.masked_fill(picked, float("-inf"))
        top_idx = torch.argmax(candidates)
        top_x, top_y = top_idx // grid_size, top_idx % grid_size
        keep.append(int(top_idx.item()))
        picked[top_x, top_y] = True
        if len(keep) >= max_output_size:
            break
        distance = torch.sqrt((grid_x - top_x).float() ** 2 + (grid_y - top_y).float() ** 2)
        window_mask = distance <= distance_limit
        gauss_decay = torch.exp(-(distance ** 2) / (2 * distance_sigma ** 2))
        similarity = F.cosine_similarity(keys, keys[top_idx, :].unsqueeze(0), dim=-1).view(grid_size, grid_size)
        similarity_decay = torch.exp(-((1 - similarity) ** 2) / (2 * similarity_sigma ** 2))
        combined_decay = gauss_decay * similarity_decay
        scores_copy[window_mask] *= 1 - combined_decay[window_mask]
    return keep
