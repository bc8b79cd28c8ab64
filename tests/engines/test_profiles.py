"""TensorRT optimization profiles and KV capacities, derived from the ONNX set and two limits, checked against
the shapes a real ONNX Runtime engine produces."""


import numpy as np
import pytest

from conftest import reseal_manifest

from engines.profiles import derive_profiles, dim_ranges, kv_capacity, pruned_before_stage
from runtime import Pipeline
from visprune.errors import ConfigError


@pytest.fixture(scope="module")
def onnx_set(exported):
    from visprune.manifests.onnx_set import read_onnx_set

    return read_onnx_set(exported["pruned-onnx"])


def test_pruned_tokens_per_kv_stage_follow_the_recipe(onnx_set):
    # TINY_RECIPE_60 = [143, 101, 44, 41, 18, 28, 0, 0]: one stage per pruning layer, stage 0 before any
    assert pruned_before_stage(onnx_set) == [0, 143, 244, 288, 329, 347, 375]


def test_profiles_cover_every_dynamic_input_with_ordered_bounds(onnx_set):
    profiles = derive_profiles(onnx_set, max_prompt_tokens=700, max_new_tokens=32, max_batch=4)
    assert set(profiles) == {"vision", "prefill", "decode"}
    # the shortest prompt is the image and one token: the text before the image is each request's own
    assert profiles["prefill"]["inputs_embeds"] == {"min": [1, 577, 64], "opt": [4, 640, 64], "max": [4, 700, 64]}
    assert profiles["prefill"]["pad_lengths"] == profiles["decode"]["pad_lengths"] == {"min": [1], "opt": [4],
                                                                                        "max": [4]}
    for graph in profiles.values():
        for shapes in graph.values():
            assert all(lo <= mid <= hi for lo, mid, hi in zip(shapes["min"], shapes["opt"], shapes["max"]))
    stage_of = onnx_set.kv_stages
    for layer in range(8):
        key = profiles["decode"][f"past.{layer}.key"]
        pruned = pruned_before_stage(onnx_set)[stage_of[layer]]
        assert key["min"][2] == 577 - pruned and key["max"][2] == 700 - pruned + 30


def test_real_cache_lengths_stay_inside_the_profiles_and_capacities(exported, onnx_set, default_set):
    """Prefill and decode on the real engine: every past length fed to decode lies in its profile range."""
    pipe = Pipeline.from_engine_dir(exported["pruned"])
    image = default_set.samples[0].image
    input_ids, pixel_values = pipe.encode(image, pipe.chat_prompt("What is shown here, in a few words?"))
    new_tokens = 5
    ranges = dim_ranges(onnx_set, max_prompt_tokens=input_ids.shape[1], max_new_tokens=new_tokens)
    capacity = kv_capacity(onnx_set, input_ids.shape[1], new_tokens)
    embeds, layout = pipe.embed(input_ids, pipe.runner.image_features(pixel_values).features)
    first = pipe.runner.prefill(embeds, layout)
    past = first.past
    for step in range(new_tokens - 1):
        for layer in range(8):
            length = past[2 * layer].shape()[2]
            low, _, high = ranges[f"past_len_s{onnx_set.kv_stages[layer]}"]
            assert low <= length <= high, (step, layer)
        embeds = pipe.embeddings[[[0]]].astype(np.float32)
        _, past = pipe.runner.decode(embeds, np.array([input_ids.shape[1] + step]), layout, past)
    assert all(past[2 * layer].shape()[2] <= capacity[layer] for layer in range(8))


@pytest.mark.parametrize("limits, fragment", [
    ((500, 16), "shorter than the shortest prompt"),
    ((2040, 16), "exceeds the 2048 tokens"),
    ((700, 0), "at least 1"),
])
def test_limits_that_do_not_fit_the_export_are_rejected(onnx_set, limits, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        derive_profiles(onnx_set, *limits)
    assert "Hint:" in str(info.value)


def test_a_request_outside_the_built_shapes_is_refused_before_it_runs(exported, tmp_path, default_set):
    """An engine with profile limits (as TensorRT engines have) refuses longer requests with the rebuild hint."""
    import shutil

    from visprune.errors import PromptError

    engine = tmp_path / "engine"
    shutil.copytree(exported["pruned"], engine)
    reseal_manifest(engine / "engine.json", lambda m: m.update(limits={"max_prompt_tokens": 600, "max_new_tokens": 8}))
    pipe = Pipeline.from_engine_dir(engine)
    image = default_set.samples[0].image
    assert len(pipe.generate(image, pipe.chat_prompt("What?"), max_new_tokens=8).token_ids) <= 8
    for question, new_tokens in (("What?", 9), ("What? " * 20, 4)):
        with pytest.raises(PromptError, match="outside the shapes") as info:
            pipe.generate(image, pipe.chat_prompt(question), max_new_tokens=new_tokens)
        assert "--max-prompt-tokens/--max-new-tokens" in str(info.value)


def test_polygraphy_profiles_carry_the_derived_shapes(onnx_set):
    """The TensorRT build hands these to Polygraphy's CreateConfig (the rest of that path needs TensorRT)."""
    from engines.tensorrt import polygraphy_profile

    derived = derive_profiles(onnx_set, max_prompt_tokens=700, max_new_tokens=32)
    for graph, inputs in derived.items():
        profile = polygraphy_profile(inputs)
        assert set(profile) == set(inputs)
        for name, bounds in inputs.items():
            assert [list(profile[name].min), list(profile[name].opt), list(profile[name].max)] == \
                [bounds["min"], bounds["opt"], bounds["max"]]
