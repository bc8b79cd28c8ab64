"""Calibration-set files and the embedded default set."""

import json

import pytest

from calibrate.data import read_calibration_jsonl, select_samples
from visprune.errors import CalibrationDataError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_default_set_has_real_photographs_and_64_samples(default_set):
    assert len(default_set.samples) == 64
    images = {s.image for s in default_set.samples}
    assert len(images) == 25 and all(p.suffix == ".png" and p.is_file() for p in images)
    assert default_set.content_hash() == default_set.content_hash()


def test_relative_images_resolve_against_the_images_folder(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"image": "a.png", "question": "q?"},
                                                {"id": "x", "image": "/abs/b.png", "prompt": "USER: <image>\nq"}])
    dataset = read_calibration_jsonl(path, tmp_path / "imgs")
    assert dataset.samples[0].image == tmp_path / "imgs" / "a.png"
    assert str(dataset.samples[1].image) == "/abs/b.png" and dataset.samples[1].sample_id == "x"
    assert dataset.samples[1].prompt.startswith("USER:") and dataset.samples[1].question is None


@pytest.mark.parametrize("line, fragment", [
    ('{"question": "what?"}', "set.jsonl:2 has no 'image'"),
    ('{"image": "a.png"}', "set.jsonl:2 has no 'question'"),
    ("{broken", "set.jsonl:2 is not valid JSON"),
    ('{"id": "dup", "image": "a.png", "question": "q"}', "appears twice"),
])
def test_malformed_lines_are_reported_with_their_line_number(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "set.jsonl", ['{"id": "dup", "image": "a.png", "question": "q"}', line])
    with pytest.raises(CalibrationDataError, match=fragment) as info:
        read_calibration_jsonl(path)
    assert "Hint:" in str(info.value)


def test_seeded_subsets_are_deterministic(default_set):
    a, b = select_samples(default_set, 8, seed=1), select_samples(default_set, 8, seed=1)
    assert a.samples == b.samples and len(a.samples) == 8
    assert select_samples(default_set, 8, seed=2).samples != a.samples
    assert select_samples(default_set, 1000, seed=0) is default_set
