"""FitPrune's per-token attention scores and its greedy deletion rule (pruning_methods.md §1.2-1.3).

Shape legend for this package: B batch, S sequence, N visual tokens of the image, n visual tokens still present,
T text tokens after the image, H heads, D hidden.

At one layer, with M = max over heads of the attention probabilities [S, S] (rows are queries):
    a_s(v) = (1/n) · Σ_{r ∈ visual rows} M[r, v]        "self":  how much the image attends to token v
    a_c(v) = (1/T) · Σ_{t ∈ text rows}   M[t, v]        "cross": how much the text after the image attends to v
The tokens before the image (system prompt, role tag) are neither queries nor candidates.
"""

from __future__ import annotations

import torch


def greedy_deletion_count(scores: torch.Tensor, target: float) -> int:
    """How many of the lowest `scores` [n] can go while the mass left stays >= `target`.

    The reference scans k = 0, 1, ... and stops at the first k whose remaining mass R(k) falls below target,
    deleting k − 1. Two fixes: the count is computed from scratch each call (the reference reuses the previous
    sample's count when the scan never drops below target), and then it is n − 1: at least one token stays.
    """
    scores = scores.double()
    total = scores.sum()
    if total < target:
        return 0
    ascending = torch.sort(scores).values
    # remaining[k] = R(k) = total − (sum of the k smallest), for k = 0 .. n−1; non-increasing in k.
    removed_mass = torch.cat([scores.new_zeros(1), torch.cumsum(ascending, 0)[:-1]])
    remaining = total - removed_mass
    return int((remaining >= target).sum().item()) - 1


def tokens_to_remove(a_self: torch.Tensor, a_cross: torch.Tensor, k_self: int, k_cross: int) -> torch.Tensor:
    """T_S ∩ T_C: positions (into the current visual tokens, ascending) among both the k_self lowest by
    a_self and the k_cross lowest by a_cross. Ties keep the earlier token first (stable sort)."""
    if k_self == 0 or k_cross == 0:
        return torch.empty(0, dtype=torch.long)
    low_self = torch.argsort(a_self, stable=True)[:k_self]
    low_cross = torch.argsort(a_cross, stable=True)[:k_cross]
    in_both = torch.zeros(a_self.shape[0], dtype=torch.bool)
    in_both[low_self] = True
    keep_mask = torch.zeros_like(in_both)
    keep_mask[low_cross] = True
    return torch.nonzero(in_both & keep_mask).flatten()


def select_removals(a_self: torch.Tensor, a_cross: torch.Tensor, ref_self: float, ref_cross: float,
                    alpha: float) -> torch.Tensor:
    """One sample at one layer: the visual positions FitPrune deletes at strength `alpha`.

    Targets are (1 − alpha) × the sample's unpruned reference mass at this layer, so alpha is the fraction of
    the unpruned attention mass that may be lost, cumulatively over all earlier pruning.
    """
    k_self = greedy_deletion_count(a_self, (1.0 - alpha) * ref_self)
    k_cross = greedy_deletion_count(a_cross, (1.0 - alpha) * ref_cross)
    return tokens_to_remove(a_self.cpu(), a_cross.cpu(), k_self, k_cross)


def visual_scores(head_max: torch.Tensor, prefix: list[int], visual: list[int], text: list[int]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample (a_self [n_b], a_cross [n_b]) in float64 from head-max probabilities [B, S, S].

    Sample b's sequence is laid out prefix | visual | text | padding, with lengths prefix[b], visual[b], text[b].
    """
    batch, seq, _ = head_max.shape
    rows = torch.arange(seq, device=head_max.device)
    weights = torch.zeros(batch, 2, seq, dtype=head_max.dtype, device=head_max.device)
    for b in range(batch):
        start, end = prefix[b], prefix[b] + visual[b]
        weights[b, 0] = ((rows >= start) & (rows < end)) / visual[b]
        weights[b, 1] = ((rows >= end) & (rows < end + text[b])) / text[b]
    column_mass = torch.bmm(weights, head_max).double()  # [B, 2, S]
    a_self = [column_mass[b, 0, prefix[b]:prefix[b] + visual[b]] for b in range(batch)]
    a_cross = [column_mass[b, 1, prefix[b]:prefix[b] + visual[b]] for b in range(batch)]
    return a_self, a_cross
