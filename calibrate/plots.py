"""Pictures and text charts of recipes: visual tokens left after each layer."""

from __future__ import annotations

from pathlib import Path

from calibrate.recipe import Recipe
from visprune.figures import pyplot, save_figure


def plot_tokens_per_layer(recipes: list[tuple[str, Recipe]], out: Path, title: str = "Visual tokens per layer") -> None:
    """One step line per recipe: visual tokens entering each decoder layer (PNG, written atomically)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, recipe in recipes:
        entering = [recipe.num_visual_tokens] + recipe.keep[:-1]
        ax.step(range(recipe.num_layers), entering, where="post", label=label, linewidth=2)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens entering the layer")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)


def format_recipe_summary(recipe: Recipe, width: int = 40) -> str:
    """A small text chart (tokens leaving each layer) and the recipe's headline numbers."""
    lines = [f"{'layer':>5}  {'removed':>7}  {'kept':>5}  "]
    for layer, (removed, keep) in enumerate(zip(recipe.removed, recipe.keep)):
        bar = "█" * max(1, round(width * keep / recipe.num_visual_tokens))
        lines.append(f"{layer:>5}  {removed:>7}  {keep:>5}  {bar}")
    lines.append("")
    achieved = recipe.achieved
    if recipe.reduction_target is not None:
        lines.append(f"target visual-FLOPs reduction   {recipe.reduction_target:.1%}")
    if "visual_flops_reduction" in achieved:
        lines.append(f"achieved visual-FLOPs reduction {achieved['visual_flops_reduction']:.1%}")
        lines.append(f"whole-LM FLOPs reduction        {achieved['lm_flops_reduction']:.1%} "
                     f"(at {achieved['lm_flops_text_tokens']:.0f} text tokens)")
    if recipe.alpha is not None:
        lines.append(f"alpha                           {recipe.alpha:.4f}")
    lines.append(f"visual tokens                   {recipe.num_visual_tokens} -> {recipe.keep[-1]} "
                 f"({recipe.total_removed} removed)")
    return "\n".join(lines)
