"""shapes-vqa: deterministic, disjoint splits, answers that follow from the scene, inputs the processor agrees with."""

from collections import Counter

import numpy as np
import pytest

from visprune.models.inputs import chat_prompt, expanded_prompt_ids, normalized_pixels
from visprune.tasks.shapes_vqa import (COLORS, COUNT_WORDS, GRID, QUESTION_TYPES, SHAPES, accuracy_by_type,
                                       make_sample, make_split, normalize_answer)


def test_samples_are_a_function_of_split_and_index():
    a, b = make_sample("test", 17), make_sample("test", 17)
    assert a == b and np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert make_sample("test", 18) != a


def test_splits_share_no_scene():
    scenes = {split: {(s.objects, s.background_seed) for s in make_split(split, 600)}
              for split in ("train", "calibration", "test")}
    assert not scenes["train"] & scenes["test"] and not scenes["train"] & scenes["calibration"]
    assert not scenes["calibration"] & scenes["test"]


def expected_answer(sample):
    """The answer recomputed from the scene description alone."""
    objects, words = sample.objects, sample.question.rstrip("?").split()
    if sample.question_type == "colour":
        return next(o.colour for o in objects if o.shape == words[-1])
    if sample.question_type == "shape":
        return next(o.shape for o in objects if o.colour == words[-2])
    if sample.question_type == "count":
        return COUNT_WORDS[sum(o.colour == words[2] for o in objects)]
    if sample.question_type == "exists":
        return "yes" if any(o.colour == words[-2] and o.shape == words[-1] for o in objects) else "no"
    target = next(o for o in objects if o.shape == words[4])
    return "left" if target.cell[1] < GRID // 2 else "right"


def test_answers_follow_from_the_scene_and_types_are_balanced():
    samples = make_split("test", 500)
    assert all(expected_answer(s) == s.answer for s in samples)
    assert Counter(s.question_type for s in samples) == {t: 100 for t in QUESTION_TYPES}
    answers = Counter(s.answer for s in samples if s.question_type == "exists")
    assert 35 <= answers["yes"] <= 65
    assert {s.answer for s in samples} <= set(COLORS) | set(SHAPES) | set(COUNT_WORDS) | {"yes", "no", "left", "right"}


def test_an_object_is_drawn_where_the_scene_says(default_set):
    sample = next(s for s in make_split("test", 50) if len(s.objects) == 1 and s.background == "plain")
    pixels = np.asarray(sample.image()).astype(int)
    x, y = sample.objects[0].centre
    assert tuple(pixels[y, x]) == COLORS[sample.objects[0].colour]
    assert pixels[2, 2, 0] == pixels[2, 2, 1] == pixels[2, 2, 2]  # grey background in the corner


def test_fast_inputs_equal_the_processor(tiny):
    sample = make_sample("test", 3)
    prompt = chat_prompt(tiny.processor, sample.question)
    reference = tiny.processor(images=sample.image(), text=prompt, return_tensors="np")
    assert expanded_prompt_ids(tiny.processor, prompt, 576) == reference["input_ids"][0].tolist()
    assert np.abs(normalized_pixels([sample.image()], tiny.processor.image_processor) - reference["pixel_values"]).max() < 1e-6


def test_accuracy_counts_the_first_word_per_type():
    samples = make_split("test", 10)
    answers = [f"{s.answer.upper()}. more words" for s in samples[:5]] + ["nonsense"] * 5
    result = accuracy_by_type(samples, answers)
    assert result["overall"] == pytest.approx(0.5) and result["n"] == 10
    assert sum(v["n"] for v in result["per_type"].values()) == 10
    assert normalize_answer("  Red. ") == "red" and normalize_answer("") == ""
