"""Batched generation over a real ONNX Runtime engine (FitPrune 60 %, tiny): requests with different images,
different text before the image (a system prompt, a chat turn) and different question lengths run as one
left-padded batch and give what each gives alone; per-request budgets, stop strings and seeded sampling hold
inside a batch; and the image offset is each prompt's own (the unpruned engine matches Hugging Face on a prompt
whose image is not where the chat template puts it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import Pipeline
from runtime.generation import Sampling
from runtime.pipeline import Request
from visprune.errors import ImageLoadError, PromptError


@pytest.fixture(scope="module")
def pruned(exported):
    return Pipeline.from_engine_dir(exported["pruned"])


@pytest.fixture(scope="module")
def images(default_set):
    return [s.image for s in default_set.samples[:4]]


def prompts(pipe: Pipeline) -> list[str]:
    """Four layouts: the template, a system prompt before it, a chat turn before the image, a long question."""
    return [pipe.chat_prompt("What is this?"),
            "SYSTEM: Answer in one word.\n" + pipe.chat_prompt("What color is it?"),
            "USER: Hello there.\nASSISTANT: Hi!\nUSER: <image>\nWhat is in the picture? ASSISTANT:",
            pipe.chat_prompt("Describe every object you can see in this picture, one by one, with its colour.")]


def test_a_batch_of_different_layouts_gives_what_each_request_gives_alone(pruned, images):
    requests = [Request(image, prompt, max_new_tokens=6) for image, prompt in zip(images, prompts(pruned))]
    encoded = [pruned.encode_request(r) for r in requests]
    assert len({e.image_start for e in encoded}) == 3 and len({len(e.input_ids) for e in encoded}) == 4
    batch = pruned.generate_encoded(encoded, keep_logits=True)
    assert all(g.timings["batch"] == 4 for g in batch)
    for request, got in zip(requests, batch):
        alone = pruned.generate(request.image, request.prompt, max_new_tokens=6, keep_logits=True)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.kept_indices == alone.kept_indices  # every pruning layer, per row
        assert len(got.step_logits) == len(alone.step_logits)
        assert max(np.abs(a - b).max() for a, b in zip(got.step_logits, alone.step_logits)) <= 1e-4
    assert len({tuple(g.kept_indices[0]) for g in batch}) == 4  # each row selected on its own


def test_budgets_stop_strings_and_seeded_sampling_are_per_request(pruned, images):
    prompt = pruned.chat_prompt("What is this?")
    free = pruned.generate(images[0], prompt, max_new_tokens=8).text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    sampled = Sampling(temperature=1.0, top_k=20, seed=7)
    requests = [Request(images[0], prompt, max_new_tokens=2), Request(images[1], prompt, max_new_tokens=8),
                Request(images[0], prompt, max_new_tokens=8, stop=(stop,)),
                Request(images[2], prompt, max_new_tokens=8, sampling=sampled)]
    short, full, stopped, drawn = pruned.generate_batch(requests)
    assert len(short.token_ids) == 2
    assert stop and stopped.text == free[:free.index(stop)]
    assert drawn.token_ids == pruned.generate(images[2], prompt, max_new_tokens=8, sampling=sampled).token_ids
    assert full.token_ids == pruned.generate(images[1], prompt, max_new_tokens=8).token_ids


def test_a_bad_request_fails_alone_with_its_own_error(pruned, images):
    with pytest.raises(ImageLoadError, match="does not decode"):
        pruned.encode_request(Request(b"not an image", pruned.chat_prompt("What?")))
    with pytest.raises(PromptError, match="exactly one"):
        pruned.encode_request(Request(images[0], "no placeholder here"))
    png = images[0].read_bytes()  # an encoded image in memory is as good as a path
    assert pruned.generate_batch([Request(png, pruned.chat_prompt("What?"), 3)])[0].token_ids == \
        pruned.generate(images[0], pruned.chat_prompt("What?"), 3).token_ids


def test_the_image_offset_is_the_prompts_own(exported, tiny, images):
    """Unpruned engine vs Hugging Face on a prompt with a chat turn before the image: same logits and tokens."""
    unpruned = Pipeline.from_engine_dir(exported["unpruned"])
    prompt = prompts(unpruned)[2]
    input_ids, pixel_values = unpruned.encode(images[1], prompt)
    assert unpruned.encode_request(Request(images[1], prompt)).image_start != unpruned.image_start
    ids, pixels = torch.from_numpy(input_ids), torch.from_numpy(pixel_values)
    with torch.no_grad():
        hf_logits = tiny.model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        hf_tokens = tiny.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                                        min_new_tokens=6)[0, ids.shape[1]:].tolist()
    engine = unpruned.generate(images[1], prompt, max_new_tokens=6, keep_logits=True)
    assert np.abs(engine.step_logits[0] - hf_logits).max() <= 1e-4
    assert engine.token_ids == hf_tokens
