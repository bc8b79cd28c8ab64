"""The path a real LLaVA-1.5-7B takes through export, build and run, minus depth, on a CPU.

A checkpoint at LLaVA-1.5-7B widths (language model: hidden 4096, MLP 11008, 32 heads; vision: CLIP ViT-L/14 at
336 px, hidden 1024, MLP 4096, 16 heads) with --text-layers and --vision-layers layers and seeded random weights,
saved with `save_pretrained` in llava-hf format (tiny's tokenizer and processor). At 3 + 3 layers its float32
weights pass 2 GB, so every step that must keep weights outside the ONNX protobuf is exercised: the exporter's
`.onnx.data`, ONNX Runtime's optimized-graph side files, the manifests' file digests and the runtime's loading.

Each stage runs as the real CLI in its own process; wall time and that process's peak resident memory
(os.wait4) are recorded:
    export (float32, a pruning recipe baked in) -> build (ONNX Runtime, CPU) -> run (one request)
    -> export --dtype float16 (TensorRT lint included)

    .venv/bin/python bench/wide_7b_cpu.py         # ~4 min on two cores, ~6 GB peak RSS, ~15 GB of files
Results: bench/results/wide_7b_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
VISION_CLIP_L = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                     num_attention_heads=16, projection_dim=768)
SEED = 7


def build_checkpoint(out: Path, text_layers: int, vision_layers: int) -> None:
    """A llava-hf folder at 7B widths with seeded weights (tiny's init rule: fan-in scaled normal noise)."""
    import math

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from visprune.models.tiny import LLAVA_1_5_CHAT_TEMPLATE, _build_processor, seeded_weight_noise

    processor = _build_processor()
    tokenizer = processor.tokenizer
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       num_hidden_layers=text_layers, **TEXT_7B)
    vision = CLIPVisionConfig(hidden_act="quick_gelu", num_hidden_layers=vision_layers, **VISION_CLIP_L)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), image_seq_length=576, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for _, param, noise, fan_in in seeded_weight_noise(model, SEED):
            param.copy_(noise / math.sqrt(fan_in))
    model.save_pretrained(out)
    processor.chat_template = LLAVA_1_5_CHAT_TEMPLATE
    processor.save_pretrained(out)


def run_stage(name: str, args: list[str], log: Path) -> dict:
    """The CLI in a child process; its wall time and peak RSS (from the kernel's accounting of that child)."""
    command = [sys.executable, "-c", "from cli.main import entry_point; entry_point()", *args]
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ visprune {' '.join(args)}\n".encode())
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    result = {"stage": name, "exit_code": code, "wall_s": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    print(json.dumps(result), flush=True)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    return result


def folder_files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/visprune-wide-7b"))
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    work, log = args.work, args.work / "stages.log"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint"
    start = time.perf_counter()
    if not (checkpoint / "config.json").exists():
        build_checkpoint(checkpoint, args.text_layers, args.vision_layers)
    built_s = time.perf_counter() - start
    removed = [200, 100] + [0] * (args.text_layers - 2)
    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"method": "fitprune", "num_visual_tokens": 576, "removed": removed}))
    image = work / "cat.png"
    if not image.exists():
        from reports.latency import default_latency_image

        default_latency_image().save(image)
    model = ["--model", str(checkpoint)]
    stages = [
        run_stage("export float32", ["export", *model, "--recipe", str(recipe), "--out", str(work / "onnx"),
                                     "--quiet", "--force"], log),
        run_stage("build onnxruntime cpu", ["build", "--onnx", str(work / "onnx"), "--out", str(work / "engine"),
                                            "--force"], log),
        run_stage("run one request", ["run", "--engine", str(work / "engine"), "--image", str(image), "--prompt",
                                      "What animal is this?", "--max-new-tokens", "4", "--verify"], log),
        run_stage("export float16 + lint", ["export", *model, "--recipe", str(recipe), "--dtype", "float16",
                                            "--out", str(work / "onnx-fp16"), "--quiet", "--force"], log),
    ]
    results = {
        "checkpoint": {"text_layers": args.text_layers, "vision_layers": args.vision_layers, **TEXT_7B,
                       "vision": VISION_CLIP_L, "weight_bytes": sum(folder_files(checkpoint).values()),
                       "build_s": round(built_s, 1)},
        "recipe_removed": removed, "stages": stages,
        "files": {name: folder_files(work / name) for name in ("onnx", "engine", "onnx-fp16")},
        "host": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
    }
    write_results(results, args.out)


def write_results(results: dict, out: Path) -> None:
    from visprune.artifacts import atomic_write_bytes, atomic_write_json, tool_versions

    results["tools"] = tool_versions("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
    atomic_write_json(out / "wide_7b_cpu.json", results)
    c = results["checkpoint"]
    lines = ["# LLaVA-1.5-7B widths, few layers, on CPU: export, build, run, float16 export", "",
             f"Checkpoint: {c['text_layers']} text layers at hidden {c['hidden_size']} / MLP {c['intermediate_size']}"
             f" / {c['num_attention_heads']} heads, {c['vision_layers']} CLIP-L/336 vision layers; "
             f"{c['weight_bytes'] / 2**30:.2f} GiB of float32 weights (built in {c['build_s']} s). "
             f"Recipe: removed {results['recipe_removed']}.", "",
             "| stage | wall (s) | peak RSS of its process (GiB) |", "|---|---:|---:|"]
    lines += [f"| {s['stage']} | {s['wall_s']} | {s['peak_rss_gib']} |" for s in results["stages"]]
    for name, files in results["files"].items():
        big = ", ".join(f"`{f}` {size / 2**30:.2f} GiB" for f, size in files.items() if size > 2**26)
        lines += ["", f"`{name}/`: {sum(files.values()) / 2**30:.2f} GiB in {len(files)} files; over 64 MiB: {big}"]
    lines += ["", f"Host: {results['host']}; tools: {results['tools']}", ""]
    atomic_write_bytes(out / "wide_7b_cpu.md", "\n".join(lines).encode())


if __name__ == "__main__":
    main()
