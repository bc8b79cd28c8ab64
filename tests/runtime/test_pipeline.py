"""The runtime over ONNX Runtime engines: generation semantics against Hugging Face and PyTorch references."""

import numpy as np
import pytest
import torch

from exporter.pruned_lm import _take_rows
from visprune.models.decoder import attend, causal_blocked, finish_layer
from runtime import Pipeline
from visprune.errors import ImageLoadError, PromptError


@pytest.fixture(scope="module")
def pruned(exported):
    return Pipeline.from_engine_dir(exported["pruned"])


@pytest.fixture(scope="module")
def unpruned(exported):
    return Pipeline.from_engine_dir(exported["unpruned"])


@pytest.fixture(scope="module")
def cat_image(default_set):
    return next(s.image for s in default_set.samples if s.image.name == "cat.png")


def test_unpruned_engine_reproduces_hugging_face(unpruned, tiny, cat_image):
    prompt = unpruned.chat_prompt("What animal is this?")
    input_ids, pixel_values = unpruned.encode(cat_image, prompt)
    ids, pixels = torch.from_numpy(input_ids), torch.from_numpy(pixel_values)
    with torch.no_grad():
        hf_logits = tiny.model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        hf_tokens = tiny.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=16, do_sample=False,
                                        min_new_tokens=16)[0, ids.shape[1]:].tolist()
    engine = unpruned.generate(cat_image, prompt, max_new_tokens=16, keep_logits=True)
    assert np.abs(engine.step_logits[0] - hf_logits).max() <= 1e-4
    assert engine.token_ids == hf_tokens and len(hf_tokens) == 16


def no_cache_logits(model, prompt_embeds, kept_by_layer, tokens, image_start):
    """Last-position logits of the whole pruned sequence (prompt + tokens) run without a cache: the kept
    visual tokens of every pruning layer are fixed to the ones prefill chose."""
    lm = model.model.language_model
    hidden = torch.cat([prompt_embeds, model.get_input_embeddings()(torch.tensor([tokens]))], dim=1)
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    visual = torch.arange(576)
    for index, layer in enumerate(lm.layers):
        context, _, _, _ = attend(layer, lm.rotary_emb, hidden, positions, blocked=causal_blocked(hidden.shape[1]))
        if index in kept_by_layer:
            kept = torch.tensor(kept_by_layer[index])
            local = torch.searchsorted(visual, kept)
            rows = torch.cat([torch.arange(image_start), image_start + local,
                              torch.arange(image_start + len(visual), hidden.shape[1])]).unsqueeze(0)
            hidden, context, positions = (_take_rows(t, rows) for t in (hidden, context, positions))
            visual = kept
        hidden = finish_layer(layer, hidden, context)
    return model.lm_head(lm.norm(hidden[:, -1]))[0].numpy()


def test_decode_with_the_pruned_cache_equals_a_no_cache_rerun(pruned, tiny, cat_image):
    prompt = pruned.chat_prompt("What is in the picture?")
    input_ids, pixel_values = pruned.encode(cat_image, prompt)
    features = pruned.runner.image_features(pixel_values).features
    embeds, _ = pruned.embed(input_ids, features)
    engine = pruned.generate(cat_image, prompt, max_new_tokens=17, keep_logits=True)
    assert len(engine.token_ids) == 17 and len(engine.kept_indices) == 6
    with torch.no_grad():
        for step in range(1, 17):
            expected = no_cache_logits(tiny.model, torch.from_numpy(embeds), engine.kept_indices,
                                       engine.token_ids[:step], pruned.image_start)
            assert np.abs(engine.step_logits[step] - expected).max() <= 1e-4, step


def test_generation_reports_timings_and_kept_tokens(pruned, cat_image):
    generation = pruned.generate(cat_image, pruned.chat_prompt("Describe it."), max_new_tokens=4)
    assert set(generation.timings) >= {"vision_s", "prefill_s", "decode_s_per_token"}
    assert {k: len(v) for k, v in generation.kept_indices.items()} == {0: 433, 1: 332, 2: 288, 3: 247, 4: 229, 5: 201}
    assert isinstance(generation.text, str) and len(generation.token_ids) == 4


@pytest.mark.parametrize("prompt, error, fragment", [
    ("USER: no image ASSISTANT:", PromptError, "exactly one"),
    ("USER: <image> <image> ASSISTANT:", PromptError, "has 2"),
])
def test_bad_prompts_are_rejected(pruned, cat_image, prompt, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        pruned.generate(cat_image, prompt, max_new_tokens=2)
    assert "Hint:" in str(info.value)


def test_a_prompt_longer_than_the_engine_allows_is_rejected(pruned, cat_image):
    with pytest.raises(PromptError, match="exceeds the 2048"):
        pruned.generate(cat_image, pruned.chat_prompt("Why?"), max_new_tokens=2000)


def test_an_image_that_does_not_open_is_rejected(pruned, tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="does not decode"):
        pruned.generate(tmp_path / "x.png", pruned.chat_prompt("Why?"), max_new_tokens=2)


def test_a_missing_image_names_no_flag_the_caller_does_not_have(pruned, tmp_path):
    """`visprune run --image missing.png` was told to check an --images folder, a calibration flag."""
    with pytest.raises(ImageLoadError, match="Image not found") as info:
        pruned.generate(tmp_path / "missing.png", pruned.chat_prompt("Why?"), max_new_tokens=2)
    assert "--images" not in info.value.hint and "path" in info.value.hint


def test_a_missing_calibration_image_points_to_the_images_folder(tiny, tmp_path):
    from calibrate.data import read_calibration_jsonl
    from calibrate.stage import prepare_samples

    (tmp_path / "set.jsonl").write_text('{"image": "dog.png", "question": "q"}\n')
    with pytest.raises(ImageLoadError, match="Image not found") as info:
        prepare_samples(tiny, read_calibration_jsonl(tmp_path / "set.jsonl"), batch_size=1)
    assert "--images folder" in info.value.hint


def test_the_engine_path_needs_no_pytorch(exported, cat_image):
    """Generation works in a process where importing torch fails (transformers then skips it too)."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from runtime import Pipeline\n"
        f"pipe = Pipeline.from_engine_dir({str(exported['pruned'])!r})\n"
        f"print(pipe.generate({str(cat_image)!r}, pipe.chat_prompt('What?'), max_new_tokens=3).token_ids)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("[")
