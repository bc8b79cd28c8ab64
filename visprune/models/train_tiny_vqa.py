"""Train `tiny-vqa`: the `tiny` architecture trained on shapes-vqa, reproducibly, on two CPU cores.

    python -m visprune.models.train_tiny_vqa --out /tmp/tiny-vqa     # ~45 min on 2 cores; ends comparing hashes

Every parameter starts from a seeded init (`tiny`'s, with unit query/key gain) and is trained with AdamW on fixed
streams of training samples, warm-up then cosine decay, in two stages:

1. **Vision** (`--vision-steps`): the vision tower alone, with linear probes on the patch features the projector
   consumes, learns what each patch shows (`patch_labels`: colour, shape, side, colour-and-shape, object centre).
   Answers give a few labels per image; this gives hundreds, for a fifth of the cost of a full step. Trained from
   scratch on answers alone, the tower never told shapes apart (the first weights stayed at chance on shape
   questions).
2. **Answers** (`--steps`): the whole model on questions, the probe loss kept on at `--probe-weight`. Each image
   carries up to `--turns` of its scene's questions as chat turns after the first, so one encoded image supervises
   several answers; the first turn is exactly the single-question format the model is evaluated with. Until the
   last `--full-steps`, the language model sees only `--keep-visual` of the 576 visual tokens (every patch that
   shows an object, then random background) at their original positions: its cost is mostly visual tokens, and
   this makes a step ~2x cheaper. The last steps see all 576, as at inference.

The loss covers only answers and their end of sequence. Nothing draws from a global random stream after the
seeded init, so validation runs (`--eval-every`) do not change the weights. The result is written with
`save_pretrained` (weights as safetensors) together with `training.json`: settings, training wall time (without
validation), the machine, the vision stage's probe accuracy and held-out accuracy on the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from visprune.models.inputs import chat_prompt, expanded_prompt_ids, normalized_pixels
from visprune.tasks.shapes_vqa import accuracy_by_type, make_sample, make_split, patch_labels, scene_questions

SEED = 20261121
NUM_VISUAL = 576
VISION_OFFSET = 100_000_000  # stage-1 samples: still the train split, apart from stage 2's


def pixel_batch(images, processor) -> torch.Tensor:
    return torch.from_numpy(normalized_pixels(images, processor.image_processor))


def text_batch(samples, processor, turns: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels [B, T], right-padded; labels only on answers and their </s>.

    With `turns` > 1, up to that many of the scene's questions follow as further chat turns: the image is encoded
    once and supervises several answers, while the first turn is exactly the single-question format the model is
    evaluated and deployed with.
    """
    tokenizer = processor.tokenizer
    rows, labels = [], []
    for sample in samples:
        pairs = scene_questions(sample, turns) if turns > 1 else [(sample.question, sample.answer)]
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


class PatchProbe(torch.nn.Module):
    """Linear heads reading `patch_labels` from each patch's vision feature (the layer the projector consumes); a
    training aid only, never saved. "object" makes colour-and-shape conjunctions readable in one look, "centre"
    marks one patch per object so objects can be counted regardless of their size."""

    CLASSES = {"colour": 6, "shape": 4, "side": 3, "object": 16, "centre": 6}
    LABELLED_WEIGHT = {"colour": 5.0, "shape": 5.0, "side": 5.0, "object": 5.0, "centre": 50.0}

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in self.CLASSES.items()})

    def loss(self, features: torch.Tensor, labels: list[dict[str, np.ndarray]]) -> torch.Tensor:
        """Cross-entropy against each image's `patch_labels`; labelled patches weigh more (background is ~95 % of
        patches)."""
        total = features.new_zeros(())
        for name, head in self.heads.items():
            target = torch.from_numpy(np.stack([lab[name].reshape(-1) for lab in labels]))
            weight = 1.0 + (self.LABELLED_WEIGHT[name] - 1.0) * (target > 0)
            ce = torch.nn.functional.cross_entropy(head(features).flatten(0, 1), target.reshape(-1), reduction="none")
            total = total + (ce * weight.reshape(-1)).sum() / weight.sum()
        return total


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, N, D] patch features at LLaVA's feature layer (-2, CLS dropped): what the projector sees."""
    return model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]


def visual_keep_mask(labels: list[dict[str, np.ndarray]], keep: int, generator: torch.Generator) -> torch.Tensor:
    """[B, N] bool: every patch that shows an object (per `patch_labels`), then random background patches up to
    `keep` per image."""
    rows = []
    for image_labels in labels:
        shows = torch.from_numpy(image_labels["colour"].reshape(-1) > 0)
        priority = torch.rand(NUM_VISUAL, generator=generator) + shows.float()  # objects first
        row = torch.zeros(NUM_VISUAL, dtype=torch.bool)
        row[priority.topk(keep).indices] = True
        rows.append(row)
    return torch.stack(rows)


def thinned_answer_loss(model, ids, mask, labels, pixel_values, keep: torch.Tensor) -> torch.Tensor:
    """The answer loss with only the kept visual tokens in the language model, at their original positions.

    Training-time speed-up: the language model's cost is mostly its 576 visual tokens, yet the answers depend on
    the few that show objects; dropping most background patches makes a step ~2x cheaper. ids/mask/labels
    [B, S], pixel_values [B, 3, H, W], keep [B, N] with the same K per row."""
    inner, config = model.model, model.config
    embeds = inner.get_input_embeddings()(ids)  # [B, S, D]
    features = inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                        vision_feature_select_strategy=config.vision_feature_select_strategy)
    image = ids == config.image_token_id  # [B, S], N per row, in patch order
    embeds = embeds.masked_scatter(image.unsqueeze(-1), torch.stack(list(features.pooler_output)))
    kept = ~image
    kept[image] = keep.reshape(-1)
    index = kept.nonzero()[:, 1].view(ids.shape[0], -1)  # [B, S - N + K]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    hidden = inner.language_model(inputs_embeds=embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])),
                                  attention_mask=mask.gather(1, index), position_ids=positions.gather(1, index))
    logits = model.lm_head(hidden.last_hidden_state)
    target = labels.gather(1, index)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].reshape(-1), ignore_index=-100)


def train(out: Path, steps: int, batch_size: int, lr: float, eval_samples: int, eval_every: int = 0,
          vision_steps: int = 0, probe_weight: float = 0.5, turns: int = 16, full_steps: int = 0,
          keep_visual: int = NUM_VISUAL, init: Path | None = None, step_offset: int = 0) -> dict:
    from transformers import LlavaForConditionalGeneration

    from visprune.models.tiny import _build_config, _build_processor

    torch.manual_seed(SEED)
    processor = _build_processor()
    # SDPA trains 3x faster than eager attention on CPU and computes the same function; visprune loads the
    # result with eager attention like every checkpoint.
    model = LlavaForConditionalGeneration._from_config(_build_config(processor.tokenizer), attn_implementation="sdpa")
    training_init_(model, SEED)
    if init is not None:  # continue from a trained checkpoint (its weights; the probes start afresh)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(Path(init) / "model.safetensors"))
    probe = PatchProbe(model.config.vision_config.hidden_size)
    start, log = time.perf_counter(), []
    model.train()
    vision_probe = _train_vision(model, probe, processor, vision_steps, batch_size * 2, lr) if vision_steps else {}
    features = {}
    hook = model.model.vision_tower.encoder.layers[-2].register_forward_hook(
        lambda module, args, output: features.__setitem__("x", output[0] if isinstance(output, tuple) else output))
    parameters = [*model.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = _warmup_cosine(optimizer, steps)
    for step in range(steps):
        samples = [make_sample("train", (step_offset + step) * batch_size + i) for i in range(batch_size)]
        ids, mask, labels = text_batch(samples, processor, turns)
        pixels, shown = pixel_batch([s.image() for s in samples], processor), [patch_labels(s) for s in samples]
        if step < steps - full_steps and keep_visual < NUM_VISUAL:
            keep = visual_keep_mask(shown, keep_visual, torch.Generator().manual_seed(SEED + step))
            answer_loss = thinned_answer_loss(model, ids, mask, labels, pixels, keep)
        else:
            answer_loss = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels).loss
        probe_loss = probe.loss(features["x"][:, 1:], shown) if probe_weight else answer_loss.new_zeros(())
        _step(optimizer, schedule, parameters, answer_loss + probe_weight * probe_loss)
        log.append(answer_loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {np.mean(log[-25:]):.4f}  probe {float(probe_loss):.3f}  "
                  f"{time.perf_counter() - start:7.1f} s", flush=True)
        if eval_every and step and step % eval_every == 0:
            paused = time.perf_counter()
            model.eval()
            print(f"step {step:5d}  validation {evaluate(model, processor, make_split('calibration', 160))}", flush=True)
            model.train()
            start += time.perf_counter() - paused  # validation is not training time
    hook.remove()
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = evaluate(model, processor, make_split("test", eval_samples))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"seed": SEED, "init": str(init) if init else None, "step_offset": step_offset, "steps": steps, "vision_steps": vision_steps, "probe_weight": probe_weight, "turns": turns,
              "keep_visual": keep_visual, "full_steps": full_steps,
              "vision_stage_patch_accuracy": vision_probe, "cpu_count": os.cpu_count(),
              "batch_size": batch_size, "lr": lr, "train_seconds": round(seconds, 1),
              "final_loss": float(np.mean(log[-25:])), "test_accuracy": accuracy, "machine": platform.machine(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    (Path(out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _train_vision(model, probe: PatchProbe, processor, steps: int, batch_size: int, lr: float) -> dict[str, float]:
    """Stage 1: the vision tower alone learns to tell colour, shape and side per patch (5x cheaper per image than
    a full step, since the language model is skipped)."""
    parameters = [*model.model.vision_tower.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = _warmup_cosine(optimizer, steps)
    start, log = time.perf_counter(), []
    for step in range(steps):
        samples = [make_sample("train", VISION_OFFSET + step * batch_size + i) for i in range(batch_size)]
        features = vision_features(model, pixel_batch([s.image() for s in samples], processor))
        loss = probe.loss(features, [patch_labels(s) for s in samples])
        _step(optimizer, schedule, parameters, loss)
        log.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"vision step {step:5d}  probe loss {np.mean(log[-50:]):.4f}  {time.perf_counter() - start:7.1f} s",
                  flush=True)
    accuracy = probe_accuracy(model, probe, processor)
    print(f"vision stage: labelled-patch accuracy {accuracy}", flush=True)
    return accuracy


@torch.no_grad()
def probe_accuracy(model, probe: PatchProbe, processor, count: int = 64) -> dict[str, float]:
    """Per head, the share of object patches (calibration split) whose label the probe gets right."""
    samples = make_split("calibration", count)
    features = vision_features(model, pixel_batch([s.image() for s in samples], processor))
    labels, result = [patch_labels(s) for s in samples], {}
    for name, head in probe.heads.items():
        target = torch.from_numpy(np.stack([lab[name].reshape(-1) for lab in labels]))
        hit = (head(features).argmax(-1) == target)[target > 0]
        result[name] = round(float(hit.float().mean()), 3)
    return result


def _warmup_cosine(optimizer, steps: int):
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _step(optimizer, schedule, parameters, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()


@torch.no_grad()
def training_init_(model: torch.nn.Module, seed: int) -> None:
    """Seeded init as `tiny`'s, but with unit gain on query/key projections: tiny's peaked attention (gain 2)
    saturates softmax and slows learning from scratch."""
    from visprune.models.tiny import seeded_weight_noise

    for _, param, noise, fan_in in seeded_weight_noise(model, seed):
        param.copy_(noise / math.sqrt(fan_in))


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
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--vision-steps", type=int, default=800, help="stage-1 steps for the vision tower alone")
    parser.add_argument("--probe-weight", type=float, default=0.5, help="weight of the patch-label loss in stage 2")
    parser.add_argument("--turns", type=int, default=12, help="questions asked per training image, at most")
    parser.add_argument("--keep-visual", type=int, default=NUM_VISUAL,
                        help="visual tokens the language model sees per image, before the last --full-steps "
                             "(v1 used 192: objects first, then random background, which favours random pruning)")
    parser.add_argument("--full-steps", type=int, default=0, help="final steps with all 576 visual tokens")
    parser.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0: never)")
    parser.add_argument("--init", type=Path, help="continue from this checkpoint folder's weights (no vision stage)")
    parser.add_argument("--step-offset", type=int, default=0,
                        help="skip this many steps' worth of training samples (fresh ones for a continuation)")
    args = parser.parse_args()
    print(json.dumps(train(args.out, args.steps, args.batch_size, args.lr, args.eval_samples, args.eval_every,
                                 args.vision_steps, args.probe_weight, args.turns,
                                 args.full_steps, args.keep_visual, args.init, args.step_offset), indent=2))
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
