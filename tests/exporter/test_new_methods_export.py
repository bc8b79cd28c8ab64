"""DART, DivPrune, VisionZip and AdaptPrune through the whole product on tiny at 60 %: export (the lint runs inside and fails the
export on any violation), an ONNX Runtime engine, and parity with the PyTorch reference of the same pruned model.

Each method is exported and built once per module, two processes at a time (tests/two_processes.py).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from calibrate.recipe import save_recipe
from calibrate.stage import budget_recipe
from runtime.runner_api import RowLayout, prefill_feeds
from exporter.graphs import VisionFeatures
from exporter.pruned_lm import PrunedLlamaPrefill
from reports.parity import default_parity_prompts, parity_report
from runtime.pipeline import Pipeline
from runtime.torch_runner import TorchRunner
from visprune.methods import METHODS
from visprune.tensor_names import PRE_LLM

from two_processes import export_and_build, run_in_two_processes

pytestmark = pytest.mark.slow  # about a minute per method on two busy CPU cores (export + build)

METHOD_NAMES = ["dart", "divprune", "visionzip", "adaptprune"]
REDUCTION = 0.6


@pytest.fixture(scope="module")
def all_built(tmp_path_factory, tiny) -> dict[str, tuple]:
    """{method: (method, recipe, ONNX folder, engine folder)}, exported and built once. The two greedy loops
    (DivPrune, AdaptPrune), the longest exports, go to different processes: tracing is mostly one core's work."""
    roots = {name: tmp_path_factory.mktemp(name) for name in METHOD_NAMES}
    recipes = {name: budget_recipe(tiny.shape, REDUCTION, name) for name in METHOD_NAMES}
    for name, root in roots.items():
        save_recipe(recipes[name], root / "recipe.json")
    jobs = {name: (export_and_build, (root / "recipe.json", root)) for name, root in roots.items()}
    run_in_two_processes([jobs["divprune"], jobs["dart"]], [jobs["adaptprune"], jobs["visionzip"]])
    return {name: (name, recipes[name], root / "onnx", root / "engine") for name, root in roots.items()}


@pytest.fixture(params=METHOD_NAMES)
def built(request, all_built):
    """(method, recipe, ONNX folder, engine folder) for one method."""
    return all_built[request.param]


def test_the_manifest_lists_image_scores_only_for_visionzip(built):
    name, recipe, onnx_dir, _ = built
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    graphs = manifest["graphs"]
    vision_out = [o["name"] for o in graphs["vision"]["outputs"]]
    prefill_in = {i["name"]: i for i in graphs["prefill"]["inputs"]}
    if name == "visionzip":
        assert vision_out == ["image_features", "image_scores"]
        assert set(prefill_in) == {"inputs_embeds", "image_starts", "pad_lengths", "image_scores"}
        assert prefill_in["image_scores"]["dtype"] == "float32" and prefill_in["image_scores"]["shape"] == ["batch", 576]
        vision_scores = next(o for o in graphs["vision"]["outputs"] if o["name"] == "image_scores")
        assert vision_scores["dtype"] == "float32" and vision_scores["shape"] == ["batch", 576]
    else:
        assert vision_out == ["image_features"] and set(prefill_in) == {"inputs_embeds", "image_starts", "pad_lengths"}
    assert "image_scores" not in json.dumps(graphs["decode"])
    assert manifest["recipe"]["method"] == name and manifest["recipe"]["sha256"] == recipe.content_hash()
    kept = {o["name"]: o["shape"] for o in graphs["prefill"]["outputs"] if o["name"].startswith("kept_indices.")}
    if METHODS[name].pre_llm:
        assert manifest["recipe"]["removed_before_llm"] == recipe.removed_before_llm > 0
        assert kept == {"kept_indices.pre_llm": ["batch", 576 - recipe.removed_before_llm]}
        assert manifest["kv_stages"] == [0] * 8  # every layer's cache has the one (shrunk) length
    else:
        (layer,) = [i for i, r in enumerate(recipe.removed) if r]
        assert kept == {f"kept_indices.{layer}": ["batch", 576 - recipe.removed[layer]]}
        assert manifest["kv_stages"] == [0] * (layer + 1) + [1] * (7 - layer)


def prompt_pairs(pipe: Pipeline, cases) -> list[tuple]:
    return [(case.image, pipe.chat_prompt(case.question)) for case in cases]


def test_engine_matches_the_pytorch_reference(built):
    """Kept indices equal and teacher-forced logits within 1e-4 (float32) on three prompts."""
    name, recipe, _, engine_dir = built
    engine = Pipeline.from_engine_dir(engine_dir)
    assert engine.runner.backend == "onnxruntime" and engine.manifest.onnx_set.recipe.method == name
    reference = engine.with_runner(TorchRunner.open(engine_dir, engine.manifest))
    expected_layers = [PRE_LLM] if METHODS[name].pre_llm else [i for i, r in enumerate(recipe.removed) if r]
    for image, prompt in prompt_pairs(engine, default_parity_prompts(3)):
        ref = reference.generate(image, prompt, max_new_tokens=4, keep_logits=True)
        got = engine.generate(image, prompt, keep_logits=True, forced_tokens=ref.token_ids)
        assert list(got.kept_indices) == expected_layers
        assert got.kept_indices == ref.kept_indices, name
        assert len(got.kept_indices[expected_layers[0]]) == recipe.keep[-1]
        assert len(got.step_logits) == len(ref.step_logits) == len(ref.token_ids)
        errors = [float(np.abs(a - b).max()) for a, b in zip(got.step_logits, ref.step_logits)]
        assert max(errors) <= 1e-4, (name, errors)
        assert [int(np.argmax(s)) for s in got.step_logits] == ref.token_ids


def test_parity_report_passes(built, tmp_path):
    """The library's parity report (engine vs. reference, and the pruned-vs-unpruned figures) on the new methods."""
    name, _, _, engine_dir = built
    report = parity_report(engine_dir, "tiny", tmp_path, prompts=default_parity_prompts(2), max_new_tokens=3)
    verdict = report.engine_vs_reference
    assert verdict.passed and verdict.max_abs_logits_error <= 1e-4, verdict
    assert verdict.min_kept_overlap == 1.0 and verdict.min_teacher_forced_top1 == 1.0
    expected = {str(PRE_LLM)} if METHODS[name].pre_llm else {"1"}
    assert all(set(case["kept_overlap"]) == expected for case in report.cases)


def test_batched_prefill_graph_matches_pytorch(built, tiny, default_set):
    """prefill.onnx at batch 2 (two images, one question) against the PyTorch module: per-row selections (gathers
    and scatters over the batch), caches and logits. For VisionZip, the vision graph's scores as well."""
    from visprune.models import chat_prompt, encode_image_prompt, load_image

    name, recipe, onnx_dir, _ = built
    prompt = chat_prompt(tiny.processor, "What is in the picture?")
    encoded = [encode_image_prompt(tiny.processor, load_image(s.image), prompt, tiny.image_token_id)
               for s in default_set.samples[2:4]]
    start = encoded[0].image_start
    pixels = torch.cat([e.pixel_values for e in encoded])
    with torch.no_grad():
        features, scores = VisionFeatures(tiny.model, cls_scores=True)(pixels)
        embeds = tiny.model.get_input_embeddings()(torch.cat([e.input_ids for e in encoded]))
        embeds[:, start:start + 576] = features
    uses_scores = METHODS[name].vision_score
    vision = ort.InferenceSession(str(onnx_dir / "vision.onnx"), providers=["CPUExecutionProvider"])
    vision_out = vision.run(None, {"pixel_values": pixels.numpy()})
    assert np.abs(vision_out[0] - features.numpy()).max() <= 1e-4
    if uses_scores:
        assert np.abs(vision_out[1] - scores.numpy()).max() <= 1e-5
    feeds = prefill_feeds(embeds.numpy(), RowLayout.unpadded(2, start), scores.numpy() if uses_scores else None)
    session = ort.InferenceSession(str(onnx_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        logits, presents, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(embeds, image_scores=scores if uses_scores else None)
    (kept_name,) = [k for k in outputs if k.startswith("kept_indices.")]
    assert (outputs[kept_name] == kept[0].numpy()).all()
    assert not (outputs[kept_name][0] == outputs[kept_name][1]).all()  # the two images keep different tokens
    assert np.abs(outputs["logits"] - logits.numpy()).max() <= 1e-4
    for layer in range(8):
        assert outputs[f"present.{layer}.key"].shape == tuple(presents[2 * layer].shape)
        assert np.abs(outputs[f"present.{layer}.value"] - presents[2 * layer + 1].numpy()).max() <= 1e-4


def test_float16_dart_ranks_in_float32(tmp_path):
    """A float16 export keeps every pruning score in float32 (exporter/graphs.py, TensorRT's strong typing): DART's
    key-norm pivots and its similarities included."""
    import onnx

    from exporter.graphs import export_prefill
    from visprune.models import load_llava

    bundle = load_llava("tiny", dtype=torch.float16)
    export_prefill(bundle.model, budget_recipe(bundle.shape, REDUCTION, "dart"), 4, 2048, tmp_path / "p.onnx", 18)
    graph = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "p.onnx")).graph
    dtype_of = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    scores = [dtype_of[n.input[0]] for n in graph.node
              if n.op_type == "TopK" and dtype_of[n.input[0]] != onnx.TensorProto.INT64]
    assert len(scores) == 1 + 8 and set(scores) == {onnx.TensorProto.FLOAT}  # pivots, then each pivot's share


def test_adaptprune_graph_keeps_what_the_reference_loop_keeps(all_built, tiny, two_prompts):
    """prefill.onnx on two images against AdaptPrune's loop written as its reference runs it, on the transformers
    model's own attention and hidden states (exporter/adaptprune_reference.py): the same kept tokens per row."""
    from exporter.adaptprune_reference import reference_kept

    _, recipe, onnx_dir, _ = all_built["adaptprune"]
    embeds, start, _ = two_prompts
    (cut,) = [i for i, r in enumerate(recipe.removed) if r]
    session = ort.InferenceSession(str(onnx_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    feeds = prefill_feeds(embeds.numpy(), RowLayout.unpadded(2, start), None)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        expected = reference_kept(tiny.model, embeds, start, 576, recipe.keep[-1], cut + 1, METHODS["adaptprune"].params)
    assert outputs[f"kept_indices.{cut}"].tolist() == expected
