"""The recipe artifact: how many visual tokens each decoder layer deletes. The contract every later stage reads.

`removed[i]` tokens are deleted at layer i, after its attention (they were queries and keys there and skip its
output projection and MLP); `keep[i]` visual tokens leave layer i. A recipe file is deterministic: the same
inputs and seed give the same bytes. Run measurements (timings, host) go to a separate run record.

A hand-written recipe needs only {"method", "num_visual_tokens", "removed"}; everything else is optional and
is checked when present.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calibrate.flops import lm_flops_reduction, visual_flops_reduction, visual_tokens_entering
from visprune.artifacts import atomic_write_json, canonical_json, sha256_bytes
from visprune.errors import RecipeError
from visprune.models.llava import LanguageModelShape

RECIPE_SCHEMA = "visprune.recipe"
RECIPE_SCHEMA_VERSION = 1
# How a pruning layer picks its survivors (exporter/pruned_lm.py): "fitprune" a_self x a_cross; "fastv" the last
# prompt token's head-mean attention (one pruning layer); "random" a seeded fixed score per image index;
# "none" prunes nothing (the unpruned model, exported through the same code).
METHODS = ("fitprune", "fastv", "random", "none")


@dataclass
class Recipe:
    method: str
    num_visual_tokens: int
    removed: list[int]
    reduction_target: float | None = None
    achieved: dict[str, float] = field(default_factory=dict)
    alpha: float | None = None
    model: dict[str, Any] = field(default_factory=dict)  # name, fingerprint
    calibration: dict[str, Any] = field(default_factory=dict)  # description, sha256, num_samples, ...
    search: dict[str, Any] = field(default_factory=dict)  # tolerance, steps
    seed: int | None = None
    tools: dict[str, str] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.removed)

    @property
    def keep(self) -> list[int]:
        """Visual tokens leaving each layer."""
        return visual_tokens_entering(self.num_visual_tokens, self.removed)[1:]

    @property
    def total_removed(self) -> int:
        return sum(self.removed)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return {"schema": RECIPE_SCHEMA, "schema_version": RECIPE_SCHEMA_VERSION, "method": body.pop("method"),
                "num_visual_tokens": body.pop("num_visual_tokens"), "num_layers": self.num_layers,
                "removed": body.pop("removed"), "keep": self.keep, **body}

    def content_hash(self) -> str:
        return sha256_bytes(canonical_json(self.to_dict()))


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Parse and check a recipe dict (a calibrated one or a hand-written one)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} is not a JSON object.", "A recipe is an object with method, num_visual_tokens and removed.")
    version = data.get("schema_version", RECIPE_SCHEMA_VERSION)
    if version != RECIPE_SCHEMA_VERSION:
        raise RecipeError(f"{source} has schema_version {version}; this visprune reads {RECIPE_SCHEMA_VERSION}.",
                          "Re-run `visprune calibrate` with this version of visprune to rewrite the recipe.")
    missing = [k for k in ("method", "num_visual_tokens", "removed") if k not in data]
    if missing:
        raise RecipeError(f"{source} lacks {', '.join(missing)}.",
                          'A minimal recipe is {"method": "fitprune", "num_visual_tokens": 576, "removed": [...]}.')
    known = {k: data[k] for k in Recipe.__dataclass_fields__ if k in data}
    recipe = Recipe(**known)
    _check_counts(recipe, source)
    if "keep" in data and list(data["keep"]) != recipe.keep:
        raise RecipeError(f"{source}: 'keep' does not match N minus the running sum of 'removed'.",
                          "Fix the numbers, or drop 'keep' (it is derived from 'removed').")
    return recipe


def _check_counts(recipe: Recipe, source: str) -> None:
    if recipe.method not in METHODS:
        raise RecipeError(f"{source}: unknown method {recipe.method!r}.", f"Use one of: {', '.join(METHODS)}.")
    counts_ok = isinstance(recipe.removed, list) and all(isinstance(r, int) and r >= 0 for r in recipe.removed)
    if not counts_ok or not isinstance(recipe.num_visual_tokens, int) or recipe.num_visual_tokens < 1:
        raise RecipeError(f"{source}: 'removed' must be non-negative integers and 'num_visual_tokens' positive.",
                          "Write removed as a list with one deletion count per decoder layer.")
    if recipe.method == "random" and recipe.seed is None:
        raise RecipeError(f"{source}: a random recipe needs a 'seed'.", "Add e.g. \"seed\": 0.")
    if recipe.total_removed >= recipe.num_visual_tokens:
        raise RecipeError(f"{source} deletes {recipe.total_removed} of {recipe.num_visual_tokens} visual tokens.",
                          "Every layer must keep at least one visual token; lower the counts.")


def unpruned_recipe(shape: LanguageModelShape) -> Recipe:
    """The recipe that removes nothing: the unpruned baseline goes through the same export code."""
    return Recipe(method="none", num_visual_tokens=shape.num_visual_tokens, removed=[0] * shape.num_layers)


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RecipeError(f"Recipe not found: {path}", "Create one with `visprune calibrate ... --out PATH`.") from e
    except ValueError as e:
        raise RecipeError(f"{path} is not valid JSON ({e}).", "Re-create it with `visprune calibrate`.") from e
    return recipe_from_dict(data, source=str(path))


def save_recipe(recipe: Recipe, path: Path) -> None:
    atomic_write_json(path, recipe.to_dict())


def check_recipe_fits(recipe: Recipe, shape: LanguageModelShape, fingerprint: str | None = None) -> None:
    """Raise unless the recipe's layer count, token count and (if recorded) model fingerprint fit the model."""
    if recipe.num_layers != shape.num_layers or recipe.num_visual_tokens != shape.num_visual_tokens:
        raise RecipeError(
            f"The recipe is for {recipe.num_layers} layers and {recipe.num_visual_tokens} visual tokens; the model "
            f"has {shape.num_layers} layers and {shape.num_visual_tokens} visual tokens.",
            "Use a recipe calibrated for this model (`visprune calibrate --model ...`).",
        )
    recorded = recipe.model.get("fingerprint")
    if fingerprint and recorded and recorded != fingerprint:
        raise RecipeError(
            f"The recipe was calibrated on a model with fingerprint {recorded}, not {fingerprint}.",
            "Calibrate again on this model; the layer and token counts match but the architecture differs.",
        )


def achieved_reductions(recipe: Recipe, shape: LanguageModelShape, text_tokens: float) -> dict[str, float]:
    """Visual-only and whole-LM FLOPs reductions of the recipe's fixed counts."""
    return {
        "visual_flops_reduction": round(visual_flops_reduction(shape, recipe.removed), 6),
        "lm_flops_reduction": round(lm_flops_reduction(shape, recipe.removed, text_tokens), 6),
        "lm_flops_text_tokens": round(text_tokens, 3),
    }
