"""FitPrune's recipe search: reference statistics, replay at a given alpha, and bisection of alpha.

Faithful to the reference (pruning_methods.md §1.2-1.3, §1.8) with its quirks fixed:
* the kept recipe is the one of the smallest *feasible* alpha, not of the last bisection step;
* the greedy counts never go stale (see `scoring.greedy_deletion_count`);
* the budget test runs on the recipe being built (floor of the mean per-sample deletions of the layers done so
  far, no further pruning), so the recipe that is written meets the budget itself; the reference tested the
  mean per-sample cost and could ship a recipe that misses its target (59.7 % for "60 %");
* the test also runs after the last layer, and if no alpha in (0, 1] meets the budget that is an error.

Work is shared where the result cannot change: images are encoded once, and as long as a sample has lost no
token its state is the unpruned one, so its scores and layer outputs come from the reference pass instead of
being recomputed (the "trunk").
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Callable

import torch

from calibrate.flops import visual_flops, visual_flops_reduction
from calibrate.replay import DecoderReplay, SampleState, batches_by_length
from calibrate.scoring import select_removals
from visprune.errors import BudgetUnreachableError
from visprune.models.llava import LanguageModelShape

ProgressFn = Callable[[int], None]


@dataclass
class Trunk:
    """The unpruned pass: per layer and sample the score vectors, and (while memory allows) the layer outputs."""

    inputs: list[SampleState]
    a_self: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][sample] -> [N]
    a_cross: list[list[torch.Tensor]] = field(default_factory=list)
    outputs: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][sample] -> [S, D], first layers only

    def reference_mass(self, layer: int, sample: int) -> tuple[float, float]:
        """(S_ref, C_ref): unpruned self and cross attention mass on visual tokens."""
        return float(self.a_self[layer][sample].sum()), float(self.a_cross[layer][sample].sum())

    def state_entering(self, layer: int, sample: int) -> SampleState:
        """The unpruned state entering `layer` (needs the outputs of layer − 1 to be cached)."""
        if layer == 0:
            return self.inputs[sample]
        base = self.inputs[sample]
        return SampleState(hidden=self.outputs[layer - 1][sample], positions=base.positions,
                           prefix=base.prefix, kept=base.kept, text=base.text)


@dataclass
class AlphaOutcome:
    """What replaying all samples at one alpha gave."""

    alpha: float
    feasible: bool
    recipe_removed: list[int]  # per layer: floor of the mean per-sample deletion count
    visual_reduction: float  # 1 − Φ(recipe)/Φ₀


@dataclass
class SearchResult:
    best: AlphaOutcome
    steps: list[AlphaOutcome]
    reduction: float


class RecipeSearch:
    """Holds the prepared samples and the model; evaluates alphas and bisects for a FLOPs budget."""

    def __init__(self, replay: DecoderReplay, states: list[SampleState], shape: LanguageModelShape,
                 batch_size: int = 8, trunk_cache_bytes: int = 2 << 30):
        self.replay = replay
        self.shape = shape
        self.batch_size = batch_size
        self.trunk = Trunk(inputs=states)
        self._trunk_cache_bytes = trunk_cache_bytes
        self.layers_computed = 0  # sample-layers actually run, for reports and tests of the trunk reuse

    @property
    def num_samples(self) -> int:
        return len(self.trunk.inputs)

    def run_reference_pass(self, progress: ProgressFn | None = None) -> None:
        """The unpruned forward, layer by layer: reference masses and the trunk for later alphas."""
        states = list(self.trunk.inputs)
        per_layer_bytes = sum(s.hidden.numel() * s.hidden.element_size() for s in states)
        cached_layers = min(self.shape.num_layers, self._trunk_cache_bytes // max(per_layer_bytes, 1))
        for layer in range(self.shape.num_layers):
            a_self, a_cross, _, states = self._run_layer(layer, states, list(range(len(states))), alpha=None)
            self.trunk.a_self.append(a_self)
            self.trunk.a_cross.append(a_cross)
            if layer < cached_layers:
                self.trunk.outputs.append([s.hidden for s in states])
            if progress:
                progress(1)

    def evaluate(self, alpha: float, reduction: float, progress: ProgressFn | None = None) -> AlphaOutcome:
        """Replay every sample at `alpha`, pruning layer by layer until the recipe meets the budget."""
        budget = (1.0 - reduction) * visual_flops(self.shape, [])
        states: list[SampleState | None] = [None] * self.num_samples  # None: still identical to the trunk
        recipe: list[int] = []
        for layer in range(self.shape.num_layers):
            if visual_flops(self.shape, recipe) <= budget:
                break
            removed = self._prune_layer(layer, states, alpha)
            recipe.append(self._mean_count(removed))
            if progress:
                progress(1)
        recipe += [0] * (self.shape.num_layers - len(recipe))
        return AlphaOutcome(alpha=alpha, feasible=visual_flops(self.shape, recipe) <= budget,
                            recipe_removed=recipe, visual_reduction=visual_flops_reduction(self.shape, recipe))

    def _mean_count(self, removed: list[torch.Tensor]) -> int:
        """The samples' mean deletion count at one layer, each scaled to the nominal N (LLaVA-NeXT: each image has
        its own N, and a `ratio` recipe scales the counts back per image); exact rationals, so a LLaVA-1.5 count is
        floor(sum / samples) as always."""
        nominal = self.shape.num_visual_tokens
        scaled = sum(Fraction(len(r) * nominal, state.num_visual) for r, state in zip(removed, self.trunk.inputs))
        return math.floor(scaled / self.num_samples)

    def _prune_layer(self, layer: int, states: list[SampleState | None], alpha: float) -> list[torch.Tensor]:
        """Decide and apply one layer's deletions for every sample; updates `states` in place."""
        removed = [torch.empty(0, dtype=torch.long)] * self.num_samples
        trunk_has_output = layer < len(self.trunk.outputs)
        to_run = []
        for b in range(self.num_samples):
            if states[b] is None and trunk_has_output:  # unpruned so far: the trunk already has this layer
                removed[b] = self._select(layer, b, self.trunk.a_self[layer][b], self.trunk.a_cross[layer][b], alpha)
                if len(removed[b]):
                    entering = self.trunk.state_entering(layer, b)
                    rows = entering.keep_rows(removed[b]).to(entering.hidden.device)
                    states[b] = entering.after_removal(self.trunk.outputs[layer][b][rows], removed[b])
            else:
                if states[b] is None:
                    states[b] = self.trunk.state_entering(layer, b)
                to_run.append(b)
        _, _, run_removed, updated = self._run_layer(layer, [states[b] for b in to_run], to_run, alpha)
        for b, removed_b, state in zip(to_run, run_removed, updated):
            removed[b], states[b] = removed_b, state
        return removed

    def _select(self, layer: int, sample: int, a_self: torch.Tensor, a_cross: torch.Tensor,
                alpha: float) -> torch.Tensor:
        ref_self, ref_cross = self.trunk.reference_mass(layer, sample)
        return select_removals(a_self, a_cross, ref_self, ref_cross, alpha)

    def _run_layer(self, layer: int, states: list[SampleState], sample_ids: list[int], alpha: float | None):
        """Attention, decisions and MLP for `states` in length-sorted batches (alpha None: prune nothing).

        Returns per state: a_self, a_cross, removed visual positions, and the state leaving the layer.
        """
        count = len(states)
        a_self, a_cross, removed, outputs = [None] * count, [None] * count, [None] * count, [None] * count
        for batch in batches_by_length(range(count), [s.seq_len for s in states], self.batch_size):
            attention = self.replay.attend(layer, [states[i] for i in batch])
            for j, i in enumerate(batch):
                a_self[i], a_cross[i] = attention.a_self[j], attention.a_cross[j]
                removed[i] = (torch.empty(0, dtype=torch.long) if alpha is None
                              else self._select(layer, sample_ids[i], a_self[i], a_cross[i], alpha))
            finished = self.replay.finish(layer, attention, [removed[i] for i in batch])
            for i, state in zip(batch, finished):
                outputs[i] = state
            self.layers_computed += len(batch)
        return a_self, a_cross, removed, outputs

    def search(self, reduction: float, tolerance: float = 0.01,
               on_step: Callable[[AlphaOutcome], None] | None = None,
               progress: ProgressFn | None = None) -> SearchResult:
        """Bisect alpha on [0, 1] to `tolerance`; keep the smallest feasible alpha's recipe."""
        low, high = 0.0, 1.0
        best: AlphaOutcome | None = None
        steps = []
        while high - low > tolerance + 1e-6:
            outcome = self.evaluate((low + high) / 2, reduction, progress)
            steps.append(outcome)
            if on_step:
                on_step(outcome)
            if outcome.feasible:
                high, best = outcome.alpha, outcome
            else:
                low = outcome.alpha
        if best is None:  # the bisection never tries alpha = 1 itself
            best = self.evaluate(1.0, reduction, progress)
            steps.append(best)
            if not best.feasible:
                raise BudgetUnreachableError(
                    f"No pruning strength reaches a {reduction:.0%} visual-FLOPs reduction: even alpha = 1 gives "
                    f"{best.visual_reduction:.1%}.",
                    f"Ask for at most {math.floor(best.visual_reduction * 100) / 100:.2f} with --reduction.",
                )
        return SearchResult(best=best, steps=steps, reduction=reduction)
