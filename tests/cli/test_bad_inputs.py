"""The bad-input suite: ordinary mistakes a user makes with every command, through the real CLI.

Each case asserts the documented exit code, a `Hint:` line, no traceback, and that the file system is unchanged:
a snapshot of the case's workspace (where its outputs and its own inputs live) and of the shared exported sets
and engines is taken before and after.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import REPO, reseal_manifest, snapshot
from cli.main import main

RECIPE_7B = REPO / "recipes" / "llava-1.5-7b" / "fitprune-60.json"


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # placeholders: {ws} workspace, {engine} {baseline} {onnx} {recipe} {image} (shared, read-only)
    code: int
    fragment: str
    setup: Callable[[Path, dict], None] | None = None


# --- workspace builders -------------------------------------------------------------------------------------


def user_folder(ws, paths):
    (ws / "mine").mkdir()
    (ws / "mine" / "thesis.tex").write_text("years of work")


def user_file(name):
    def make(ws, paths):
        (ws / name).write_text("a user's file")
    return make


def jsonl(text: bytes | str, image=True):
    def make(ws, paths):
        if image:
            shutil.copy(paths["image"], ws / "cat.png")
        (ws / "set.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
    return make


def recipe_file(data):
    def make(ws, paths):
        (ws / "r.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return make


def copy_of(key, change=None):
    """A copy of a shared set or engine in the workspace as `{key}2`, changed by `change(folder)`."""
    def make(ws, paths):
        shutil.copytree(paths[key], ws / f"{key}2")
        if change:
            change(ws / f"{key}2")
    return make


def both(*makers):
    def make(ws, paths):
        for maker in makers:
            maker(ws, paths)
    return make


def edit_json(name, change, reseal=False):
    def apply(folder):
        if reseal:
            reseal_manifest(folder / name, change)
            return
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return apply


def flip_bytes(name):
    """Same size, other content: only the hash can tell."""
    def apply(folder):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
    return apply


def truncate(name):
    def apply(folder):
        (folder / name).write_bytes((folder / name).read_bytes()[:100])
    return apply


def remove(name):
    def apply(folder):
        (folder / name).unlink()
    return apply


def write(name, data: bytes):
    def apply(folder):
        (folder / name).write_bytes(data)
    return apply


MINIMAL = {"method": "fitprune", "num_visual_tokens": 576, "removed": [10, 0, 0, 0, 0, 0, 0, 0]}
OTHER_MODEL = "sha256:" + "0" * 64
GOOD_LINE = '{"image": "cat.png", "question": "What is this?"}\n'

CASES = [
    # --- calibrate -----------------------------------------------------------------------------------------
    Case("calibrate-reduction-zero", "calibrate --reduction 0 --out {ws}/r.json", 2, "strictly between 0 and 1"),
    Case("calibrate-reduction-above-one", "calibrate --reduction 1.5 --out {ws}/r.json", 2, "strictly between"),
    Case("calibrate-reduction-not-a-number", "calibrate --reduction abc --out {ws}/r.json", 2, "invalid float"),
    Case("calibrate-no-out", "calibrate --reduction 0.5", 2, "required: --out"),
    Case("calibrate-unknown-method", "calibrate --reduction 0.5 --method magic --out {ws}/r.json", 2, "invalid choice: 'magic'"),
    Case("calibrate-zero-samples", "calibrate --reduction 0.5 --samples 0 --out {ws}/r.json", 2, "--samples"),
    Case("calibrate-zero-batch", "calibrate --reduction 0.5 --batch-size 0 --out {ws}/r.json", 2, "--batch-size"),
    Case("calibrate-unknown-device", "calibrate --reduction 0.5 --device tpu --out {ws}/r.json", 2, "Unknown device"),
    Case("calibrate-cuda-without-cuda", "calibrate --reduction 0.5 --device cuda --out {ws}/r.json", 10, "no CUDA"),
    Case("calibrate-missing-model", "calibrate --reduction 0.5 --model {ws}/nowhere --out {ws}/r.json", 3,
         "Model not found"),
    Case("calibrate-model-without-config", "calibrate --reduction 0.5 --model {ws}/mine --out {ws}/r.json", 3,
         "config.json", user_folder),
    Case("calibrate-model-not-llava", "calibrate --reduction 0.5 --model {ws}/m --out {ws}/r.json", 3,
         "not a LLaVA-1.5", lambda ws, p: (ws / "m").mkdir() or (ws / "m" / "config.json").write_text(
             '{"model_type": "bert"}')),
    Case("calibrate-missing-data", "calibrate --reduction 0.5 --data {ws}/none.jsonl --out {ws}/r.json", 4,
         "Calibration file not found"),
    Case("calibrate-data-not-utf8", "calibrate --reduction 0.5 --data {ws}/set.jsonl --out {ws}/r.json", 4,
         "set.jsonl:2 is not UTF-8", jsonl(GOOD_LINE.encode() + b'{"image": "cat.png", "question": "caf\xe9"}\n')),
    Case("calibrate-data-bad-json", "calibrate --reduction 0.5 --data {ws}/set.jsonl --out {ws}/r.json", 4,
         "set.jsonl:2 is not valid JSON", jsonl(GOOD_LINE + "{oops\n")),
    Case("calibrate-data-empty", "calibrate --reduction 0.5 --data {ws}/set.jsonl --out {ws}/r.json", 4,
         "holds no samples", jsonl("\n\n")),
    Case("calibrate-data-duplicate-ids", "calibrate --reduction 0.5 --data {ws}/set.jsonl --out {ws}/r.json", 4,
         "appears twice", jsonl('{"id": "a", "image": "cat.png", "question": "q"}\n' * 2)),
    Case("calibrate-data-missing-image", "calibrate --reduction 0.5 --data {ws}/set.jsonl --out {ws}/r.json", 4,
         "Image not found", jsonl('{"image": "dog.png", "question": "q"}\n')),
    Case("calibrate-data-is-a-folder", "calibrate --reduction 0.5 --data {ws}/mine --out {ws}/r.json", 4,
         "Calibration file not found", user_folder),
    Case("calibrate-fastv-unreachable",
         "calibrate --reduction 0.95 --method fastv --samples 1 --no-plot --out {ws}/r.json", 6,
         "One cut before layer 1 removes at most 9"),
    Case("calibrate-out-is-a-user-file", "calibrate --reduction 0.5 --out {ws}/notes.json", 2,
         "is a file, not a visprune recipe", user_file("notes.json")),
    Case("calibrate-out-is-a-folder", "calibrate --reduction 0.5 --out {ws}/mine", 2,
         "a folder with other files", user_folder),
    Case("calibrate-out-under-a-file", "calibrate --reduction 0.5 --out {ws}/notes.json/r.json", 2,
         "is a file, not a folder", user_file("notes.json")),
    Case("calibrate-out-is-the-data", "calibrate --reduction 0.5 --data {ws}/set.jsonl --out {ws}/set.jsonl", 2,
         "is the input", jsonl(GOOD_LINE)),
    Case("calibrate-out-inside-images",
         "calibrate --reduction 0.5 --data {ws}/set.jsonl --images {ws} --out {ws}/sub/r.json", 2,
         "lies inside the input", jsonl(GOOD_LINE)),
    Case("calibrate-plot-would-replace-a-user-png", "calibrate --reduction 0.5 --out {ws}/r.json", 2,
         "r.png exists and is not part of a visprune recipe", user_file("r.png")),
    # --- recipe --------------------------------------------------------------------------------------------
    Case("recipe-missing", "recipe {ws}/none.json", 5, "No recipe at"),
    Case("recipe-is-a-folder", "recipe {ws}/mine", 5, "is a folder, not a recipe file", user_folder),
    Case("recipe-not-json", "recipe {ws}/r.json", 5, "not valid JSON", recipe_file("{nope")),
    Case("recipe-a-list", "recipe {ws}/r.json", 5, "not a JSON object", recipe_file([1, 2])),
    Case("recipe-boolean-count", "recipe {ws}/r.json", 5, "removed.0: Input should be a valid integer",
         recipe_file({**MINIMAL, "removed": [True, 0, 0, 0, 0, 0, 0, 0]})),
    Case("recipe-negative-count", "recipe {ws}/r.json", 5, "greater than or equal to 0",
         recipe_file({**MINIMAL, "removed": [-1, 0, 0, 0, 0, 0, 0, 0]})),
    Case("recipe-null-tokens", "recipe {ws}/r.json", 5, "num_visual_tokens",
         recipe_file({**MINIMAL, "num_visual_tokens": None})),
    Case("recipe-string-tokens", "recipe {ws}/r.json", 5, "num_visual_tokens",
         recipe_file({**MINIMAL, "num_visual_tokens": "576"})),
    Case("recipe-keep-disagrees", "recipe {ws}/r.json", 5, "'keep' does not match",
         recipe_file({**MINIMAL, "keep": [1] * 8})),
    Case("recipe-num-layers-disagrees", "recipe {ws}/r.json", 5, "num_layers is 32",
         recipe_file({**MINIMAL, "num_layers": 32})),
    Case("recipe-num-layers-a-bool", "recipe {ws}/r.json", 5, "num_layers is True",
         recipe_file({"method": "fitprune", "num_visual_tokens": 576, "removed": [1], "num_layers": True})),
    Case("recipe-removes-everything", "recipe {ws}/r.json", 5, "deletes 576 of 576",
         recipe_file({**MINIMAL, "removed": [576, 0, 0, 0, 0, 0, 0, 0]})),
    Case("recipe-random-without-seed", "recipe {ws}/r.json", 5, "needs a 'seed'",
         recipe_file({**MINIMAL, "method": "random"})),
    Case("recipe-future-schema", "recipe {ws}/r.json", 5, "schema_version 99",
         recipe_file({**MINIMAL, "schema_version": 99})),
    Case("recipe-alpha-out-of-range", "recipe {ws}/r.json", 5, "alpha", recipe_file({**MINIMAL, "alpha": 7})),
    Case("recipe-for-another-model", "recipe {recipe} --model llava-1.5-7b", 5, "for 8 layers"),
    Case("recipe-plot-is-a-folder", "recipe {recipe} --plot {ws}/mine", 2, "a folder with other files",
         user_folder),
    Case("recipe-plot-over-a-user-png", "recipe {recipe} --plot {ws}/photo.png", 2, "is a file, not a visprune plot",
         user_file("photo.png")),
    # --- export --------------------------------------------------------------------------------------------
    Case("export-unknown-dtype", "export --dtype float8 --out {ws}/onnx", 2, "invalid choice: 'float8'"),
    Case("export-old-opset", "export --opset 11 --out {ws}/onnx", 2, "too old"),
    Case("export-unknown-target", "export --target openvino --out {ws}/onnx", 2, "invalid choice: 'openvino'"),
    Case("export-opset-below-the-targets", "export --target onnxruntime --opset 18 --out {ws}/onnx", 2,
         "too old for --target onnxruntime"),
    Case("export-max-seq-one", "export --max-seq 1 --out {ws}/onnx", 2, "--max-seq must be at least 2"),
    Case("export-max-seq-below-layout", "export --max-seq 300 --out {ws}/onnx", 2, "Pass --max-seq 582 or more"),
    Case("export-missing-recipe", "export --recipe {ws}/none.json --out {ws}/onnx", 5, "No recipe at"),
    Case("export-recipe-is-a-folder", "export --recipe {ws}/mine --out {ws}/onnx", 5, "is a folder", user_folder),
    Case("export-7b-recipe", f"export --recipe {RECIPE_7B} --out {{ws}}/onnx", 5, "for 32 layers"),
    Case("export-recipe-of-another-model", "export --recipe {ws}/r.json --out {ws}/onnx", 5, "fingerprint",
         recipe_file({**MINIMAL, "model": {"fingerprint": OTHER_MODEL}})),
    Case("export-missing-model", "export --model {ws}/nowhere --out {ws}/onnx", 3, "Model not found"),
    # LLaVA-NeXT: a LLaVA-1.5 recipe on tiny-next, a NeXT recipe on tiny, a ratio budget for a greedy selection
    Case("export-1.5-recipe-on-next", "export --model tiny-next --recipe {ws}/r.json --out {ws}/onnx", 5,
         "is a LLaVA-1.5 recipe", recipe_file(MINIMAL)),
    Case("export-next-recipe-on-1.5", "export --model tiny --recipe {ws}/r.json --out {ws}/onnx", 5,
         "is a LLaVA-NeXT recipe", recipe_file({**MINIMAL, "num_visual_tokens": 2928, "budget_policy": "ratio"})),
    Case("export-ratio-divprune", "export --model tiny-next --recipe {ws}/r.json --out {ws}/onnx", 5,
         "needs a constant kept count", recipe_file({"method": "divprune", "num_visual_tokens": 2928,
                                                     "removed": [0] * 8, "removed_before_llm": 2000,
                                                     "budget_policy": "ratio"})),
    Case("export-adaptprune-on-next", "export --model tiny-next --recipe {ws}/r.json --out {ws}/onnx", 5,
         "AdaptPrune on LLaVA-NeXT", recipe_file({"method": "adaptprune", "num_visual_tokens": 2928,
                                                  "removed": [800] + [0] * 7, "budget_policy": "absolute"})),
    Case("calibrate-budget-policy-on-1.5", "calibrate --reduction 0.5 --method fastv --budget-policy absolute "
         "--out {ws}/r.json", 2, "LLaVA-NeXT models only"),
    Case("export-out-is-a-user-folder", "export --out {ws}/mine", 2, "a folder with other files", user_folder),
    Case("export-out-is-an-engine", "export --out {ws}/engine2", 2, "is a visprune engine, not a visprune ONNX set",
         copy_of("engine")),
    Case("export-out-is-the-recipe", "export --recipe {ws}/r.json --out {ws}/r.json", 2, "is the input",
         recipe_file(MINIMAL)),
    Case("export-onnx-set-with-user-files", "export --out {ws}/onnx2", 2, "holds files visprune did not write",
         copy_of("onnx", write("notes.md", b"mine"))),
    # --- build ---------------------------------------------------------------------------------------------
    Case("build-missing-onnx", "build --onnx {ws}/none --out {ws}/e", 8, "is not a folder"),
    Case("build-folder-without-manifest", "build --onnx {ws}/mine --out {ws}/e", 8, "No ONNX set manifest",
         user_folder),
    Case("build-manifest-not-json", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "not valid JSON",
         copy_of("onnx", write("manifest.json", b"{"))),
    Case("build-manifest-a-list", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "is not a visprune ONNX set manifest",
         copy_of("onnx", write("manifest.json", b"[1, 2]"))),
    Case("build-manifest-old-version", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "schema version 1",
         copy_of("onnx", edit_json("manifest.json", lambda m: m.update(schema_version=1)))),
    Case("build-manifest-edited-image-offset", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "was edited",
         copy_of("onnx", edit_json("manifest.json", lambda m: m["prompt"].update(image_start=35)))),
    Case("build-manifest-edited-names", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "was edited",
         copy_of("onnx", edit_json("manifest.json", lambda m: m["graphs"]["decode"]["inputs"][0].update(name="x")))),
    Case("build-manifest-bool-as-count", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "recipe.removed.0",
         copy_of("onnx", edit_json("manifest.json", lambda m: m["recipe"]["removed"].__setitem__(0, True), True))),
    Case("build-manifest-layers-disagree", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "the language model has 8 layers",
         copy_of("onnx", edit_json("manifest.json", lambda m: m.update(kv_stages=[0] * 9), True))),
    Case("build-manifest-null-prompt", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "prompt",
         copy_of("onnx", edit_json("manifest.json", lambda m: m.update(prompt=None), True))),
    Case("build-graph-missing", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "lacks prefill.onnx",
         copy_of("onnx", remove("prefill.onnx"))),
    Case("build-graph-truncated", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "has 100 bytes",
         copy_of("onnx", truncate("decode.onnx"))),
    Case("build-graph-same-size-corruption", "build --onnx {ws}/onnx2 --out {ws}/e", 8, "sha256 differs",
         copy_of("onnx", flip_bytes("vision.onnx"))),
    Case("build-out-is-the-onnx-set", "build --onnx {ws}/onnx2 --out {ws}/onnx2", 2, "is the input", copy_of("onnx")),
    Case("build-out-inside-the-onnx-set", "build --onnx {ws}/onnx2 --out {ws}/onnx2/engine", 2, "lies inside",
         copy_of("onnx")),
    Case("build-out-holds-the-onnx-set", "build --onnx {ws}/onnx2 --out {ws} --force", 2, "contains the input",
         copy_of("onnx")),
    Case("build-out-is-a-user-folder", "build --onnx {onnx} --out {ws}/mine", 2, "a folder with other files",
         user_folder),
    Case("build-out-is-an-onnx-set", "build --onnx {onnx} --out {ws}/onnx2", 2, "is a visprune ONNX set, not",
         copy_of("onnx")),
    Case("build-unknown-backend", "build --onnx {onnx} --out {ws}/e --backend openvino", 2, "invalid choice: 'openvino'"),
    Case("build-unknown-device", "build --onnx {onnx} --out {ws}/e --device tpu", 2, "invalid choice: 'tpu'"),
    Case("build-cuda-without-cuda", "build --onnx {onnx} --out {ws}/e --device cuda", 10, "CUDAExecutionProvider"),
    Case("build-tensorrt-missing", "build --onnx {onnx} --out {ws}/e --backend tensorrt", 10, "TensorRT"),
    Case("build-tensorrt-prompt-too-short", "build --onnx {onnx} --out {ws}/e --backend tensorrt "
         "--max-prompt-tokens 10", 2, "shorter than the shortest prompt"),
    Case("build-unknown-optimization", "build --onnx {onnx} --out {ws}/e --optimization-level max", 2,
         "invalid choice: 'max'"),
    Case("build-builder-level", "build --onnx {onnx} --out {ws}/e --builder-optimization-level 9", 2, "not in 0-5"),
    Case("build-negative-threads", "build --onnx {onnx} --out {ws}/e --intra-op-threads -1", 2, "is negative"),
    Case("build-zero-max-batch", "build --onnx {onnx} --out {ws}/e --max-batch 0", 2, "--max-batch must be at least 1"),
    Case("build-pytorch-buckets-outside-limits", "build --onnx {onnx} --out {ws}/e --backend pytorch "
         "--prompt-buckets 100,2000", 2, "must lie within 577 (the shortest prompt)"),
    Case("build-pytorch-buckets-not-numbers", "build --onnx {onnx} --out {ws}/e --backend pytorch "
         "--prompt-buckets six,seven", 2, "expected comma-separated token counts"),
    Case("build-pytorch-buckets-empty-item", "build --onnx {onnx} --out {ws}/e --backend pytorch "
         "--prompt-buckets 640,,700", 2, "expected comma-separated token counts"),
    # --- serve, export-triton ------------------------------------------------------------------------------
    Case("serve-missing-engine", "serve --engine {ws}/none", 8, "is not a folder"),
    Case("serve-port-zero", "serve --engine {engine} --http-port 0", 2, "must be a port number"),
    Case("serve-zero-max-batch", "serve --engine {engine} --max-batch 0", 2, "--max-batch must be at least 1"),
    Case("export-triton-missing-engine", "export-triton --engine {ws}/none --out {ws}/t", 8, "is not a folder"),
    Case("export-triton-out-is-a-user-folder", "export-triton --engine {engine} --out {ws}/mine", 2,
         "a folder with other files", user_folder),
    # --- run -----------------------------------------------------------------------------------------------
    Case("run-missing-engine", "run --engine {ws}/none --image {image} --prompt hi", 8, "is not a folder"),
    Case("run-onnx-set-as-engine", "run --engine {onnx} --image {image} --prompt hi", 8,
         "is a visprune ONNX set (written by `visprune export`), not an engine"),
    Case("build-engine-as-onnx-set", "build --onnx {engine} --out {ws}/e", 8,
         "is a visprune engine (written by `visprune build`), not an ONNX set"),
    Case("run-missing-image", "run --engine {engine} --image {ws}/none.png --prompt hi", 4, "Image not found"),
    Case("run-image-not-an-image", "run --engine {engine} --image {ws}/notes.png --prompt hi", 4, "does not decode",
         user_file("notes.png")),
    Case("run-two-image-placeholders", "run --engine {engine} --image {image} --prompt", 4, "exactly one"),
    Case("run-zero-new-tokens", "run --engine {engine} --image {image} --prompt hi --max-new-tokens 0", 2,
         "at least 1"),
    Case("run-negative-new-tokens", "run --engine {engine} --image {image} --prompt hi --max-new-tokens -1", 2,
         "at least 1"),
    Case("run-negative-temperature", "run --engine {engine} --image {image} --prompt hi --temperature -1", 2,
         "temperature must be >= 0"),
    Case("run-negative-top-k", "run --engine {engine} --image {image} --prompt hi --temperature 1 --top-k -1", 2,
         "top_k must be >= 0"),
    Case("run-top-p-zero", "run --engine {engine} --image {image} --prompt hi --temperature 1 --top-p 0", 2,
         "top_p must be in"),
    Case("run-edited-engine-manifest", "run --engine {ws}/engine2 --image {image} --prompt hi", 8, "was edited",
         copy_of("engine", edit_json("engine.json", lambda m: m["onnx_set"]["prompt"].update(image_start=3)))),
    Case("run-engine-file-missing", "run --engine {ws}/engine2 --image {image} --prompt hi", 8, "lacks embed_tokens",
         copy_of("engine", remove("embed_tokens.npy"))),
    Case("run-corrupt-embeddings-verify", "run --engine {ws}/engine2 --image {image} --prompt hi --verify", 8,
         "sha256 differs", copy_of("engine", flip_bytes("embed_tokens.npy"))),
    Case("run-engine-of-unknown-backend", "run --engine {ws}/engine2 --image {image} --prompt hi", 8, "backend",
         copy_of("engine", edit_json("engine.json", lambda m: m.update(backend="openvino"), True))),
    # --- report --------------------------------------------------------------------------------------------
    Case("report-latency-without-baseline", "report --engine {engine} --out {ws}/r --latency", 2, "--baseline"),
    Case("report-nothing-to-report", "report --engine {engine} --out {ws}/r --no-parity", 2, "Nothing to report"),
    Case("report-zero-new-tokens", "report --engine {engine} --out {ws}/r --max-new-tokens 0", 2, "at least 1"),
    Case("report-zero-rounds", "report --engine {engine} --out {ws}/r --no-parity --latency --baseline {baseline} "
         "--rounds 0", 2, "--rounds"),
    Case("report-overlap-above-one", "report --engine {engine} --out {ws}/r --min-kept-overlap 1.5", 2,
         "--min-kept-overlap 1.5 is out of range"),
    Case("report-negative-tolerance", "report --engine {engine} --out {ws}/r --logits-atol -1", 2, "out of range"),
    Case("report-unknown-reference", "report --engine {engine} --out {ws}/r --reference gpu", 2, "invalid choice"),
    Case("report-7b-recipe", f"report --engine {{engine}} --out {{ws}}/r --recipe {RECIPE_7B}", 5, "for 32 layers"),
    Case("report-another-recipe", "report --engine {engine} --out {ws}/r --recipe {ws}/r.json", 8,
         "exported from recipe", recipe_file(MINIMAL)),
    Case("report-missing-model", "report --engine {engine} --out {ws}/r --model {ws}/nowhere", 3, "Model not found"),
    Case("report-wrong-model", "report --engine {engine} --out {ws}/r --model tiny-vqa --max-new-tokens 1", 8,
         "not from --model tiny-vqa"),
    Case("report-out-is-the-engine", "report --engine {ws}/engine2 --out {ws}/engine2", 2, "is the input",
         copy_of("engine")),
    Case("report-out-is-a-user-folder", "report --engine {engine} --out {ws}/mine", 2, "a folder with other files",
         user_folder),
    Case("report-baseline-of-another-model", "report --engine {engine} --out {ws}/r --no-parity --latency "
         "--baseline {ws}/engine2 --rounds 1 --warmup 0", 8, "different models",
         copy_of("engine", edit_json("engine.json", lambda m: m["onnx_set"]["model"].update(fingerprint=OTHER_MODEL),
                                     True))),
    # --- pipeline ------------------------------------------------------------------------------------------
    Case("pipeline-reduction-two", "pipeline --reduction 2 --out {ws}/run", 2, "strictly between"),
    Case("pipeline-unknown-method", "pipeline --method nosuch --out {ws}/run", 2, "invalid choice: 'nosuch'"),
    Case("pipeline-cuda-without-cuda", "pipeline --device cuda --out {ws}/run", 10, "sees no CUDA GPU"),
    Case("pipeline-zero-latency-rounds", "pipeline --latency-rounds 0 --out {ws}/run", 2, "--latency-rounds must be"),
    Case("pipeline-unknown-backend", "pipeline --backend openvino --out {ws}/run", 2, "invalid choice: 'openvino'"),
    Case("pipeline-out-is-a-user-folder", "pipeline --out {ws}/mine", 2, "a folder with other files", user_folder),
    Case("pipeline-out-is-an-engine", "pipeline --out {ws}/engine2", 2, "is a visprune engine, not a visprune "
         "pipeline run", copy_of("engine")),
    Case("pipeline-out-is-the-data", "pipeline --data {ws}/set.jsonl --out {ws}/set.jsonl", 2, "is the input",
         jsonl(GOOD_LINE)),
    # --- eval ----------------------------------------------------------------------------------------------
    Case("eval-engine-and-recipe", "eval --engine {engine} --recipe {recipe} --out {ws}/e", 2, "not allowed with"),
    Case("eval-neither", "eval --out {ws}/e", 2, "one of the arguments --engine --recipe is required"),
    Case("eval-7b-recipe", f"eval --recipe {RECIPE_7B} --out {{ws}}/e --questions 2", 5, "for 32 layers"),
    Case("eval-zero-questions", "eval --recipe {recipe} --out {ws}/e --questions 0", 2, "at least 1"),
    Case("eval-out-is-a-user-file", "eval --recipe {recipe} --out {ws}/notes.txt --questions 2", 2, "is a file",
         user_file("notes.txt")),
    Case("eval-out-is-the-engine", "eval --engine {ws}/engine2 --out {ws}/engine2 --questions 2", 2, "is the input",
         copy_of("engine")),
    # --- tradeoff and the command line itself --------------------------------------------------------------
    Case("tradeoff-reduction-above-one", "tradeoff --reductions 1.5 --out {ws}/t", 2, "must lie in (0, 1)"),
    Case("tradeoff-unknown-method", "tradeoff --methods fastv nosuch --out {ws}/t", 2, "invalid choice: 'nosuch'"),
    Case("tradeoff-ablation-budget-above-one", "tradeoff --ablation-reductions 0.6 1.2 --out {ws}/t", 2,
         "must lie in (0, 1)"),
    Case("tradeoff-zero-questions", "tradeoff --questions 0 --out {ws}/t", 2, "--questions and --latency-rounds"),
    Case("tradeoff-out-is-a-user-folder", "tradeoff --out {ws}/mine --questions 2", 2, "a folder with other files",
         user_folder),
    Case("unknown-command", "deploy --port 80", 2, "invalid choice"),
    Case("unknown-flag", "run --engine {engine} --image {image} --prompt hi --beam-size 4", 2,
         "unrecognized arguments: --beam-size"),
]


@pytest.fixture(scope="module")
def shared(exported, default_set):
    return {"engine": exported["pruned"], "baseline": exported["unpruned"], "onnx": exported["pruned-onnx"],
            "recipe": exported["recipe"], "image": default_set.samples[0].image}


def argv_of(case, ws, shared):
    if case.id == "run-two-image-placeholders":  # a prompt with spaces is one argument
        return ["run", "--engine", str(shared["engine"]), "--image", str(shared["image"]), "--prompt",
                "USER: <image><image> hi ASSISTANT:"]
    return case.argv.format(ws=ws, **shared).split()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly_and_changes_nothing(case, tmp_path, shared, capsys):
    if case.code == 10 and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    ws = tmp_path / "ws"
    ws.mkdir()
    if case.setup:
        case.setup(ws, shared)
    before = snapshot(ws, *(p for p in shared.values()))
    try:
        code = main(argv_of(case, ws, shared))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    _, err = capsys.readouterr()
    assert code == case.code, err
    assert "\nHint: " in err and "Traceback" not in err, err
    assert case.fragment in err, err
    assert snapshot(ws, *(p for p in shared.values())) == before


def test_the_suite_covers_every_command():
    commands = {c.argv.split()[0] for c in CASES}
    assert {"calibrate", "recipe", "export", "build", "run", "report", "pipeline", "eval", "tradeoff"} <= commands
    assert len(CASES) >= 60
