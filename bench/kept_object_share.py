"""Which visual tokens each pruning method keeps: the share of object patches still present after each pruning
layer, next to the share of all visual tokens, on tiny-vqa and held-out shapes-vqa questions.

Object patches are those `patch_labels` marks (an object covers at least 15 % of the patch). A method that
keeps what the answers need keeps object patches well above the all-token share; random selection keeps them at
the same share. Read next to docs/tradeoff: it shows whether a method's accuracy follows from keeping the patches the answers
need. A pre-LLM method's selection is listed as "before layer 0".

    VISPRUNE_CACHE=/tmp/vpcache .venv/bin/python bench/kept_object_share.py [--questions 100]

Runs each recipe of docs/tradeoff/recipes through the PyTorch backend of the runtime (the exporter's own pruned
prefill), after exporting and building an unpruned ONNX Runtime engine for the pipeline's tokenizer and template.
Writes bench/results/kept_object_share.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [f"{method}-{budget}" for budget in ("0.60", "0.80")
           for method in ("fitprune", "random", "fastv", "dart", "divprune", "visionzip", "fitprune-self",
                          "fitprune-cross", "fitprune-headmean", "fitprune-lasttoken", "fitprune-onelayer")]


def kept_object_shares(pipeline, recipe, samples) -> dict[int, dict[str, float]]:
    """pruning layer -> mean share of object patches kept and mean share of all visual tokens kept."""
    from runtime.torch_runner import TorchRunner
    from visprune.tasks.shapes_vqa import patch_labels

    runner = pipeline.with_runner(TorchRunner.from_model("tiny-vqa", recipe))
    shares: dict[int, list[tuple[float, float]]] = {}
    for sample in samples:
        objects = patch_labels(sample)["colour"].reshape(-1) > 0  # [N]
        generation = runner.generate(sample.image(), runner.chat_prompt(sample.question), max_new_tokens=1)
        for layer, kept in generation.kept_indices.items():
            shares.setdefault(layer, []).append((objects[kept].sum() / objects.sum(), len(kept) / objects.size))
    return {layer: {"objects": round(float(np.mean([o for o, _ in v])), 3),
                    "all": round(float(np.mean([a for _, a in v])), 3)} for layer, v in sorted(shares.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=100)
    args = parser.parse_args()
    from calibrate.recipe import load_recipe
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx
    from runtime.pipeline import Pipeline
    from visprune.tasks.shapes_vqa import make_split

    samples = make_split("test", args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(ExportConfig(model="tiny-vqa"), Path(tmp) / "onnx", progress=False)
        build_engine(BuildConfig(), Path(tmp) / "onnx", Path(tmp) / "engine")
        pipeline = Pipeline.from_engine_dir(Path(tmp) / "engine")
        results = {name: kept_object_shares(pipeline, load_recipe(ROOT / "docs/tradeoff/recipes" / f"{name}.json"),
                                            samples) for name in RECIPES}
    out = ROOT / "bench" / "results"
    (out / "kept_object_share.json").write_text(json.dumps({"questions": args.questions, "recipes": results}, indent=2) + "\n")
    lines = [f"# Object patches kept per pruning layer (tiny-vqa, {args.questions} test questions)", "",
             "objects / all: mean share of object patches / of all 576 visual tokens present after the layer.", "",
             "| recipe | before layer 0 | " + " | ".join(f"after layer {k}" for k in range(8)) + " |",
             "|---|" + "---:|" * 9]
    for name, layers in results.items():
        cells = [f"{layers[k]['objects']:.2f} / {layers[k]['all']:.2f}" if k in layers else "" for k in range(-1, 8)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "kept_object_share.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
