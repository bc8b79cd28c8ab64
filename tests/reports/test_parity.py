"""Parity reports and the checks that an engine fits the model it is compared against."""

import json
import shutil

import numpy as np
import pytest

from engines import BuildConfig, build_engine
from runtime import Pipeline
from reports.parity import (CRITERIA, ParityError, default_parity_prompts, kept_comparison, logits_within, tied_swaps,
                            parity_report, step_atol, top1_flips)
from visprune.errors import ArtifactMismatchError
from visprune.manifests.common import model_dump


def test_parity_report_passes_and_describes_pruning(exported, tmp_path):
    report = parity_report(exported["pruned"], "tiny", tmp_path / "report", prompts=default_parity_prompts(3),
                           max_new_tokens=4)
    a, b = report.engine_vs_reference, report.pruned_vs_unpruned
    assert a.passed and a.max_abs_logits_error <= 1e-4 and a.reference == {"device": "cpu", "dtype": "float32"}
    assert a.criteria == {"logits_atol": 1e-4, "logits_rtol": 3e-5, "min_kept_overlap": 1.0, "min_top1": 1.0,
                          "score_rtol": 1e-5}
    assert a.min_kept_overlap == 1.0 and a.min_teacher_forced_top1 == 1.0 and a.max_kept_mismatches == 0
    assert a.logits_judged_prompts == 3 and a.near_tie_flips == a.decisive_flips == 0
    assert report.schema_version == 3 and 0.0 <= a.max_logits_error_over_atol <= 1.0
    for case in report.cases:
        assert case["kept_indices_equal"] and case["tokens_equal"] and case["engine_tokens"] == case["reference_tokens"]
        assert set(case["kept_overlap"]) == {"0", "1", "2", "3", "4", "5"}  # TINY_RECIPE_60 prunes at layers 0-5
        assert case["logits_judged"] and case["logits_within"] and case["first_divergent_layer"] is None
        assert all(1e-4 <= atol < 2e-4 for atol in case["logits_atol"])  # tiny's |logit| ~3-6: at or near the floor
    assert 0.0 <= b.first_token_top1_agreement <= 1.0 and b.mean_first_token_kl >= 0.0
    assert json.loads((tmp_path / "report" / "parity.json").read_text()) == model_dump(report)
    assert "PASSED" in (tmp_path / "report" / "parity.md").read_text()


def test_unpruned_engine_agrees_perfectly_with_unpruned_reference(exported, tmp_path):
    report = parity_report(exported["unpruned"], "tiny", tmp_path, prompts=default_parity_prompts(2),
                           max_new_tokens=3)
    assert report.pruned_vs_unpruned.first_token_top1_agreement == 1.0
    assert report.pruned_vs_unpruned.mean_first_token_kl == pytest.approx(0.0, abs=1e-9)


def test_parity_failure_is_an_error_unless_allowed(exported, tmp_path):
    strict = {"logits_atol": 1e-12, "logits_rtol": 0.0}  # no engine can meet this
    with pytest.raises(ParityError, match=r"logits error up to .* with the same kept tokens in 1 prompt\(s\), over the "
                                          r"step's atol max\(1e-12, 0 \* max \|reference logit\|\)"):
        parity_report(exported["pruned"], "tiny", tmp_path / "a", prompts=default_parity_prompts(1), max_new_tokens=2,
                      criteria=strict)
    report = parity_report(exported["pruned"], "tiny", tmp_path / "b", prompts=default_parity_prompts(1),
                           max_new_tokens=2, allow_failure=True, criteria=strict)
    assert not report.engine_vs_reference.passed and report.engine_vs_reference.criteria["logits_atol"] == 1e-12


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
    assert report.engine_vs_reference.passed


@pytest.mark.slow
def test_a_float16_engine_is_judged_by_the_float16_criteria(exported, tmp_path):
    """A correct float16 engine against the float32 reference: passes its own criteria, where the float32 ones
    (and the old rule of identical kept indices and tokens) would fail it on expected rounding."""
    from exporter import ExportConfig, export_onnx
    from reports.parity import CRITERIA

    export_onnx(ExportConfig(model="tiny", recipe=exported["recipe"], dtype="float16"), tmp_path / "onnx",
                progress=False)
    build_engine(BuildConfig(), tmp_path / "onnx", tmp_path / "engine")
    report = parity_report(tmp_path / "engine", "tiny", tmp_path / "r", prompts=default_parity_prompts(8),
                           max_new_tokens=8, allow_failure=True)
    verdict = report.engine_vs_reference
    assert verdict.passed and verdict.criteria == vars(CRITERIA["float16"]), verdict.model_dump_json()
    assert verdict.reference == {"device": "cpu", "dtype": "float32"}
    same = [c for c in report.cases if c["kept_indices_equal"]]
    assert same and max(max(c["max_abs_logits_error"]) for c in same) < 0.05  # float16 rounding alone
    assert verdict.logits_judged_prompts == len(same)  # the others are said to be unjudged, not passed silently
    assert all(c["logits_within"] is None and not c["logits_judged"] for c in report.cases if c not in same)
    assert verdict.max_abs_logits_error > CRITERIA["float32"].logits_atol  # the float32 rule would fail it


# --- the criteria on real arrays ------------------------------------------------------------------------------


def logits(scale: float, vocab: int = 32000, seed: int = 0) -> np.ndarray:
    """A step's logits whose largest magnitude is `scale`."""
    values = np.random.default_rng(seed).normal(size=vocab).astype(np.float32)
    return values * np.float32(scale / np.abs(values).max())


def test_the_float32_logits_tolerance_scales_with_the_logits():
    """The same 5e-4 error: summation-order noise on a 7B model's logits (|logit| 100), an error on tiny's (|3|)."""
    rules = CRITERIA["float32"]
    large, small = logits(100.0), logits(3.0)
    error = np.zeros_like(large)
    error[123] = 5e-4
    assert step_atol(large, rules) == pytest.approx(3e-3) and step_atol(small, rules) == 1e-4  # floor
    atols = [step_atol(large, rules), step_atol(small, rules)]
    assert logits_within([large + error, small + error], [large, small], atols) == [True, False]
    broken = small.copy()
    broken[7] = np.nan
    assert logits_within([broken], [small], [1.0]) == [False]  # NaN fails at any tolerance


def test_a_near_tie_flip_is_reported_and_a_decisive_flip_fails():
    rules = CRITERIA["float32"]
    reference = logits(3.0)
    first, second = np.argsort(reference)[-2:][::-1]
    tied, clear = reference.copy(), reference.copy()
    tied[second] = tied[first] - 1e-5  # the reference's margin: well under 2 atol (2e-4)
    engine_tied = tied.copy()
    engine_tied[second] += 2e-5  # within atol of the reference, yet the argmax moves
    engine_clear = clear.copy()
    engine_clear[second] = clear[first] + 1.0
    steps = top1_flips([tied, engine_tied, engine_clear], [tied, tied, clear], [int(first)] * 3,
                       [step_atol(r, rules) for r in (tied, tied, clear)])
    assert (steps["near_tie_flips"], steps["decisive_flips"]) == (1, 1)
    assert steps["teacher_forced_top1"] == pytest.approx(2 / 3) and steps["raw_top1"] == pytest.approx(1 / 3)
    assert steps["reference_margins"][0] == pytest.approx(1e-5, abs=1e-6)
    assert logits_within([engine_tied], [tied], [step_atol(tied, rules)]) == [True]


def test_kept_mismatches_are_counted_per_layer():
    reference = {0: [1, 2, 3, 4, 5], 3: [2, 3, 4]}
    same = kept_comparison(reference, reference)
    assert same["kept_indices_equal"] and same["kept_mismatches"] == {"0": 0, "3": 0}
    swapped = kept_comparison({0: [1, 2, 3, 4, 9], 3: [2, 3, 9]}, reference)  # 9 for 5, then 9 for 4
    assert swapped["kept_mismatches"] == {"0": 1, "3": 1} and swapped["first_divergent_layer"] == 0
    assert swapped["kept_overlap"] == {"0": pytest.approx(0.8), "3": pytest.approx(2 / 3)}
    assert not swapped["kept_indices_equal"]
    assert swapped["tied_swaps"] == 0 and swapped["kept_judged_overlap"] == swapped["kept_overlap"]  # no scores


def test_a_swap_on_a_topk_tie_counts_as_agreement_and_a_decisive_one_does_not():
    """The reference's scores tell them apart: at layer 0 the reference kept 0-4 and cut 5 with a score equal (to
    rounding) to 4's; the engine keeping 5 for 4 is a tie, keeping 6 (far below the cut) for 4 is not. After a
    tie the next layer chooses among other tokens and is not judged."""
    reference = {0: [0, 1, 2, 3, 4], 3: [0, 1, 2]}
    scores = {0: np.array([9.0, 8.0, 7.0, 6.0, 5.0, 5.0 - 1e-7, 1.0]), 3: np.array([3.0, 2.0, 1.0, 0.5, 0.1] + [np.nan] * 2)}
    tied = kept_comparison({0: [0, 1, 2, 3, 5], 3: [0, 1, 3]}, reference, scores, score_rtol=1e-5)
    assert tied["tied_swaps"] == 1 and tied["first_divergent_layer"] == 0
    assert tied["kept_judged_overlap"] == {"0": 1.0, "3": None} and tied["kept_overlap"]["3"] == pytest.approx(2 / 3)
    wrong = kept_comparison({0: [0, 1, 2, 3, 6], 3: [0, 1, 3]}, reference, scores, score_rtol=1e-5)
    assert wrong["tied_swaps"] == 0 and wrong["kept_judged_overlap"]["0"] == pytest.approx(0.8)
    assert tied_swaps([0, 1, 2, 3, 5], [0, 1, 2, 3, 4], scores[0], 0.0) == 0  # exact equality only at rtol 0


def test_the_pytorch_reference_returns_its_selection_scores(exported, default_set):
    """What the tie rule reads: per pruning layer, the score of every image index still present (NaN for those
    gone), and the kept indices are the top of those scores."""
    from runtime.torch_runner import TorchRunner

    engine = Pipeline.from_engine_dir(exported["pruned"])
    reference = engine.with_runner(TorchRunner.open(exported["pruned"], engine.manifest))
    image = default_set.samples[0].image
    generation = reference.generate(image, reference.chat_prompt("What is it?"), max_new_tokens=1)
    assert set(generation.selection_scores) == set(generation.kept_indices)
    for layer, kept in generation.kept_indices.items():
        scores = generation.selection_scores[layer]
        present = np.flatnonzero(~np.isnan(scores))
        assert set(kept) == set(present[np.argsort(-scores[present], kind="stable")[:len(kept)]].tolist())


def test_a_report_says_which_prompts_had_their_logits_judged(exported):
    """Two prompts through the real aggregation: one with identical kept sets and logits within tolerance, one
    whose kept sets differ by one tied index (logits not judged, not silently passed) with a near-tie flip."""
    from visprune.manifests.engine_set import read_engine_set
    from reports.parity import _markdown, _summarize

    rules = CRITERIA["float32"]
    reference = logits(3.0)
    first, second = np.argsort(reference)[-2:][::-1]
    reference[second] = reference[first] - 1e-5
    engine = reference.copy()
    engine[second] += 5e-5
    atols = [step_atol(reference, rules)]

    scores = {0: np.concatenate([np.linspace(2.0, 1.0, 99), [1.0, 1.0, 0.4, 0.3]])}  # 98, 99, 100 tie at the cut

    def case(kept_engine):
        kept = kept_comparison(kept_engine, {0: list(range(100))}, scores, rules.score_rtol)
        judged = kept["kept_indices_equal"]
        flips = top1_flips([engine], [reference], [int(first)], atols)
        return {"image": "a.png", "question": "Why?", "max_abs_logits_error": [5e-5], "logits_atol": atols,
                "logits_judged": judged,
                "logits_within": all(logits_within([engine], [reference], atols)) if judged else None,
                **kept, **flips, "first_token_top1_agree": True, "first_token_kl": 0.0, "answer_exact_match": True}

    cases = [case({0: list(range(100))}), case({0: list(range(99)) + [100]})]
    onnx_set, reference_facts = read_engine_set(exported["pruned"]).onnx_set, {"device": "cpu", "dtype": "float32"}
    report = _summarize(cases, rules, onnx_set, reference_facts)
    verdict = report.engine_vs_reference
    assert verdict.passed and verdict.logits_judged_prompts == 1 and verdict.near_tie_flips == 2
    assert verdict.min_kept_overlap == 1.0 and verdict.max_kept_mismatches == 1 and verdict.tied_swaps == 1
    assert verdict.max_logits_error_over_atol == pytest.approx(0.5)
    markdown = _markdown(report)
    assert "Logits judged in 1 of 2 prompts" in markdown and "no: kept sets differ" in markdown
    assert "0 decisive, 2 near ties" in markdown and "1 (layer 0)" in markdown
    three_swaps = _summarize([case({0: list(range(97)) + [100, 101, 102]})], rules, onnx_set, reference_facts)
    assert three_swaps.engine_vs_reference.failures == [
        "kept-index overlap down to 0.970 < 1 (up to 3 indices of a layer not kept)"]


def test_parity_shows_progress_on_a_terminal_unless_quiet(exported, tmp_path):
    """The parity report takes ~35 s: a bar per prompt on stderr when it is a terminal (a real pty here), none
    with progress=False (`--quiet`)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from conftest import REPO

    call = (f"parity_report({str(exported['pruned'])!r}, 'tiny', {str(tmp_path)!r} + '/{{}}', "
            "prompts=default_parity_prompts(2), max_new_tokens=1, progress={})")
    script = ("import sys; from reports.parity import parity_report, default_parity_prompts; "
              f"{call.format('a', True)}; print('--- quiet:', file=sys.stderr, flush=True); "
              f"{call.format('b', False)}")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    shown, quiet = b"".join(chunks).decode(errors="replace").split("--- quiet:")
    assert "parity (prompts)" in shown and "2/2" in shown
    assert "parity (prompts)" not in quiet
