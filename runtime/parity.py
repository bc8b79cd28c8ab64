"""Parity reports: (a) the engine against the PyTorch reference of the same pruned model, (b) pruned against
unpruned (both in PyTorch, same weights) on prompts that calibration did not use.

(a) per prompt: first-token and per-step logits error, kept indices per pruning layer, greedy tokens.
(b) per prompt: next-token top-1 agreement, KL(unpruned || pruned) of the first-token distribution, and
whether the greedy answers match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.recipe import Recipe, check_recipe_fits, load_recipe, unpruned_recipe
from runtime.pipeline import Pipeline
from runtime.torch_runner import TorchRunner, engine_recipe
from visprune.artifacts import atomic_write_bytes, atomic_write_json
from visprune.errors import ArtifactMismatchError, VispruneError
from visprune.manifests import OnnxSetManifest, ParityReport
from visprune.models import LlavaBundle, load_llava

# Logits tolerance of engine vs reference, by export dtype (max abs error).
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}
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
                  reference_device: str = "cpu") -> dict[str, Any]:
    """Write parity.json and parity.md to `out_dir`; raise ParityError on failure unless `allow_failure`.

    The reference is the PyTorch backend in float32 on `reference_device`. With `recipe`, the engine must have
    been exported from exactly that recipe.
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
    recipe = engine_recipe(onnx_set)
    pruned = pipe.with_runner(TorchRunner(bundle, recipe, pipe.image_start, reference_device))
    unpruned = pipe.with_runner(TorchRunner(bundle, unpruned_recipe(bundle.shape), pipe.image_start, reference_device))
    tolerance = TOLERANCE[onnx_set.dtype]
    cases = [_compare_case(pipe, pruned, unpruned, case, max_new_tokens) for case in prompts or default_parity_prompts()]
    report = _summarize(cases, tolerance, onnx_set)
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


def _compare_case(pipe: Pipeline, pruned: Pipeline, unpruned: Pipeline, case: PromptCase,
                  max_new_tokens: int) -> dict[str, Any]:
    prompt = pipe.chat_prompt(case.question)
    engine = pipe.generate(case.image, prompt, max_new_tokens=max_new_tokens, keep_logits=True)
    reference = pruned.generate(case.image, prompt, max_new_tokens=max_new_tokens, keep_logits=True)
    baseline = unpruned.generate(case.image, prompt, max_new_tokens=max_new_tokens, keep_logits=True)
    ref_tokens, ref_logits, ref_kept = reference.token_ids, reference.step_logits, reference.kept_indices
    base_tokens, base_logits = baseline.token_ids, baseline.step_logits
    steps = min(len(engine.step_logits), len(ref_logits))
    abs_err = [float(np.abs(engine.step_logits[i] - ref_logits[i]).max()) for i in range(steps)]
    rel_err = [e / max(float(np.abs(ref_logits[i]).max()), 1e-12) for i, e in enumerate(abs_err)]
    return {
        "image": case.image.name, "question": case.question,
        "max_abs_logits_error": abs_err, "max_rel_logits_error": rel_err,
        "kept_indices_equal": engine.kept_indices == ref_kept,
        "tokens_equal": engine.token_ids == ref_tokens, "engine_tokens": engine.token_ids,
        "first_token_top1_agree": int(np.argmax(base_logits[0])) == int(np.argmax(ref_logits[0])),
        "first_token_kl": _kl(base_logits[0], ref_logits[0]),
        "answer_exact_match": base_tokens == ref_tokens,
    }


def _summarize(cases: list[dict[str, Any]], tolerance: float, onnx_set: OnnxSetManifest) -> dict[str, Any]:
    worst = max(max(c["max_abs_logits_error"]) for c in cases)
    failures = []
    if worst > tolerance:
        failures.append(f"max abs logits error {worst:.2e} > {tolerance:.0e}")
    if not all(c["kept_indices_equal"] for c in cases):
        failures.append("kept indices differ")
    if not all(c["tokens_equal"] for c in cases):
        failures.append("greedy tokens differ")
    return {
        "schema": "visprune.parity_report", "schema_version": 1,
        "engine": {"recipe_sha256": onnx_set.recipe.sha256, "dtype": onnx_set.dtype, "model": onnx_set.model.name},
        "engine_vs_reference": {"passed": not failures, "failures": failures, "tolerance": tolerance,
                                "max_abs_logits_error": worst, "prompts": len(cases)},
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
        f"**{'PASSED' if a['passed'] else 'FAILED'}** over {a['prompts']} prompts: max abs logits error "
        f"{a['max_abs_logits_error']:.2e} (tolerance {a['tolerance']:.0e}); "
        + ("; ".join(a["failures"]) if a["failures"] else "kept indices and greedy tokens identical."), "",
        "| image | question | max abs err | kept equal | tokens equal |", "|---|---|---:|---|---|",
    ]
    lines += [f"| {c['image']} | {c['question']} | {max(c['max_abs_logits_error']):.2e} | "
              f"{'yes' if c['kept_indices_equal'] else 'NO'} | {'yes' if c['tokens_equal'] else 'NO'} |"
              for c in report["cases"]]
    lines += ["", "## Pruned vs. unpruned (PyTorch, same weights, prompts not used for calibration)", "",
              f"- first-token top-1 agreement: {b['first_token_top1_agreement']:.0%}",
              f"- mean KL(unpruned ‖ pruned) of the first token: {b['mean_first_token_kl']:.4f} nats",
              f"- greedy answers identical: {b['answer_exact_match_rate']:.0%}", ""]
    return "\n".join(lines)
