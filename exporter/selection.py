"""In-graph token selections: which visual tokens survive at a pruning point, for every registered method.

Each function takes a `SelectionInputs` view of the pruning point and a fixed `keep` count, and returns the
positions [B, keep] (into the n visual tokens present, any order) that survive. Only fixed-K TopK, ArgMax,
Gather and Scatter appear, so the graphs stay static-shape and NonZero-free (exporter/lint.py). The registry
(visprune/methods.py) names the function each method uses.

Shape legend: B batch, S sequence, P tokens before the image (per row), n visual tokens present, N visual tokens of the
image, K kept, H heads, Hkv key/value heads, Dh head dim, D hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from visprune.errors import ConfigError


@dataclass
class SelectionInputs:
    """What a selection may read at a pruning point (None where the point does not have it). Each row's image
    starts at its own offset (a system prompt, a chat history, left padding), so the image span is gathered."""

    image_starts: torch.Tensor  # [B] int64: P per row
    visual_ids: torch.Tensor  # [B, n] image indices of the visual tokens present
    hidden: torch.Tensor  # [B, S, D] the layer's normalized input (pre-LLM: the input embeddings)
    probs: torch.Tensor | None = None  # [B, H, S or 1, n] float32 attention probabilities of the visual keys
    key: torch.Tensor | None = None  # [B, Hkv, S, Dh] the layer's keys
    random_scores: torch.Tensor | None = None  # [N] a fixed seeded score per image index
    image_scores: torch.Tensor | None = None  # [B, N] the vision graph's score (VisionZip)
    # a reference run's record of (visual_ids, scores) per score-based selection, for telling TopK ties from errors
    scores_seen: list | None = None
    rows: torch.Tensor | None = None  # [B, n] visual_rows() where the caller has it already
    next_keys: torch.Tensor | None = None  # [B, S, Hkv*Dh] the next layer's k_proj of this layer's output (AdaptPrune)
    num_visual: int | None = None  # N: the image's tokens, a square grid in LLaVA-1.5

    def choose(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` best of `scores` [B, n] (recorded where a reference asks)."""
        if self.scores_seen is not None:
            self.scores_seen.append((self.visual_ids, scores.float()))
        return top(scores, keep)

    def visual_rows(self) -> torch.Tensor:
        """[B, n] the sequence positions of the visual tokens present."""
        return self.rows if self.rows is not None else visual_positions(self.image_starts, self.visual_ids.shape[1])

    def after_image(self, seq: int) -> torch.Tensor:
        """[B, S] True at the positions after each row's image (its text)."""
        ends = self.image_starts + self.visual_ids.shape[1]
        return torch.arange(seq, device=ends.device)[None, :] >= ends[:, None]

    def take_visual(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor` [B, ..., S, ...] restricted to the visual positions along `dim`: [B, ..., n, ...]."""
        rows = self.visual_rows()
        view = [rows.shape[0]] + [1] * (tensor.dim() - 1)
        view[dim] = rows.shape[1]
        size = list(tensor.shape)
        size[dim] = rows.shape[1]
        return torch.gather(tensor, dim, rows.view(view).expand(size))


def visual_positions(image_starts: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] the sequence positions of a row's n visual tokens (they stay contiguous: pruning keeps the order)."""
    return image_starts[:, None] + torch.arange(n, device=image_starts.device)


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices


def fitprune_product(v: SelectionInputs, keep: int) -> torch.Tensor:
    """FitPrune (pruning_methods.md §1.5): a_self * a_cross from the head-max probabilities."""
    a_self, a_cross = _fitprune_terms(v.probs.amax(dim=1), v)
    return v.choose(a_self * a_cross, keep)


def fitprune_self(v: SelectionInputs, keep: int) -> torch.Tensor:
    return v.choose(_fitprune_terms(v.probs.amax(dim=1), v)[0], keep)


def fitprune_cross(v: SelectionInputs, keep: int) -> torch.Tensor:
    return v.choose(_fitprune_terms(v.probs.amax(dim=1), v)[1], keep)


def fitprune_head_mean(v: SelectionInputs, keep: int) -> torch.Tensor:
    a_self, a_cross = _fitprune_terms(v.probs.mean(dim=1), v)
    return v.choose(a_self * a_cross, keep)


def _fitprune_terms(combined: torch.Tensor, v: SelectionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_self, a_cross) [B, n] from heads-combined probabilities of the visual keys [B, S, n]: the attention each
    visual token gets from the visual rows (mean) and from the rows after the image (sum: 1/T does not change the
    ranking)."""
    a_self = v.take_visual(combined, 1).sum(dim=1) / v.visual_ids.shape[1]
    text_rows = v.after_image(combined.shape[1]).unsqueeze(-1).to(combined.dtype)  # [B, S, 1]
    return a_self, (combined * text_rows).sum(dim=1)


def last_token(v: SelectionInputs, keep: int) -> torch.Tensor:
    """FastV (pruning_methods.md §2.2): the last prompt token's attention, heads averaged."""
    return v.choose(v.probs.mean(dim=1)[:, -1], keep)  # left padding: -1 is every row's last


def random(v: SelectionInputs, keep: int) -> torch.Tensor:
    """A fixed score per image index: nested random subsets from layer to layer."""
    return v.choose(v.random_scores[v.visual_ids], keep)


def visionzip(v: SelectionInputs, keep: int) -> torch.Tensor:
    """VisionZip's dominant tokens: the vision tower's [CLS] attention (computed in the vision graph)."""
    return v.choose(torch.gather(v.image_scores, 1, v.visual_ids), keep)


def dart(v: SelectionInputs, keep: int, pivots: int = 8) -> torch.Tensor:
    """DART (arXiv 2502.11494): pivots are the visual tokens with the largest key L1 norm; then, pivot by pivot
    (largest norm first), each claims its share of the remaining tokens least cosine-similar to it. Pivots count
    towards `keep`. Attention-free."""
    keys = v.take_visual(v.key, 2).transpose(1, 2).flatten(2)  # [B, n, Hkv*Dh]
    pivots = min(pivots, keep)
    chosen = top(keys.float().abs().sum(-1), pivots)  # [B, pivots]; float32 like every score (fp16 overflows)
    unit = torch.nn.functional.normalize(v.take_visual(v.hidden, 1).float(), dim=-1)  # [B, n, D]
    similarity = unit @ torch.gather(unit, 1, chosen.unsqueeze(-1).expand(-1, -1, unit.shape[-1])).transpose(1, 2)
    taken = _marked(torch.zeros_like(similarity[..., 0]), chosen)  # [B, n]
    picks = [chosen]
    for pivot, share in enumerate(_shares(keep - pivots, pivots)):
        if share:
            candidates = (-similarity[:, :, pivot]).masked_fill(taken > 0, float("-inf"))
            picks.append(top(candidates, share))
            taken = _marked(taken, picks[-1])
    return torch.cat(picks, dim=1)


def _marked(taken: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """`taken` [B, n] float32 with 1 at `picks` [B, k]. Float, not bool: TensorRT's Scatter takes no bool data."""
    return taken.scatter(1, picks, 1.0)


def _shares(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as possible, the first ones larger."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def divprune(v: SelectionInputs, keep: int) -> torch.Tensor:
    """DivPrune (arXiv 2503.02175): greedy max-min diversity under cosine distance. The first token is the one
    farthest from its nearest neighbour; each next one is the farthest from everything chosen so far. Chosen
    tokens are ruled out explicitly (the reference relies on their self-distance being exactly 0)."""
    unit = torch.nn.functional.normalize(v.take_visual(v.hidden, 1).float(), dim=-1)  # [B, n, D]
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, n, n]
    nearest = torch.topk(distance, 2, dim=1, largest=False, sorted=True).values[:, 1]  # [B, n] beyond itself
    first = nearest.argmax(dim=1, keepdim=True)  # [B, 1]
    if keep == 1:
        return first
    closest = _distance_row(distance, first).scatter(1, first, -1.0)  # taken: below every distance (> -1)
    return torch.cat([first, _greedy_picks(closest, distance, keep - 1, torch.minimum)], dim=1)


def _distance_row(distance: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """distance [B, n, n] row `pick` [B, 1] -> [B, n]."""
    return torch.gather(distance, 1, pick.unsqueeze(-1).expand(-1, -1, distance.shape[-1])).squeeze(1)


def adaptprune(v: SelectionInputs, keep: int, prior_sigma: float, distance_limit: float, distance_sigma: float,
               similarity_sigma: float) -> torch.Tensor:
    """AdaptPrune (arXiv 2503.08019, pruning_methods.md §3): the last prompt token's attention (heads averaged)
    times a centred Gaussian prior, then `keep` greedy soft-NMS steps on the image grid. Each step takes the best
    score and scales every token within `distance_limit` cells by 1 - g_d * g_s (g_d of the grid distance, g_s of
    the cosine of the raw next-layer keys). The reference loop is exporter/adaptprune_reference.py; unlike it,
    a pick is never picked again, even when every score left reaches 0."""
    side = _grid_side(v.num_visual or v.visual_ids.shape[1])
    row, col = (v.visual_ids // side).float(), (v.visual_ids % side).float()  # [B, n] grid cells
    prior = _centre_prior(side, prior_sigma, v.probs.device)[v.visual_ids]  # [B, n]
    scores = v.probs.mean(dim=1)[:, -1] * prior  # [B, n] float32
    unit = torch.nn.functional.normalize(v.take_visual(v.next_keys, 1).float(), dim=-1)  # [B, n, Hkv*Dh]
    distance2 = (row[:, :, None] - row[:, None, :]) ** 2 + (col[:, :, None] - col[:, None, :]) ** 2  # [B, n, n]
    near = (distance2 <= distance_limit ** 2).float()
    similar = torch.exp(-(1.0 - unit @ unit.transpose(1, 2)) ** 2 / (2 * similarity_sigma ** 2))
    factor = 1.0 - near * torch.exp(-distance2 / (2 * distance_sigma ** 2)) * similar  # [B, n, n] row: a pick's
    return _greedy_picks(scores, factor, keep, torch.mul)


def _greedy_picks(scores: torch.Tensor, rows: torch.Tensor, keep: int, update=torch.mul) -> torch.Tensor:
    """`keep` greedy arg-max picks [B, keep] from scores [B, n] (>= 0 where not taken, -1 where taken): after each
    pick, scores := update(scores, the pick's row of rows [B, n, n]) and the pick's own score -1. The updates keep
    taken scores negative (AdaptPrune multiplies by factors > 0 off the diagonal, DivPrune takes minima with
    cosine distances, > -1 even where rounding makes one slightly negative), so no index is picked twice and the arg-max over the rest, ties included, is what masking
    the taken out would give. Seven ONNX nodes a step (a taken-mask and its scatter took 11): the loops of a
    few hundred steps are most of these graphs and of their export time."""
    batch, n = scores.shape
    flat = rows.reshape(batch * n, n)  # row b * n + i: row i of batch row b
    offsets = torch.arange(batch, device=scores.device)[:, None] * n  # [B, 1]
    ids = torch.arange(n, device=scores.device)
    picks = []
    for _ in range(keep):
        pick = scores.argmax(dim=1, keepdim=True)  # [B, 1]
        picks.append(pick)
        row = flat.index_select(0, (pick + offsets).view(batch))  # [B, n]
        scores = torch.where(ids == pick, -1.0, update(scores, row))
    return torch.cat(picks, dim=1)


def _grid_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"AdaptPrune needs a square grid of visual tokens; this image has {n}.",
                          "Use AdaptPrune on a LLaVA-1.5 model (24 x 24 tokens), or choose another --method.")
    return side


def _centre_prior(side: int, sigma: float, device: torch.device) -> torch.Tensor:
    """[side * side] exp(-(x^2 + y^2) / 2 sigma^2) on the coordinates linspace(-side // 2, side // 2, side) (the
    reference's -12..12 for 24 cells), divided by its maximum: a fixed prior for the image's centre."""
    coords = torch.linspace(-side // 2, side // 2, side, device=device)
    x, y = torch.meshgrid(coords, coords, indexing="ij")
    gaussian = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return (gaussian / gaussian.max()).flatten()
