"""`visprune pipeline` through the real CLI on the tiny model: every stage, every report, sane figures."""

import gc
import json
import shutil
from collections import Counter

import pytest

from calibrate.recipe import load_recipe
from workflows.end_to_end import SAMPLE_QUESTION
from cli.main import main


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
    assert "accuracy" not in figures  # tiny is no shapes-vqa model: no accuracy sample, a photograph as the request
    assert run["sample"]["question"] == SAMPLE_QUESTION and run["sample"]["expected"] is None


@pytest.mark.slow
def test_pipeline_with_an_unreachable_budget_fails_cleanly(tmp_path, capsys):
    code = main(["pipeline", "--reduction", "0.999", "--out", str(tmp_path / "run"), "--samples", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 6 and "Hint:" in err
    assert list(tmp_path.iterdir()) == []  # the run folder, the background export's staging: all gone


# --- the demo's model: tiny-vqa, whose answers can be checked ------------------------------------------------

ACCURACY_QUESTIONS = 10


def answer_words(question_type: str) -> set[str]:
    from visprune.tasks import shapes_vqa as task

    return {"colour": set(task.COLORS), "shape": set(task.SHAPES), "count": set(task.COUNT_WORDS),
            "exists": {"yes", "no"}, "side": {"left", "right"}}[question_type]


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("pipeline-vqa") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["pipeline", "--model", "tiny-vqa", "--reduction", "0.6", "--out", str(out), "--samples", "8",
                     "--latency-rounds", "2", "--accuracy-questions", str(ACCURACY_QUESTIONS)])
    return code, out, printed.getvalue()


@pytest.mark.slow
def test_vqa_pipeline_answers_a_held_out_question(vqa_run):
    """The sample request is a shapes-vqa test question; both engines answer it with a word of its type."""
    from workflows.end_to_end import SAMPLE_TEST_INDEX
    from visprune.tasks.shapes_vqa import make_sample, normalize_answer

    code, out, printed = vqa_run
    assert code == 0
    sample = make_sample("test", SAMPLE_TEST_INDEX)
    run = json.loads((out / "pipeline.json").read_text())
    assert run["sample"]["question"] == sample.question and run["sample"]["expected"] == sample.answer
    for key in ("pruned_answer", "unpruned_answer"):
        assert normalize_answer(run["sample"][key]) in answer_words(sample.question_type), run["sample"]
    assert run["answer"] == run["sample"]["pruned_answer"]
    report = (out / "report.md").read_text()
    for text in (sample.question, f'"{sample.answer}"', f'"{run["sample"]["pruned_answer"]}"', "](sample.png)"):
        assert text in report, text
    assert "expected answer" in printed and repr(sample.answer) in printed and sample.question in printed
    assert (out / "sample.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_vqa_pipeline_reports_pruned_and_unpruned_accuracy(vqa_run):
    """Both accuracies, on the requested number of held-out questions, each inside its own 95 % interval, and the
    pruned one is what `visprune eval --engine` computes for the same questions."""
    from reports.evaluate import EvalConfig, answers_from_engine
    from visprune.tasks.shapes_vqa import accuracy_by_type, make_split

    _, out, printed = vqa_run
    run = json.loads((out / "pipeline.json").read_text())
    accuracy = run["figures"]["accuracy"]
    assert accuracy["questions"] == ACCURACY_QUESTIONS and accuracy["split"] == "test"
    for engine in ("pruned", "unpruned"):
        a = accuracy[engine]
        low, high = a["ci95"]
        assert a["n"] == ACCURACY_QUESTIONS and 0.0 <= low <= a["overall"] <= high <= 1.0
        assert sum(v["n"] for v in a["per_type"].values()) == ACCURACY_QUESTIONS
        assert all(v["ci95"][0] <= v["accuracy"] <= v["ci95"][1] for v in a["per_type"].values())
        assert f"{a['overall']:.1%} [{low:.1%}, {high:.1%}]" in (out / "report.md").read_text()
        assert f"{a['overall']:.1%} right of {ACCURACY_QUESTIONS}" in printed
    samples = make_split("test", ACCURACY_QUESTIONS, start=accuracy["start"])
    answers = answers_from_engine(out / "engine", samples, EvalConfig().max_new_tokens)
    assert accuracy["pruned"] == accuracy_by_type(samples, answers)
    assert run["config"]["accuracy_questions"] == ACCURACY_QUESTIONS


def test_pipeline_rejects_a_negative_accuracy_sample(tmp_path, capsys):
    from workflows.end_to_end import PipelineConfig
    from visprune.errors import ConfigError

    code = main(["pipeline", "--model", "tiny-vqa", "--accuracy-questions", "-1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--accuracy-questions must be 0 or more, got -1" in err and "Hint:" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        PipelineConfig(model="tiny-vqa", accuracy_questions=-1)
    assert PipelineConfig(model="tiny-vqa", accuracy_questions=0).accuracy_questions == 0


# --- memory: each engine opened once, engines built for batch 1 -------------------------------------------------


def test_the_pipeline_opens_each_engine_once_and_frees_them(exported, tmp_path):
    """The stages after the builds, on the session's engines (built by the pipeline's own `_export_and_build`):
    every stage takes the one open Pipeline of its engine, and nothing of the run (engines, the parity reference)
    outlives it."""
    from workflows.end_to_end import PipelineConfig, PipelineResult, _engine_stages
    from runtime.pipeline import ENGINE_OPENS, Pipeline
    from runtime.torch_runner import TorchRunner

    out = tmp_path / "run"
    (out / "report").mkdir(parents=True)
    (out / "engine").symlink_to(exported["pruned"])
    (out / "engine-unpruned").symlink_to(exported["unpruned"])
    shutil.copy(exported["recipe"], out / "recipe.json")
    references_before, opens_before = _alive(TorchRunner), ENGINE_OPENS.copy()
    config = PipelineConfig(model="tiny", parity_prompts=1, max_new_tokens=2, latency_rounds=1)
    parity, latency, accuracy = _engine_stages(config, PipelineResult(out), progress=False)
    assert ENGINE_OPENS - opens_before == Counter({str(exported["pruned"].resolve()): 1,
                                                   str(exported["unpruned"].resolve()): 1})
    assert parity.engine_vs_reference.passed and accuracy is None
    assert latency.engines["pruned"]["memory"]["load_bytes"] is None  # open already: its loading not measured
    assert "load: not measured" in latency.engines["baseline"]["memory"]["method"]
    gc.collect()
    assert _alive(TorchRunner) == references_before
    assert not [p for p in _alive(Pipeline) if out in p.engine_dir.parents]


def test_the_pipeline_builds_its_engines_for_one_request_at_a_time(exported):
    for name in ("pruned", "unpruned"):
        config = json.loads((exported[name] / "engine.json").read_text())["config"]
        assert config["max_batch"] == 1, name


def _alive(kind: type) -> list:
    return [o for o in gc.get_objects() if type(o) is kind]  # type(), not isinstance: no __class__ of proxies
