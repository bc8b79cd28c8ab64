"""The recipe artifact: how many visual tokens each decoder layer deletes. The contract every later stage reads.

`removed[i]` tokens are deleted at layer i, after its attention (they were queries and keys there and skip its
output projection and MLP); `keep[i]` visual tokens leave layer i. A recipe file is deterministic: the same
inputs and seed give the same bytes. Run measurements (timings, host) go to a separate run record.

A hand-written recipe needs only {"method", "num_visual_tokens", "removed"}; everything else is optional and
is checked when present. This module is the recipe's one schema and `load_recipe` its one reader.

LLaVA-NeXT images bring a different N each (anyres: 1176 for a small square, 2340 for 640x480, 2928 at most), so a
NeXT recipe says how its counts, written for `num_visual_tokens` (the nominal N), meet an image of N tokens
(`budget_policy`, `counts_at`):

| policy | counts at an image of N tokens | as in |
|---|---|---|
| `fixed` | N must equal `num_visual_tokens` (LLaVA-1.5: always 576) | LLaVA-1.5 recipes |
| `ratio` | each count scaled: `int(removed[i] * N / num_visual_tokens)` | FitPrune's NeXT code (nominal 2880) |
| `absolute` | the same kept counts `keep[i]` whatever N: the first cut takes the difference | DART's NeXT budget |
"""

from __future__ import annotations

from dataclasses import asdict, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from calibrate.flops import lm_flops_reduction, visual_flops_reduction, visual_tokens_entering
from visprune.artifacts import atomic_write_json, canonical_json, sha256_bytes
from visprune.errors import RecipeError
from visprune.manifests import schema_ids
from visprune.manifests.common import Fraction, NonNegInt, PosInt, parse, read_json
from visprune.methods import METHOD_NAMES
from visprune.methods import METHODS as METHOD_REGISTRY
from visprune.models.llava import LanguageModelShape

BudgetPolicy = Literal["fixed", "ratio", "absolute"]
RECIPE_SCHEMA, RECIPE_SCHEMA_VERSION = schema_ids.RECIPE.name, schema_ids.RECIPE.version
RECIPE_HINT = 'A minimal recipe is {"method": "fitprune", "num_visual_tokens": 576, "removed": [...]} with one ' \
              "count per decoder layer; `visprune calibrate` writes complete ones."


@dataclass(config=ConfigDict(strict=True))
class Recipe:
    """Every field type-checked on construction (strict: `true` is not a count); cross-field rules in
    `check_recipe`."""

    method: Literal[METHOD_NAMES]
    num_visual_tokens: PosInt
    removed: list[NonNegInt]
    reduction_target: Fraction | None = None
    achieved: dict[str, float] = field(default_factory=dict)
    alpha: Fraction | None = None
    model: dict[str, Any] = field(default_factory=dict)  # name, fingerprint, dtype
    calibration: dict[str, Any] = field(default_factory=dict)  # description, sha256, num_samples, ...
    search: dict[str, Any] = field(default_factory=dict)  # tolerance, steps
    seed: int | None = None
    tools: dict[str, str] = field(default_factory=dict)
    removed_before_llm: NonNegInt = 0  # pre-LLM methods: tokens dropped before the first layer
    budget_policy: BudgetPolicy = "fixed"  # how the counts meet an image of another N (LLaVA-NeXT; see above)

    @property
    def num_layers(self) -> int:
        return len(self.removed)

    @property
    def keep(self) -> list[int]:
        """Visual tokens leaving each layer."""
        return visual_tokens_entering(self.num_visual_tokens - self.removed_before_llm, self.removed)[1:]

    @property
    def total_removed(self) -> int:
        return self.removed_before_llm + sum(self.removed)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        for name, default in (("removed_before_llm", 0), ("budget_policy", "fixed")):
            if body[name] == default:  # LLaVA-1.5 recipes keep the bytes (and hashes) they always had
                del body[name]
        return {"schema": RECIPE_SCHEMA, "schema_version": RECIPE_SCHEMA_VERSION, "method": body.pop("method"),
                "num_visual_tokens": body.pop("num_visual_tokens"), "num_layers": self.num_layers,
                "removed": body.pop("removed"), "keep": self.keep, **body}

    def content_hash(self) -> str:
        return sha256_bytes(canonical_json(self.to_dict()))


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Parse and check a recipe dict (a calibrated one or a hand-written one): every field's type and range, the
    derived fields (`num_layers`, `keep`) against `removed`, and the rules between fields."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} is not a JSON object.", RECIPE_HINT)
    _check_header(data, source)
    known = {k: data[k] for k in Recipe.__dataclass_fields__ if k in data}
    recipe = parse(Recipe, known, source, RECIPE_HINT, RecipeError)
    check_recipe(recipe, source)
    if "num_layers" in data and canonical_json(data["num_layers"]) != canonical_json(recipe.num_layers):
        raise RecipeError(f"{source}: num_layers is {data['num_layers']!r} but 'removed' has {recipe.num_layers} "
                          "counts.", "Fix the numbers, or drop 'num_layers' (it is derived from 'removed').")
    if "keep" in data and canonical_json(data["keep"]) != canonical_json(recipe.keep):  # true is not 1
        raise RecipeError(f"{source}: 'keep' does not match N minus the running sum of 'removed'.",
                          "Fix the numbers, or drop 'keep' (it is derived from 'removed').")
    return recipe


def _check_header(data: dict[str, Any], source: str) -> None:
    if data.get("schema", RECIPE_SCHEMA) != RECIPE_SCHEMA:
        raise RecipeError(f"{source} is a {data.get('schema')!r} file, not a recipe.", RECIPE_HINT)
    version = data.get("schema_version", RECIPE_SCHEMA_VERSION)
    if version != RECIPE_SCHEMA_VERSION or isinstance(version, bool):
        raise RecipeError(f"{source} has schema_version {version!r}; this visprune reads {RECIPE_SCHEMA_VERSION}.",
                          "Re-run `visprune calibrate` with this version of visprune to rewrite the recipe.")


def check_recipe(recipe: Recipe, source: str = "recipe") -> None:
    """The rules between fields, for recipes read from files and made in code alike."""
    spec = METHOD_REGISTRY[recipe.method]
    if spec.needs_seed and recipe.seed is None:
        raise RecipeError(f"{source}: a {recipe.method} recipe needs a 'seed'.", "Add e.g. \"seed\": 0.")
    if (recipe.removed_before_llm > 0) != spec.pre_llm or (spec.pre_llm and any(recipe.removed)):
        where = "before the LLM only ('removed_before_llm')" if spec.pre_llm else "inside the LLM only ('removed')"
        raise RecipeError(f"{source}: {recipe.method} removes tokens {where}.",
                          f"Write {recipe.method}'s count there, or rebuild it with `visprune calibrate --method "
                          f"{recipe.method}`.")
    if not recipe.removed:
        raise RecipeError(f"{source}: 'removed' is empty.", RECIPE_HINT)
    if recipe.budget_policy == "ratio" and spec.constant_keep and recipe.total_removed:
        raise RecipeError(f"{source}: {recipe.method}'s selection needs a constant kept count, which a 'ratio' budget "
                          "(K a fraction of each image's N) does not give.",
                          f"Use budget_policy 'absolute' (`visprune calibrate --method {recipe.method} "
                          "--budget-policy absolute`).")
    if spec.cuts_after_layer and recipe.removed[-1]:
        raise RecipeError(f"{source}: {recipe.method} cannot prune at the last layer: its selection reads the next "
                          "layer's keys.", "Move the count to an earlier layer.")
    if recipe.total_removed >= recipe.num_visual_tokens:
        raise RecipeError(f"{source} deletes {recipe.total_removed} of {recipe.num_visual_tokens} visual tokens.",
                          "Every layer must keep at least one visual token; lower the counts.")
    fingerprint = recipe.model.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise RecipeError(f"{source}: model.fingerprint must be a string.", RECIPE_HINT)


def counts_at(recipe: Recipe, n):
    """(removed_before_llm, removed per layer) for an image of `n` visual tokens, as `budget_policy` says. Plain
    integer arithmetic, so the exporter traces it on the graph's symbolic N and the graph computes K from N;
    `check_image_fits` tells whether an image fits at all."""
    if recipe.budget_policy == "ratio":  # FitPrune's int(count * n / nominal), exact in integers
        scale = lambda count: count * n // recipe.num_visual_tokens  # noqa: E731
        return scale(recipe.removed_before_llm), [scale(count) for count in recipe.removed]
    if recipe.budget_policy == "fixed" or not recipe.total_removed:
        return recipe.removed_before_llm, list(recipe.removed)
    extra = n - recipe.num_visual_tokens  # absolute: the first cut removes what makes its kept count the recipe's
    if recipe.removed_before_llm:
        return recipe.removed_before_llm + extra, list(recipe.removed)
    first = recipe.removed.index(next(count for count in recipe.removed if count))
    return 0, [count + extra if i == first else count for i, count in enumerate(recipe.removed)]


def check_image_fits(recipe: Recipe, n: int) -> None:
    """RecipeError unless an image of `n` visual tokens can run this recipe: a `fixed` recipe takes its own N
    only; an `absolute` one needs at least the tokens its first cut keeps."""
    if recipe.budget_policy == "fixed" and n != recipe.num_visual_tokens:
        raise RecipeError(f"The recipe is for images of {recipe.num_visual_tokens} visual tokens; this one has {n}.",
                          "Use a recipe with budget_policy 'ratio' or 'absolute' for a LLaVA-NeXT model.")
    before, removed = counts_at(recipe, n)
    if recipe.budget_policy == "absolute" and min(before, *removed) < 0:
        raise RecipeError(f"This image has {n} visual tokens; the recipe's absolute budget keeps "
                          f"{n - min(before, *removed)} of them at its first cut.",
                          "Use a larger image, or a recipe with budget_policy 'ratio'.")


def unpruned_recipe(shape: LanguageModelShape) -> Recipe:
    """The recipe that removes nothing: the unpruned baseline goes through the same export code."""
    return Recipe(method="none", num_visual_tokens=shape.num_visual_tokens, removed=[0] * shape.num_layers,
                  budget_policy="ratio" if shape.anyres else "fixed")  # NeXT: N per image, nothing removed


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    data = read_json(path, "recipe", "Create one with `visprune calibrate ... --out PATH`, or pass the path of a "
                     "recipe JSON file.", RecipeError)
    return recipe_from_dict(data, source=str(path))


def save_recipe(recipe: Recipe, path: Path) -> None:
    atomic_write_json(path, recipe.to_dict())


def check_recipe_fits(recipe: Recipe, shape: LanguageModelShape, fingerprint: str | None = None,
                      model: str | None = None, allow_other_model: bool = False) -> None:
    """Raise unless the recipe's layer count, token count and (if recorded) model fingerprint fit the model, and,
    given `model` (a checkpoint's name), unless the recipe was calibrated on that checkpoint or
    `allow_other_model`. Checkpoints of one architecture (tiny, tiny-vqa) share a fingerprint, but the counts
    were searched on one checkpoint's attention: on another they are a guess, which the user must ask for."""
    _check_policy_fits(recipe, shape)
    if recipe.num_layers != shape.num_layers or (not shape.anyres and recipe.num_visual_tokens != shape.num_visual_tokens):
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
    calibrated_on = recipe.model.get("name")
    if model and calibrated_on and not _same_checkpoint(calibrated_on, model) and not allow_other_model:
        raise RecipeError(
            f"The recipe was calibrated on {calibrated_on}, not on {model} (same architecture, other weights).",
            f"Calibrate on {model} (`visprune calibrate --model {model} ...`), or pass --allow-other-model to use "
            "these counts anyway.",
        )


def _check_policy_fits(recipe: Recipe, shape: LanguageModelShape) -> None:
    """A LLaVA-1.5 recipe (`fixed`: one N) cannot meet NeXT's per-image N, nor a NeXT recipe a fixed-N model."""
    if shape.anyres and recipe.method == "adaptprune":
        raise RecipeError("AdaptPrune on LLaVA-NeXT is not supported yet: its centre prior and grid suppression "
                          "need the base view and the unpadded grid as two 2-D maps.",
                          "Use another --method (fitprune, fastv, dart, divprune, visionzip, random) on NeXT.")
    if shape.anyres and recipe.budget_policy == "fixed":
        raise RecipeError(
            f"The recipe is a LLaVA-1.5 recipe (budget_policy 'fixed', {recipe.num_visual_tokens} visual tokens); "
            f"this LLaVA-NeXT model gives {shape.visual_token_range[0]}..{shape.visual_token_range[1]} per image.",
            "Calibrate on this model (`visprune calibrate --model ...`), or use a NeXT recipe "
            "(recipes/llava-v1.6-vicuna-7b/) with budget_policy 'ratio' or 'absolute'.")
    if not shape.anyres and recipe.budget_policy != "fixed":
        raise RecipeError(
            f"The recipe is a LLaVA-NeXT recipe (budget_policy {recipe.budget_policy!r}); this model is LLaVA-1.5 "
            f"with {shape.num_visual_tokens} visual tokens per image.",
            "Use a recipe calibrated for this model (`visprune calibrate --model ...`).")


def _same_checkpoint(a: str, b: str) -> bool:
    """Names are an embedded model's name, a folder's resolved path or a hub id: the last part names the
    checkpoint, so a moved folder or a hub id (the shipped llava-hf/llava-1.5-7b-hf recipes) and a local
    download of it still match."""
    return Path(a).name == Path(b).name


def achieved_reductions(recipe: Recipe, shape: LanguageModelShape, text_tokens: float) -> dict[str, float]:
    """Visual-only and whole-LM FLOPs reductions of the recipe's fixed counts."""
    pre, after_layer = recipe.removed_before_llm, METHOD_REGISTRY[recipe.method].cuts_after_layer
    return {
        "visual_flops_reduction": round(visual_flops_reduction(shape, recipe.removed, pre, after_layer), 6),
        "lm_flops_reduction": round(lm_flops_reduction(shape, recipe.removed, text_tokens, pre, after_layer), 6),
        "lm_flops_text_tokens": round(text_tokens, 3),
    }
