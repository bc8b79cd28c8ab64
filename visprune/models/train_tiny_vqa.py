"""Train `tiny-vqa`: the `tiny` architecture trained on shapes-vqa, reproducibly, on two CPU cores.

    python -m visprune.models.train_tiny_vqa --out /tmp/tiny-vqa     # ~45 min on 2 cores; ends comparing hashes

Every parameter (vision tower, projector, language model) starts from the seeded init `tiny` uses and is trained
with AdamW on a fixed stream of training samples (warm-up then cosine decay). Each training image carries every
question its scene can pose, as chat turns after the first (the encoded image is the expensive part, so this gives
several answers per image for ~15 % more compute); the loss covers only answers and their end of sequence, and
nothing in training draws random numbers beyond the seeded init, so validation runs do not change the weights. The result is written with `save_pretrained` (weights as safetensors) together
with `training.json`: the settings, wall time, the machine, and held-out accuracy on the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from visprune.models.inputs import chat_prompt, expanded_prompt_ids, normalized_pixels
from visprune.tasks.shapes_vqa import accuracy_by_type, make_sample, make_split, scene_questions

SEED = 20261121
NUM_VISUAL = 576


def pixel_batch(images, processor) -> torch.Tensor:
    return torch.from_numpy(normalized_pixels(images, processor.image_processor))


def text_batch(samples, processor, all_questions: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels [B, T], right-padded; labels only on answers and their </s>.

    With `all_questions`, every question the scene can pose follows as a further chat turn: the image is encoded
    once and supervises several answers, while the first turn is exactly the single-question format the model is
    evaluated and deployed with.
    """
    tokenizer = processor.tokenizer
    rows, labels = [], []
    for sample in samples:
        pairs = scene_questions(sample) if all_questions else [(sample.question, sample.answer)]
        ids, target = [], []
        for turn, (question, answer) in enumerate(pairs):
            prompt_ids = (expanded_prompt_ids(processor, chat_prompt(processor, question), NUM_VISUAL) if turn == 0
                          else tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"])
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids += prompt_ids + answer_ids
            target += [-100] * len(prompt_ids) + answer_ids
        rows.append(ids)
        labels.append(target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return ids, mask, target


def train(out: Path, steps: int, batch_size: int, lr: float, eval_samples: int, eval_every: int = 0) -> dict:
    from transformers import LlavaForConditionalGeneration

    from visprune.models.tiny import _build_config, _build_processor, _seeded_init_

    torch.manual_seed(SEED)
    processor = _build_processor()
    # SDPA trains 3x faster than eager attention on CPU and computes the same function; visprune loads the
    # result with eager attention like every checkpoint.
    model = LlavaForConditionalGeneration._from_config(_build_config(processor.tokenizer), attn_implementation="sdpa")
    _seeded_init_(model, SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, log = time.perf_counter(), []
    model.train()
    for step in range(steps):
        samples = [make_sample("train", step * batch_size + i) for i in range(batch_size)]
        ids, mask, labels = text_batch(samples, processor, all_questions=True)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_batch([s.image() for s in samples], processor),
                     labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.append(float(loss))
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {np.mean(log[-25:]):.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
        if eval_every and step and step % eval_every == 0:
            model.eval()
            print(f"step {step:5d}  validation {evaluate(model, processor, make_split('calibration', 160))}", flush=True)
            model.train()
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = evaluate(model, processor, make_split("test", eval_samples))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"seed": SEED, "steps": steps, "batch_size": batch_size, "lr": lr, "train_seconds": round(seconds, 1),
              "final_loss": float(np.mean(log[-25:])), "test_accuracy": accuracy, "machine": platform.processor(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    (Path(out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def evaluate(model, processor, samples, batch_size: int = 32) -> dict:
    """Teacher-forced exact match: an answer counts when every answer token and the </s> after it are the argmax,
    which is exactly when greedy decoding produces the answer and stops."""
    answers = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ids, mask, labels = text_batch(chunk, processor)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_batch([s.image() for s in chunk], processor)).logits
        predicted = logits[:, :-1].argmax(-1)  # predicts position t + 1
        for row, sample in enumerate(chunk):
            target = labels[row, 1:]
            hit = bool((predicted[row][target != -100] == target[target != -100]).all())
            answers.append(sample.answer if hit else "<wrong>")
    return accuracy_by_type(samples, answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0: never)")
    args = parser.parse_args()
    print(json.dumps(train(args.out, args.steps, args.batch_size, args.lr, args.eval_samples, args.eval_every), indent=2))
    print(reproduction_verdict(args.out / "model.safetensors"))


def reproduction_verdict(weights: Path) -> str:
    """Whether a fresh training run gave the committed weights byte for byte."""
    from visprune.artifacts import sha256_file
    from visprune.models.tiny_vqa import tiny_vqa_record

    ours, committed = sha256_file(weights), tiny_vqa_record()["sha256"]
    if ours == committed:
        return f"reproduced: {weights} equals the committed weights ({committed})"
    return (f"not byte-identical: {ours} vs committed {committed}. CPU kernels and thread counts can change the "
            "last bits; compare test_accuracy above with visprune/models/weights/tiny-vqa.json.")


if __name__ == "__main__":
    main()
