"""Parity reports and the checks that an engine fits the model it is compared against."""

import json
import shutil

import pytest

import runtime.parity as parity_module
from engines import BuildConfig, build_engine
from runtime import Pipeline
from runtime.parity import ParityError, default_parity_prompts, parity_report
from visprune.errors import ArtifactMismatchError


def test_parity_report_passes_and_describes_pruning(exported, tmp_path):
    report = parity_report(exported["pruned"], "tiny", tmp_path / "report", prompts=default_parity_prompts(3),
                           max_new_tokens=4)
    a, b = report["engine_vs_reference"], report["pruned_vs_unpruned"]
    assert a["passed"] and a["max_abs_logits_error"] <= 1e-4
    assert all(c["kept_indices_equal"] and c["tokens_equal"] for c in report["cases"])
    assert 0.0 <= b["first_token_top1_agreement"] <= 1.0 and b["mean_first_token_kl"] >= 0.0
    assert json.loads((tmp_path / "report" / "parity.json").read_text())["engine_vs_reference"]["passed"]
    assert "PASSED" in (tmp_path / "report" / "parity.md").read_text()


def test_unpruned_engine_agrees_perfectly_with_unpruned_reference(exported, tmp_path):
    report = parity_report(exported["unpruned"], "tiny", tmp_path, prompts=default_parity_prompts(2),
                           max_new_tokens=3)
    assert report["pruned_vs_unpruned"]["first_token_top1_agreement"] == 1.0
    assert report["pruned_vs_unpruned"]["mean_first_token_kl"] == pytest.approx(0.0, abs=1e-9)


def test_parity_failure_is_an_error_unless_allowed(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(parity_module.TOLERANCE, "float32", 1e-12)  # no engine can meet this
    with pytest.raises(ParityError, match="Hint:"):
        parity_report(exported["pruned"], "tiny", tmp_path / "a", prompts=default_parity_prompts(1), max_new_tokens=2)
    report = parity_report(exported["pruned"], "tiny", tmp_path / "b", prompts=default_parity_prompts(1),
                           max_new_tokens=2, allow_failure=True)
    assert not report["engine_vs_reference"]["passed"]


def test_an_engine_from_another_model_is_rejected(exported, tmp_path, tiny):
    other = tmp_path / "other-model"
    shutil.copytree(tiny.path, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-6  # same shapes, different architecture fingerprint
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactMismatchError, match="different model"):
        parity_report(exported["pruned"], str(other), tmp_path / "r", prompts=default_parity_prompts(1))


def test_missing_or_corrupt_graphs_are_reported(exported, tmp_path):
    broken = tmp_path / "engine"
    shutil.copytree(exported["pruned"], broken)
    (broken / "decode.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactMismatchError, match="decode.onnx has 8 bytes; the manifest recorded"):
        Pipeline.from_engine_dir(broken)
    (broken / "prefill.onnx").unlink()
    with pytest.raises(ArtifactMismatchError, match="lacks prefill.onnx"):
        Pipeline.from_engine_dir(broken)
    with pytest.raises(ArtifactMismatchError, match="No engine manifest"):
        Pipeline.from_engine_dir(tmp_path)


def test_building_from_an_incomplete_onnx_set_writes_nothing(exported, tmp_path):
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(exported["pruned-onnx"], onnx_dir)
    (onnx_dir / "vision.onnx").write_bytes(b"not onnx")
    with pytest.raises(ArtifactMismatchError, match="vision.onnx has 8 bytes"):
        build_engine(BuildConfig(), onnx_dir, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_an_engine_from_another_recipe_is_rejected(exported, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": [100, 0, 0, 0, 0, 0, 0, 0]}))
    with pytest.raises(ArtifactMismatchError, match="exported from recipe"):
        parity_report(exported["pruned"], "tiny", tmp_path / "r", recipe=other)
    assert not (tmp_path / "r").exists()
    report = parity_report(exported["pruned"], "tiny", tmp_path / "ok", recipe=exported["recipe"],
                           prompts=default_parity_prompts(1), max_new_tokens=2)
    assert report["engine_vs_reference"]["passed"]
