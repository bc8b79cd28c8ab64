"""Pictures and text charts of recipes: visual tokens left after each layer.

A pre-LLM method (DivPrune, VisionZip) drops its tokens before the first decoder layer: both the plot and the
table show that drop as its own step ("before the LLM"), so layer 0 starts from what really enters the LLM.
"""

from __future__ import annotations

from pathlib import Path

from calibrate.recipe import Recipe
from visprune.figures import pyplot, save_figure

BEFORE_LLM = "before the LLM"
BEFORE_LLM_X = -1  # the plot's x position of the vision tower's output, left of decoder layer 0


def tokens_entering_steps(recipe: Recipe) -> tuple[list[int], list[int]]:
    """The plotted series: x = [before the LLM, 0, ..., L-1], y = the visual tokens there (the vision tower's
    output first, then the tokens entering each decoder layer)."""
    entering = [recipe.num_visual_tokens - recipe.removed_before_llm] + recipe.keep[:-1]
    return [BEFORE_LLM_X, *range(recipe.num_layers)], [recipe.num_visual_tokens, *entering]


def plot_tokens_per_layer(recipes: list[tuple[str, Recipe]], out: Path,
                          title: str = "Visual tokens per layer") -> dict[str, tuple[list[int], list[int]]]:
    """One step line per recipe: visual tokens entering each decoder layer (PNG, written atomically). Returns
    {label: (x, y)}, the series drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    series = {label: tokens_entering_steps(recipe) for label, recipe in recipes}
    for label, (x, y) in series.items():
        ax.step(x, y, where="post", label=label, linewidth=2)
    layers = max(recipe.num_layers for _, recipe in recipes)
    ticks = [BEFORE_LLM_X, *range(0, layers, max(1, layers // 8))]
    ax.set_xticks(ticks, [BEFORE_LLM.replace(" the ", "\nthe "), *map(str, ticks[1:])])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens entering the layer")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)
    return series


def format_recipe_summary(recipe: Recipe, width: int = 40) -> str:
    """A small text chart (tokens leaving each step: before the LLM if the method prunes there, then each layer)
    and the recipe's headline numbers."""
    steps = [(str(layer), removed, keep) for layer, (removed, keep) in enumerate(zip(recipe.removed, recipe.keep))]
    if recipe.removed_before_llm:
        pre = recipe.removed_before_llm
        steps.insert(0, (BEFORE_LLM, pre, recipe.num_visual_tokens - pre))
    column = max(len("layer"), *(len(name) for name, _, _ in steps))
    lines = [f"{'layer':>{column}}  {'removed':>7}  {'kept':>5}  "]
    for name, removed, keep in steps:
        bar = "█" * max(1, round(width * keep / recipe.num_visual_tokens))
        lines.append(f"{name:>{column}}  {removed:>7}  {keep:>5}  {bar}")
    lines.append("")
    achieved = recipe.achieved
    if recipe.reduction_target is not None:
        lines.append(f"target visual-FLOPs reduction   {recipe.reduction_target:.1%}")
    if "visual_flops_reduction" in achieved:
        lines.append(f"achieved visual-FLOPs reduction {achieved['visual_flops_reduction']:.1%}")
        if "lm_flops_reduction" in achieved:
            lines.append(f"whole-LM FLOPs reduction        {achieved['lm_flops_reduction']:.1%} "
                         f"(at {achieved['lm_flops_text_tokens']:.0f} text tokens)")
    if recipe.alpha is not None:
        lines.append(f"alpha                           {recipe.alpha:.4f}")
    lines.append(f"visual tokens                   {recipe.num_visual_tokens} -> {recipe.keep[-1]} "
                 f"({recipe.total_removed} removed)")
    return "\n".join(lines)
