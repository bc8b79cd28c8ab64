"""Calibration sets: a JSONL file of (image, question) samples resolved against an image folder.

One sample per line:
    {"image": "coffee.png", "question": "What is on the table?"}       # wrapped in the model's chat template
    {"image": "coffee.png", "prompt": "USER: <image>\\nDescribe it. ASSISTANT:"}   # used verbatim, one <image>
An optional "id" names the sample; relative image paths resolve against the images folder (default: the
JSONL file's folder). The embedded default set is built from the photographs scikit-image ships offline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from visprune.artifacts import canonical_json, sha256_bytes, sha256_file
from visprune.outputs import atomic_directory
from visprune.errors import CalibrationDataError
from visprune.models.cache import cache_root

DEFAULT_SET_VERSION = 1


@dataclass(frozen=True)
class CalibrationSample:
    sample_id: str
    image: Path
    question: str | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class CalibrationSet:
    samples: tuple[CalibrationSample, ...]
    description: str

    def content_hash(self) -> str:
        """Hash of exactly what calibration reads: ids, prompt texts and image bytes, in order."""
        rows = [[s.sample_id, s.question, s.prompt, sha256_file(s.image)] for s in self.samples]
        return sha256_bytes(canonical_json(rows))


def read_calibration_jsonl(path: Path, images_dir: Path | None = None) -> CalibrationSet:
    """Parse a calibration JSONL file; every malformed line is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"Calibration file not found: {path}",
                                   "Pass --data with a JSONL file, or leave it out to use the embedded default set.")
    images_dir = Path(images_dir) if images_dir else path.parent
    samples = [_parse_line(line, number, path, images_dir)
               for number, line in enumerate(_read_utf8(path).splitlines(), start=1) if line.strip()]
    if not samples:
        raise CalibrationDataError(f"{path} holds no samples.", "Add one JSON object per line with 'image' and 'question'.")
    _check_unique_ids(samples, path)
    return CalibrationSet(tuple(samples), f"{path.name} ({len(samples)} samples, images from {images_dir})")


def _read_utf8(path: Path) -> str:
    """The file as text; JSONL is UTF-8 (a leading BOM, as some editors write, is dropped). A decode error
    names the line, which the byte offset UnicodeDecodeError reports does not."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:  # e.object: the bytes after any BOM, which e.start counts in
        line = e.object.count(b"\n", 0, e.start) + 1
        raise CalibrationDataError(f"{path}:{line} is not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason}).",
                                   "Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`), "
                                   "then pass it again.") from e


def _parse_line(line: str, number: int, path: Path, images_dir: Path) -> CalibrationSample:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as e:
        raise CalibrationDataError(f"{where} is not valid JSON ({e}).", "Write one JSON object per line.") from e
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise CalibrationDataError(f"{where} has no 'image' field.",
                                   'Each line needs "image" (a path) and "question" (or "prompt"), '
                                   'e.g. {"image": "cat.png", "question": "What animal is this?"}.')
    question, prompt = record.get("question"), record.get("prompt")
    if not isinstance(question, str) and not isinstance(prompt, str):
        raise CalibrationDataError(f"{where} has no 'question' (or 'prompt') text.",
                                   'Add "question": "..." to the line, or "prompt" with exactly one <image>.')
    return CalibrationSample(
        sample_id=str(record.get("id", f"{path.stem}:{number}")),
        image=images_dir / record["image"],
        question=question if isinstance(question, str) else None,
        prompt=prompt if isinstance(prompt, str) else None,
    )


def _check_unique_ids(samples: list[CalibrationSample], path: Path) -> None:
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise CalibrationDataError(f"{path}: sample id {sample.sample_id!r} appears twice.",
                                       "Give every line a unique 'id', or drop the 'id' fields.")
        seen.add(sample.sample_id)


def select_samples(dataset: CalibrationSet, count: int | None, seed: int) -> CalibrationSet:
    """A seeded subset of `count` samples (in file order), or the whole set when count is None or larger."""
    if count is None or count >= len(dataset.samples):
        return dataset
    chosen = sorted(random.Random(seed).sample(range(len(dataset.samples)), count))
    samples = tuple(dataset.samples[i] for i in chosen)
    return replace(dataset, samples=samples, description=f"{dataset.description}; {count} drawn with seed {seed}")


# --- the embedded default set -------------------------------------------------------------------------------

# (name, loader attribute in skimage.data, index into a tuple result or None)
_PHOTOS = [
    ("astronaut", "astronaut", None), ("brick", "brick", None), ("camera", "camera", None),
    ("cat", "cat", None), ("cell", "cell", None), ("clock", "clock", None), ("coffee", "coffee", None),
    ("coins", "coins", None), ("colorwheel", "colorwheel", None), ("grass", "grass", None),
    ("gravel", "gravel", None), ("horse", "horse", None), ("hubble_deep_field", "hubble_deep_field", None),
    ("immunohistochemistry", "immunohistochemistry", None), ("logo", "logo", None),
    ("microaneurysms", "microaneurysms", None), ("moon", "moon", None), ("page", "page", None),
    ("retina", "retina", None), ("rocket", "rocket", None), ("text", "text", None),
    ("motorcycle_left", "stereo_motorcycle", 0), ("motorcycle_right", "stereo_motorcycle", 1),
    ("face_a", "lfw_subset", 0), ("face_b", "lfw_subset", 100),
]
_QUESTIONS = [
    "What is shown in this image?",
    "Describe the picture in detail.",
    "What is the main object in the center of the image?",
    "What colors are visible in this photo?",
    "Is there any text in the image? What does it say?",
    "How many objects can you see?",
    "Where might this photo have been taken?",
    "What is the texture of the largest surface?",
]
DEFAULT_SAMPLE_COUNT = 64


def default_calibration_set() -> CalibrationSet:
    """The embedded set: 25 scikit-image photographs, 64 samples of generic questions (built once, cached)."""
    folder = cache_root() / "calibration" / f"default-v{DEFAULT_SET_VERSION}"
    if not (folder / "calibration.jsonl").exists():
        with atomic_directory(folder) as staging:
            _write_default_set(staging)
    dataset = read_calibration_jsonl(folder / "calibration.jsonl", folder / "images")
    return replace(dataset, description=f"embedded default v{DEFAULT_SET_VERSION}: scikit-image photographs, "
                                        f"{len(dataset.samples)} samples")


def _write_default_set(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    for name, loader, index in _PHOTOS:
        _photo_as_rgb(loader, index).save(folder / "images" / f"{name}.png")
    lines = []
    for i in range(DEFAULT_SAMPLE_COUNT):
        name = _PHOTOS[i % len(_PHOTOS)][0]
        question = _QUESTIONS[(i * 3 + i // len(_PHOTOS)) % len(_QUESTIONS)]
        lines.append(json.dumps({"id": f"default-{i:03d}", "image": f"{name}.png", "question": question}))
    (folder / "calibration.jsonl").write_text("\n".join(lines) + "\n")


def _photo_as_rgb(loader: str, index: int | None):
    import numpy as np
    import skimage.data
    from PIL import Image

    array = getattr(skimage.data, loader)()
    if index is not None:
        array = array[index]
    array = np.asarray(array, dtype=np.float64) if np.asarray(array).dtype != np.uint8 else np.asarray(array)
    if array.dtype != np.uint8:  # boolean masks and float images: stretch to 0..255
        array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-12)).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert("RGB")


SHAPES_VQA_CALIBRATION_COUNT = 64


def shapes_vqa_calibration_set(count: int = SHAPES_VQA_CALIBRATION_COUNT) -> CalibrationSet:
    """The shapes-vqa calibration split (disjoint from training and test), written once as JSONL + PNGs."""
    from visprune.tasks.shapes_vqa import TASK_VERSION, make_split

    folder = cache_root() / "calibration" / f"shapes-vqa-v{TASK_VERSION}-{count}"
    if not (folder / "calibration.jsonl").exists():
        with atomic_directory(folder) as staging:
            (staging / "images").mkdir()
            lines = []
            for sample in make_split("calibration", count):
                sample.image().save(staging / "images" / f"{sample.id}.png")
                lines.append(json.dumps({"id": sample.id, "image": f"{sample.id}.png", "question": sample.question}))
            (staging / "calibration.jsonl").write_text("\n".join(lines) + "\n")
    dataset = read_calibration_jsonl(folder / "calibration.jsonl", folder / "images")
    return replace(dataset, description=f"shapes-vqa v{TASK_VERSION} calibration split, {count} samples")


def default_set_for(model: str) -> CalibrationSet:
    """The calibration set a model is calibrated on by default: its own task's split for tiny-vqa."""
    return shapes_vqa_calibration_set() if model == "tiny-vqa" else default_calibration_set()
