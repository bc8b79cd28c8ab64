"""`visprune pipeline` through the real CLI on the tiny model: every stage, every report, sane figures."""

import json

import pytest

from calibrate.recipe import load_recipe
from visprune.cli import main


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "demo"
    code = main(["pipeline", "--model", "tiny", "--reduction", "0.6", "--out", str(out), "--samples", "16",
                 "--latency-rounds", "3", "--quiet"])
    return code, out


@pytest.mark.slow
def test_pipeline_writes_every_artifact(pipeline_run):
    code, out = pipeline_run
    assert code == 0
    for name in ("recipe.json", "recipe.png", "onnx/manifest.json", "onnx-unpruned/manifest.json", "engine/engine.json",
                 "engine-unpruned/engine.json", "sample.png", "report.md", "pipeline.json", "report/parity.json",
                 "report/latency.json", "report/kept_tokens.png", "report/parity.png", "report/latency.png"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    for picture in ("recipe.png", "report/kept_tokens.png", "report/latency.png", "report/parity.png"):
        assert f"]({picture})" in report and (out / picture).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*staging*")) and [p.name for p in out.parent.iterdir()] == ["demo"]


@pytest.mark.slow
def test_a_pipeline_run_is_recognised_as_one(pipeline_run):
    """A second `pipeline --out` may replace it; every other command's --out refuses it without --force."""
    from visprune.outputs import ENGINE_SET, PIPELINE_RUN, OutputLocationError, check_output, foreign_entries

    _, out = pipeline_run
    check_output(out, PIPELINE_RUN)
    assert foreign_entries(out, PIPELINE_RUN) == []
    with pytest.raises(OutputLocationError, match="is a visprune pipeline run, not a visprune engine"):
        check_output(out, ENGINE_SET)


@pytest.mark.slow
def test_pipeline_figures_are_sane(pipeline_run):
    _, out = pipeline_run
    run = json.loads((out / "pipeline.json").read_text())
    figures = run["figures"]
    assert run["backend"] == "onnxruntime"  # no TensorRT on CPU machines
    assert 0 < figures["lm_flops_ratio"] < 1 and 0.6 <= figures["visual_flops_reduction"] <= 0.62
    assert figures["parity_passed"] and figures["max_abs_logits_error"] <= 1e-4
    assert 0 < figures["kv_bytes_ratio"] < 1 and figures["prefill_latency_ratio"] > 0
    assert set(run["stage_seconds"]) >= {"calibrate", "export + build (pruned)", "parity report", "latency report"}
    pruned = json.loads((out / "engine" / "engine.json").read_text())
    baseline = json.loads((out / "engine-unpruned" / "engine.json").read_text())
    assert sum(pruned["onnx_set"]["recipe"]["removed"]) > 0 and sum(baseline["onnx_set"]["recipe"]["removed"]) == 0
    assert pruned["onnx_set"]["recipe"]["sha256"] == load_recipe(out / "recipe.json").content_hash()


@pytest.mark.slow
def test_pipeline_with_an_unreachable_budget_fails_cleanly(tmp_path, capsys):
    code = main(["pipeline", "--reduction", "0.999", "--out", str(tmp_path / "run"), "--samples", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 6 and "Hint:" in err
    assert list(tmp_path.iterdir()) == []  # the run folder, the background export's staging: all gone
