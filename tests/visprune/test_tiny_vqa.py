"""The committed tiny-vqa model: hash-checked weights, loaded like any checkpoint, and its recorded accuracy."""

import pytest

from visprune.errors import ModelLoadError
from visprune.models import load_llava
from visprune.models.tiny_vqa import WEIGHTS, ensure_tiny_vqa_checkpoint, tiny_vqa_record
from visprune.tasks.shapes_vqa import accuracy_by_type, make_split


def test_corrupted_weights_are_caught_by_their_hash(tmp_path):
    broken = tmp_path / "tiny-vqa.safetensors"
    data = bytearray(WEIGHTS.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of a tensor
    broken.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt or was changed") as info:
        ensure_tiny_vqa_checkpoint(broken)
    assert "git checkout -- visprune/models/weights/tiny-vqa.safetensors" in str(info.value)
    with pytest.raises(ModelLoadError, match="missing"):
        ensure_tiny_vqa_checkpoint(tmp_path / "absent.safetensors")


def test_tiny_vqa_loads_through_from_pretrained_with_tinys_architecture(tiny):
    bundle = load_llava("tiny-vqa")
    assert bundle.name == "tiny-vqa" and bundle.shape == tiny.shape
    assert bundle.processor.tokenizer.get_vocab() == tiny.processor.tokenizer.get_vocab()
    assert tiny_vqa_record()["sha256"].startswith("sha256:")


@pytest.fixture(scope="module")
def unpruned_engine(tiny_vqa_engines):
    return tiny_vqa_engines["unpruned"]  # export and build with default configs, shared (conftest.py)


@pytest.mark.slow
def test_unpruned_engine_accuracy_on_the_fixed_200_questions_is_the_recorded_one(unpruned_engine):
    """Regression guard: the runtime over the exported engine answers exactly as when the value was recorded."""
    from reports.evaluate import answers_from_engine

    samples = make_split("test", 200)
    accuracy = accuracy_by_type(samples, answers_from_engine(unpruned_engine, samples, max_new_tokens=8))
    assert accuracy["overall"] == tiny_vqa_record()["accuracy"]["engine_unpruned_test200"]


@pytest.mark.slow
def test_the_pytorch_reference_agrees_with_the_engine_on_every_answer(unpruned_engine):
    from reports.evaluate import EvalConfig, answers_from_engine, answers_from_recipe

    samples = make_split("test", 60)
    engine = answers_from_engine(unpruned_engine, samples, max_new_tokens=8)
    reference = answers_from_recipe("tiny-vqa", None, samples, EvalConfig(questions=60, batch_size=16))
    assert engine == reference
