"""The PyTorch backend: an engine folder that rebuilds the pruned model in PyTorch, against the ORT engine."""

import numpy as np
import pytest

from engines import BuildConfig, build_engine
from runtime import Pipeline
from visprune.errors import BackendUnavailableError, PromptError


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


@pytest.fixture(scope="module")
def small_engine(exported, tmp_path_factory):
    """A PyTorch engine built for short prompts and answers: buckets 600 and 640, at most 4 new tokens."""
    out = tmp_path_factory.mktemp("small") / "engine"
    build_engine(BuildConfig(backend="pytorch", max_prompt_tokens=640, max_new_tokens=4, max_batch=2,
                             prompt_buckets=(600, 640)), exported["pruned-onnx"], out)
    return out


def test_the_engine_records_its_static_shapes(small_engine):
    manifest = Pipeline.from_engine_dir(small_engine).manifest
    assert manifest.static_shapes.prompt_buckets == [600, 640] and manifest.static_shapes.batch_sizes == [1, 2]
    assert manifest.limits.max_prompt_tokens == 640 and manifest.limits.max_new_tokens == 4
    assert not manifest.static_shapes.cuda_graphs and not manifest.torch_compile  # a CPU build: eager, no graphs


def test_a_request_beyond_the_built_shapes_is_refused_with_the_rebuild_command(small_engine, cat_image):
    pipe = Pipeline.from_engine_dir(small_engine)
    with pytest.raises(PromptError, match="outside the shapes") as error:
        pipe.generate(cat_image, pipe.chat_prompt("What animal is this?"), max_new_tokens=5)
    assert "--max-new-tokens" in error.value.hint
    assert len(pipe.generate(cat_image, pipe.chat_prompt("What animal is this?"), max_new_tokens=4).token_ids) <= 4


def test_a_generation_whose_cache_a_later_prefill_reused_is_refused(small_engine, cat_image):
    """Static buffers belong to the engine: two interleaved generations on one engine would read each other's
    cache, so the older one stops with a clear error instead of answering wrong."""
    from runtime.pipeline import Request

    pipe = Pipeline.from_engine_dir(small_engine)
    encoded = pipe.encode_request(Request(cat_image, pipe.chat_prompt("What animal is this?"), 4))
    first, layout, _ = pipe.prefill_batch([encoded])
    token = np.zeros((1, 1, pipe.embeddings.shape[1]), dtype=pipe.host_dtype)
    positions = np.array([len(encoded.input_ids)])
    pipe.runner.decode(token, positions, layout, first.past)  # its own cache: fine
    pipe.prefill_batch([encoded])  # a second prefill of the same batch size takes the buffers over
    with pytest.raises(PromptError, match="reused by a later prefill") as error:
        pipe.runner.decode(token, positions + 1, layout, first.past)
    assert "one generation at a time" in error.value.hint
