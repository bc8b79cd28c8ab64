"""Fused attention in both export targets: the prefill and decode graphs of each flavour against the PyTorch
reference (Hugging Face's eager math), the ops each flavour is made of, and the lint rule that checks the form.

Methods cover the three attention needs: FitPrune (every probability row at its pruning layers: those stay
eager), FastV (the last row only, next to fused attention) and DART (no probabilities). Every other method is
exported with the default (onnxruntime) target by tests/exporter/test_new_methods_export.py and the pipeline.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from calibrate.recipe import Recipe, unpruned_recipe
from calibrate.stage import budget_recipe
from exporter.export import lint_exported_set
from exporter.graphs import KERNELS
from exporter.lint import lint_onnx
from exporter.pruned_lm import LlamaDecodeStep, PrunedLlamaPrefill
from runtime.runner_api import RowLayout, prefill_feeds
from visprune.backends import EXPORT_TARGETS
from visprune.methods import METHODS
from visprune.models.decoder import EAGER
from visprune.tensor_names import kept_layer

from conftest import TINY_RECIPE_60
from two_processes import export_tiny_graph, run_in_two_processes

IMAGE_START, TEXT = 4, 9
PREFILL_METHODS = ["fitprune", "fastv", "dart", "visionzip"]


def recipe_for(name: str, shape) -> Recipe:
    return Recipe("fitprune", 576, TINY_RECIPE_60) if name == "fitprune" else budget_recipe(shape, 0.6, name)


@pytest.fixture(scope="module")
def embeds(tiny):
    torch.manual_seed(0)
    return torch.randn(2, IMAGE_START + 576 + TEXT, tiny.shape.hidden_size)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny) -> dict[tuple[str, str], Path]:
    """Every graph this module checks, exported once, two at a time: {(method, target): prefill.onnx},
    {("decode", target): decode.onnx} and {("unpruned", "eager"): an unpruned prefill in eager kernels}."""
    root = tmp_path_factory.mktemp("fused")
    keys = [(name, t) for name in PREFILL_METHODS for t in EXPORT_TARGETS] + [("decode", t) for t in EXPORT_TARGETS]
    paths = {key: root / f"{key[0]}-{key[1]}.onnx" for key in [*keys, ("unpruned", "eager")]}
    graph_of = lambda name: ("decode", "fitprune") if name == "decode" else ("prefill", name)  # noqa: E731
    jobs = [(export_tiny_graph, (graph, recipe_for(method, tiny.shape), IMAGE_START, paths[name, target],
                                 EXPORT_TARGETS[target], KERNELS[target]))
            for name, target in keys for graph, method in [graph_of(name)]]
    jobs.append((export_tiny_graph, ("prefill", unpruned_recipe(tiny.shape), IMAGE_START, paths["unpruned", "eager"],
                                     18, EAGER)))
    run_in_two_processes(jobs[::2], jobs[1::2])  # alternating: each method's two targets go to both sides
    return paths


def ops_of(path) -> collections.Counter:
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("target", list(EXPORT_TARGETS))
@pytest.mark.parametrize("name", PREFILL_METHODS)
def test_fused_prefill_matches_the_eager_reference(graphs, tiny, embeds, name, target):
    """fp32: logits and caches within 1e-4 of the eager PyTorch reference, kept indices equal. One method per
    attention need: every row (FitPrune), the last row (FastV), none (DART), none and pre-LLM (VisionZip)."""
    recipe, path = recipe_for(name, tiny.shape), graphs[name, target]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = torch.rand(2, 576, generator=torch.Generator().manual_seed(0)) if METHODS[name].vision_score else None
    feeds = prefill_feeds(embeds.numpy(), RowLayout.unpadded(2, IMAGE_START), None if scores is None else scores.numpy())
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        logits, presents, kept = PrunedLlamaPrefill(tiny.model, recipe, IMAGE_START, EAGER)(embeds, image_scores=scores)
    assert np.abs(got["logits"] - logits.numpy()).max() <= 1e-4
    kept_names = sorted((k for k in got if kept_layer(k) is not None), key=kept_layer)
    assert [got[k].tolist() for k in kept_names] == [k.tolist() for k in kept]
    for layer in range(8):  # caches reach |5|: relative and absolute 1e-4
        np.testing.assert_allclose(got[f"present.{layer}.key"], presents[2 * layer].numpy(), rtol=1e-4, atol=1e-4)
    ops = ops_of(path)
    if target == "onnxruntime":  # one fused op per attention: FitPrune's layers too (its score is computed beside)
        assert ops["Attention"] == 8 and ops["RMSNormalization"] == 17 and ops["RotaryEmbedding"] == 16
    else:
        assert ops["Attention"] == ops["RMSNormalization"] == ops["RotaryEmbedding"] == 0
    if METHODS[name].attention_rows == "all":  # the score's softmax, one per pruning layer, none feeding V (lint)
        fused_softmaxes = 0 if target == "onnxruntime" else 8  # TensorRT's form writes each attention's own
        assert ops.get("Softmax", 0) == fused_softmaxes + sum(1 for r in recipe.removed if r)
    assert lint_onnx(path, None, 0) == []


@pytest.mark.parametrize("target", list(EXPORT_TARGETS))
def test_fused_decode_matches_the_eager_reference(graphs, tiny, embeds, target):
    """One decode step over a pruned prefill's caches (per-layer lengths differ), fused vs eager."""
    recipe = recipe_for("fitprune", tiny.shape)
    with torch.no_grad():
        _, past, _ = PrunedLlamaPrefill(tiny.model, recipe, IMAGE_START, EAGER)(embeds)
        token = embeds[:, -1:]
        position = torch.full((2, 1), embeds.shape[1], dtype=torch.long)
        logits, presents = LlamaDecodeStep(tiny.model, EAGER)(token, position, None, past)
    path = graphs["decode", target]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"inputs_embeds": token.numpy(), "position_ids": position.numpy(), "pad_lengths": np.zeros(2, np.int64),
             **{f"past.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p.numpy() for i, p in enumerate(past)}}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert np.abs(got["logits"] - logits.numpy()).max() <= 1e-4
    np.testing.assert_allclose(got["present.7.value"], presents[15].numpy(), rtol=1e-4, atol=1e-4)
    assert lint_onnx(path, None, 0) == []
    assert ops_of(path)["Softmax"] == (0 if target == "onnxruntime" else 8)


def test_lint_flags_eager_attention_where_none_is_needed(graphs, tmp_path, tiny):
    """An unpruned prefill traced with the eager kernels computes probabilities nobody reads: not fused."""
    (tmp_path / "prefill.onnx").write_bytes(graphs["unpruned", "eager"].read_bytes())
    (violation,) = lint_onnx(tmp_path / "prefill.onnx", None, 0)
    assert violation.rule == "fused-attention" and "8 attentions" in violation.detail
    with pytest.raises(Exception, match="fused-attention"):
        (tmp_path / "vision.onnx").write_bytes((tmp_path / "prefill.onnx").read_bytes())
        (tmp_path / "decode.onnx").write_bytes((tmp_path / "prefill.onnx").read_bytes())
        lint_exported_set(tmp_path, unpruned_recipe(tiny.shape))


def test_pytorch_sdpa_kernels_match_eager(tiny, embeds):
    """The PyTorch engine's kernels (SDPA wherever no probabilities are read) against the reference."""
    from visprune.models.decoder import SDPA

    for name in ("fitprune", "fastv"):
        recipe = recipe_for(name, tiny.shape)
        with torch.no_grad():
            ref = PrunedLlamaPrefill(tiny.model, recipe, IMAGE_START, EAGER)(embeds)
            got = PrunedLlamaPrefill(tiny.model, recipe, IMAGE_START, SDPA)(embeds)
        assert (got[0] - ref[0]).abs().max() <= 1e-4
        assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))
