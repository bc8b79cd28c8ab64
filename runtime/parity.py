"""Parity reports: (a) the engine against the PyTorch reference of the same pruned model, (b) pruned against
unpruned (both in PyTorch, same weights) on prompts that calibration did not use.

(a) per prompt, under the criteria of the engine's precision (`CRITERIA`, overridable, written into the report):
the reference decodes greedily and the engine is fed the reference's tokens (teacher forcing), so one early flip
cannot ruin every later step; per pruning layer the share of kept indices both keep; per step whether the engine's
top-1 is the reference's token, and, where both kept the same tokens, the logits through Polygraphy's
comparator (each step one iteration; its max error within atol, or its max relative error within rtol). Where
the selection differs the logits legitimately differ more, and the overlap and top-1 criteria judge. The reference
is the PyTorch backend at the engine's dtype on the engine's device where that device exists here (a CUDA engine
on a CUDA host), else float32 on the CPU, and the criteria of the engine's dtype allow for that difference.
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
from runtime.torch_runner import TORCH_DTYPES, TorchRunner, engine_recipe
from visprune.artifacts import atomic_write_bytes, atomic_write_json
from visprune.errors import ArtifactMismatchError, VispruneError
from visprune.manifests import OnnxSetManifest, ParityReport
from visprune.models import LlavaBundle, load_llava



@dataclass(frozen=True)
class ParityCriteria:
    """What "the engine computes what the reference computes" means at one precision, output by output."""

    logits_atol: float  # where the kept tokens agree, per step: max abs error <= atol, or max relative error <= rtol
    logits_rtol: float
    min_kept_overlap: float  # per pruning layer: |kept by both| / K
    min_top1: float  # per prompt, teacher-forced: share of steps whose top-1 is the reference's token


# By the engine's export dtype. float32: exact selection and tokens, float32 rounding in the logits. float16 and
# bfloat16 engines against the float32 reference: rounding moves near-tied scores across the TopK boundary and
# near-tied logits across the argmax, so a few flips are expected numerics. Measured on CPU for float16
# (bench/results/parity_fp16.md: 8 prompts, kept sets equal in 5 with logits errors 0.007-0.022 at logits of
# magnitude ~3; overlap down to 0.950, teacher-forced top-1 down to 0.875). The float16 atol leaves room for the
# larger logits of a 7B model; bfloat16 (8 mantissa bits to float16's 11) is scaled from it. Both unmeasured at 7B.
# rtol stays 0: logits cross zero, so an element-wise relative error says little about them.
CRITERIA = {
    "float32": ParityCriteria(logits_atol=1e-4, logits_rtol=0.0, min_kept_overlap=1.0, min_top1=1.0),
    "float16": ParityCriteria(logits_atol=0.1, logits_rtol=0.0, min_kept_overlap=0.9, min_top1=0.75),
    "bfloat16": ParityCriteria(logits_atol=0.5, logits_rtol=0.0, min_kept_overlap=0.8, min_top1=0.6),
}
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


def parity_report(engine_dir: Path, model: str, out_dir: Path, prompts: list[PromptCase] | None = None,
                  max_new_tokens: int = 8, allow_failure: bool = False, recipe: Path | None = None,
                  criteria: dict[str, float] | None = None, reference: str = "auto") -> dict[str, Any]:
    """Write parity.json and parity.md to `out_dir`; raise ParityError on failure unless `allow_failure`.

    `criteria` overrides fields of the engine dtype's `CRITERIA`. `reference`: "auto" (see `reference_precision`)
    or "cpu" (float32 on the CPU, e.g. for the PyTorch backend on CUDA, whose "auto" reference would be itself).
    With `recipe`, the engine must have been exported from exactly that recipe.
    """
    pipe = Pipeline.from_engine_dir(engine_dir)
    onnx_set = pipe.manifest.onnx_set
    if recipe is not None:
        check_engine_recipe(onnx_set, load_recipe(recipe), engine_dir)
    bundle = load_llava(model)
    if bundle.fingerprint != onnx_set.model.fingerprint:
        raise ArtifactMismatchError(f"The engine in {engine_dir} was exported from a different model "
                                    f"({onnx_set.model.name}) than {model}.",
                                    "Pass the --model the engine was exported from, or export and build again.")
    check_engine_embeddings(pipe, bundle, model)
    device, dtype = reference_precision(pipe) if reference == "auto" else ("cpu", "float32")
    bundle = bundle if dtype == "float32" else load_llava(model, dtype=TORCH_DTYPES[dtype])
    pruned = pipe.with_runner(TorchRunner(bundle, engine_recipe(onnx_set), pipe.image_start, device))
    unpruned = pipe.with_runner(TorchRunner(bundle, unpruned_recipe(bundle.shape), pipe.image_start, device))
    rules = replace(CRITERIA[onnx_set.dtype], **(criteria or {}))
    cases = [_compare_case(pipe, pruned, unpruned, case, max_new_tokens, rules)
             for case in prompts or default_parity_prompts()]
    report = _summarize(cases, rules, onnx_set, {"device": device, "dtype": dtype})
    out_dir = Path(out_dir)
    ParityReport.model_validate(report)  # a writer's bug, not the user's: fails loudly before writing
    atomic_write_json(out_dir / "parity.json", report)
    atomic_write_bytes(out_dir / "parity.md", _markdown(report).encode())
    if not report["engine_vs_reference"]["passed"] and not allow_failure:
        raise ParityError(f"The engine does not match the PyTorch reference: {report['engine_vs_reference']['failures']}",
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
    top1 = [int(np.argmax(e)) == token for e, token in zip(engine.step_logits, ref_tokens)]
    overlap = kept_overlap(engine.kept_indices, reference.kept_indices)
    return {
        "image": case.image.name, "question": case.question,
        "max_abs_logits_error": abs_err, "max_rel_logits_error": [e / max(s, 1e-12) for e, s in zip(abs_err, scale)],
        "logits_within": not all(v == 1.0 for v in overlap.values()) or  # judged by overlap and top-1 instead
                         logits_match(engine.step_logits, ref_logits, rules),
        "kept_overlap": overlap, "kept_indices_equal": all(v == 1.0 for v in overlap.values()),
        "teacher_forced_top1": float(np.mean(top1)), "tokens_equal": all(top1),
        "engine_tokens": [int(np.argmax(e)) for e in engine.step_logits], "reference_tokens": ref_tokens,
        "first_token_top1_agree": int(np.argmax(base_logits[0])) == int(np.argmax(ref_logits[0])),
        "first_token_kl": _kl(base_logits[0], ref_logits[0]),
        "answer_exact_match": base_tokens == ref_tokens,
    }


def logits_match(engine: list[np.ndarray], reference: list[np.ndarray], rules: ParityCriteria) -> bool:
    """Polygraphy's comparator over the steps' logits [V] (one iteration per step), quietly."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    runs = RunResults([(name, [IterationResult({"logits": step}, runner_name=name) for step in steps])
                       for name, steps in (("engine", engine), ("reference", reference))])
    compare = SimpleCompareFunc(atol=rules.logits_atol, rtol=rules.logits_rtol, check_error_stat="max")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        return bool(Comparator.compare_accuracy(runs, compare_func=compare))


def kept_overlap(engine: dict[int, list[int]], reference: dict[int, list[int]]) -> dict[str, float]:
    """Per pruning layer, the share of the reference's kept image indices that the engine kept too."""
    return {str(layer): len(set(engine.get(layer, [])) & set(kept)) / len(kept) for layer, kept in reference.items()}


def _worst(cases: list[dict[str, Any]]) -> dict[str, float]:
    """The figures the criteria judge, over all prompts."""
    return {"max_abs_logits_error": max(max(c["max_abs_logits_error"]) for c in cases),
            "min_kept_overlap": min((v for c in cases for v in c["kept_overlap"].values()), default=1.0),
            "min_teacher_forced_top1": min(c["teacher_forced_top1"] for c in cases)}


def _failures(cases: list[dict[str, Any]], worst: dict[str, float], rules: ParityCriteria) -> list[str]:
    failures = []
    if not all(c["logits_within"] for c in cases):
        error = max(max(c["max_abs_logits_error"]) for c in cases if not c["logits_within"])
        failures.append(f"logits error up to {error:.2e} with the same kept tokens, over atol {rules.logits_atol:g} "
                        f"and rtol {rules.logits_rtol:g} (Polygraphy's max-error check)")
    if worst["min_kept_overlap"] < rules.min_kept_overlap:
        failures.append(f"kept-index overlap down to {worst['min_kept_overlap']:.3f} < {rules.min_kept_overlap:g}")
    if worst["min_teacher_forced_top1"] < rules.min_top1:
        failures.append(f"teacher-forced top-1 agreement down to {worst['min_teacher_forced_top1']:.3f} < "
                        f"{rules.min_top1:g}")
    return failures


def _summarize(cases: list[dict[str, Any]], rules: ParityCriteria, onnx_set: OnnxSetManifest,
               reference: dict[str, str]) -> dict[str, Any]:
    worst = _worst(cases)
    failures = _failures(cases, worst, rules)
    return {
        "schema": "visprune.parity_report", "schema_version": 2,
        "engine": {"recipe_sha256": onnx_set.recipe.sha256, "dtype": onnx_set.dtype, "model": onnx_set.model.name},
        "engine_vs_reference": {
            "passed": not failures, "failures": failures, "criteria": asdict(rules), "reference": reference,
            "tolerance": rules.logits_atol, **worst, "prompts": len(cases)},
        "pruned_vs_unpruned": {
            "first_token_top1_agreement": float(np.mean([c["first_token_top1_agree"] for c in cases])),
            "mean_first_token_kl": float(np.mean([c["first_token_kl"] for c in cases])),
            "answer_exact_match_rate": float(np.mean([c["answer_exact_match"] for c in cases])),
        },
        "cases": cases,
    }


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of the softmax distributions of two logit vectors, in nats."""
    log_p = p_logits - np.logaddexp.reduce(p_logits)
    log_q = q_logits - np.logaddexp.reduce(q_logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def _markdown(report: dict[str, Any]) -> str:
    a, b = report["engine_vs_reference"], report["pruned_vs_unpruned"]
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
        "Criteria: " + ", ".join(f"{k} {v:g}" for k, v in a["criteria"].items()) + ".", "",
        "| image | question | max abs err | min kept overlap | top-1 (teacher-forced) |", "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {c['image']} | {c['question']} | {max(c['max_abs_logits_error']):.2e} | "
              f"{min(c['kept_overlap'].values(), default=1.0):.3f} | {c['teacher_forced_top1']:.3f} |"
              for c in report["cases"]]
    lines += ["", "## Pruned vs. unpruned (PyTorch, same weights, prompts not used for calibration)", "",
              f"- first-token top-1 agreement: {b['first_token_top1_agreement']:.0%}",
              f"- mean KL(unpruned ‖ pruned) of the first token: {b['mean_first_token_kl']:.4f} nats",
              f"- greedy answers identical: {b['answer_exact_match_rate']:.0%}", ""]
    return "\n".join(lines)
