"""shapes-vqa: deterministic, disjoint splits, answers that follow from the scene, inputs the processor agrees with."""

from collections import Counter

import numpy as np
import pytest

from visprune.models.inputs import chat_prompt, expanded_prompt_ids, normalized_pixels
from visprune.tasks.shapes_vqa import (COLORS, COUNT_WORDS, GRID, QUESTION_TYPES, SHAPES, accuracy_by_type,
                                       make_sample, make_split, normalize_answer, patch_labels,
                                       scene_questions)


def test_samples_are_a_function_of_split_and_index():
    a, b = make_sample("test", 17), make_sample("test", 17)
    assert a == b and np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert make_sample("test", 18) != a


def test_splits_share_no_scene():
    scenes = {split: {(s.objects, s.background_seed) for s in make_split(split, 600)}
              for split in ("train", "calibration", "test")}
    assert not scenes["train"] & scenes["test"] and not scenes["train"] & scenes["calibration"]
    assert not scenes["calibration"] & scenes["test"]


QUESTION_OPENINGS = {"What color": "colour", "What shape": "shape", "How many": "count", "Is there": "exists",
                     "Which side": "side"}


def expected_answer(sample, question=None):
    """The answer recomputed from the scene description alone."""
    question = question or sample.question
    question_type = next(t for opening, t in QUESTION_OPENINGS.items() if question.startswith(opening))
    objects, words = sample.objects, question.rstrip("?").split()
    if question_type == "colour":
        return next(o.colour for o in objects if o.shape == words[-1])
    if question_type == "shape":
        return next(o.shape for o in objects if o.colour == words[-2])
    if question_type == "count":
        return COUNT_WORDS[sum(o.colour == words[2] for o in objects)]
    if question_type == "exists":
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


def test_training_turns_start_with_the_sample_and_all_follow_from_the_scene():
    for sample in make_split("train", 200):
        pairs = scene_questions(sample)
        assert pairs[0] == (sample.question, sample.answer) and len(pairs) == len(set(pairs)) <= 16
        assert all(expected_answer(sample, q) == a for q, a in pairs)
        kinds = {next(t for o, t in QUESTION_OPENINGS.items() if q.startswith(o)) for q, _ in pairs}
        unique_shape = any(sum(p.shape == o.shape for p in sample.objects) == 1 for o in sample.objects)
        unique_colour = any(sum(p.colour == o.colour for p in sample.objects) == 1 for o in sample.objects)
        assert {"count", "exists"} <= kinds  # every scene can pose these
        if len(pairs) < 16:  # not cut short
            assert ("shape" in kinds) == unique_colour and ("side" in kinds) == unique_shape
    answers = Counter(a for s in make_split("train", 200) for q, a in scene_questions(s) if q.startswith("Is there"))
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6


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


def test_patch_labels_mark_the_patches_that_show_each_object():
    sample = next(s for s in make_split("test", 80) if len(s.objects) == 3 and s.background == "plain")
    labels = patch_labels(sample)
    pixels = np.asarray(sample.image()).astype(int).reshape(24, 14, 24, 14, 3)
    for o in sample.objects:
        x, y = o.centre
        row, column = y // 14, x // 14
        assert labels["colour"][row, column] == list(COLORS).index(o.colour) + 1
        assert labels["shape"][row, column] == SHAPES.index(o.shape) + 1
        assert labels["side"][row, column] == (1 if o.cell[1] < GRID // 2 else 2)
        assert labels["object"][row, column] == list(COLORS).index(o.colour) * len(SHAPES) + SHAPES.index(o.shape) + 1
        assert labels["centre"][row, column] == list(COLORS).index(o.colour) + 1
    assert (labels["centre"] > 0).sum() == len(sample.objects)  # one patch per object, whatever its size
    # every labelled patch shows its object's colour somewhere; unlabelled patches are mostly background
    for (row, column), colour in np.ndenumerate(labels["colour"]):
        patch = pixels[row, :, column].reshape(-1, 3)
        shows = {name for name, rgb in COLORS.items() if (patch == rgb).all(-1).any()}
        if colour:
            assert list(COLORS)[colour - 1] in shows
    assert len({int((labels[k] > 0).sum()) for k in ("colour", "shape", "side", "object")}) == 1
    assert 0 < (labels["colour"] > 0).mean() < 0.2
