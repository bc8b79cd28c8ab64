"""FastV and random baselines: recipes at an equal budget, and how the exported model picks survivors."""

from pathlib import Path

import pytest
import torch

from calibrate.baselines import fastv_recipe, random_recipe
from calibrate.flops import visual_flops_reduction
from calibrate.recipe import Recipe, recipe_from_dict, save_recipe
from exporter.graphs import VisionFeatures
from exporter.pruned_lm import PrunedLlamaPrefill
from visprune.errors import BudgetUnreachableError, RecipeError
from visprune.models.decoder import attend, causal_blocked, finish_layer

from conftest import TINY_RECIPE_60
from two_processes import export_and_build, run_in_two_processes


def test_fastv_prunes_once_before_layer_two_with_the_smallest_count_meeting_the_budget(tiny):
    recipe = fastv_recipe(tiny.shape, 0.6)
    assert recipe.method == "fastv" and [i for i, r in enumerate(recipe.removed) if r] == [1]
    assert visual_flops_reduction(tiny.shape, recipe.removed) >= 0.6
    fewer = list(recipe.removed)
    fewer[1] -= 1
    assert visual_flops_reduction(tiny.shape, fewer) < 0.6


def test_fastv_beyond_layer_twos_reach_cuts_before_layer_one_and_records_it(tiny):
    recipe = fastv_recipe(tiny.shape, 0.8)  # a cut before layer 2 reaches at most 78.8 % on 8 layers
    assert [i for i, r in enumerate(recipe.removed) if r] == [0]
    assert recipe.search["cut_before_layer"] == 1 and recipe.search["asked_cut_before_layer"] == 2
    assert visual_flops_reduction(tiny.shape, recipe.removed) >= 0.8


def test_a_budget_no_single_cut_reaches_is_an_error_with_the_highest_reachable_one(tiny):
    with pytest.raises(BudgetUnreachableError, match=r"at most 9\d\.\d%") as info:
        fastv_recipe(tiny.shape, 0.95)
    assert "Hint: Ask for at most 0.9" in str(info.value)


def test_random_keeps_the_counts_and_needs_a_seed():
    fit = Recipe("fitprune", 576, [143, 101, 44, 41, 18, 28, 0, 0], alpha=0.1)
    rand = random_recipe(fit, seed=7)
    assert rand.removed == fit.removed and rand.method == "random" and rand.seed == 7 and rand.alpha is None
    assert rand.content_hash() != random_recipe(fit, seed=8).content_hash()
    with pytest.raises(RecipeError, match="needs a 'seed'"):
        recipe_from_dict({"method": "random", "num_visual_tokens": 576, "removed": fit.removed})


def prompt_embeds(tiny, default_set):
    from visprune.models import chat_prompt, encode_image_prompt, load_image

    sample = default_set.samples[0]
    encoded = encode_image_prompt(tiny.processor, load_image(sample.image), chat_prompt(tiny.processor, sample.question),
                                  tiny.image_token_id)
    with torch.no_grad():
        hidden = tiny.model.get_input_embeddings()(encoded.input_ids)
        hidden[:, encoded.image_start:encoded.image_start + 576] = VisionFeatures(tiny.model)(encoded.pixel_values)
    return hidden, encoded.image_start


def test_fastv_keeps_what_the_last_token_attends_to_most_at_layer_one(tiny, default_set):
    hidden, start = prompt_embeds(tiny, default_set)
    recipe = fastv_recipe(tiny.shape, 0.4)
    with torch.no_grad():
        _, _, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(hidden)
        lm = tiny.model.model.language_model
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        context, _, _, _ = attend(lm.layers[0], lm.rotary_emb, hidden, positions, blocked=causal_blocked(hidden.shape[1]))
        after_first = finish_layer(lm.layers[0], hidden, context)
        _, probs, _, _ = attend(lm.layers[1], lm.rotary_emb, after_first, positions,
                                blocked=causal_blocked(hidden.shape[1]))
    scores = probs.mean(dim=1)[0, -1, start:start + 576]
    expected = torch.topk(scores, 576 - recipe.removed[1]).indices.sort().values
    assert kept[0][0].tolist() == expected.tolist()


def test_random_survivors_depend_on_the_seed_not_the_image(tiny, default_set):
    hidden, start = prompt_embeds(tiny, default_set)
    recipe = random_recipe(Recipe("fitprune", 576, [100, 50, 0, 0, 0, 0, 0, 0]), seed=3)
    with torch.no_grad():
        _, _, kept_a = PrunedLlamaPrefill(tiny.model, recipe, start)(hidden)
        _, _, kept_b = PrunedLlamaPrefill(tiny.model, recipe, start)(torch.randn_like(hidden))
    scores = torch.rand(576, generator=torch.Generator().manual_seed(3))
    assert kept_a[0][0].tolist() == torch.topk(scores, 476).indices.sort().values.tolist()
    assert [k.tolist() for k in kept_a] == [k.tolist() for k in kept_b]
    assert set(kept_a[1][0].tolist()) < set(kept_a[0][0].tolist())  # nested: later layers keep a subset


def baseline_recipe(method: str, shape) -> Recipe:
    return fastv_recipe(shape, 0.6) if method == "fastv" else \
        random_recipe(Recipe("fitprune", 576, TINY_RECIPE_60), seed=1)


@pytest.fixture(scope="module")
def baseline_engines(tmp_path_factory, tiny) -> dict[str, Path]:
    """{method: root} with root/onnx and root/engine, both baselines exported at once (tests/two_processes.py)."""
    roots = {method: tmp_path_factory.mktemp(method) for method in ("fastv", "random")}
    for method, root in roots.items():
        save_recipe(baseline_recipe(method, tiny.shape), root / "recipe.json")
    run_in_two_processes(*([(export_and_build, (root / "recipe.json", root))] for root in roots.values()))
    return roots


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastv", "random"])
def test_baselines_export_and_run_like_fitprune(method, tiny, baseline_engines, default_set):
    """Through the same exporter and runtime: the ORT engine keeps what the PyTorch reference keeps."""
    from runtime import Pipeline
    from runtime.torch_runner import TorchRunner

    recipe = baseline_recipe(method, tiny.shape)
    engine_dir = baseline_engines[method] / "engine"
    engine = Pipeline.from_engine_dir(engine_dir)
    assert engine.manifest.onnx_set.recipe.method == method
    reference = engine.with_runner(TorchRunner(tiny, recipe, engine.image_start))
    image, prompt = default_set.samples[5].image, engine.chat_prompt("What is in the picture?")
    a, b = (p.generate(image, prompt, max_new_tokens=4, keep_logits=True) for p in (engine, reference))
    assert a.kept_indices == b.kept_indices and len(a.kept_indices) == sum(1 for r in recipe.removed if r)
    assert a.token_ids == b.token_ids
    assert max(abs(x - y).max() for x, y in zip(a.step_logits, b.step_logits)) <= 1e-4
