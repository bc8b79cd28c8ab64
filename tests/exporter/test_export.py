"""The exported ONNX set: manifest, graph contract, and edge recipes through ONNX Runtime vs PyTorch."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from calibrate.recipe import Recipe, check_recipe_fits, save_recipe
from conftest import TINY_RECIPE_60
from runtime.runner_api import RowLayout, prefill_feeds
from exporter import ExportConfig, export_onnx
from exporter.graphs import export_prefill
from exporter.pruned_lm import PrunedLlamaPrefill
from visprune.artifacts import sha256_bytes, canonical_json
from visprune.errors import RecipeError
from visprune.models.decoder import EAGER

from two_processes import export_tiny_graph, run_in_two_processes


def test_manifest_describes_the_set(exported):
    manifest = json.loads((exported["pruned-onnx"] / "manifest.json").read_text())
    assert manifest["schema"] == "visprune.onnx_set" and manifest["schema_version"] == 3
    assert manifest["prompt"]["image_start"] == 4 and manifest["prompt"]["num_visual_tokens"] == 576
    assert manifest["recipe"]["removed"] == TINY_RECIPE_60 and manifest["recipe"]["keep"][-1] == 201
    assert manifest["kv_stages"] == [0, 1, 2, 3, 4, 5, 6, 6]
    prefill = manifest["graphs"]["prefill"]
    assert prefill["inputs"] == [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "seq", 64]},
                                 {"name": "image_starts", "dtype": "int64", "shape": ["batch"]},
                                 {"name": "pad_lengths", "dtype": "int64", "shape": ["batch"]}]
    outputs = {o["name"]: o["shape"] for o in prefill["outputs"]}
    assert outputs["kept_indices.0"] == ["batch", 433] and "kept_indices.6" not in outputs
    kv_dims = {outputs[f"present.{layer}.key"][2] for layer in range(8)}
    assert len(kv_dims) == 7  # one length per KV stage (layers 6 and 7 share one)
    decode_inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["decode"]["inputs"]}
    assert decode_inputs["past.0.key"][2] == "past_len_s0" and decode_inputs["past.7.key"][2] == "past_len_s6"
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    assert manifest["target"] == "onnxruntime" and manifest["config"]["opset"] == 23
    for name in ("vision.onnx", "prefill.onnx", "decode.onnx", "embed_tokens.npy", "processor/tokenizer.json"):
        assert (exported["pruned-onnx"] / name).exists(), name


def test_unpruned_export_uses_the_same_code_path(exported):
    manifest = json.loads((exported["unpruned-onnx"] / "manifest.json").read_text())
    assert manifest["recipe"]["method"] == "none" and manifest["recipe"]["keep"] == [576] * 8
    assert manifest["kv_stages"] == [0] * 8


EDGE_RECIPES = {
    "keep one visual token": [575, 0, 0, 0, 0, 0, 0, 0],
    "prune only at layer 0": [300, 0, 0, 0, 0, 0, 0, 0],
    "prune only at the last layer": [0, 0, 0, 0, 0, 0, 0, 400],
}


@pytest.fixture(scope="module")
def edge_prefills(tmp_path_factory, tiny) -> dict[str, Path]:
    """{name: prefill.onnx} for every edge recipe (eager kernels, opset 18), two exports at a time."""
    root = tmp_path_factory.mktemp("edge")
    paths = {name: root / f"{index}.onnx" for index, name in enumerate(EDGE_RECIPES)}
    jobs = [(export_tiny_graph, ("prefill", Recipe("fitprune", 576, removed), 4, paths[name], 18, EAGER))
            for name, removed in EDGE_RECIPES.items()]
    run_in_two_processes(jobs[::2], jobs[1::2])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name", EDGE_RECIPES)
def test_edge_recipes_match_pytorch(edge_prefills, tiny, default_states, name):
    removed = EDGE_RECIPES[name]
    recipe, path = Recipe("fitprune", 576, removed), edge_prefills[name]
    embeds = torch.stack([default_states[0].hidden, default_states[0].hidden])  # batch 2
    with torch.no_grad():
        ref_logits, ref_kv, ref_kept = PrunedLlamaPrefill(tiny.model, recipe, 4)(embeds)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, prefill_feeds(embeds.numpy(), RowLayout.unpadded(2, 4)))))
    assert np.abs(outputs["logits"] - ref_logits.numpy()).max() <= 1e-4
    layer = next(i for i, r in enumerate(removed) if r)
    assert (outputs[f"kept_indices.{layer}"] == ref_kept[0].numpy()).all()
    assert outputs[f"kept_indices.{layer}"].shape == (2, 576 - sum(removed))
    assert np.all(np.diff(outputs[f"kept_indices.{layer}"], axis=1) > 0)  # ascending, original order
    seq = embeds.shape[1]
    assert outputs["present.7.key"].shape[2] == seq - sum(removed[:7])


def test_a_recipe_for_another_model_is_rejected_before_anything_is_written(tmp_path):
    bad = tmp_path / "recipe.json"
    bad.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": [1] * 32}))
    with pytest.raises(RecipeError, match="32 layers"):
        export_onnx(ExportConfig(model="tiny", recipe=bad), tmp_path / "onnx", progress=False)
    assert not (tmp_path / "onnx").exists()


def tinys_recipe(tiny) -> Recipe:
    """TINY_RECIPE_60 with the provenance calibration records (calibrate/stage.py)."""
    return Recipe("fitprune", 576, TINY_RECIPE_60, model={"name": tiny.name, "fingerprint": tiny.fingerprint})


def test_a_recipe_calibrated_on_another_checkpoint_is_refused_unless_asked_for(tiny, tmp_path):
    """tiny and tiny-vqa share an architecture (and fingerprint): only the recorded name tells them apart."""
    recipe = tinys_recipe(tiny)
    save_recipe(recipe, tmp_path / "recipe.json")
    with pytest.raises(RecipeError, match="calibrated on tiny, not on tiny-vqa") as info:
        export_onnx(ExportConfig(model="tiny-vqa", recipe=tmp_path / "recipe.json"), tmp_path / "onnx", progress=False)
    assert "--allow-other-model" in info.value.hint and "visprune calibrate --model tiny-vqa" in info.value.hint
    assert not (tmp_path / "onnx").exists()
    check_recipe_fits(recipe, tiny.shape, tiny.fingerprint, "tiny-vqa", allow_other_model=True)  # the opt-in
    check_recipe_fits(recipe, tiny.shape, tiny.fingerprint, "tiny")  # its own checkpoint
    assert ExportConfig(model="tiny-vqa", allow_other_model=True).to_dict()["allow_other_model"] is True


def test_a_hub_id_and_a_local_download_of_it_are_one_checkpoint(tiny):
    """The shipped llava-1.5-7b recipes record the hub id; an export names a local folder by its path."""
    recipe = Recipe("fitprune", 576, TINY_RECIPE_60, model={"name": "llava-hf/llava-1.5-7b-hf"})
    check_recipe_fits(recipe, tiny.shape, tiny.fingerprint, "/models/llava-1.5-7b-hf")
    with pytest.raises(RecipeError, match="calibrated on llava-hf/llava-1.5-7b-hf"):
        check_recipe_fits(recipe, tiny.shape, tiny.fingerprint, "/models/llava-1.5-13b-hf")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"target": "openvino"}, "Unknown --target"),
    ({"target": "onnxruntime", "opset": 18}, "too old for --target onnxruntime"),
    ({"target": "tensorrt", "opset": 17}, "too old for --target tensorrt"),
])
def test_bad_targets_are_rejected(kwargs, fragment):
    from visprune.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        ExportConfig(**kwargs)


def test_opset_follows_the_target():
    assert ExportConfig().opset == 23 and ExportConfig(target="tensorrt").opset == 18
    assert ExportConfig(target="tensorrt", opset=23).to_dict()["opset"] == 23


def test_recipe_hash_in_the_manifest_is_the_recipes(exported):
    manifest = json.loads((exported["pruned-onnx"] / "manifest.json").read_text())
    expected = Recipe("fitprune", 576, TINY_RECIPE_60).content_hash()
    assert manifest["recipe"]["sha256"] == expected != sha256_bytes(canonical_json({}))


@pytest.mark.slow
def test_float16_export_keeps_float32_islands(tmp_path):
    """fp16 weights and activations, but softmax and the pruning scores run in float32 (needed by TensorRT 11
    strong typing, and for ranking stability)."""
    import onnx

    from visprune.models import load_llava

    bundle = load_llava("tiny", dtype=torch.float16)
    export_prefill(bundle.model, Recipe("fitprune", 576, TINY_RECIPE_60), 4, 2048, tmp_path / "p.onnx", 18)
    model = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "p.onnx"))
    graph = model.graph
    dtype_of = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    weight_matrices = [i for i in graph.initializer if len(i.dims) == 2 and i.data_type in (float32, float16)]
    assert weight_matrices and {i.data_type for i in weight_matrices} == {float16}
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 8 and all(dtype_of[n.input[0]] == float32 for n in softmax)
    scores = [n for n in graph.node if n.op_type == "TopK" and dtype_of[n.input[0]] != onnx.TensorProto.INT64]
    assert len(scores) == 6 and all(dtype_of[n.input[0]] == float32 for n in scores)
    assert dtype_of["logits"] == float16
