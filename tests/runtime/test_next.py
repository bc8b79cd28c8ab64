"""LLaVA-NeXT end to end on the embedded tiny-next: every method and both budget policies exported, built for ONNX
Runtime, and held to the PyTorch reference at two image sizes whose N fall in different buckets; the unpruned
engine held to transformers' own LlavaNextForConditionalGeneration; a batch of two sizes; bad input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from calibrate.recipe import Recipe, counts_at, save_recipe
from runtime.pipeline import Pipeline, Request
from runtime.torch_runner import TorchRunner
from visprune.models.llava import resolve_model_path
from visprune.tensor_names import PRE_LLM

from two_processes import export_and_build, run_in_two_processes

pytestmark = pytest.mark.slow  # about two minutes of exports on two cores

NOMINAL = 2928
# name: (method, policy, removed per layer, removed before the LLM); about 60 % of the visual FLOPs at N = 2928
SETS = {
    "fitprune-ratio": ("fitprune", "ratio", [0, 0, 1200, 0, 500, 300, 0, 0], 0),
    "fitprune-absolute": ("fitprune", "absolute", [0, 0, 2000, 0, 300, 200, 0, 0], 0),
    "fastv-absolute": ("fastv", "absolute", [0, 2200, 0, 0, 0, 0, 0, 0], 0),
    "random-ratio": ("random", "ratio", [0, 0, 1200, 0, 500, 300, 0, 0], 0),
    "dart-absolute": ("dart", "absolute", [0, 2600, 0, 0, 0, 0, 0, 0], 0),
    "divprune-absolute": ("divprune", "absolute", [0] * 8, 2750),
    "visionzip-ratio": ("visionzip", "ratio", [0] * 8, 2000),
}
# (H, W): N = 1176 (336 x 336: the smallest bucket) and 2340 (640 x 480 landscape: the 2352 bucket)
SIZES = {(336, 336): 1176, (480, 640): 2340}


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (a blurred noise field), so attention is not uniform."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(height // 48, 2), max(width // 48, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@pytest.fixture(scope="module")
def next_sets(tmp_path_factory) -> dict:
    """{name: (recipe, engine folder)}, plus "unpruned"; exported and built once, two processes at a time."""
    resolve_model_path("tiny-next")  # built here once, before two processes could race to build it
    roots, recipes = {}, {}
    for name, (method, policy, removed, before) in SETS.items():
        roots[name] = tmp_path_factory.mktemp(name)
        recipes[name] = Recipe(method=method, num_visual_tokens=NOMINAL, removed=removed, budget_policy=policy,
                               removed_before_llm=before, seed=0)
        save_recipe(recipes[name], roots[name] / "recipe.json")
    roots["unpruned"] = tmp_path_factory.mktemp("unpruned")
    jobs = [(export_and_build, (roots[n] / "recipe.json" if n in SETS else None, roots[n], "tiny-next"))
            for n in roots]
    run_in_two_processes(jobs[0::2], jobs[1::2])
    return {name: (recipes.get(name), root / "engine") for name, root in roots.items()}


@pytest.fixture(scope="module")
def pipes(next_sets) -> dict:
    return {name: Pipeline.from_engine_dir(engine) for name, (_, engine) in next_sets.items()}


def test_unpruned_engine_matches_transformers(pipes):
    """Host-side anyres packing + our prefill and decode graphs = transformers' LlavaNext, logits and tokens."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    pipe = pipes["unpruned"]
    model = LlavaNextForConditionalGeneration.from_pretrained(resolve_model_path("tiny-next"),
                                                              attn_implementation="eager").eval()
    prompt = pipe.chat_prompt("What is in the picture?")
    for (height, width), n in SIZES.items():
        picture = image(height, width)
        ours = pipe.generate(picture, prompt, 3, keep_logits=True)
        inputs = pipe.processor(images=picture, text=prompt, return_tensors="pt")
        assert int((inputs["input_ids"] == pipe.image_token_id).sum()) == n
        with torch.no_grad():
            theirs = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        assert ours.token_ids == theirs.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        for step, logits in enumerate(theirs.logits):
            np.testing.assert_allclose(ours.step_logits[step], logits[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("name", list(SETS))
def test_engine_matches_the_pytorch_reference(pipes, next_sets, name):
    """Every method and policy: the same tokens, fp32 logits within 1e-4, the same kept indices, and the counts
    `counts_at` gives for each image's N."""
    pipe, recipe = pipes[name], next_sets[name][0]
    reference = pipe.with_runner(TorchRunner.open(next_sets[name][1], pipe.manifest))
    prompt = pipe.chat_prompt("What is in the picture?")
    for (height, width), n in SIZES.items():
        ours = pipe.generate(image(height, width), prompt, 3, keep_logits=True)
        theirs = reference.generate(image(height, width), prompt, 3, keep_logits=True)
        assert ours.token_ids == theirs.token_ids
        assert max(np.abs(a - b).max() for a, b in zip(ours.step_logits, theirs.step_logits)) <= 1e-4
        assert ours.kept_indices == theirs.kept_indices
        before, removed = counts_at(recipe, n)
        kept = [n - before] if before else []
        for count in removed:
            kept += [(kept[-1] if kept else n) - count] if count else []
        assert [len(v) for v in ours.kept_indices.values()] == kept[-len(ours.kept_indices):]
        assert all(0 <= i < n for v in ours.kept_indices.values() for i in v)


def test_a_batch_of_two_sizes_equals_each_alone(pipes):
    """Rows of different N run as groups of one N; each row gives what it gives alone."""
    pipe = pipes["fitprune-ratio"]
    prompt = pipe.chat_prompt("What is in the picture?")
    pictures = [image(336, 336, 1), image(480, 640, 2), image(300, 300, 3)]
    batch = pipe.generate_batch([Request(p, prompt, 3) for p in pictures], keep_logits=True)
    assert [g.timings["batch"] for g in batch] == [2, 1, 2]  # the two 1176-token images shared a batch
    for picture, together in zip(pictures, batch):
        alone = pipe.generate(picture, prompt, 3, keep_logits=True)
        assert together.token_ids == alone.token_ids and together.kept_indices == alone.kept_indices
        assert max(np.abs(a - b).max() for a, b in zip(together.step_logits, alone.step_logits)) <= 1e-4


def test_the_manifest_describes_anyres(next_sets):
    manifest = json.loads((next_sets["random-ratio"][1] / "engine.json").read_text())["onnx_set"]
    assert manifest["anyres"]["visual_token_range"] == [648, 2928]
    assert manifest["recipe"]["budget_policy"] == "ratio"
    prefill = {i["name"]: i["shape"] for i in manifest["graphs"]["prefill"]["inputs"]}
    assert prefill["visual_mask"] == ["batch", "num_visual"]
    assert manifest["prompt"]["max_seq"] == 4096


@pytest.mark.parametrize("size", [(3000, 2), (9000, 400)])
def test_an_image_too_thin_or_too_large_is_refused(pipes, size):
    from visprune.errors import ImageLoadError

    pipe = pipes["unpruned"]
    with pytest.raises(ImageLoadError) as raised:
        pipe.generate(Image.new("RGB", (size[1], size[0])), pipe.chat_prompt("?"), 1)
    assert raised.value.hint


def test_an_absolute_budget_names_the_smallest_image_it_takes():
    from exporter.export import min_image_tokens

    recipe = Recipe(method="fastv", num_visual_tokens=NOMINAL, removed=[0, 1500, 0, 0, 0, 0, 0, 0],
                    budget_policy="absolute")
    assert min_image_tokens(recipe, 648, NOMINAL) == 1428  # 2928 - 1500 kept at the cut
    assert min_image_tokens(Recipe(**{**recipe.__dict__, "budget_policy": "ratio"}), 648, NOMINAL) == 648
