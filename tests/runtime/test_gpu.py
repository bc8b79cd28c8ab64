"""What a CUDA host with PyTorch alone can verify (`pytest -m gpu`); skipped cleanly without CUDA.

The PyTorch backend on CUDA (float32 and float16, eager and torch.compile) against the float32 CPU reference
under the parity criteria of its dtype, and calibration on CUDA (float16 with float32 scores) against the same
calibration on the CPU. The TensorRT and ONNX Runtime CUDA tests live in tests/engines/test_tensorrt.py.
"""

import pytest
import torch

from engines import BuildConfig, build_engine
from reports.parity import default_parity_prompts, parity_report

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def float16_onnx(exported, tmp_path_factory):
    from exporter import ExportConfig, export_onnx

    out = tmp_path_factory.mktemp("fp16") / "onnx"
    export_onnx(ExportConfig(model="tiny", recipe=exported["recipe"], dtype="float16"), out, progress=False)
    return out


@pytest.mark.parametrize("dtype, compile", [("float32", False), ("float16", False), ("float16", True)])
def test_pytorch_cuda_backend_meets_the_criteria_of_its_dtype(exported, float16_onnx, tmp_path, dtype, compile):
    onnx = exported["pruned-onnx"] if dtype == "float32" else float16_onnx
    manifest = build_engine(BuildConfig(backend="pytorch", device="cuda", torch_compile=compile), onnx,
                            tmp_path / "engine")
    assert manifest.device == "cuda" and not manifest.tf32
    report = parity_report(tmp_path / "engine", "tiny", tmp_path / "report", prompts=default_parity_prompts(8),
                           max_new_tokens=8, allow_failure=True, reference="cpu")
    verdict = report.engine_vs_reference.model_dump()
    assert verdict["reference"] == {"device": "cpu", "dtype": "float32"}
    assert verdict["passed"], verdict


def test_calibration_on_cuda_agrees_with_the_cpu(tmp_path):
    from calibrate import CalibrationConfig, calibrate

    recipes = {device: calibrate(CalibrationConfig(model="tiny", reduction=0.6, samples=16, device=device),
                                 tmp_path / f"{device}.json", plot=False, progress=False).recipe
               for device in ("cpu", "cuda")}
    cpu, cuda = recipes["cpu"], recipes["cuda"]
    assert cuda.model["dtype"] == "float16" and cpu.model["dtype"] == "float32"
    assert cuda.achieved["visual_flops_reduction"] >= 0.6 and cpu.achieved["visual_flops_reduction"] >= 0.6
    moved = sum(abs(a - b) for a, b in zip(cpu.removed, cuda.removed))
    assert moved <= 0.1 * cpu.num_visual_tokens, (cpu.removed, cuda.removed)  # float16 scores, same choices mostly
