"""`calibrate(config, out)`: the calibration stage from model and data to a written recipe."""

from __future__ import annotations

import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from calibrate.baselines import counts_recipe, one_layer_recipe, pre_llm_recipe
from calibrate.config import CalibrationConfig
from calibrate.data import CalibrationSet, default_set_for, read_calibration_jsonl, select_samples
from calibrate.plots import plot_tokens_per_layer
from calibrate.recipe import Recipe, achieved_reductions, check_recipe, save_recipe
from calibrate.replay import DecoderReplay, SampleState, embed_samples
from calibrate.search import RecipeSearch, SearchResult
from visprune.artifacts import to_pretty_json, tool_versions
from visprune.errors import BackendUnavailableError, InputDataError
from visprune.methods import METHODS
from visprune.models import LlavaBundle, chat_prompt, encode_image_prompt, load_image, load_llava
from visprune.models.llava import LanguageModelShape, load_llava_config, model_folder
from visprune.outputs import RECIPE, check_output, replacing


@dataclass
class CalibrationResult:
    recipe: Recipe
    recipe_path: Path
    plot_path: Path | None
    run_record_path: Path
    timings: dict[str, float] = field(default_factory=dict)


def calibrate(config: CalibrationConfig, out: Path, plot: bool = True, progress: bool = True,
              force: bool = False) -> CalibrationResult:
    """Make `config.method`'s recipe for `config.reduction` and write it to `out` (plus a plot and a run record):
    FitPrune's search, or a method built on its counts, or one whose counts follow from the budget alone
    (visprune/methods.py: the schedule).

    `out` is checked before any work (visprune/outputs.py; `force` replaces what is not a visprune recipe).
    Nothing is written unless the search succeeds; the files are staged and swapped in, the recipe last.
    """
    out = Path(out)
    check_output(out, RECIPE, inputs=calibration_inputs(config), force=force, siblings=_side_files(out))
    spec = METHODS[config.method]
    if not spec.needs_calibration:  # a budget the counts cannot meet fails from the config alone, before loading
        budget_recipe(LanguageModelShape.from_config(load_llava_config(config.model)), config.reduction, config.method)
    timings: dict[str, float] = {}
    device, dtype = resolve_device(config.device)
    batch_size = config.batch_size or resolve_batch_size(device)
    with _timed(timings, "load_model_s"):
        bundle = load_llava(config.model, device=device, dtype=dtype)
    with _timed(timings, "prepare_samples_s"):
        dataset = _dataset(config)
        states = prepare_samples(bundle, dataset, batch_size, progress)
    if not spec.needs_calibration:  # no search: the counts follow from the FLOPs budget alone
        recipe = _with_provenance(budget_recipe(bundle.shape, config.reduction, config.method), config, bundle,
                                  dataset, states)
        timings["total_s"] = round(sum(timings.values()), 3)
        return _write_outputs(recipe, out, plot, timings, {"device": device})
    search = RecipeSearch(DecoderReplay(bundle.model), states, bundle.shape, batch_size=batch_size)
    with _timed(timings, "reference_pass_s"):
        with tqdm(total=bundle.shape.num_layers, desc="reference pass (layers)", disable=not progress) as bar:
            search.run_reference_pass(progress=bar.update)
    with _timed(timings, "search_s"):
        result = _bisect(search, config, progress)
    timings["total_s"] = round(sum(timings.values()), 3)
    recipe = _recipe(config, bundle, dataset, states, result)
    if config.method != "fitprune":
        recipe = counts_recipe(recipe, config.method, config.seed)
    run = {"device": device, "batch_size": batch_size, "sample_layers_computed": search.layers_computed}
    return _write_outputs(recipe, out, plot, timings, run)


def budget_recipe(shape, reduction: float, method: str) -> Recipe:
    """The recipe of a method whose counts follow from the FLOPs budget alone (one cut, or before the LLM)."""
    if METHODS[method].pre_llm:
        return pre_llm_recipe(shape, reduction, method)
    return one_layer_recipe(shape, reduction, method)


def resolve_device(device: str) -> tuple[str, torch.dtype]:
    """`auto` picks CUDA when present. CUDA runs in float16 (softmax and scores in float32), CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"--device {device} was asked for, but this PyTorch sees no CUDA GPU.",
                                      "Use --device cpu (or auto), or install a CUDA build of PyTorch on a GPU host.")
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


def resolve_batch_size(device: str) -> int:
    """Samples per replayed batch. Large batches pay on a GPU; on a CPU a batch's attention tensors
    (B x H x S x S in float32) fall out of the cache, and batches of 2 measured twice as fast as 8."""
    return 16 if device.startswith("cuda") else 2


def _dataset(config: CalibrationConfig) -> CalibrationSet:
    dataset = read_calibration_jsonl(config.data, config.images) if config.data else default_set_for(config.model)
    return select_samples(dataset, config.samples, config.seed)


IMAGES_HINT = "Check the path, or the --images folder it is resolved against."


def prepare_samples(bundle: LlavaBundle, dataset: CalibrationSet, batch_size: int,
                    progress: bool = False) -> list[SampleState]:
    """Read, template, tokenize and embed every sample once (the reference re-reads images at every layer)."""
    prompts = []
    for sample in tqdm(dataset.samples, desc="preparing samples", disable=not progress):
        try:
            prompt = sample.prompt if sample.prompt is not None else chat_prompt(bundle.processor, sample.question)
            image = load_image(sample.image, IMAGES_HINT)
            prompts.append(encode_image_prompt(bundle.processor, image, prompt, bundle.image_token_id))
        except InputDataError as e:
            raise type(e)(f"Calibration sample {sample.sample_id}: {e.message}", e.hint) from e
    states: list[SampleState] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            states += embed_samples(bundle.model, prompts[i:i + batch_size])
    return states


def _bisect(search: RecipeSearch, config: CalibrationConfig, progress: bool) -> SearchResult:
    steps = math.ceil(math.log2(1.0 / config.alpha_tolerance))  # 7 at the default 0.01
    with tqdm(total=steps, desc="bisection on alpha", disable=not progress) as bar:
        def on_step(outcome) -> None:
            bar.set_postfix(alpha=f"{outcome.alpha:.4f}", reduction=f"{outcome.visual_reduction:.3f}",
                            feasible="yes" if outcome.feasible else "no")
            bar.update(1)

        return search.search(config.reduction, config.alpha_tolerance, on_step=on_step)


def _recipe(config: CalibrationConfig, bundle: LlavaBundle, dataset: CalibrationSet,
            states: list[SampleState], result: SearchResult) -> Recipe:
    recipe = Recipe(
        method="fitprune",
        num_visual_tokens=bundle.shape.num_visual_tokens,
        removed=result.best.recipe_removed,
        reduction_target=config.reduction,
        alpha=result.best.alpha,
        search={"tolerance": config.alpha_tolerance, "head_reduction": "max", "budget_test": "recipe",
                "steps": [{"alpha": s.alpha, "feasible": s.feasible,
                           "visual_flops_reduction": round(s.visual_reduction, 6)} for s in result.steps]},
    )
    return _with_provenance(recipe, config, bundle, dataset, states)


def _with_provenance(recipe: Recipe, config: CalibrationConfig, bundle: LlavaBundle, dataset: CalibrationSet,
                     states: list[SampleState]) -> Recipe:
    """Model, calibration set, seed, tools and achieved reductions (whole-LM at the set's mean text length)."""
    text_tokens = sum(s.prefix + s.text for s in states) / len(states)
    recipe.model = {"name": bundle.name, "fingerprint": bundle.fingerprint,
                    "dtype": str(bundle.model.dtype).removeprefix("torch.")}
    recipe.calibration = {"description": dataset.description, "sha256": dataset.content_hash(),
                          "num_samples": len(states), "mean_text_tokens": round(text_tokens, 3)}
    recipe.seed, recipe.tools = config.seed, tool_versions("torch", "transformers")
    recipe.budget_policy = config.resolve_budget_policy(bundle.shape.anyres)
    check_recipe(recipe)  # e.g. a ratio policy for a selection that needs a constant K
    recipe.achieved = achieved_reductions(recipe, bundle.shape, text_tokens)
    return recipe


def calibration_inputs(config: CalibrationConfig) -> list[Path | None]:
    """What calibration reads: an output must not replace any of it."""
    return [config.data, config.images, model_folder(config.model)]


def _side_files(out: Path) -> tuple[Path, Path]:
    """The plot and the run record written next to the recipe."""
    return out.with_suffix(".png"), out.with_name(out.stem + ".run.json")


def _write_outputs(recipe: Recipe, out: Path, plot: bool, timings: dict[str, float],
                   run: dict) -> CalibrationResult:
    plot_path, run_path = _side_files(out)
    # exits run innermost first: the run record and the plot are swapped in before the recipe
    with replacing(out, is_dir=False) as recipe_file, replacing(plot_path, is_dir=False) as plot_file, \
            replacing(run_path, is_dir=False) as run_file:
        if plot:
            plot_tokens_per_layer([(f"{recipe.reduction_target:.0%} target", recipe)], plot_file,
                                  title=f"{METHODS[recipe.method].title} recipe, {recipe.model.get('name', '')}")
        run_file.write_bytes(to_pretty_json({
            "schema": "visprune.calibration_run", "recipe_sha256": recipe.content_hash(), "timings": timings, **run,
            "host": platform.node(), "created_unix": round(time.time(), 3)}))
        save_recipe(recipe, recipe_file)
    return CalibrationResult(recipe=recipe, recipe_path=out, plot_path=plot_path if plot else None,
                             run_record_path=run_path, timings=timings)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)
