"""The TensorRT-readiness lint on hand-built graphs with planted problems, and on a real export."""

import onnx
import pytest
from onnx import TensorProto, helper

from exporter.lint import lint_onnx


def save_graph(tmp_path, nodes, inputs, outputs, initializers=(), name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def topk_graph(tmp_path, k, sorted_=1, constant=True):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, None]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [1, None])]
    inits, inputs = [], [x]
    if constant:
        inits.append(helper.make_tensor("k", TensorProto.INT64, [1], [k]))
    else:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, sorted=sorted_, name="topk")
    return save_graph(tmp_path, [node], inputs, outs, inits)


def rules(violations):
    return sorted(v.rule for v in violations)


def test_a_clean_topk_passes(tmp_path):
    assert lint_onnx(topk_graph(tmp_path, 576)) == []


def test_topk_over_3840_is_caught(tmp_path):
    violations = lint_onnx(topk_graph(tmp_path, 4000))
    assert rules(violations) == ["topk-k-limit"] and "K=4000 > 3840" in str(violations[0])


def test_unsorted_and_computed_k_are_caught(tmp_path):
    assert rules(lint_onnx(topk_graph(tmp_path, 10, sorted_=0))) == ["topk-sorted"]
    assert rules(lint_onnx(topk_graph(tmp_path, 10, constant=False))) == ["topk-constant-k"]


def test_a_planted_nonzero_is_caught(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])
    path = save_graph(tmp_path, [helper.make_node("NonZero", ["x"], ["y"], name="nz")], [x], [y])
    assert rules(lint_onnx(path)) == ["static-shapes"]


def test_custom_domains_are_caught(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    node = helper.make_node("FancyAttention", ["x"], ["y"], domain="com.microsoft", name="fancy")
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "g.onnx")
    assert "standard-domain" in rules(lint_onnx(tmp_path / "g.onnx"))


def test_kv_stages_sharing_a_dim_name_are_caught(tmp_path):
    kv = [helper.make_tensor_value_info(f"past.{i}.key", TensorProto.FLOAT, [1, 4, "past_len", 16]) for i in range(2)]
    outs = [helper.make_tensor_value_info(f"present.{i}.key", TensorProto.FLOAT, [1, 4, "past_len", 16]) for i in range(2)]
    nodes = [helper.make_node("Identity", [f"past.{i}.key"], [f"present.{i}.key"]) for i in range(2)]
    path = save_graph(tmp_path, nodes, kv, outs)
    assert lint_onnx(path, kv_stage_of_layer=[0, 0]) == []
    assert rules(lint_onnx(path, kv_stage_of_layer=[0, 1])) == ["kv-dim-names"]


@pytest.mark.parametrize("graph", ["vision", "prefill", "decode"])
def test_the_real_export_is_clean(exported, graph):
    from conftest import TINY_RECIPE_60
    from visprune.manifests.onnx_set import kv_stages_of

    stages = kv_stages_of(TINY_RECIPE_60) if graph != "vision" else None
    assert lint_onnx(exported["pruned-onnx"] / f"{graph}.onnx", stages) == []


def scatter_graph(tmp_path, dtype):
    """ScatterElements writing ones into `dtype` data at computed indices (the data's type comes from inference:
    it is the output of a Cast, declared nowhere)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2, 3])
    y = helper.make_tensor_value_info("y", dtype, [2, 8])
    ones = helper.make_tensor("ones", dtype, [2, 3], [1] * 6)
    nodes = [helper.make_node("Cast", ["x"], ["data"], to=dtype, name="cast"),
             helper.make_node("ScatterElements", ["data", "idx", "ones"], ["y"], axis=1, name="taken")]
    return save_graph(tmp_path, nodes, [x, idx], [y], [ones], name=f"scatter-{dtype}.onnx")


def test_a_bool_scatter_is_caught_and_numeric_ones_pass(tmp_path):
    (violation,) = lint_onnx(scatter_graph(tmp_path, TensorProto.BOOL))
    assert violation.rule == "scatter-bool-data" and "node taken" in violation.detail
    assert lint_onnx(scatter_graph(tmp_path, TensorProto.FLOAT)) == []
    assert lint_onnx(scatter_graph(tmp_path, TensorProto.INT32)) == []


def test_a_scatter_of_unknown_dtype_is_no_violation(tmp_path):
    """A lint that cannot tell the data's type says nothing (the graph-level checks still run)."""
    from exporter.lint import _node_violations

    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["y"], name="nd")
    assert _node_violations("g", node, {}, {}) == []
    assert _node_violations("g", node, {}, {"data": TensorProto.BOOL})[0].rule == "scatter-bool-data"


def attention_graph(tmp_path, prescale=True, between=(), name="attn.onnx"):
    """softmax(Q K^T + mask) V on [1, 2, 4, 8] heads, with `between` ("cast", "nan-guard") inserted between the
    Softmax and the MatMul with V, and Q scaled by a constant before Q K^T when `prescale`."""
    f = TensorProto.FLOAT
    q, k, v = (helper.make_tensor_value_info(n, f, [1, 2, 4, 8]) for n in "qkv")
    mask = helper.make_tensor_value_info("mask", f, [1, 1, 4, 4])
    inits = [helper.make_tensor("scale", f, [], [0.35]), helper.make_tensor("zero", f, [], [0.0])]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="kt")]
    if prescale:
        nodes.append(helper.make_node("Mul", ["q", "scale"], ["qs"], name="scale_q"))
    nodes += [helper.make_node("MatMul", ["qs" if prescale else "q", "kt"], ["scores"], name="qk"),
              helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
              helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax")]
    probs, v_name, out_type = "p", "v", f
    if "nan-guard" in between:
        nodes += [helper.make_node("IsNaN", [probs], ["nan"], name="isnan"),
                  helper.make_node("Where", ["nan", "zero", probs], ["p_guarded"], name="nan_guard")]
        probs = "p_guarded"
    if "cast" in between:
        out_type = TensorProto.FLOAT16
        nodes += [helper.make_node("Cast", [probs], ["p16"], to=out_type, name="to_fp16"),
                  helper.make_node("Cast", ["v"], ["v16"], to=out_type, name="v_fp16")]
        probs, v_name = "p16", "v16"
    nodes.append(helper.make_node("MatMul", [probs, v_name], ["out"], name="pv"))
    out = helper.make_tensor_value_info("out", out_type, [1, 2, 4, 8])
    return save_graph(tmp_path, nodes, [q, k, v, mask], [out], inits, name=name)


def test_a_prescaled_attention_passes_the_fused_attention_rule(tmp_path):
    assert lint_onnx(attention_graph(tmp_path), None, 0) == []


def test_an_unscaled_softmax_cast_matmul_is_counted_unfused(tmp_path):
    """fp16 eager layers cast the fp32 probabilities before the MatMul with V: still an explicit softmax."""
    path = attention_graph(tmp_path, prescale=False, between=("cast",))
    (violation,) = lint_onnx(path, None, 0)
    assert violation.rule == "fused-attention" and "1 attentions" in violation.detail and "softmax" in violation.detail
    assert lint_onnx(path, None, 1) == []
    assert lint_onnx(attention_graph(tmp_path, between=("cast",), name="scaled.onnx"), None, 0) == []


def test_a_nan_guarded_softmax_is_caught(tmp_path):
    """onnxscript's bool-mask SDPA (opset 18) writes Where(IsNaN(p), 0, p) before the MatMul with V: pre-scaled,
    but not the pattern TensorRT fuses."""
    (violation,) = lint_onnx(attention_graph(tmp_path, between=("nan-guard",)), None, 0)
    assert violation.rule == "attention-nan-guard"
    assert "softmax -> nan_guard" in violation.detail and "additive float mask" in violation.detail
    unscaled = attention_graph(tmp_path, prescale=False, between=("nan-guard", "cast"), name="both.onnx")
    assert rules(lint_onnx(unscaled, None, 0)) == ["attention-nan-guard", "fused-attention"]
    assert rules(lint_onnx(unscaled, None, 1)) == ["attention-nan-guard"]


def shape_k_graph(tmp_path, from_shape: bool):
    """TopK over x [1, N] keeping N * 2 // 5: K computed from x's Shape (a LLaVA-NeXT ratio recipe) or from x's data."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, None]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [1, None])]
    inits = [helper.make_tensor(name, TensorProto.INT64, [1], [value]) for name, value in
             (("one", 1), ("two", 2), ("five", 5))]
    if from_shape:
        source = [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["n"], axis=0)]
    else:
        source = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
                  helper.make_node("Cast", ["total"], ["n0"], to=TensorProto.INT64),
                  helper.make_node("Reshape", ["n0", "one"], ["n"])]
    nodes = source + [helper.make_node("Mul", ["n", "two"], ["n2"]), helper.make_node("Div", ["n2", "five"], ["k"]),
                      helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, sorted=1, name="topk")]
    return save_graph(tmp_path, nodes, [x], outs, inits, name=f"k-from-shape-{from_shape}.onnx")


def test_a_k_computed_from_shapes_passes_and_one_from_data_does_not(tmp_path):
    assert lint_onnx(shape_k_graph(tmp_path, from_shape=True)) == []
    assert rules(lint_onnx(shape_k_graph(tmp_path, from_shape=False))) == ["topk-constant-k"]
