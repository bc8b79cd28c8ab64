"""Engine folders: manifest contents and the configs they accept."""

import json

import pytest

from engines import BuildConfig
from visprune.artifacts import sha256_file
from visprune.errors import ConfigError


def test_engine_manifest_records_backend_and_upstream(exported):
    manifest = json.loads((exported["pruned"] / "engine.json").read_text())
    assert manifest["schema"] == "visprune.engine_set" and manifest["backend"] == "onnxruntime"
    assert manifest["providers"] == ["CPUExecutionProvider"] and manifest["optimization_level"] == "extended"
    assert manifest["onnxruntime_version"]
    assert manifest["upstream"]["manifest_sha256"] == sha256_file(exported["pruned-onnx"] / "manifest.json")
    assert manifest["onnx_set"]["recipe"]["keep"][-1] == 201


@pytest.mark.parametrize("kwargs, fragment", [
    ({"device": "tpu"}, "Unknown device"),
    ({"builder_optimization_level": 7}, "not in 0-5"),
    ({"backend": "openvino"}, "Unknown backend"),
    ({"optimization_level": "max"}, "Unknown optimization level"),
    ({"intra_op_threads": -1}, "negative"),
])
def test_bad_build_configs_are_rejected(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        BuildConfig(**kwargs)


def test_session_options_are_recorded_and_used(exported):
    """Serving threads and spinning are chosen at build time, written down, and what the runner opens with."""
    import os

    from runtime.pipeline import Pipeline

    manifest = json.loads((exported["pruned"] / "engine.json").read_text())
    assert manifest["session_options"] == {"intra_op_threads": 0, "spinning": False}
    runner = Pipeline.from_engine_dir(exported["pruned"]).runner
    assert runner.session_facts == {"intra_op_threads": len(os.sched_getaffinity(0)), "spinning": False}


def test_tensorrt_refuses_a_set_exported_for_onnxruntime(exported, tmp_path):
    """The default export target uses opset-23 ops TensorRT's parser does not promise: build_engine refuses it
    (after checking that TensorRT is installed at all) with the export command that fixes it."""
    from engines.build import check_target
    from visprune.manifests.onnx_set import read_onnx_set
    from visprune.errors import ArtifactMismatchError

    onnx_set = read_onnx_set(exported["pruned-onnx"])
    assert onnx_set.target == "onnxruntime"
    with pytest.raises(ArtifactMismatchError, match="--target tensorrt"):
        check_target(onnx_set, "tensorrt", exported["pruned-onnx"])
    for backend in ("onnxruntime", "pytorch"):
        check_target(onnx_set, backend, exported["pruned-onnx"])


def test_tf32_is_off_unless_asked_for_and_recorded(exported):
    from engines.build import ort_providers, uses_tf32

    manifest = json.loads((exported["pruned"] / "engine.json").read_text())
    assert manifest["tf32"] is False and manifest["config"]["allow_tf32"] is False
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(cuda, uses_tf32("cuda", False)) == [("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                             "CPUExecutionProvider"]
    assert ort_providers(cuda, uses_tf32("cuda", True))[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert not uses_tf32("cpu", True) and ort_providers(["CPUExecutionProvider"], False) == ["CPUExecutionProvider"]


def test_weights_over_the_protobuf_limit_go_to_side_files_that_travel_with_the_engine(exported, tmp_path, monkeypatch,
                                                                                      default_set):
    """What a 7B graph takes (over 2 GB): the optimized graph's weights in `<graph>.onnx.data`, recorded and loaded.
    The threshold is lowered so that tiny's graphs take the same path."""
    import shutil

    import numpy as np

    import engines.build
    from engines import build_engine
    from runtime import Pipeline
    from visprune.errors import ArtifactMismatchError

    monkeypatch.setattr(engines.build, "EXTERNAL_DATA_ABOVE", 0)
    manifest = build_engine(BuildConfig(), exported["pruned-onnx"], tmp_path / "engine")
    assert {"vision.onnx.data", "prefill.onnx.data", "decode.onnx.data"} <= set(manifest.files)
    image, prompt = default_set.samples[0].image, "USER: <image>\nWhat is it? ASSISTANT:"
    side, whole = (Pipeline.from_engine_dir(e).generate(image, prompt, 4, keep_logits=True)
                   for e in (tmp_path / "engine", exported["pruned"]))
    assert side.token_ids == whole.token_ids and np.allclose(side.step_logits[0], whole.step_logits[0], atol=1e-5)
    shutil.copytree(tmp_path / "engine", tmp_path / "copy", ignore=shutil.ignore_patterns("prefill.onnx.data"))
    with pytest.raises(ArtifactMismatchError, match="lacks prefill.onnx.data"):
        Pipeline.from_engine_dir(tmp_path / "copy")


@pytest.mark.parametrize("version, target, device, refused", [
    ("1.24.2", "onnxruntime", "cuda", True),  # CUDA Attention-23 throws on a bool mask
    ("1.23.0", "onnxruntime", "cuda", True),  # CPU Attention-23 only
    ("1.9.1", "onnxruntime", "cuda", True),  # compared as numbers, not strings
    ("weird", "onnxruntime", "cuda", True),
    ("1.25.0", "onnxruntime", "cuda", False),
    ("1.25.0.dev20260301", "onnxruntime", "cuda", False),
    ("1.26.1+cu128", "onnxruntime", "cuda", False),
    ("2.0.0", "onnxruntime", "cuda", False),
    ("1.20.0", "onnxruntime", "cpu", False),  # the CPU kernel has run Attention-23 since 1.23
    ("1.20.0", "tensorrt", "cuda", False),  # opset 18: no Attention op
])
def test_ort_cuda_needs_1_25_for_opset_23_attention(version, target, device, refused):
    from engines.build import check_ort_cuda_attention
    from visprune.errors import BackendUnavailableError

    if not refused:
        check_ort_cuda_attention(target, device, version)
        return
    with pytest.raises(BackendUnavailableError, match=f"onnxruntime {version} cannot run") as info:
        check_ort_cuda_attention(target, device, version)
    assert 'pip install "onnxruntime-gpu>=1.25"' in str(info.value) and "--target tensorrt" in str(info.value)
    assert "--device cpu" in str(info.value)


def test_the_installed_onnxruntime_is_checked_when_no_version_is_given():
    import onnxruntime as ort

    from engines.build import _release, check_ort_cuda_attention
    from visprune.errors import BackendUnavailableError

    if _release(ort.__version__) >= (1, 25):
        check_ort_cuda_attention("onnxruntime", "cuda")
    else:
        with pytest.raises(BackendUnavailableError, match=ort.__version__):
            check_ort_cuda_attention("onnxruntime", "cuda")


def shape_arithmetic_graph(path):
    """x [N, 3] @ w, reshaped to [N, 2, 2] by a shape computed from the product's own (dynamic) shape: the
    Shape -> Gather -> Unsqueeze -> Concat chain ORT's CUDA provider keeps on the host. The computed shape is an
    output too, so ORT's ReshapeFusion cannot fold the chain into a constant."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2, 2])
    new_shape = helper.make_tensor_value_info("new_shape", TensorProto.INT64, [3])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.arange(12, dtype=np.float32)),
             helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
             helper.make_tensor("tail", TensorProto.INT64, [2], [2, 2])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
             helper.make_node("Shape", ["y"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0, name="gather_rows"),
             helper.make_node("Unsqueeze", ["rows", "axes"], ["rows1"], name="unsqueeze"),
             helper.make_node("Concat", ["rows1", "tail"], ["new_shape"], axis=0, name="concat"),
             helper.make_node("Reshape", ["y", "new_shape"], ["z"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [x], [z, new_shape], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_node_placement_reports_every_node_of_a_cpu_session(tmp_path):
    import numpy as np

    from engines.build import node_placement

    path = shape_arithmetic_graph(tmp_path / "g.onnx")
    placement = node_placement(path, ["CPUExecutionProvider"], {"x": np.ones((5, 3), np.float32)})
    assert list(placement) == ["CPUExecutionProvider"]
    nodes = {node.name: node for node in placement["CPUExecutionProvider"]}
    assert set(nodes) == {"matmul", "shape", "gather_rows", "unsqueeze", "concat", "reshape"}
    assert nodes["matmul"].op_type == "MatMul" and nodes["matmul"].output_types == ("float",)
    assert nodes["shape"].output_types == ("int64",)
    assert list(tmp_path.iterdir()) == [path]  # no profile file left behind


def test_check_node_placement_names_the_heavy_ops_a_cuda_session_ran_on_the_cpu(tmp_path):
    """The CPU session's real placement read as a CUDA session's: MatMul and the Reshape of its float output
    are work that left the GPU; the int64 shape arithmetic is where ORT's CUDA provider puts it on purpose."""
    import numpy as np

    from engines.build import check_node_placement, node_placement
    from visprune.errors import BackendUnavailableError

    path = shape_arithmetic_graph(tmp_path / "g.onnx")
    placement = node_placement(path, ["CPUExecutionProvider"], {"x": np.ones((5, 3), np.float32)})
    check_node_placement(placement, "cpu")
    with pytest.raises(BackendUnavailableError, match=r"ran 2 nodes .* on the CPU \(MatMul, Reshape: ") as info:
        check_node_placement(placement, "cuda")
    assert "Gather" not in str(info.value) and "Concat" not in str(info.value)
    assert "onnxruntime-gpu>=1.25" in str(info.value)
    cpu = placement["CPUExecutionProvider"]
    shape_only = {"CUDAExecutionProvider": [n for n in cpu if n.output_types == ("float",)],
                  "CPUExecutionProvider": [n for n in cpu if n.output_types != ("float",)]}
    assert [n.op_type for n in shape_only["CPUExecutionProvider"]] == ["Shape", "Gather", "Unsqueeze", "Concat"]
    check_node_placement(shape_only, "cuda")


def test_an_onnx_set_where_an_engine_belongs_is_named_with_the_build_command(exported):
    """`visprune run --engine ONNX_SET`: the folder is fine, it is the wrong kind; building it is the fix."""
    from runtime import Pipeline
    from visprune.errors import ArtifactMismatchError

    with pytest.raises(ArtifactMismatchError, match="is a visprune ONNX set .*not an engine") as info:
        Pipeline.from_engine_dir(exported["pruned-onnx"])
    assert info.value.hint.startswith(f"Build an engine from it with `visprune build --onnx {exported['pruned-onnx']} "
                                      "--out ENGINE`")


def test_an_engine_where_an_onnx_set_belongs_asks_for_the_set_it_was_built_from(exported, tmp_path):
    """`visprune build --onnx ENGINE`: not "export it again"."""
    from engines import build_engine
    from visprune.errors import ArtifactMismatchError

    with pytest.raises(ArtifactMismatchError, match="is a visprune engine .*not an ONNX set") as info:
        build_engine(BuildConfig(), exported["pruned"], tmp_path / "engine")
    assert "Pass the ONNX set this engine was built from" in info.value.hint and "again" not in info.value.hint
    assert not (tmp_path / "engine").exists()
