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
])
def test_bad_build_configs_are_rejected(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        BuildConfig(**kwargs)


def test_tf32_is_off_unless_asked_for_and_recorded(exported):
    from engines.build import ort_providers, uses_tf32

    manifest = json.loads((exported["pruned"] / "engine.json").read_text())
    assert manifest["tf32"] is False and manifest["config"]["allow_tf32"] is False
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(cuda, uses_tf32("cuda", False)) == [("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                             "CPUExecutionProvider"]
    assert ort_providers(cuda, uses_tf32("cuda", True))[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert not uses_tf32("cpu", True) and ort_providers(["CPUExecutionProvider"], False) == ["CPUExecutionProvider"]
