"""TensorRT-readiness lint for exported graphs (deploy_constraints.md §3): what can be checked without TensorRT.

Rules: the ONNX full check passes; only standard domains; every TopK has sorted=1 and a constant K <= 3840, or a K
computed from shapes alone (a shape tensor, which TensorRT takes: a LLaVA-NeXT `ratio` recipe's K is a fraction of
the image's N, at most 2928);
no op with a data-dependent output shape (NonZero and friends); no Scatter / ScatterElements / ScatterND writes
into BOOL data (TensorRT's scatter takes int8/int32/int64/float16/float32/bfloat16 only; dtypes come from ONNX
shape inference, and an unknown dtype is no violation); KV stages have distinct dim names; a graph over 2 GB keeps
its weights as external data; attention is fused (below). All violations are collected, then reported together.

Fused attention: TensorRT fuses MatMul -> [mask] -> Softmax -> MatMul into one attention kernel only when Q or
K (or both, by sqrt(scale)) are scaled *before* the first MatMul ("Fused Attention", TensorRT developer guide);
ONNX Runtime runs the opset-23 `Attention` op fused. So a Softmax that feeds a MatMul (an attention whose
context is computed from explicit probabilities) counts as unfused unless its first MatMul takes a Q or K
scaled by a constant. The exporter allows none in the language model: a FitPrune layer keeps its fused
attention and computes the visual keys' probabilities beside it (no probabilities feed a MatMul there). The Softmax output is followed to its MatMul through Cast (fp16 eager layers cast the fp32
probabilities), Identity, and Where / IsNaN; a Where there (onnxscript's bool-mask SDPA at opset 18 writes
`Where(IsNaN(p), 0, p)`) is its own violation, `attention-nan-guard`: TensorRT fuses softmax(QK^T+mask)V, not a
guarded softmax, whatever the scaling. An additive float mask gives SDPA's decomposition no guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

TOPK_MAX_K = 3840
STANDARD_DOMAINS = {"", "ai.onnx"}
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"}
SCATTER_OPS = {"Scatter", "ScatterElements", "ScatterND"}
# between a Softmax and the MatMul with V: dtype casts, no-ops and the NaN guard (Where + IsNaN)
PROBABILITY_PASS_THROUGH = {"Cast", "Identity", "Where", "IsNaN"}
PROTOBUF_LIMIT = 2 * 1024**3


@dataclass(frozen=True)
class Violation:
    graph: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.graph}: [{self.rule}] {self.detail}"


def lint_onnx(path: Path, kv_stage_of_layer: list[int] | None = None,
              unfused_attention_allowed: int | None = None) -> list[Violation]:
    """Every TensorRT-readiness violation in the graph at `path` (empty when it is clean). With
    `unfused_attention_allowed`, also the fused-attention rule (module docstring)."""
    path = Path(path)
    name = path.name
    violations = _full_check(path)
    model = onnx.load(str(path), load_external_data=False)
    constants = _constant_values(model.graph)
    dtypes = _element_types(model)
    from_shapes = _shape_computed(model.graph, constants)
    for node in model.graph.node:
        violations += _node_violations(name, node, constants, dtypes, from_shapes)
    if kv_stage_of_layer is not None:
        violations += _kv_dim_violations(name, model.graph, kv_stage_of_layer)
    if unfused_attention_allowed is not None:
        violations += _attention_violations(name, model.graph, constants, unfused_attention_allowed)
    if path.stat().st_size > PROTOBUF_LIMIT:
        violations.append(Violation(name, "external-data", f"{path.stat().st_size} bytes inline; over 2 GB must "
                                                            "keep weights as external data"))
    return violations


def _full_check(path: Path) -> list[Violation]:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return []
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return [Violation(path.name, "onnx-checker", str(e).splitlines()[0])]


def _shape_computed(graph: onnx.GraphProto, constants: dict) -> set[str]:
    """Tensors computed from Shape outputs and constants alone (nodes come in topological order)."""
    known = set(constants)
    for node in graph.node:
        if node.op_type == "Shape" or all(i in known for i in node.input if i):
            known.update(node.output)
    return known


def _node_violations(graph: str, node: onnx.NodeProto, constants: dict, dtypes: dict[str, int],
                     from_shapes: set[str] = frozenset()) -> list[Violation]:
    where = f"node {node.name or node.op_type}"
    found = []
    if node.domain not in STANDARD_DOMAINS:
        found.append(Violation(graph, "standard-domain", f"{where} uses domain {node.domain!r}"))
    if node.op_type in DATA_DEPENDENT_OPS:
        found.append(Violation(graph, "static-shapes", f"{where} is {node.op_type}: its output shape depends on data"))
    if node.op_type == "TopK":
        found += _topk_violations(graph, node, constants, where, from_shapes)
    if node.op_type in SCATTER_OPS and dtypes.get(node.input[0]) == onnx.TensorProto.BOOL:
        found.append(Violation(graph, "scatter-bool-data", f"{where} is {node.op_type} into BOOL data "
                                                            f"{node.input[0]!r}; TensorRT's scatter has no bool: "
                                                            "scatter int32 (or float) and compare instead"))
    return found


def _topk_violations(graph: str, node: onnx.NodeProto, constants: dict, where: str,
                     from_shapes: set[str]) -> list[Violation]:
    found = []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("sorted", 1) != 1:
        found.append(Violation(graph, "topk-sorted", f"{where} has sorted=0; TensorRT needs sorted=1"))
    k = constants.get(node.input[1]) if len(node.input) > 1 else None
    if k is None and node.input[1] not in from_shapes:
        found.append(Violation(graph, "topk-constant-k", f"{where} takes K from data, not from constants or shapes"))
    elif k is None:
        pass  # a shape tensor: TensorRT checks K <= 3840 at run time
    elif int(k.reshape(-1)[0]) > TOPK_MAX_K:
        found.append(Violation(graph, "topk-k-limit", f"{where} has K={int(k.reshape(-1)[0])} > {TOPK_MAX_K}"))
    return found


def _constant_values(graph: onnx.GraphProto) -> dict:
    """Initializers and Constant-node outputs by name (as numpy arrays)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer if not init.external_data}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, for every tensor whose type is known after shape inference (inputs,
    outputs, value_info, initializers, Constant outputs). A graph shape inference rejects keeps the types it
    declares: the checker rule reports the rejection."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):  # ValueError: over 2 GB
        pass
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]
             if v.type.HasField("tensor_type")}
    types.update({init.name: init.data_type for init in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            types.update({node.output[0]: a.t.data_type for a in node.attribute if a.name == "value"})
    return {name: t for name, t in types.items() if t != onnx.TensorProto.UNDEFINED}


def _kv_dim_violations(graph: str, g: onnx.GraphProto, stage_of_layer: list[int]) -> list[Violation]:
    """KV tensors of different stages must not share a symbolic length name (TensorRT needs distinct names)."""
    names_by_stage: dict[int, set[str]] = {}
    for value in list(g.input) + list(g.output):
        parts = value.name.split(".")
        if len(parts) == 3 and parts[0] in ("past", "present") and parts[1].isdigit():
            dim = value.type.tensor_type.shape.dim[2]
            names_by_stage.setdefault(stage_of_layer[int(parts[1])], set()).add(dim.dim_param or str(dim.dim_value))
    found = []
    stages = sorted(names_by_stage)
    for i, a in enumerate(stages):
        for b in stages[i + 1:]:
            shared = {n for n in names_by_stage[a] & names_by_stage[b] if not n.isdigit()}
            if shared:
                found.append(Violation(graph, "kv-dim-names", f"stages {a} and {b} share KV length dim {shared}"))
    return found


def _attention_violations(graph: str, g: onnx.GraphProto, constants: dict, allowed: int) -> list[Violation]:
    producer = {out: node for node in g.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    unfused, guarded = [], []
    for softmax in (node for node in g.node if node.op_type == "Softmax"):
        reaches_matmul, guards = _probability_path(softmax, consumers)
        if reaches_matmul and not _prescaled(_first_matmul(softmax, producer), producer, constants):
            unfused.append(softmax.name)
        if reaches_matmul and guards:
            guarded.append(f"{softmax.name} -> {', '.join(guards)}")
    found = []
    if len(unfused) > allowed:
        found.append(Violation(graph, "fused-attention", f"{len(unfused)} attentions compute explicit probabilities "
                                                         f"without a pre-scaled Q or K (allowed: {allowed}): "
                                                         f"{', '.join(unfused)}"))
    if guarded:
        found.append(Violation(graph, "attention-nan-guard",
                               f"{len(guarded)} attentions put a Where (NaN guard) between Softmax and the MatMul "
                               f"with V, which is not the softmax(QK^T+mask)V TensorRT fuses: {'; '.join(guarded)}. "
                               "Fix: pass SDPA an additive float mask in the query dtype, not a bool mask"))
    return found


def _probability_path(softmax: onnx.NodeProto, consumers: dict) -> tuple[bool, list[str]]:
    """Whether `softmax`'s output reaches a MatMul through PROBABILITY_PASS_THROUGH ops only, and the Where nodes
    on those paths (a Where that masks the probabilities, e.g. the IsNaN guard)."""
    reaches, guards, seen = False, [], set()
    frontier = list(consumers.get(softmax.output[0], []))
    while frontier:
        node = frontier.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul":
            reaches = True
        elif node.op_type in PROBABILITY_PASS_THROUGH:
            if node.op_type == "Where":
                guards.append(node.name or "Where")
            frontier += [c for out in node.output for c in consumers.get(out, [])]
    return reaches, guards if reaches else []


def _first_matmul(softmax: onnx.NodeProto, producer: dict) -> onnx.NodeProto | None:
    """The MatMul that feeds `softmax` through mask ops only (Add, Where, Cast), or None."""
    frontier = [producer.get(softmax.input[0])]
    while frontier:
        node = frontier.pop(0)
        if node is not None and node.op_type == "MatMul":
            return node
        if node is not None and node.op_type in ("Add", "Where", "Cast"):
            frontier += [producer.get(i) for i in node.input]
    return None


def _prescaled(matmul: onnx.NodeProto | None, producer: dict, constants: dict) -> bool:
    """Whether an input of `matmul` is a Mul by a constant (the scale applied before Q K^T)."""
    if matmul is None:
        return False
    scaled = [producer.get(i) for i in matmul.input]
    return any(n is not None and n.op_type == "Mul" and any(i in constants for i in n.input) for n in scaled)
