"""The PyTorch backend: an engine folder that rebuilds the pruned model in PyTorch, against the ORT engine."""

import numpy as np
import pytest

from engines import BuildConfig, build_engine
from runtime import Pipeline
from visprune.errors import BackendUnavailableError


@pytest.fixture(scope="module")
def torch_engine(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "engine"
    build_engine(BuildConfig(backend="pytorch"), exported["pruned-onnx"], out)
    return out


@pytest.fixture(scope="module")
def cat_image(default_set):
    return next(s.image for s in default_set.samples if s.image.name == "cat.png")


def generate_both(engine_a, engine_b, image, question, new_tokens=8):
    a, b = Pipeline.from_engine_dir(engine_a), Pipeline.from_engine_dir(engine_b)
    return [p.generate(image, p.chat_prompt(question), new_tokens, keep_logits=True) for p in (a, b)]


def test_pytorch_engine_matches_the_onnx_runtime_engine(torch_engine, exported, cat_image):
    torch_gen, ort_gen = generate_both(torch_engine, exported["pruned"], cat_image, "What animal is this?")
    assert Pipeline.from_engine_dir(torch_engine).runner.backend == "pytorch"
    assert torch_gen.token_ids == ort_gen.token_ids and torch_gen.kept_indices == ort_gen.kept_indices
    errors = [np.abs(a - b).max() for a, b in zip(torch_gen.step_logits, ort_gen.step_logits)]
    assert max(errors) <= 1e-4
    manifest = Pipeline.from_engine_dir(torch_engine).manifest  # static buffers: every layer at its full capacity
    text = manifest.onnx_set.language_model
    per_token = 2 * text.num_kv_heads * (text.hidden_size // text.num_heads) * 4  # K and V, float32
    assert torch_gen.timings["kv_bytes"] == sum(manifest.kv_capacity) * per_token  # batch size 1


def test_pytorch_engine_on_a_missing_gpu_is_a_clear_error(exported, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        build_engine(BuildConfig(backend="pytorch", device="cuda"), exported["pruned-onnx"], tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_torch_compile_gives_the_eager_results(exported, tmp_path, cat_image):
    """torch.compile (inductor; about two minutes of compiling on two cores) changes speed, not results."""
    compiled = tmp_path / "compiled"
    build_engine(BuildConfig(backend="pytorch", torch_compile=True), exported["pruned-onnx"], compiled)
    compiled_gen, ort_gen = generate_both(compiled, exported["pruned"], cat_image, "Describe it.", new_tokens=4)
    assert compiled_gen.token_ids == ort_gen.token_ids and compiled_gen.kept_indices == ort_gen.kept_indices
    assert max(np.abs(a - b).max() for a, b in zip(compiled_gen.step_logits, ort_gen.step_logits)) <= 1e-4
