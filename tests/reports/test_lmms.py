"""lmms-eval over visprune engines (reports/lmms/): real lmms-eval, real engines of tiny-vqa (unpruned and DivPrune
60 %), on the held-out shapes-vqa questions; its figures must be `visprune eval`'s for the same questions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from reports.lmms.tasks import TASK_TEMPLATE, write_shapes_vqa_task
from visprune.tasks.shapes_vqa import make_split

QUESTIONS = 32
NEEDS_LMMS = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed: pip install -e '.[eval]' && pip install --no-deps 'lmms-eval>=0.7.3,<0.8' "
           "(make test installs both; docs/evaluating.md)")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return write_shapes_vqa_task(tmp_path_factory.mktemp("lmms-tasks"), QUESTIONS)


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """No hub, and the datasets cache inside the test: the task's data must be the local files alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_the_task_folder_is_the_test_split_written_deterministically(task_folder, tmp_path):
    lines = [json.loads(line) for line in (task_folder / "test.jsonl").read_text().splitlines()]
    samples = make_split("test", QUESTIONS)
    assert [(d["question"], d["answer"], d["question_type"]) for d in lines] == \
        [(s.question, s.answer, s.question_type) for s in samples]
    assert all((task_folder / "images" / f"{s.id}.png").read_bytes()[:4] == b"\x89PNG" for s in samples)
    again = write_shapes_vqa_task(tmp_path / "again", QUESTIONS)
    assert [json.loads(line)["question"] for line in (again / "test.jsonl").read_text().splitlines()] == \
        [d["question"] for d in lines]
    assert f"include: {TASK_TEMPLATE}" in (task_folder / "shapes_vqa.yaml").read_text()


def test_the_task_scores_with_visprunes_rule():
    spec = importlib.util.spec_from_file_location("shapes_utils", TASK_TEMPLATE.parent / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"answer": "red"}
    assert utils.process_results(doc, ["Red."])["accuracy"] == 1.0  # first word, lower case, no full stop
    assert utils.process_results(doc, ["red circle"])["accuracy"] == 1.0
    assert utils.process_results(doc, ["a red one"])["accuracy"] == 0.0
    assert utils.process_results(doc, [""])["accuracy"] == 0.0


@NEEDS_LMMS
@pytest.mark.slow
@pytest.mark.parametrize("name", ["unpruned", "divprune-60"])
def test_lmms_eval_accuracy_is_visprune_evals_and_records_the_engine(name, tiny_vqa_engines, task_folder):
    from reports.evaluate import EvalConfig, answers_from_engine
    from reports.lmms.evaluate import LmmsEvalConfig, evaluate_engine
    from visprune.manifests.common import model_dump
    from visprune.manifests.engine_set import read_engine_set
    from visprune.tasks.shapes_vqa import accuracy_by_type

    engine = tiny_vqa_engines[name]
    results = evaluate_engine(engine, LmmsEvalConfig(include_path=task_folder, batch_size=8))  # batched
    samples = make_split("test", QUESTIONS)
    answers = answers_from_engine(engine, samples, EvalConfig().max_new_tokens)  # `visprune eval`, one at a time
    logged = sorted(results["samples"]["shapes_vqa"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in logged] == answers
    assert results["results"]["shapes_vqa"]["accuracy,none"] == accuracy_by_type(samples, answers)["overall"]
    manifest = read_engine_set(engine)
    record = results["config"]["model_args"]
    assert record["recipe"] == model_dump(manifest.onnx_set.recipe)
    assert record["recipe"]["method"] == ("none" if name == "unpruned" else "divprune")
    assert (sum(record["recipe"]["removed"]) + record["recipe"]["removed_before_llm"] > 0) == (name != "unpruned")
    assert record["engine_manifest_sha256"] == manifest.manifest_sha256 and record["backend"] == "onnxruntime"
    assert record["model"]["fingerprint"] == manifest.onnx_set.model.fingerprint


@NEEDS_LMMS
@pytest.mark.slow
def test_the_lmms_eval_command_finds_the_visprune_model_by_its_entry_point(tiny_vqa_engines, task_folder, tmp_path):
    """`lmms-eval --model visprune --model_args engine=DIR`, as a researcher types it (the package installed)."""
    from reports.evaluate import EvalConfig, answers_from_engine
    from visprune.tasks.shapes_vqa import accuracy_by_type

    engine, limit = tiny_vqa_engines["divprune-60"], 8
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "visprune", "--model_args", f"engine={engine}",
                          "--tasks", "shapes_vqa", "--include_path", str(task_folder), "--limit", str(limit),
                          "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = list((tmp_path / "out").rglob("*_results.json"))
    assert len(written) == 1, run.stdout[-3000:] + run.stderr[-3000:]  # lmms-eval exits 0 when it fails, too
    results = json.loads(written[0].read_text())
    assert results["config"]["model_args"] == f"engine={engine}"
    assert results["config"]["model_backend"] == "reports.lmms.model.VispruneLMMs (simple)"
    samples = make_split("test", limit)
    expected = accuracy_by_type(samples, answers_from_engine(engine, samples, EvalConfig().max_new_tokens))
    assert results["results"]["shapes_vqa"]["accuracy,none"] == expected["overall"]


@NEEDS_LMMS
@pytest.mark.slow
def test_loglikelihood_is_greedy_for_the_engines_answer_alone_and_sums_its_log_probabilities(tiny_vqa_engines,
                                                                                             task_folder):
    """Multiple-choice tasks: the teacher-forced log-probability of each candidate, from the engine's logits."""
    from lmms_eval.api.instance import Instance

    from reports.lmms.model import VispruneLMMs
    from reports.lmms.shapes_vqa.utils import doc_to_visual
    from visprune.tasks.shapes_vqa import COLORS

    model = VispruneLMMs(engine=tiny_vqa_engines["divprune-60"])
    sample = next(s for s in make_split("test", QUESTIONS) if s.question_type == "colour")
    model.task_dict = {"shapes_vqa": {"test": {0: {"image": str(task_folder / "images" / f"{sample.id}.png")}}}}
    free = model.pipe.generate(sample.image(), model.pipe.chat_prompt(sample.question), 8, keep_logits=True)
    assert free.text.strip() in COLORS
    candidates = [f" {c}" for c in COLORS]
    requests = [Instance("loglikelihood", (sample.question, c, doc_to_visual, 0, "shapes_vqa", "test"), idx=0,
                         metadata={"task": "shapes_vqa", "doc_id": 0, "repeats": 1}) for c in candidates]
    scores = model.loglikelihood(requests)
    chosen = candidates.index(f" {free.text.strip()}")
    assert [greedy for _, greedy in scores] == [i == chosen for i in range(len(candidates))]
    assert all(logprob < 0 for logprob, _ in scores)
    # the engine's answer scores what free-running greedy decoding's own logits give its tokens (EOS aside)
    steps = [(logits.astype(np.float64), token) for logits, token in zip(free.step_logits, free.token_ids)
             if token != model.pipe.eos_token_id]
    expected = sum(float(logits[token] - np.logaddexp.reduce(logits)) for logits, token in steps)
    assert scores[chosen][0] == pytest.approx(expected, abs=1e-4)
