"""Parity reports and the checks that an engine fits the model it is compared against."""

import json
import shutil

import pytest

from engines import BuildConfig, build_engine
from runtime import Pipeline
from runtime.parity import ParityError, default_parity_prompts, parity_report
from visprune.errors import ArtifactMismatchError


def test_parity_report_passes_and_describes_pruning(exported, tmp_path):
    report = parity_report(exported["pruned"], "tiny", tmp_path / "report", prompts=default_parity_prompts(3),
                           max_new_tokens=4)
    a, b = report["engine_vs_reference"], report["pruned_vs_unpruned"]
    assert a["passed"] and a["max_abs_logits_error"] <= 1e-4 and a["reference"] == {"device": "cpu", "dtype": "float32"}
    assert a["criteria"] == {"logits_atol": 1e-4, "logits_rtol": 0.0, "min_kept_overlap": 1.0, "min_top1": 1.0}
    assert a["min_kept_overlap"] == 1.0 and a["min_teacher_forced_top1"] == 1.0
    for case in report["cases"]:
        assert case["kept_indices_equal"] and case["tokens_equal"] and case["engine_tokens"] == case["reference_tokens"]
        assert set(case["kept_overlap"]) == {"0", "1", "2", "3", "4", "5"}  # TINY_RECIPE_60 prunes at layers 0-5
    assert 0.0 <= b["first_token_top1_agreement"] <= 1.0 and b["mean_first_token_kl"] >= 0.0
    assert json.loads((tmp_path / "report" / "parity.json").read_text())["engine_vs_reference"]["passed"]
    assert "PASSED" in (tmp_path / "report" / "parity.md").read_text()


def test_unpruned_engine_agrees_perfectly_with_unpruned_reference(exported, tmp_path):
    report = parity_report(exported["unpruned"], "tiny", tmp_path, prompts=default_parity_prompts(2),
                           max_new_tokens=3)
    assert report["pruned_vs_unpruned"]["first_token_top1_agreement"] == 1.0
    assert report["pruned_vs_unpruned"]["mean_first_token_kl"] == pytest.approx(0.0, abs=1e-9)


def test_parity_failure_is_an_error_unless_allowed(exported, tmp_path):
    strict = {"logits_atol": 1e-12}  # no engine can meet this
    with pytest.raises(ParityError, match="logits error up to .* with the same kept tokens, over atol 1e-12 and rtol 0"):
        parity_report(exported["pruned"], "tiny", tmp_path / "a", prompts=default_parity_prompts(1), max_new_tokens=2,
                      criteria=strict)
    report = parity_report(exported["pruned"], "tiny", tmp_path / "b", prompts=default_parity_prompts(1),
                           max_new_tokens=2, allow_failure=True, criteria=strict)
    assert not report["engine_vs_reference"]["passed"] and report["engine_vs_reference"]["criteria"]["logits_atol"] == 1e-12


def test_teacher_forcing_feeds_the_given_tokens(exported, default_set):
    pipe = Pipeline.from_engine_dir(exported["pruned"])
    image, prompt = default_set.samples[1].image, pipe.chat_prompt("What is it?")
    free = pipe.generate(image, prompt, max_new_tokens=4, keep_logits=True)
    forced = pipe.generate(image, prompt, keep_logits=True, forced_tokens=[7, 8, 9])
    assert forced.token_ids == [7, 8, 9] and len(forced.step_logits) == 3
    assert (forced.step_logits[0] == free.step_logits[0]).all()  # the first step sees only the prompt
    assert not (forced.step_logits[1] == free.step_logits[1]).all() or free.token_ids[0] == 7


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


@pytest.mark.slow
def test_a_float16_engine_is_judged_by_the_float16_criteria(exported, tmp_path):
    """A correct float16 engine against the float32 reference: passes its own criteria, where the float32 ones
    (and the old rule of identical kept indices and tokens) would fail it on expected rounding."""
    from exporter import ExportConfig, export_onnx
    from runtime.parity import CRITERIA

    export_onnx(ExportConfig(model="tiny", recipe=exported["recipe"], dtype="float16"), tmp_path / "onnx",
                progress=False)
    build_engine(BuildConfig(), tmp_path / "onnx", tmp_path / "engine")
    report = parity_report(tmp_path / "engine", "tiny", tmp_path / "r", prompts=default_parity_prompts(8),
                           max_new_tokens=8, allow_failure=True)
    verdict = report["engine_vs_reference"]
    assert verdict["passed"] and verdict["criteria"] == vars(CRITERIA["float16"]), json.dumps(verdict)
    assert verdict["reference"] == {"device": "cpu", "dtype": "float32"}
    same = [c for c in report["cases"] if c["kept_indices_equal"]]
    assert same and max(max(c["max_abs_logits_error"]) for c in same) < 0.05  # float16 rounding alone
    assert verdict["max_abs_logits_error"] > CRITERIA["float32"].logits_atol  # the float32 rule would fail it
