"""The `visprune` command line end to end: real model, real files, real exit codes."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from cli.main import main


@pytest.fixture
def small_set(tmp_path, default_set):
    """A 3-sample JSONL set with its own image folder."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, sample in enumerate(default_set.samples[:3]):
        shutil.copy(sample.image, images / sample.image.name)
        rows.append({"image": sample.image.name, "question": f"What is in picture {i}?"})
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data, images


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_calibrate_writes_a_byte_identical_recipe_for_the_same_seed(tmp_path, capsys):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "recipe.json"
        code, stdout, _ = run_cli(capsys, "calibrate", "--model", "tiny", "--reduction", "0.6", "--samples", "6",
                                  "--seed", "3", "--out", str(out))
        assert code == 0, stdout
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    recipe = json.loads(outs[0].read_text())
    assert recipe["calibration"]["num_samples"] == 6 and recipe["seed"] == 3
    assert 0.6 <= recipe["achieved"]["visual_flops_reduction"] <= 0.62
    assert recipe["model"]["fingerprint"].startswith("sha256:")
    assert (tmp_path / "a" / "recipe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((tmp_path / "a" / "recipe.run.json").read_text())
    assert run["timings"]["total_s"] > 0 and run["recipe_sha256"].startswith("sha256:")
    assert "achieved visual-FLOPs reduction" in stdout and stdout.rstrip().endswith(f"wrote {outs[-1]}")


def test_calibrate_on_a_user_jsonl(tmp_path, capsys, small_set):
    data, images = small_set
    out = tmp_path / "out" / "recipe.json"
    code, stdout, _ = run_cli(capsys, "calibrate", "--reduction", "0.5", "--data", str(data), "--images", str(images),
                              "--out", str(out), "--quiet", "--no-plot")
    assert code == 0
    recipe = json.loads(out.read_text())
    assert recipe["calibration"]["description"].startswith("set.jsonl (3 samples")
    assert not (tmp_path / "out" / "recipe.png").exists()


def _bad_image(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return "broken.png"


@pytest.mark.parametrize("case, line, exit_code, fragment", [
    ("missing image", {"image": "nowhere.png", "question": "q"}, 4, "Image not found"),
    ("corrupt image", "BROKEN", 4, "does not decode"),
    ("no image field", {"question": "q"}, 4, "has no 'image'"),
    ("no question", {"image": "IMG"}, 4, "has no 'question'"),
    ("prompt without <image>", {"image": "IMG", "prompt": "USER: hi ASSISTANT:"}, 4, "exactly one '<image>'"),
    ("prompt with two <image>", {"image": "IMG", "prompt": "USER: <image><image> ASSISTANT:"}, 4, "has 2"),
])
def test_bad_calibration_data_fails_cleanly(tmp_path, capsys, small_set, case, line, exit_code, fragment):
    data, images = small_set
    good = data.read_text().splitlines()[0]
    image = json.loads(good)["image"]
    if line == "BROKEN":
        line = {"image": _bad_image(images), "question": "q"}
    line = json.loads(json.dumps(line).replace('"IMG"', json.dumps(image)))
    data.write_text(good + "\n" + json.dumps(line) + "\n")
    out = tmp_path / "out" / "recipe.json"
    code, _, err = run_cli(capsys, "calibrate", "--reduction", "0.6", "--data", str(data), "--images", str(images),
                           "--out", str(out), "--quiet")
    assert code == exit_code, (case, err)
    assert fragment in err and "Hint:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no recipe, plot, run record or temporary file


@pytest.mark.parametrize("args, exit_code, fragment", [
    (["--reduction", "0"], 2, "strictly between 0 and 1"),
    (["--reduction", "1.2"], 2, "strictly between 0 and 1"),
    (["--reduction", "-0.1"], 2, "strictly between 0 and 1"),
    (["--reduction", "0.6", "--model", "/definitely/not/here"], 3, "Model not found"),
    (["--reduction", "0.6", "--device", "tpu"], 2, "Unknown device"),
])
def test_bad_arguments_fail_cleanly(tmp_path, capsys, args, exit_code, fragment):
    out = tmp_path / "recipe.json"
    code, _, err = run_cli(capsys, "calibrate", *args, "--out", str(out), "--quiet")
    assert code == exit_code and fragment in err and "Hint:" in err
    assert not out.exists()


def test_non_llava_checkpoint_is_rejected(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(capsys, "calibrate", "--reduction", "0.6", "--model", str(tmp_path / "ckpt"),
                           "--out", str(tmp_path / "r.json"), "--quiet")
    assert code == 3 and "not a LLaVA-1.5" in err and "Hint:" in err


def test_unreachable_budget_fails_without_writing(tmp_path, capsys, small_set):
    data, images = small_set
    out = tmp_path / "out" / "recipe.json"
    code, _, err = run_cli(capsys, "calibrate", "--reduction", "0.999", "--data", str(data), "--images",
                           str(images), "--out", str(out), "--quiet")
    assert code == 6 and "No pruning strength reaches" in err and "Hint: Ask for at most" in err
    assert not (tmp_path / "out").exists()


def test_recipe_command_checks_the_shipped_7b_recipe(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "recipe", str(REPO / "recipes/llava-1.5-7b/fitprune-60.json"),
                           str(REPO / "recipes/llava-1.5-7b/fitprune-80.json"), "--model", "llava-1.5-7b",
                           "--plot", str(tmp_path / "both.png"))
    assert code == 0
    assert "achieved visual-FLOPs reduction 59.7%" in out and "achieved visual-FLOPs reduction 79.7%" in out
    assert (tmp_path / "both.png").stat().st_size > 1000


def test_recipe_command_rejects_a_recipe_for_another_model(capsys):
    code, _, err = run_cli(capsys, "recipe", str(REPO / "recipes/llava-1.5-7b/fitprune-60.json"), "--model", "tiny")
    assert code == 5 and "32 layers" in err and "Hint:" in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "visprune"
    for command in ([str(script)], [sys.executable, "-m", "cli"]):
        result = subprocess.run([*command, "calibrate", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--reduction" in result.stdout


def test_run_and_report_commands(exported, capsys, tmp_path, default_set):
    image = default_set.samples[0].image
    code, out, err = run_cli(capsys, "run", "--engine", str(exported["pruned"]), "--image", str(image),
                             "--prompt", "What is shown?", "--max-new-tokens", "3")
    assert code == 0 and out.strip() and "prefill" in err and "ms/token" in err
    code, out, _ = run_cli(capsys, "report", "--engine", str(exported["pruned"]), "--out", str(tmp_path / "r"),
                           "--max-new-tokens", "2")
    assert code == 0 and "PASSED" in out and (tmp_path / "r" / "parity.json").exists()


def test_run_streams_and_samples(exported, capsys, default_set):
    """--stream prints the same answer as a plain run; a seeded sampled run repeats itself."""
    base = ["run", "--engine", str(exported["pruned"]), "--image", str(default_set.samples[0].image),
            "--prompt", "What is shown?", "--max-new-tokens", "6"]
    plain = run_cli(capsys, *base)[1]
    code, streamed, _ = run_cli(capsys, *base, "--stream")
    assert code == 0 and streamed == plain
    sampled = [run_cli(capsys, *base, "--temperature", "1.2", "--top-k", "20", "--seed", "5")[1] for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].strip()


def test_run_rejects_a_missing_engine_and_a_bad_image(exported, capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--engine", str(tmp_path), "--image", "x.png", "--prompt", "hi")
    assert code == 8 and "No engine manifest" in err and "Hint:" in err
    code, _, err = run_cli(capsys, "run", "--engine", str(exported["pruned"]), "--image", str(tmp_path / "none.png"),
                           "--prompt", "hi")
    assert code == 4 and "Image not found" in err


def test_export_rejects_a_recipe_for_another_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--recipe", str(REPO / "recipes/llava-1.5-7b/fitprune-60.json"),
                           "--out", str(tmp_path / "onnx"), "--quiet")
    assert code == 5 and "32 layers" in err and not (tmp_path / "onnx").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_without_tensorrt_exits_with_an_install_hint(exported, capsys, tmp_path):
    code, _, err = run_cli(capsys, "build", "--onnx", str(exported["pruned-onnx"]), "--out", str(tmp_path / "e"),
                           "--backend", "tensorrt")
    assert code == 10 and "TensorRT is not installed" in err and "Hint:" in err and "pip install tensorrt" in err
    assert not (tmp_path / "e").exists()


def test_build_rejects_limits_outside_the_export_before_building(exported, capsys, tmp_path):
    code, _, err = run_cli(capsys, "build", "--onnx", str(exported["pruned-onnx"]), "--out", str(tmp_path / "e"),
                           "--backend", "tensorrt", "--max-prompt-tokens", "100")
    assert code == 2 and "shorter than the shortest prompt" in err and not (tmp_path / "e").exists()


def test_report_latency_needs_a_baseline(exported, capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", "--engine", str(exported["pruned"]), "--out", str(tmp_path / "r"),
                           "--latency", "--no-parity")
    assert code == 2 and "--baseline" in err and not (tmp_path / "r").exists()


def test_report_latency_through_the_cli(exported, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "report", "--engine", str(exported["pruned"]), "--out", str(tmp_path / "r"),
                           "--no-parity", "--latency", "--baseline", str(exported["unpruned"]), "--rounds", "2",
                           "--warmup", "1", "--new-tokens", "3")
    assert code == 0 and "Prefill latency ratio" in out
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"latency.json", "latency.md", "latency.png"}
