"""Local lmms-eval tasks: shapes-vqa's held-out test questions, written where lmms-eval can read them offline.

`write_shapes_vqa_task(folder, questions)` writes, deterministically (the same questions give the same bytes):

    folder/shapes_vqa.yaml   includes reports/lmms/shapes_vqa/shapes_vqa.yaml (scoring, prompts, generation)
    folder/test.jsonl        one line per question: id, index, question, answer, question_type, image
    folder/images/*.png      each question's scene

so `lmms-eval --include_path folder --tasks shapes_vqa` evaluates test questions 0 to questions - 1, the ones
`visprune eval --questions N` answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from visprune.artifacts import atomic_write_bytes
from visprune.errors import ConfigError
from visprune.tasks.shapes_vqa import TASK_VERSION, make_split

TASK_TEMPLATE = Path(__file__).parent / "shapes_vqa" / "shapes_vqa.yaml"
TASK_NAME = "shapes_vqa"


def write_shapes_vqa_task(folder: Path, questions: int = 500) -> Path:
    """Write the task folder for the first `questions` test questions; returns it (pass it as include_path).
    Images already written for the same question are kept: a scene is a function of its split and index."""
    if questions < 1:
        raise ConfigError(f"The shapes_vqa task needs at least one question, got {questions}.",
                          "Ask for e.g. 500 questions (visprune eval's default).")
    folder = Path(folder).resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in make_split("test", questions):
        image = folder / "images" / f"{sample.id}.png"
        if not image.exists():
            sample.image().save(image.with_suffix(".tmp"), format="PNG")
            image.with_suffix(".tmp").replace(image)
        lines.append(json.dumps({"id": sample.id, "index": sample.index, "question": sample.question,
                                 "answer": sample.answer, "question_type": sample.question_type,
                                 "image": str(image), "task_version": TASK_VERSION}))
    atomic_write_bytes(folder / "test.jsonl", ("\n".join(lines) + "\n").encode())
    # data_files resolve against this file's folder; everything else comes from the committed task
    task = f"include: {TASK_TEMPLATE}\ndataset_kwargs:\n  data_files:\n    test: test.jsonl\n"
    atomic_write_bytes(folder / f"{TASK_NAME}.yaml", task.encode())
    return folder
