"""`inspect_recipes`: check recipes (calibrated or hand-written) against a model and summarise or plot them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from calibrate.plots import format_recipe_summary, plot_tokens_per_layer
from calibrate.recipe import Recipe, achieved_reductions, check_recipe_fits, load_recipe
from visprune.errors import ConfigError
from visprune.models.llava import LanguageModelShape, architecture_fingerprint, load_llava_config
from visprune.outputs import PLOT, check_output


def inspect_recipes(paths: list[Path], model: str | None = None, plot: Path | None = None,
                    text_tokens: float | None = None, force: bool = False) -> tuple[list[Recipe], str]:
    """Load every recipe; with `model`, check it fits and (re)compute its FLOPs reductions for that model.

    `text_tokens` is the prompt's non-visual length for the whole-LM figure (default: the recipe's own
    calibration mean, else 0). Returns the recipes and a printable summary; writes a PNG to `plot` if given.
    """
    if text_tokens is not None and not text_tokens >= 0:
        raise ConfigError(f"--text-tokens must be 0 or more, got {text_tokens}.",
                          "Give the prompt's non-visual token count, e.g. --text-tokens 40, or leave it out.")
    if plot:
        check_output(Path(plot), PLOT, inputs=paths, force=force)
    recipes = [load_recipe(p) for p in paths]
    if model:
        config = load_llava_config(model)
        shape, fingerprint = LanguageModelShape.from_config(config), architecture_fingerprint(config)
        recipes = [_with_reductions(r, shape, fingerprint, text_tokens) for r in recipes]
    sections = [f"== {path}\n{format_recipe_summary(recipe)}" for path, recipe in zip(paths, recipes)]
    if plot:
        plot_tokens_per_layer([(Path(p).stem, r) for p, r in zip(paths, recipes)], plot)
        sections.append(f"plot: {plot}")
    return recipes, "\n\n".join(sections)


def _with_reductions(recipe: Recipe, shape: LanguageModelShape, fingerprint: str,
                     text_tokens: float | None) -> Recipe:
    check_recipe_fits(recipe, shape, fingerprint)
    tokens = text_tokens if text_tokens is not None else recipe.calibration.get("mean_text_tokens", 0.0)
    return replace(recipe, achieved=achieved_reductions(recipe, shape, tokens))
