"""The embedded `tiny-vqa` model: `tiny`'s architecture, tokenizer and template, trained on shapes-vqa.

Its weights are committed (`weights/tiny-vqa.safetensors`, a few MB) next to `weights/tiny-vqa.json`, which
records their sha256 and how they were trained (`python -m visprune.models.train_tiny_vqa` reproduces them).
On first use the weights are checked against that hash and assembled with `tiny`'s config and processor into a
cache folder, which is then loaded with `from_pretrained` like any llava-hf checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from visprune.artifacts import sha256_file
from visprune.outputs import atomic_directory
from visprune.errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS = WEIGHTS_DIR / "tiny-vqa.safetensors"
RECORD = WEIGHTS_DIR / "tiny-vqa.json"


def tiny_vqa_record() -> dict[str, Any]:
    """The committed record: sha256 of the weights, training settings and measured accuracies."""
    return json.loads(RECORD.read_text())


def ensure_tiny_vqa_checkpoint(weights: Path = WEIGHTS) -> Path:
    """The cache folder of tiny-vqa, built from `weights` once their hash matches the record."""
    from visprune.models.cache import cache_root

    expected = tiny_vqa_record()["sha256"]
    check_weights(weights, expected)
    path = cache_root() / "models" / f"tiny-vqa-{expected.removeprefix('sha256:')[:16]}"
    if not (path / "config.json").exists() or sha256_file(path / "model.safetensors") != expected:
        with atomic_directory(path) as staging:
            _assemble(weights, staging)
    return path


def check_weights(weights: Path, expected: str) -> None:
    if not Path(weights).exists():
        raise ModelLoadError(f"The tiny-vqa weights are missing: {weights}.", _RESTORE_HINT)
    actual = sha256_file(weights)
    if actual != expected:
        raise ModelLoadError(f"The tiny-vqa weights {weights} have hash {actual[:23]}…, not the recorded "
                             f"{expected[:23]}…: the file is corrupt or was changed.", _RESTORE_HINT)


_RESTORE_HINT = ("Restore it with `git checkout -- visprune/models/weights/tiny-vqa.safetensors`, or retrain with "
                 "`python -m visprune.models.train_tiny_vqa --out DIR` and record the new file's hash in "
                 "visprune/models/weights/tiny-vqa.json.")


def _assemble(weights: Path, out: Path) -> None:
    """tiny's config and processor (deterministic builders) plus the trained weights."""
    from visprune.models.tiny import _build_config, _build_processor

    processor = _build_processor()
    _build_config(processor.tokenizer).save_pretrained(out)
    processor.save_pretrained(out)
    shutil.copyfile(weights, out / "model.safetensors")
