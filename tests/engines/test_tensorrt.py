"""TensorRT: what can be checked without it (missing-TensorRT errors, compatibility checks), and the GPU parity
test that runs where `tensorrt` and a CUDA GPU are present."""

import importlib.util
import json

from types import SimpleNamespace

import pytest

from engines import BuildConfig, build_engine
from engines.tensorrt import check_engine_compatible
from visprune.errors import ArtifactMismatchError, BackendUnavailableError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_tensorrt_gpu = pytest.mark.skipif(not (HAS_TENSORRT and _cuda_available()),
                                        reason="needs the tensorrt package and a CUDA GPU")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_building_without_tensorrt_says_how_to_install_it_and_writes_nothing(exported, tmp_path):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed") as info:
        build_engine(BuildConfig(backend="tensorrt"), exported["pruned-onnx"], tmp_path / "engine")
    assert "pip install tensorrt" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_auto_backend_picks_onnx_runtime_without_tensorrt_or_for_an_onnxruntime_set(exported, tmp_path):
    """The shared fixture is exported for onnxruntime (the default target): auto never hands it to TensorRT,
    whose parser does not promise its opset-23 ops; without TensorRT it is ONNX Runtime anyway."""
    assert json.loads((exported["pruned-onnx"] / "manifest.json").read_text())["target"] == "onnxruntime"
    manifest = build_engine(BuildConfig(backend="auto"), exported["pruned-onnx"], tmp_path / "engine")
    assert manifest.backend == "onnxruntime"


def test_onnxruntime_cuda_without_its_provider_is_an_error(exported, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_available():
        pytest.skip("this machine has ONNX Runtime CUDA")
    with pytest.raises(BackendUnavailableError, match="no CUDAExecutionProvider") as info:
        build_engine(BuildConfig(device="cuda"), exported["pruned-onnx"], tmp_path / "engine")
    assert "onnxruntime-gpu" in str(info.value)
    assert not (tmp_path / "engine").exists()


GPU_BUILT = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
# the engine-manifest fields the check reads (EngineManifest needs a whole build to construct)
BUILT = SimpleNamespace(tensorrt_version="10.13.0.35", gpu=SimpleNamespace(**GPU_BUILT),
                        upstream={"onnx_dir": "/runs/demo/onnx"})


@pytest.mark.parametrize("version, gpu, fragment", [
    ("11.4.0.106", GPU_BUILT, "TensorRT 10.13.0.35, this machine has 11.4.0.106"),
    ("10.13.0.35", {"name": "NVIDIA A10G", "compute_capability": "8.6"}, "this machine has NVIDIA A10G \\(8.6\\)"),
])
def test_an_engine_from_another_tensorrt_or_gpu_is_refused(version, gpu, fragment):
    with pytest.raises(ArtifactMismatchError, match=fragment) as info:
        check_engine_compatible(BUILT, version, gpu, "runs/demo/engine")
    assert "visprune build --backend tensorrt --onnx /runs/demo/onnx" in str(info.value)


def test_the_same_tensorrt_and_gpu_are_accepted():
    assert check_engine_compatible(BUILT, "10.13.0.35", dict(GPU_BUILT), "engine") is None


@pytest.mark.gpu
@needs_tensorrt_gpu
def test_tensorrt_fp16_engine_matches_the_pytorch_reference(tmp_path, exported):
    """fp16 export with float32 islands -> strongly typed TensorRT engine -> parity under the fp16 criteria against
    the fp16 CUDA reference."""
    from exporter import ExportConfig, export_onnx
    from reports.parity import parity_report

    export_onnx(ExportConfig(model="tiny", recipe=exported["recipe"], dtype="float16", target="tensorrt"),
                tmp_path / "onnx", progress=False)
    manifest = build_engine(BuildConfig(backend="tensorrt", max_prompt_tokens=700, max_new_tokens=16),
                            tmp_path / "onnx", tmp_path / "engine")
    assert manifest.precision == "float16" and manifest.profiles["prefill"]["inputs_embeds"]["max"][1] == 700
    report = parity_report(tmp_path / "engine", "tiny", tmp_path / "report", max_new_tokens=8, allow_failure=True)
    verdict = report.engine_vs_reference.model_dump()
    assert verdict["passed"], json.dumps(verdict)
    assert verdict["reference"] == {"device": "cuda", "dtype": "float16"}


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_onnxruntime_cuda_engine_matches_the_pytorch_reference(tmp_path, exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    from reports.parity import parity_report

    manifest = build_engine(BuildConfig(device="cuda"), exported["pruned-onnx"], tmp_path / "engine")
    assert manifest.providers[0] == "CUDAExecutionProvider"
    report = parity_report(tmp_path / "engine", "tiny", tmp_path / "report", max_new_tokens=8, allow_failure=True)
    verdict = report.engine_vs_reference.model_dump()
    assert verdict["reference"] == {"device": "cuda", "dtype": "float32"} and not manifest.tf32
    assert verdict["max_abs_logits_error"] <= 1e-3 and verdict["min_teacher_forced_top1"] == 1.0, json.dumps(verdict)
    assert verdict["min_kept_overlap"] >= 0.99
    assert_every_heavy_node_on_cuda(tmp_path / "engine")


def assert_every_heavy_node_on_cuda(engine):
    """Per-node placement from an ORT profile of the CUDA prefill (the session's provider list would not show a
    node ORT quietly put on the CPU, e.g. an opset-23 Attention without a CUDA kernel)."""
    import numpy as np

    from engines.build import check_node_placement, node_placement

    feeds = {"inputs_embeds": np.zeros((1, 600, 64), np.float32), "image_starts": np.array([5]),
             "pad_lengths": np.array([0])}
    placement = node_placement(engine / "prefill.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], feeds)
    check_node_placement(placement, "cuda")
    assert placement.get("CUDAExecutionProvider"), placement


def test_polygraphy_parser_errors_are_collected_for_the_build_error():
    """Polygraphy's own parser-error check (what NetworkFromOnnxPath calls) logs each node's error, then raises
    with a generic last line; the build error gets the per-node lines. The parser stands in for TensorRT's."""
    from polygraphy.backend.trt.util import check_onnx_parser_errors
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from engines.tensorrt import polygraphy_errors

    node_errors = ["In node 7 with name: /taken and operator: ScatterElements (parseNode): UNSUPPORTED_NODE:\n"
                   "bool data is not supported", "In node 9 (parseNode): INVALID_NODE: second"]
    parser = SimpleNamespace(num_errors=2, get_error=node_errors.__getitem__)
    with pytest.raises(PolygraphyException, match="Could not parse ONNX correctly"):
        with polygraphy_errors() as errors:
            check_onnx_parser_errors(parser, False)
    assert errors == [" ".join(e.replace("\n", " ").split()) for e in node_errors]
    assert G_LOGGER.log_file is None
    with polygraphy_errors() as errors:  # a clean run collects nothing
        G_LOGGER.info("parsed")
    assert errors == []
