"""Bad inputs end in a named error with a `Hint:` and the documented exit code, write nothing, and never show a
traceback; inputs that only look odd (16-bit images, a UTF-8 BOM) are read correctly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from calibrate.data import read_calibration_jsonl
from calibrate.recipe import unpruned_recipe
from exporter.export import check_max_seq_fits
from runtime import Pipeline
from reports.parity import check_engine_embeddings
from reports.report import ReportConfig
from runtime.torch_runner import TorchRunner
from cli.main import main
from visprune.errors import ArtifactMismatchError, BackendUnavailableError, ConfigError
from visprune.models import load_llava
from visprune.models.inputs import load_image

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code, err, expected_code, *fragments):
    assert code == expected_code, err
    assert "\nHint: " in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# 1. fewer than one new token ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--rounds", "0"], "--rounds must be at least 1"),
])
def test_report_rejects_bad_counts_before_loading_anything(tmp_path, capsys, flags, fragment):
    code, _, err = run_cli(capsys, "report", "--engine", tmp_path / "no-engine", "--out", tmp_path / "r", *flags)
    assert_clean_failure(code, err, 2, fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("count", ["0", "-1"])
def test_run_rejects_fewer_than_one_new_token(tmp_path, capsys, count):
    code, out, err = run_cli(capsys, "run", "--engine", tmp_path / "no-engine", "--image", tmp_path / "x.png",
                             "--prompt", "hi", "--max-new-tokens", count)
    assert_clean_failure(code, err, 2, f"--max-new-tokens must be at least 1, got {count}")
    assert out == ""


def test_report_config_rejects_bad_counts_in_the_library():
    with pytest.raises(ConfigError, match="--rounds must be at least 1"):
        ReportConfig(latency=True, baseline="b", rounds=0)
    ReportConfig(warmup=0)  # no warm-up is allowed


@pytest.mark.parametrize("count", [0, -1])
def test_pipeline_rejects_fewer_than_one_new_token(exported, default_set, count):
    pipe = Pipeline.from_engine_dir(exported["pruned"])
    with pytest.raises(ConfigError, match="at least 1") as error:
        pipe.generate(default_set.samples[0].image, pipe.chat_prompt("What is it?"), max_new_tokens=count)
    assert error.value.hint
    with pytest.raises(ConfigError, match="at least 1"):
        pipe.check_request(600, count)


# 2. --max-seq too short for the prompt layout ---------------------------------------------------------------

def test_export_rejects_a_max_seq_shorter_than_the_shortest_prompt(tmp_path, capsys):
    # tiny: 4 template tokens before the image, 576 image tokens, one question token, one generated token
    code, _, err = run_cli(capsys, "export", "--max-seq", "581", "--out", tmp_path / "onnx", "--quiet")
    assert_clean_failure(code, err, 2, "--max-seq 581 is too short", "needs 582", "Hint: Pass --max-seq 582 or more",
                         "2048")
    assert not (tmp_path / "onnx").exists() and list(tmp_path.iterdir()) == []


def test_max_seq_check_accepts_the_minimum():
    check_max_seq_fits(582, 4, 576)
    with pytest.raises(ConfigError, match="needs 582"):
        check_max_seq_fits(581, 4, 576)


@pytest.mark.slow
def test_export_at_the_minimum_max_seq_traces(tmp_path, capsys):
    # the example inputs shrink to fit: torch.export rejects examples longer than a dynamic dim's max
    code, out, err = run_cli(capsys, "export", "--max-seq", "582", "--out", tmp_path / "onnx", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["prompt"]["max_seq"] == 582


# 3. calibration JSONL that is not UTF-8 ---------------------------------------------------------------------

def _jsonl(tmp_path, default_set, *lines: bytes):
    image = default_set.samples[0].image
    good = json.dumps({"image": str(image), "question": "What is it?"}).encode()
    data = tmp_path / "set.jsonl"
    data.write_bytes(b"\n".join(line.replace(b"GOOD", good) for line in lines) + b"\n")
    return data


def test_non_utf8_calibration_file_names_its_first_bad_line(tmp_path, capsys, default_set):
    image = json.dumps(str(default_set.samples[1].image)).encode()
    latin1 = b'{"image": ' + image + b', "question": "Qu\xe9 es esto?"}'  # Latin-1 e-acute
    data = _jsonl(tmp_path, default_set, b"GOOD", b"", latin1, latin1)
    out = tmp_path / "out" / "recipe.json"
    code, _, err = run_cli(capsys, "calibrate", "--reduction", "0.6", "--data", data, "--out", out, "--quiet")
    assert_clean_failure(code, err, 4, f"{data}:3 is not UTF-8", "Hint: Save the file as UTF-8")
    assert not (tmp_path / "out").exists()


def test_calibration_file_with_a_utf8_bom_reads(tmp_path, default_set):
    accented = json.dumps({"image": str(default_set.samples[1].image), "question": "Qué es esto?"}, ensure_ascii=False)
    data = _jsonl(tmp_path, default_set, b"\xef\xbb\xbfGOOD", accented.encode())  # as Windows editors save it
    assert [s.question for s in read_calibration_jsonl(data).samples] == ["What is it?", "Qué es esto?"]


# 4. 16-bit and float greyscale images -----------------------------------------------------------------------

GRADIENT = np.tile(np.array([0, 257, 8192, 32768, 49152, 65535], dtype=np.uint16), (8, 1))  # 8 x 6
EXPECTED = np.array([0, 1, 32, 128, 191, 255], dtype=np.uint8)  # round(v / 257)


@pytest.mark.parametrize("name, make", [
    ("grey16.png", lambda: Image.fromarray(GRADIENT)),  # opens as I;16
    ("grey16b.tif", lambda: Image.fromarray(GRADIENT).convert("I").convert("I;16B")),
    ("grey32.tif", lambda: Image.fromarray(GRADIENT.astype(np.int32))),  # mode I, read as 16-bit
    ("float.tif", lambda: Image.fromarray(GRADIENT.astype(np.float32) / 65535)),  # mode F, read as 0..1
])
def test_wide_greyscale_images_keep_their_gradient(tmp_path, name, make):
    make().save(tmp_path / name)
    image = load_image(tmp_path / name)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (8, 6, 3)
    assert np.abs(pixels[0, :, 0].astype(int) - EXPECTED).max() <= 1, pixels[0, :, 0]
    assert (pixels == pixels[:1, :, :1]).all()  # grey: every row and channel alike


def test_out_of_range_wide_values_clip_to_black_and_white(tmp_path):
    Image.fromarray(np.array([[-5.0, 0.5, 3.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[-9, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 255]


# 5. argparse's own errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, command, fragment", [
    (["bogus"], "visprune", "invalid choice: 'bogus'"),
    ([], "visprune", "required: COMMAND"),
    (["calibrate", "--out", "OUT"], "visprune calibrate", "required: --reduction"),
    (["eval", "--engine", "e", "--recipe", "r", "--out", "OUT"], "visprune eval", "not allowed with argument"),
    (["calibrate", "--reduction", "0.6", "--out", "OUT", "--nope"], "visprune calibrate", "unrecognized arguments: --nope"),
    (["export", "--max-seq", "1.5", "--out", "OUT"], "visprune export", "invalid int value: '1.5'"),
    (["calibrate", "--reduction", "sixty", "--out", "OUT"], "visprune calibrate", "invalid float value: 'sixty'"),
])
def test_usage_errors_end_with_a_help_hint(tmp_path, capsys, args, command, fragment):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([str(out) if a == "OUT" else a for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert fragment in err and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == f"Hint: run `{command} --help` to see the options."
    assert not out.exists()


# 6. --device cuda without CUDA ------------------------------------------------------------------------------

@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_calibrate_on_cuda_without_cuda_is_backend_unavailable(tmp_path, capsys, device):
    out = tmp_path / "out" / "recipe.json"
    code, _, err = run_cli(capsys, "calibrate", "--reduction", "0.6", "--device", device, "--out", out, "--quiet")
    assert_clean_failure(code, err, 10, f"--device {device} was asked for", "Hint: Use --device cpu")
    assert not (tmp_path / "out").exists()


@no_cuda
def test_pytorch_build_on_cuda_without_cuda_is_backend_unavailable(exported, tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "--onnx", exported["pruned-onnx"], "--out", tmp_path / "e",
                           "--backend", "pytorch", "--device", "cuda")
    assert_clean_failure(code, err, 10, "sees no CUDA GPU")
    assert not (tmp_path / "e").exists()


@no_cuda
def test_torch_runner_on_cuda_without_cuda_is_backend_unavailable(tiny):
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU") as error:
        TorchRunner(tiny, unpruned_recipe(tiny.shape), image_start=4, device="cuda")
    assert error.value.exit_code == 10 and error.value.hint


# 7. parity against the wrong model of the same architecture -------------------------------------------------

def test_report_against_another_model_of_the_same_architecture_is_a_mismatch(exported, tmp_path, capsys):
    # tiny and tiny-vqa share one architecture fingerprint; only their weights tell them apart
    code, _, err = run_cli(capsys, "report", "--engine", exported["pruned"], "--model", "tiny-vqa",
                           "--out", tmp_path / "r", "--max-new-tokens", "2")
    assert_clean_failure(code, err, 8, "exported from tiny, not from --model tiny-vqa", "Hint: Pass --model tiny ")
    assert "does not match the PyTorch reference" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_embedding_check_allows_the_export_dtype_rounding(exported, tiny, dtype):
    """A half-precision export saves rounded embeddings: the right model still matches, the wrong one does not."""
    pipe = Pipeline.from_engine_dir(exported["pruned"])
    onnx_set = pipe.manifest.onnx_set.model_copy(update={"dtype": dtype})
    manifest = pipe.manifest.model_copy(update={"onnx_set": onnx_set})
    rounded = torch.from_numpy(pipe.embeddings).to(getattr(torch, dtype))
    saved = rounded.numpy() if dtype == "float16" else rounded.float().numpy()  # as _numpy_dtype stores them
    half = Pipeline(pipe.engine_dir, manifest, pipe.runner, saved, pipe.processor)
    check_engine_embeddings(half, tiny, "tiny")
    with pytest.raises(ArtifactMismatchError, match="not from --model tiny-vqa"):
        check_engine_embeddings(half, load_llava("tiny-vqa"), "tiny-vqa")


@pytest.mark.slow
def test_report_takes_the_engines_model_unless_told(tmp_path, capsys):
    """An engine exported from tiny-vqa: without --model the report checks it against tiny-vqa (its manifest's);
    told --model tiny, it is a mismatch naming the right model."""
    from engines import BuildConfig, build_engine
    from exporter import ExportConfig, export_onnx

    export_onnx(ExportConfig(model="tiny-vqa"), tmp_path / "onnx", progress=False)
    build_engine(BuildConfig(), tmp_path / "onnx", tmp_path / "engine")
    code, _, err = run_cli(capsys, "report", "--engine", tmp_path / "engine", "--out", tmp_path / "r",
                           "--model", "tiny")
    assert_clean_failure(code, err, 8, "exported from tiny-vqa, not from --model tiny", "Hint: Pass --model tiny-vqa")
    assert not (tmp_path / "r").exists()
    code, out, err = run_cli(capsys, "report", "--engine", tmp_path / "engine", "--out", tmp_path / "r",
                             "--max-new-tokens", "2")
    assert code == 0, err  # the engine's embeddings matched tiny-vqa's (with tiny they do not: above)
    assert out.strip().endswith(f"wrote {tmp_path / 'r'}")
