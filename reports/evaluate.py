"""`evaluate`: shapes-vqa accuracy of a (pruned) model, through an engine folder or a recipe.

- An engine folder runs through the real runtime (`Pipeline`, whatever its backend), one question at a time,
  greedy, exactly as `visprune run` answers.
- A recipe runs through the PyTorch reference: the same modules the exporter traces (exporter/pruned_lm.py),
  batched by prompt length, greedy for every row until all rows have ended.

An answer is right when its first word (lower case, punctuation dropped) is the expected word.

Shape legend: B batch, S prompt length, N visual tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.generation import run_tokens
from visprune.artifacts import atomic_write_bytes
from visprune.errors import ConfigError
from visprune.manifests.common import model_dump, write_model
from visprune.manifests.reports import EVAL_SCHEMA, Accuracy, EvalReport
from visprune.models.llava import DEFAULT_MODEL, model_folder
from visprune.outputs import EVAL, check_output, replacing
from visprune.tasks.shapes_vqa import ShapesSample, accuracy_by_type, make_split

if TYPE_CHECKING:  # for the annotation only: the functions import it when called, as before
    from runtime.pipeline import Pipeline


@dataclass(frozen=True)
class EvalConfig:
    VERSION = 1

    questions: int = 500  # held-out shapes-vqa test questions, from index 0
    max_new_tokens: int = 8  # the longest answer is 6 tokens plus </s>
    batch_size: int = 32  # PyTorch path
    device: str = "cpu"  # PyTorch path

    def __post_init__(self) -> None:
        if self.questions < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("--questions, --max-new-tokens and --batch-size must be at least 1.",
                              "Use e.g. --questions 500.")


def answers_from_engine(engine: Path | Pipeline, samples: list[ShapesSample], max_new_tokens: int,
                        progress: bool = False, verify: bool = False) -> list[str]:
    """Greedy answers of an engine folder, or of a Pipeline already open on one (`verify` applies to a folder)."""
    from tqdm.auto import tqdm

    from runtime.pipeline import Pipeline

    pipe = engine if isinstance(engine, Pipeline) else Pipeline.from_engine_dir(engine, verify)
    return [pipe.generate(s.image(), pipe.chat_prompt(s.question), max_new_tokens).text
            for s in tqdm(samples, desc="answering (engine)", disable=not progress)]


@dataclass
class PreparedQuestions:
    """What every recipe shares for a set of questions: prompt ids and the vision tower's outputs (pruning acts
    after the vision tower), computed once so a study of many recipes runs only the language model per recipe."""

    samples: list[ShapesSample]
    input_ids: list[list[int]]  # per question [S]
    features: Any  # torch [Q, N, D]
    scores: Any  # torch [Q, N] float32: the [CLS] attention VisionZip selects with


def prepare_questions(model: str, samples: list[ShapesSample], config: EvalConfig,
                      progress: bool = False) -> PreparedQuestions:
    from runtime.torch_runner import TorchRunner

    return _prepare(TorchRunner.from_model(model, device=config.device), samples, config.batch_size, progress)


def _prepare(runner, samples: list[ShapesSample], batch_size: int, progress: bool = False) -> PreparedQuestions:
    """The vision tower of `runner`'s model (its own, unpruned) over `samples`, once, in batches."""
    import torch
    from tqdm.auto import tqdm

    from exporter.graphs import VisionFeatures
    from visprune.models.inputs import chat_prompt, expanded_prompt_ids, normalized_pixels

    processor, vision = runner.bundle.processor, VisionFeatures(runner.bundle.model, cls_scores=True).eval()
    ids = [expanded_prompt_ids(processor, chat_prompt(processor, s.question), runner.num_visual) for s in samples]
    features, scores = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(samples), batch_size), desc="vision (once)", disable=not progress):
            chunk = samples[start:start + batch_size]
            pixels = torch.from_numpy(normalized_pixels([s.image() for s in chunk], processor.image_processor))
            f, c = vision(pixels.to(runner.device, runner.dtype))
            features.append(f)
            scores.append(c)
    return PreparedQuestions(samples, ids, torch.cat(features), torch.cat(scores))


def answers_from_recipe(model: str, recipe: Any, samples: list[ShapesSample], config: EvalConfig,
                        progress: bool = False, prepared: PreparedQuestions | None = None) -> list[str]:
    """Greedy answers of the PyTorch reference pruned by `recipe` (a Recipe; None: unpruned). `prepared` (for
    these `samples`) skips the vision tower."""
    from tqdm.auto import tqdm

    from runtime.torch_runner import TorchRunner

    runner = TorchRunner.from_model(model, recipe, device=config.device)
    prepared = prepared or _prepare(runner, samples, config.batch_size)  # the same model: no second load
    answers: dict[int, str] = {}
    for indices in tqdm(_batches_by_length(prepared.input_ids, config.batch_size), desc="answering (PyTorch)",
                        disable=not progress):
        answers.update(zip(indices, _greedy_batch(runner, prepared, indices, config.max_new_tokens)))
    return [answers[i] for i in range(len(samples))]


def _batches_by_length(input_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Question indices grouped by prompt length (prefill needs one layout per batch), in chunks."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(input_ids):
        by_length[len(ids)].append(index)
    return [rows[start:start + batch_size] for length in sorted(by_length)
            for rows in [by_length[length]] for start in range(0, len(rows), batch_size)]


def _greedy_batch(runner, prepared: PreparedQuestions, indices: list[int], max_new_tokens: int) -> list[str]:
    """Greedy answers of one batch of same-length questions through the pruned PyTorch modules."""
    import torch

    tokenizer = runner.bundle.processor.tokenizer
    embed = runner.bundle.model.get_input_embeddings()
    ids = torch.tensor([prepared.input_ids[i] for i in indices], device=runner.device)  # [B, S]
    with torch.no_grad():
        embeds = embed(ids)
        embeds[:, runner.image_start:runner.image_start + runner.num_visual] = prepared.features[indices]
        logits, past, _ = runner.prefill_module(embeds, image_scores=prepared.scores[indices])
        step = ModuleStep(runner, embed, past, ids.shape[1])
        loop = run_tokens(logits.float().cpu().numpy(), step, max_new_tokens, eos=tokenizer.eos_token_id)
    return [tokenizer.decode(loop.row_tokens(row, tokenizer.eos_token_id), skip_special_tokens=True)
            for row in range(len(indices))]


class ModuleStep:
    """runtime/generation.py's `Step` over the PyTorch decode module for a batch: tokens [B] at prompt_len + step."""

    def __init__(self, runner, embed, past, prompt_len: int):
        self.runner, self.embed, self.past, self.prompt_len = runner, embed, past, prompt_len

    def __call__(self, tokens: np.ndarray, index: int) -> np.ndarray:
        import torch

        device = self.runner.device
        positions = torch.full((len(tokens), 1), self.prompt_len + index, device=device)
        token_embeds = self.embed(torch.from_numpy(tokens)[:, None].to(device))
        logits, self.past = self.runner.decode_module(token_embeds, positions, None, self.past)
        return logits.float().cpu().numpy()


def eval_report(out_dir: Path, config: EvalConfig, engine_dir: Path | None = None, recipe: Path | None = None,
                model: str | None = None, progress: bool = True, force: bool = False,
                verify: bool = False) -> EvalReport:
    """Accuracy on the first `config.questions` test questions; writes eval.json and eval.md to the folder
    `out_dir` (checked before any work, see visprune/outputs.py). A recipe must fit `model` (None: the default
    model); an engine is its own (None: the one its manifest names)."""
    from calibrate.recipe import load_recipe
    from visprune.manifests.engine_set import read_engine_set

    if (engine_dir is None) == (recipe is None):
        raise ConfigError("Evaluate either an engine (--engine) or a recipe (--recipe), not both or neither.",
                          "Pass --engine DIR for the runtime, or --recipe FILE for the PyTorch reference.")
    out_dir = Path(out_dir)
    check_output(out_dir, EVAL, inputs=[engine_dir, recipe, model_folder(model) if model else None], force=force)
    if model is None:
        model = read_engine_set(Path(engine_dir)).onnx_set.model.name if engine_dir is not None else DEFAULT_MODEL
    samples = make_split("test", config.questions)
    if engine_dir is not None:
        answers = answers_from_engine(engine_dir, samples, config.max_new_tokens, progress, verify)
        subject, path = str(engine_dir), "runtime (engine)"
    else:
        answers, subject = answers_from_recipe(model, load_recipe(recipe), samples, config, progress), str(recipe)
        path = "PyTorch reference"
    report = EvalReport(subject=subject, path=path, model=model, task="shapes-vqa test split",
                        config={"version": config.VERSION, **config.__dict__},
                        accuracy=Accuracy(**accuracy_by_type(samples, answers)),
                        examples=[{"question": s.question, "expected": s.answer, "answer": a}
                                  for s, a in list(zip(samples, answers))[:10]])
    with replacing(out_dir) as staging:
        write_model(staging / EVAL_SCHEMA.file, report)
        atomic_write_bytes(staging / "eval.md", eval_markdown(report).encode())
    return report


def eval_markdown(evaluation: EvalReport) -> str:
    report = model_dump(evaluation)
    accuracy = report["accuracy"]
    lines = [f"# shapes-vqa accuracy: {accuracy['overall']:.1%} of {accuracy['n']} questions", "",
             f"Subject `{report['subject']}` through the {report['path']}.", "",
             "| question type | accuracy | questions |", "|---|---:|---:|"]
    lines += [f"| {t} | {v['accuracy']:.1%} | {v['n']} |" for t, v in accuracy["per_type"].items()]
    lines += ["", "| question | expected | answer |", "|---|---|---|"]
    lines += [f"| {e['question']} | {e['expected']} | {e['answer']} |" for e in report["examples"]]
    return "\n".join(lines) + "\n"
