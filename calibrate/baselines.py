"""Baseline recipes at an equal FLOPs budget, exported through the same code as FitPrune's (paper Fig. 5 and 9).

- `fastv_recipe`: FastV (pruning_methods.md §2.2) prunes once, before layer K (2 by default), keeping the visual
  tokens layer K-1's last prompt token attends to most (heads averaged). In our recipe terms that is one
  deletion count at layer K-1, taken after its attention: the kept tokens compute exactly what FastV computes, and
  the dropped ones skip layer K-1's output projection and MLP, which only ever fed themselves. The count is the
  smallest that meets the visual-only FLOPs reduction under the same accounting FitPrune recipes are fitted with.
- `random_recipe`: FitPrune's per-layer counts with the survivors drawn at random (a seeded fixed score per image
  index), "FitPrune(Random)" in the paper.
"""

from __future__ import annotations

from dataclasses import replace

from calibrate.flops import visual_flops_reduction
from calibrate.recipe import Recipe
from visprune.errors import BudgetUnreachableError
from visprune.models.llava import LanguageModelShape

FASTV_LAYER = 2


def fastv_recipe(shape: LanguageModelShape, reduction: float, layer: int = FASTV_LAYER) -> Recipe:
    """The FastV recipe pruning before `layer` whose visual-only FLOPs reduction first reaches `reduction`."""
    schedule = [0] * shape.num_layers
    for removed in range(1, shape.num_visual_tokens):
        schedule[layer - 1] = removed
        if visual_flops_reduction(shape, schedule) >= reduction:
            recipe = Recipe(method="fastv", num_visual_tokens=shape.num_visual_tokens, removed=list(schedule),
                            reduction_target=reduction, search={"fastv_layer": layer, "score": "last token, head mean"})
            recipe.achieved = {"visual_flops_reduction": round(visual_flops_reduction(shape, schedule), 6)}
            return recipe
    best = visual_flops_reduction(shape, schedule)
    raise BudgetUnreachableError(
        f"FastV pruning before layer {layer} removes at most {best:.1%} of the visual-token FLOPs "
        f"(keeping one token); {reduction:.0%} was asked for.",
        f"Ask for at most {int(best * 100) / 100:.2f}, or prune earlier (a smaller K).")


def random_recipe(recipe: Recipe, seed: int) -> Recipe:
    """`recipe`'s per-layer counts with seeded random survivors."""
    return replace(recipe, method="random", seed=seed, alpha=None,
                   search={**recipe.search, "counts_from": recipe.method})
