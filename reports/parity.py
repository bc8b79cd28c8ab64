"""Parity reports: (a) the engine against the PyTorch reference of the same pruned model, (b) pruned against
unpruned (both in PyTorch, same weights) on prompts that calibration did not use.

(a) per prompt, under the criteria of the engine's precision (`CRITERIA`, overridable, written into the report):
the reference decodes greedily and the engine is fed the reference's tokens (teacher forcing), so one early flip
cannot ruin every later step.
- Logits, where both kept the same tokens: per step, Polygraphy's comparator (max error) against that step's own
  atol, max(atol floor, rtol * max |reference logit| of the step), so the tolerance follows the logits' scale.
  Where the kept sets differ the logits legitimately differ more: the case says `logits_judged: false` and the
  overlap and top-1 criteria judge it.
- Top-1, per step: a step whose engine argmax is not the reference's token is a flip only where the reference's
  margin (top-1 minus top-2 logit) exceeds twice the step's atol; below that it is a near-tie flip, reported and
  not failed (rounding within the tolerance can legitimately reorder such a pair).
- Kept indices, per pruning layer: the share of the reference's kept indices the engine kept too, and how many
  it did not (`kept_mismatches`), with the first layer where the sets part.
The reference is the PyTorch backend at the engine's dtype on the engine's device where that device exists here
(a CUDA engine on a CUDA host), else float32 on the CPU, and the criteria of the engine's dtype allow for that.
(b) per prompt: next-token top-1 agreement, KL(unpruned || pruned) of the first-token distribution, and
whether the greedy answers match exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.recipe import Recipe, check_recipe_fits, load_recipe, unpruned_recipe
from runtime.pipeline import Pipeline
from runtime.torch_runner import TorchRunner, engine_recipe
from visprune.artifacts import atomic_write_bytes
from visprune.dtypes import torch_dtype
from visprune.errors import ArtifactMismatchError, VispruneError
from visprune.manifests.common import model_dump, write_model
from visprune.manifests.onnx_set import OnnxSetManifest
from visprune.manifests.reports import PARITY_SCHEMA, EngineVsReference, ParityReport, PrunedVsUnpruned
from visprune.models import LlavaBundle, load_llava



@dataclass(frozen=True)
class ParityCriteria:
    """What "the engine computes what the reference computes" means at one precision, output by output."""

    # per step, where the kept tokens agree: max abs error <= max(logits_atol, logits_rtol * max |reference logit|)
    logits_atol: float
    logits_rtol: float
    min_kept_overlap: float  # per judged pruning layer: |kept by both, TopK ties counted as agreement| / K
    min_top1: float  # per prompt, teacher-forced: share of steps without a decisive flip (see NEAR_TIE_FACTOR)
    # a swap at the first layer where the kept sets part is a TopK tie when the reference scored both tokens within
    # this much (relative to the layer's largest score) of its cut (kept_comparison)
    score_rtol: float = 1e-5


# By the engine's export dtype. The logits atol scales with the step's largest logit because rounding does: a
# D-wide dot product summed in another order (cuBLAS vs. TensorRT/ONNX Runtime kernels, split-K) moves its result
# by ~sqrt(D) * eps relative to its magnitude, and the residual stream carries that through every layer. float32:
# rtol 3e-5 (~250 ulps of the largest logit; ~9e-4 at a 7B model's |logit| ~30, where a 1e-4 absolute bound fails
# on summation order alone) above a floor of 1e-4 (tiny's logits, |logit| ~3-6, stay at or near it). A selection or
# cache bug moves logits by 1e-2 relative or more, far above either.
# float16 and bfloat16 engines: rounding moves near-tied scores across the TopK boundary and near-tied logits across
# the argmax, so a few flips are expected numerics. Measured on CPU for float16 against the float32 reference
# (bench/results/parity_fp16.md: 8 prompts, kept sets equal in 5 with logits errors 0.007-0.022 at logits of
# magnitude ~3; overlap down to 0.950, teacher-forced top-1 down to 0.875). float16: floor 0.1 (that measurement
# with room), rtol 1e-2 (~10 float16 ulps, 2^-10, of the largest logit: 0.3 at |logit| ~30); bfloat16 (8 mantissa
# bits to float16's 11) is scaled from it: floor 0.5, rtol 8e-2. Both unmeasured at 7B.
# Kept indices: ONNX's TopK breaks ties by the lower index, TensorRT's does not promise to, and identical image
# patches (a flat background) score exactly equal, so a correct engine may swap tokens at the K boundary. The
# reference returns its selection scores (score-based methods), so a swap counts as a tie where both tokens scored
# within rounding of the cut: score_rtol ~100 float32 ulps, ~2 float16 and ~1.3 bfloat16 ulps of the layer's
# largest score. Layers after a tie choose among other tokens and are not judged; the logits neither.
CRITERIA = {
    "float32": ParityCriteria(logits_atol=1e-4, logits_rtol=3e-5, min_kept_overlap=1.0, min_top1=1.0,
                              score_rtol=1e-5),
    "float16": ParityCriteria(logits_atol=0.1, logits_rtol=1e-2, min_kept_overlap=0.9, min_top1=0.75,
                              score_rtol=2e-3),
    "bfloat16": ParityCriteria(logits_atol=0.5, logits_rtol=8e-2, min_kept_overlap=0.8, min_top1=0.6,
                               score_rtol=1e-2),
}
# A teacher-forced top-1 flip fails only where the reference's margin (top-1 minus top-2 logit) exceeds this many
# step atols: each of the two logits may move by up to one atol, so a smaller margin may legitimately reverse.
NEAR_TIE_FACTOR = 2.0
# How far the engine's saved token embeddings may sit from the model's float32 ones: the export rounds them to
# its dtype (float16 keeps 11 significant bits, bfloat16 8; bfloat16 sets store the rounded values as float32).
EMBEDDING_TOLERANCE = {"float32": (1e-6, 1e-8), "float16": (1e-3, 1e-7), "bfloat16": (1e-2, 1e-7)}  # (rtol, atol)
HELD_OUT_QUESTIONS = ["What is the dominant color here?", "Is this picture taken at night?",
                      "What shape is the biggest thing?", "Name one object in the photo."]


class ParityError(VispruneError):
    exit_code = 9


@dataclass
class PromptCase:
    image: Path
    question: str


def default_parity_prompts(count: int = 8) -> list[PromptCase]:
    """Default-set photographs with questions that calibration never asked."""
    from calibrate.data import default_calibration_set

    images = sorted({s.image for s in default_calibration_set().samples})
    return [PromptCase(images[(7 * i) % len(images)], HELD_OUT_QUESTIONS[i % len(HELD_OUT_QUESTIONS)])
            for i in range(count)]


def parity_report(engine: Path | Pipeline, model: str, out_dir: Path, prompts: list[PromptCase] | None = None,
                  max_new_tokens: int = 8, allow_failure: bool = False, recipe: Path | None = None,
                  criteria: dict[str, float] | None = None, reference: str = "auto",
                  progress: bool = True) -> ParityReport:
    """Write parity.json and parity.md to `out_dir`; raise ParityError on failure unless `allow_failure`.

    `engine`: an engine folder, or a Pipeline already open on one (the whole-pipeline run hands over the one it
    uses for every stage rather than hold a second copy of the engine). `criteria` overrides fields of the engine
    dtype's `CRITERIA`. `reference`: "auto" (see `reference_precision`) or "cpu" (float32 on the CPU, e.g. for the
    PyTorch backend on CUDA, whose "auto" reference would be itself). With `recipe`, the engine must have been
    exported from exactly that recipe. `progress`: a bar per prompt on stderr (each takes seconds: three
    generations), shown only on a terminal.
    """
    pipe = engine if isinstance(engine, Pipeline) else Pipeline.from_engine_dir(engine)
    engine_dir, onnx_set = pipe.engine_dir, pipe.manifest.onnx_set
    if recipe is not None:
        check_engine_recipe(onnx_set, load_recipe(recipe), engine_dir)
    bundle = load_llava(model)
    if bundle.fingerprint != onnx_set.model.fingerprint:
        raise ArtifactMismatchError(f"The engine in {engine_dir} was exported from a different model "
                                    f"({onnx_set.model.name}) than {model}.",
                                    "Pass the --model the engine was exported from, or export and build again.")
    check_engine_embeddings(pipe, bundle, model)
    device, dtype = reference_precision(pipe) if reference == "auto" else ("cpu", "float32")
    bundle = bundle if dtype == "float32" else load_llava(model, dtype=torch_dtype(dtype))
    pruned = pipe.with_runner(TorchRunner(bundle, engine_recipe(onnx_set), pipe.image_start, device))
    unpruned = pipe.with_runner(TorchRunner(bundle, unpruned_recipe(bundle.shape), pipe.image_start, device))
    rules = replace(CRITERIA[onnx_set.dtype], **(criteria or {}))
    cases = [_compare_case(pipe, pruned, unpruned, case, max_new_tokens, rules)
             for case in _progress(prompts or default_parity_prompts(), progress)]
    report = _summarize(cases, rules, onnx_set, {"device": device, "dtype": dtype})
    out_dir = Path(out_dir)
    write_model(out_dir / PARITY_SCHEMA.file, report)
    atomic_write_bytes(out_dir / "parity.md", _markdown(report).encode())
    if not report.engine_vs_reference.passed and not allow_failure:
        raise ParityError(f"The engine does not match the PyTorch reference: {report.engine_vs_reference.failures}",
                          f"See {out_dir / 'parity.md'}; pass --allow-parity-failure to keep going anyway.")
    return report


def check_engine_embeddings(pipe: Pipeline, bundle: LlavaBundle, model: str) -> None:
    """ArtifactMismatchError unless the engine's embed_tokens.npy holds `model`'s own token embeddings. Models of
    one architecture (tiny, tiny-vqa) share a fingerprint, and comparing against the wrong weights would report a
    parity failure instead of the wrong --model."""
    onnx_set = pipe.manifest.onnx_set
    ours = bundle.model.get_input_embeddings().weight.detach().float().numpy()
    theirs = pipe.embeddings.astype(np.float32)
    rtol, atol = EMBEDDING_TOLERANCE[onnx_set.dtype]
    if ours.shape == theirs.shape and np.allclose(theirs, ours, rtol=rtol, atol=atol):
        return
    exported_from = onnx_set.model.name
    raise ArtifactMismatchError(
        f"The engine in {pipe.engine_dir} was exported from {exported_from}, not from --model {model}: their token "
        "embeddings differ, so this is the wrong reference model, not a parity failure.",
        f"Pass --model {exported_from} (the model the engine was exported from), or export and build again from "
        f"{model}.")


def check_engine_recipe(onnx_set: OnnxSetManifest, recipe: Recipe, engine_dir: Path) -> None:
    """RecipeError if the recipe does not fit the engine's model; ArtifactMismatchError if the engine was exported
    from another recipe."""
    check_recipe_fits(recipe, onnx_set.language_model, onnx_set.model.fingerprint)
    if onnx_set.recipe.sha256 != recipe.content_hash():
        raise ArtifactMismatchError(
            f"The engine in {engine_dir} was exported from recipe {onnx_set.recipe.sha256[:19]}… "
            f"(keep {onnx_set.recipe.keep[-1]}), not from the given one ({recipe.content_hash()[:19]}…, "
            f"keep {recipe.keep[-1]}).",
            "Export and build again from this recipe, or leave --recipe out.")


def reference_precision(pipe: Pipeline) -> tuple[str, str]:
    """(device, dtype) of the reference: like the engine where its device exists here, else float32 on the CPU."""
    import torch

    if pipe.runner.device.startswith("cuda") and torch.cuda.is_available():
        return "cuda", pipe.manifest.onnx_set.dtype
    return "cpu", "float32"


def _compare_case(pipe: Pipeline, pruned: Pipeline, unpruned: Pipeline, case: PromptCase, max_new_tokens: int,
                  rules: ParityCriteria) -> dict[str, Any]:
    prompt = pipe.chat_prompt(case.question)
    reference = pruned.generate(case.image, prompt, max_new_tokens=max_new_tokens, keep_logits=True)
    engine = pipe.generate(case.image, prompt, keep_logits=True, forced_tokens=reference.token_ids)
    baseline = unpruned.generate(case.image, prompt, max_new_tokens=max_new_tokens, keep_logits=True)
    ref_tokens, ref_logits = reference.token_ids, reference.step_logits
    base_tokens, base_logits = baseline.token_ids, baseline.step_logits
    abs_err = [float(np.abs(e - r).max()) for e, r in zip(engine.step_logits, ref_logits)]
    scale = [float(np.abs(r).max()) for r in ref_logits]
    atols = [step_atol(r, rules) for r in ref_logits]
    flips = top1_flips(engine.step_logits, ref_logits, ref_tokens, atols)
    kept = kept_comparison(engine.kept_indices, reference.kept_indices, reference.selection_scores, rules.score_rtol)
    judged = kept["kept_indices_equal"]  # else the logits legitimately differ more: overlap and top-1 judge
    return {
        "image": case.image.name, "question": case.question,
        "max_abs_logits_error": abs_err, "max_rel_logits_error": [e / max(s, 1e-12) for e, s in zip(abs_err, scale)],
        "logits_atol": atols, "logits_judged": judged,
        "logits_within": all(logits_within(engine.step_logits, ref_logits, atols)) if judged else None,
        **kept, **flips, "tokens_equal": flips["raw_top1"] == 1.0,
        "engine_tokens": [int(np.argmax(e)) for e in engine.step_logits], "reference_tokens": ref_tokens,
        "first_token_top1_agree": int(np.argmax(base_logits[0])) == int(np.argmax(ref_logits[0])),
        "first_token_kl": _kl(base_logits[0], ref_logits[0]),
        "answer_exact_match": base_tokens == ref_tokens,
    }


def step_atol(reference: np.ndarray, rules: ParityCriteria) -> float:
    """The logits atol of one step: the floor, or the relative tolerance times the step's largest |logit|."""
    return max(rules.logits_atol, rules.logits_rtol * float(np.abs(reference).max()))


def logits_within(engine: list[np.ndarray], reference: list[np.ndarray], atols: list[float]) -> list[bool]:
    """Per step, whether the engine's logits [V] are within that step's atol of the reference's: Polygraphy's
    comparator (max-error check, NaN fails). One comparison per step, as its atol is one per output and run, not
    per iteration. rtol 0: an element-wise relative error says little of logits, which cross zero (the step's
    scale is already in its atol)."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    def within(e: np.ndarray, r: np.ndarray, atol: float) -> bool:
        runs = RunResults([(name, [IterationResult({"logits": step}, runner_name=name)])
                           for name, step in (("engine", e), ("reference", r))])
        compare = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="max")
        return bool(Comparator.compare_accuracy(runs, compare_func=compare))

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        return [within(e, r, atol) for e, r, atol in zip(engine, reference, atols)]


def top1_flips(engine: list[np.ndarray], reference: list[np.ndarray], tokens: list[int],
               atols: list[float]) -> dict[str, Any]:
    """Teacher-forced top-1 per step. A step whose engine argmax is not the reference's token is a decisive flip
    where the reference's margin (top-1 minus top-2 logit) exceeds NEAR_TIE_FACTOR step atols, else a near-tie
    flip: logits each within tolerance may reverse a pair that close. `teacher_forced_top1`: the share of steps
    without a decisive flip; `raw_top1`: the share whose argmax is the reference's token."""
    margins = [_margin(r) for r in reference]
    flipped = [int(np.argmax(e)) != token for e, token in zip(engine, tokens)]
    decisive = [f and m > NEAR_TIE_FACTOR * atol for f, m, atol in zip(flipped, margins, atols)]
    steps = max(len(flipped), 1)
    return {"teacher_forced_top1": 1.0 - sum(decisive) / steps, "raw_top1": 1.0 - sum(flipped) / steps,
            "decisive_flips": sum(decisive), "near_tie_flips": sum(flipped) - sum(decisive),
            "reference_margins": margins}


def _margin(logits: np.ndarray) -> float:
    second, first = np.partition(logits, -2)[-2:]
    return float(first - second)


def kept_comparison(engine: dict[int, list[int]], reference: dict[int, list[int]],
                    scores: dict[int, np.ndarray] | None = None, score_rtol: float = 0.0) -> dict[str, Any]:
    """Per pruning layer: the share of the reference's kept image indices that the engine kept too, and how many
    of them it did not (as many as it kept instead: both keep K). The first layer where the sets part is where a
    tie or an error happened: there, swaps the reference's scores show as TopK ties (`tied_swaps`) count as
    agreement, and when every swap is a tie the later layers, which choose among other tokens, are not judged
    (`kept_judged_overlap` None). Without scores (DART, DivPrune) every layer is judged as it is."""
    missing = {str(layer): len(set(kept) - set(engine.get(layer, []))) for layer, kept in reference.items()}
    overlap = {str(layer): (len(kept) - missing[str(layer)]) / len(kept) for layer, kept in reference.items()}
    parted = [int(layer) for layer, count in missing.items() if count]
    first = min(parted) if parted else None
    ties = 0 if first is None or not scores else tied_swaps(engine[first], reference[first], scores[first],
                                                            score_rtol)
    judged = dict(overlap)
    if first is not None and ties == missing[str(first)]:
        judged = {layer: 1.0 if int(layer) <= first else None for layer in overlap}
    return {"kept_overlap": overlap, "kept_mismatches": missing, "kept_indices_equal": not parted,
            "first_divergent_layer": first, "tied_swaps": ties, "kept_judged_overlap": judged}


def tied_swaps(engine: list[int], reference: list[int], scores: np.ndarray, rtol: float) -> int:
    """How many of the engine's swaps (kept a token the reference dropped, for one it kept) sit on a TopK tie:
    both tokens' reference scores within rtol * max|score| of the reference's cut (the lowest score it kept)."""
    cut, tol = float(np.min(scores[reference])), rtol * float(np.nanmax(np.abs(scores)))
    extra = [i for i in set(engine) - set(reference) if scores[i] >= cut - tol]
    dropped = [i for i in set(reference) - set(engine) if scores[i] <= cut + tol]
    return min(len(extra), len(dropped))


def _worst(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the criteria judge, over all prompts."""
    judged = [(e / atol) for c in cases if c["logits_judged"]
              for e, atol in zip(c["max_abs_logits_error"], c["logits_atol"])]
    return {"max_abs_logits_error": max(max(c["max_abs_logits_error"]) for c in cases),
            "max_logits_error_over_atol": max(judged) if judged else None,
            "logits_judged_prompts": sum(c["logits_judged"] for c in cases),
            "min_kept_overlap": min((v for c in cases for v in c["kept_judged_overlap"].values() if v is not None),
                                    default=1.0),
            "tied_swaps": sum(c["tied_swaps"] for c in cases),
            "max_kept_mismatches": max((v for c in cases for v in c["kept_mismatches"].values()), default=0),
            "min_teacher_forced_top1": min(c["teacher_forced_top1"] for c in cases),
            "decisive_flips": sum(c["decisive_flips"] for c in cases),
            "near_tie_flips": sum(c["near_tie_flips"] for c in cases)}


def _failures(cases: list[dict[str, Any]], worst: dict[str, Any], rules: ParityCriteria) -> list[str]:
    failures = []
    if any(c["logits_within"] is False for c in cases):
        failed = [c for c in cases if c["logits_within"] is False]
        error = max(max(c["max_abs_logits_error"]) for c in failed)
        failures.append(f"logits error up to {error:.2e} with the same kept tokens in {len(failed)} prompt(s), over "
                        f"the step's atol max({rules.logits_atol:g}, {rules.logits_rtol:g} * max |reference logit|) "
                        "(Polygraphy's max-error check)")
    if worst["min_kept_overlap"] < rules.min_kept_overlap:
        failures.append(f"kept-index overlap down to {worst['min_kept_overlap']:.3f} < {rules.min_kept_overlap:g} "
                        f"(up to {worst['max_kept_mismatches']} indices of a layer not kept)")
    if worst["min_teacher_forced_top1"] < rules.min_top1:
        failures.append(f"teacher-forced top-1 agreement down to {worst['min_teacher_forced_top1']:.3f} < "
                        f"{rules.min_top1:g} ({worst['decisive_flips']} flip(s) where the reference's margin exceeds "
                        f"{NEAR_TIE_FACTOR:g} step atols)")
    return failures


def _summarize(cases: list[dict[str, Any]], rules: ParityCriteria, onnx_set: OnnxSetManifest,
               reference: dict[str, str]) -> ParityReport:
    worst = _worst(cases)
    failures = _failures(cases, worst, rules)
    return ParityReport(
        engine={"recipe_sha256": onnx_set.recipe.sha256, "dtype": onnx_set.dtype, "model": onnx_set.model.name},
        engine_vs_reference=EngineVsReference(
            passed=not failures, failures=failures, criteria=asdict(rules), reference=reference,
            tolerance=rules.logits_atol, near_tie_factor=NEAR_TIE_FACTOR, **worst, prompts=len(cases)),
        pruned_vs_unpruned=PrunedVsUnpruned(
            first_token_top1_agreement=float(np.mean([c["first_token_top1_agree"] for c in cases])),
            mean_first_token_kl=float(np.mean([c["first_token_kl"] for c in cases])),
            answer_exact_match_rate=float(np.mean([c["answer_exact_match"] for c in cases]))),
        cases=cases,
    )


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of the softmax distributions of two logit vectors, in nats."""
    log_p = p_logits - np.logaddexp.reduce(p_logits)
    log_q = q_logits - np.logaddexp.reduce(q_logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def _markdown(parity: ParityReport) -> str:
    report = model_dump(parity)
    a, b = report["engine_vs_reference"], report["pruned_vs_unpruned"]
    c = a["criteria"]
    lines = [
        "# Parity report", "",
        f"Model `{report['engine']['model']}`, export dtype {report['engine']['dtype']}, "
        f"recipe {report['engine']['recipe_sha256'][:19]}…", "",
        "## Engine vs. PyTorch reference (same pruned model)", "",
        f"**{'PASSED' if a['passed'] else 'FAILED'}** over {a['prompts']} prompts against the PyTorch reference in "
        f"{a['reference']['dtype']} on {a['reference']['device']}: max abs logits error "
        f"{a['max_abs_logits_error']:.2e}, kept-index overlap at least {a['min_kept_overlap']:.3f}, teacher-forced "
        f"top-1 agreement at least {a['min_teacher_forced_top1']:.3f}"
        + (f". Failed: {'; '.join(a['failures'])}." if a["failures"] else "."), "",
        f"Logits judged in {a['logits_judged_prompts']} of {a['prompts']} prompts"
        + (f" (worst error {a['max_logits_error_over_atol']:.2f}x its step's atol)"
           if a["max_logits_error_over_atol"] is not None else "")
        + "; in the others the kept sets differ, so the logits legitimately differ more and were not judged. "
        f"Top-1 flips: {a['decisive_flips']} decisive, {a['near_tie_flips']} near ties (the reference's margin "
        f"within {a['near_tie_factor']:g} step atols: reported, not failed). Kept indices: up to "
        f"{a['max_kept_mismatches']} of a layer's not kept by the engine, {a['tied_swaps']} swap(s) at a TopK tie "
        "(both tokens scored within rounding of the reference's cut) counted as agreement.", "",
        f"Criteria: logits atol per step max({c['logits_atol']:g}, {c['logits_rtol']:g} * max |reference logit|), "
        f"kept-index overlap >= {c['min_kept_overlap']:g} per judged pruning layer (ties within "
        f"{c['score_rtol']:g} of the largest score count as agreement), teacher-forced top-1 >= "
        f"{c['min_top1']:g}.", "",
        "| image | question | max abs err | max atol | logits judged | min kept overlap | kept mismatches (first "
        "layer) | top-1 (teacher-forced) | near-tie flips |", "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {c['image']} | {c['question']} | {max(c['max_abs_logits_error']):.2e} | {max(c['logits_atol']):.1e} "
              f"| {_judged_cell(c)} | {min(c['kept_overlap'].values(), default=1.0):.3f} | "
              f"{max(c['kept_mismatches'].values(), default=0)} ({_first_layer_cell(c)}) | "
              f"{c['teacher_forced_top1']:.3f} | {c['near_tie_flips']} |"
              for c in report["cases"]]
    lines += ["", "## Pruned vs. unpruned (PyTorch, same weights, prompts not used for calibration)", "",
              f"- first-token top-1 agreement: {b['first_token_top1_agreement']:.0%}",
              f"- mean KL(unpruned ‖ pruned) of the first token: {b['mean_first_token_kl']:.4f} nats",
              f"- greedy answers identical: {b['answer_exact_match_rate']:.0%}", ""]
    return "\n".join(lines)


def _judged_cell(case: dict[str, Any]) -> str:
    if not case["logits_judged"]:
        return "no: kept sets differ"
    return "within" if case["logits_within"] else "**over**"


def _first_layer_cell(case: dict[str, Any]) -> str:
    layer = case["first_divergent_layer"]
    return "-" if layer is None else f"layer {layer}"


def _progress(cases: list[PromptCase], enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm's own test, off when stderr is not a terminal (logs, CI, pipes)
    return tqdm(cases, desc="parity (prompts)", unit="prompt", disable=None if enabled else True)
