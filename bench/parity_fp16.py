"""How far a float16 engine sits from the float32 reference, measured on CPU: the figures behind the float16
parity criteria in reports/parity.py (`CRITERIA`).

tiny with its 60 % recipe (tests' TINY_RECIPE_60) is exported in float32 and in float16 (float32 islands for
norms, softmax and scores), both built for ONNX Runtime on the CPU, and each is compared with the float32
PyTorch reference on --prompts held-out prompts: the reference decodes greedily, the engine is teacher-forced with
the reference's tokens. Recorded per engine: the worst logits error (absolute, and over max |reference logit|),
the least kept-index overlap per pruning layer, the least teacher-forced top-1 agreement, and how often the old
rule (identical kept indices and free-running tokens) would have failed a correct engine.

    .venv/bin/python bench/parity_fp16.py            # ~3 min on two cores
Results: bench/results/parity_fp16.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import TINY_RECIPE_60  # noqa: E402


def measure(dtype: str, work: Path, prompts: int, new_tokens: int) -> dict:
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx
    from reports.parity import default_parity_prompts, parity_report

    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": TINY_RECIPE_60}))
    export_onnx(ExportConfig(model="tiny", recipe=recipe, dtype=dtype), work / f"onnx-{dtype}", progress=False)
    build_engine(BuildConfig(), work / f"onnx-{dtype}", work / f"engine-{dtype}")
    report = parity_report(work / f"engine-{dtype}", "tiny", work / f"report-{dtype}", allow_failure=True,
                           prompts=default_parity_prompts(prompts), max_new_tokens=new_tokens)
    verdict, cases = report.engine_vs_reference.model_dump(), report.cases
    return {
        "dtype": dtype, "passed": verdict["passed"], "failures": verdict["failures"], "criteria": verdict["criteria"],
        "reference": verdict["reference"], "max_abs_logits_error": verdict["max_abs_logits_error"],
        "max_rel_logits_error": max(max(c["max_rel_logits_error"]) for c in cases),
        "min_kept_overlap": verdict["min_kept_overlap"], "min_teacher_forced_top1": verdict["min_teacher_forced_top1"],
        "prompts_with_kept_indices_differing": sum(not c["kept_indices_equal"] for c in cases),
        "prompts_with_a_token_flip": sum(not c["tokens_equal"] for c in cases), "prompts": len(cases),
        "per_prompt": [{"image": c["image"], "max_abs": max(c["max_abs_logits_error"]),
                        "min_overlap": min(c["kept_overlap"].values()), "top1": c["teacher_forced_top1"]}
                       for c in cases],
    }


def markdown(results: list[dict]) -> str:
    lines = ["# float16 vs float32 parity on CPU (tiny, 60 % recipe, ONNX Runtime, float32 PyTorch reference)", "",
             "| engine | criteria passed | max abs logits err | max err / max|ref| | min kept overlap | "
             "min top-1 (teacher-forced) | prompts with kept indices differing | prompts with a token flip |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['dtype']} | {'yes' if r['passed'] else 'NO: ' + '; '.join(r['failures'])} | "
                     f"{r['max_abs_logits_error']:.3g} | {r['max_rel_logits_error']:.3g} | {r['min_kept_overlap']:.3f} "
                     f"| {r['min_teacher_forced_top1']:.3f} | {r['prompts_with_kept_indices_differing']}/{r['prompts']} "
                     f"| {r['prompts_with_a_token_flip']}/{r['prompts']} |")
    lines += ["", "Criteria applied: " + "; ".join(f"{r['dtype']}: {r['criteria']}" for r in results), "",
              "Per prompt (float16): the logits differ by float16 rounding where both kept the same tokens, and "
              "more where a near-tied score crossed the TopK boundary.", "",
              "| image | max abs logits err | min kept overlap | top-1 |", "|---|---:|---:|---:|"]
    lines += [f"| {c['image']} | {c['max_abs']:.3g} | {c['min_overlap']:.3f} | {c['top1']:.3f} |"
              for c in results[-1]["per_prompt"]]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    from visprune.artifacts import atomic_write_bytes, atomic_write_json

    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(dtype, Path(tmp), args.prompts, args.new_tokens) for dtype in ("float32", "float16")]
    atomic_write_json(args.out / "parity_fp16.json", results)
    atomic_write_bytes(args.out / "parity_fp16.md", markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
