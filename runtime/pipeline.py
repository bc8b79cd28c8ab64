"""`Pipeline`: image + prompt -> text over an engine folder of any backend (runtime/runners.py).

Flow: the checkpoint's own processor tokenizes the prompt (its `<image>` expanded) and preprocesses the image;
the vision graph gives image features; token embeddings come from the saved matrix, with the features spliced in
at the image's position; prefill prunes as the recipe says and returns the first logits and per-layer KV; decode
then runs one token at a time at logical positions continuing from the unpruned length. Over ONNX Runtime the
whole path is NumPy and ONNX Runtime: no PyTorch is imported.

Shape legend: B batch (1 here), S prompt length, N visual tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engines.build import read_engine_set
from engines.profiles import check_request_fits
from runtime.generation import GREEDY, Sampling, iterate_tokens
from runtime.runners import Runner, open_runner
from visprune.errors import ConfigError, PromptError
from visprune.manifests import EngineManifest
from visprune.models.inputs import IMAGE_PLACEHOLDER, check_single_image_placeholder, image_span, load_image


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Prefill always yields one token, so a request for none (or fewer) is a mistake, not an empty answer."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.",
                          "Ask for at least one token, e.g. --max-new-tokens 32.")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    timings: dict[str, float]  # vision_s, prefill_s, ttft_s, decode_s_per_token, decode_tokens, prompt_tokens, kv_bytes
    kept_indices: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept image indices
    step_logits: list[np.ndarray] = field(default_factory=list)  # [V] per generated token


class Pipeline:
    """Loads an engine folder once; `generate` runs one image and prompt (batch 1)."""

    def __init__(self, engine_dir: Path, manifest: EngineManifest, runner: Runner, embeddings: np.ndarray,
                 processor: Any):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.runner = runner
        self.embeddings = embeddings  # [V, D]
        self.processor = processor
        prompt = manifest.onnx_set.prompt
        self.image_start, self.num_visual = prompt.image_start, prompt.num_visual_tokens
        self.max_seq, self.eos_token_id = prompt.max_seq, prompt.eos_token_id
        self.image_token_id = prompt.image_token_id
        # numpy has no bfloat16: such sets take float32 on the host and the backend casts
        self.host_dtype = np.float16 if manifest.onnx_set.dtype == "float16" else np.float32

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, verify: bool = False) -> "Pipeline":
        """Load an engine folder after checking its manifest and files (`verify`: re-hash every file)."""
        from transformers import AutoProcessor

        engine_dir = Path(engine_dir)
        manifest = read_engine_set(engine_dir, verify)
        runner = open_runner(engine_dir, manifest)
        embeddings = np.load(engine_dir / "embed_tokens.npy")
        processor = AutoProcessor.from_pretrained(engine_dir / "processor")
        return cls(engine_dir, manifest, runner, embeddings, processor)

    def with_runner(self, runner: Runner) -> "Pipeline":
        """The same prompt handling over another runner (e.g. the PyTorch reference of this engine)."""
        return Pipeline(self.engine_dir, self.manifest, runner, self.embeddings, self.processor)

    def chat_prompt(self, question: str) -> str:
        from visprune.models.inputs import chat_prompt

        return chat_prompt(self.processor, question)

    def encode(self, image: Any, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """input_ids [1, S] and pixel_values [1, 3, H, W] for one image and a prompt with one `<image>`."""
        check_single_image_placeholder(prompt)
        if isinstance(image, (str, Path)):
            image = load_image(Path(image))
        batch = self.processor(images=image, text=prompt, return_tensors="np")
        input_ids = batch["input_ids"].astype(np.int64)
        start, count = image_span(input_ids[0], self.image_token_id)
        if start != self.image_start or count != self.num_visual:
            raise PromptError(
                f"The prompt puts the image at token {start} ({count} tokens); this engine was exported for "
                f"token {self.image_start} ({self.num_visual} tokens).",
                f"Keep the text before {IMAGE_PLACEHOLDER} as the chat template writes it (use a plain question).")
        return input_ids, batch["pixel_values"].astype(self.host_dtype)

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ConfigError for fewer than one new token; PromptError if the request does not fit the export's max_seq
        or the engine's built shapes."""
        check_max_new_tokens(max_new_tokens)
        if prompt_tokens + max_new_tokens > self.max_seq:
            raise PromptError(f"The prompt has {prompt_tokens} tokens; with {max_new_tokens} new tokens that "
                              f"exceeds the {self.max_seq} this engine allows.",
                              "Shorten the prompt, lower --max-new-tokens, or export with a larger --max-seq.")
        if self.manifest.limits:  # TensorRT: the optimization profiles' ranges
            check_request_fits(self.manifest.limits, prompt_tokens, max_new_tokens, self.engine_dir)

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 32, keep_logits: bool = False,
                 forced_tokens: list[int] | None = None, sampling: Sampling = GREEDY,
                 stop: tuple[str, ...] = ()) -> Generation:
        """Decode from `prompt` (a full prompt with one `<image>`) about `image` (a path or PIL image): greedy by
        default, else as `sampling` says; the text ends before the first of the `stop` strings.

        `forced_tokens` teacher-forces: each step feeds the given token instead of its own choice (parity checks
        compare the logits of two models fed the same tokens), and generation runs exactly that many steps."""
        input_ids, first, timings = self._prefill(image, prompt, len(forced_tokens or []) or max_new_tokens)
        tokens, step_logits, seconds = [], [], []
        for token, logits, spent in self._tokens(first, input_ids.shape[1], max_new_tokens, sampling, forced_tokens):
            tokens.append(int(token[0]))
            step_logits.append(logits[0])
            seconds += [] if spent is None else [spent]
            if stop and stop_index(self._text(tokens), stop) is not None:
                break
        timings["decode_s_per_token"] = float(np.mean(seconds)) if seconds else 0.0
        timings["decode_tokens"] = len(seconds)
        text = self._text(tokens)
        return Generation(text=text[:stop_index(text, stop)], token_ids=tokens, timings=timings,
                          kept_indices=first.kept, step_logits=step_logits if keep_logits else [])

    def stream(self, image: Any, prompt: str, max_new_tokens: int = 32, sampling: Sampling = GREEDY,
               stop: tuple[str, ...] = ()) -> Iterator[str]:
        """`generate`'s text in pieces as tokens are decoded; text that could begin a stop string is held back
        until it cannot."""
        input_ids, first, _ = self._prefill(image, prompt, max_new_tokens)
        tokens, sent = [], 0
        for token, _, _ in self._tokens(first, input_ids.shape[1], max_new_tokens, sampling):
            tokens.append(int(token[0]))
            text = self._text(tokens)
            end = stop_index(text, stop)
            ready = end if end is not None else len(text) - held_back(text, stop)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
            if end is not None:
                return
        text = self._text(tokens)
        if len(text) > sent:
            yield text[sent:]

    def _prefill(self, image: Any, prompt: str, max_new_tokens: int):
        """(input_ids [1, S], the prefill's output, timings so far): encode, vision, embed, prefill."""
        check_max_new_tokens(max_new_tokens)  # before the image is read and encoded
        input_ids, pixel_values = self.encode(image, prompt)
        self.check_request(input_ids.shape[1], max_new_tokens)
        timings: dict[str, float] = {"prompt_tokens": input_ids.shape[1]}
        start = time.perf_counter()
        vision = self.runner.image_features(pixel_values)
        timings["vision_s"] = time.perf_counter() - start
        prefill_start = time.perf_counter()
        first = self.runner.prefill(self.embed(input_ids, vision.features), vision.scores)
        timings["prefill_s"] = time.perf_counter() - prefill_start
        timings["ttft_s"] = time.perf_counter() - start
        timings["kv_bytes"] = self.runner.kv_bytes(first.past)
        return input_ids, first, timings

    def _tokens(self, first, prompt_len: int, max_new_tokens: int, sampling: Sampling = GREEDY,
                forced: list[int] | None = None):
        """runtime/generation.py's loop over this engine's decode graph, from a prefill's output."""
        return iterate_tokens(first.logits, EngineStep(self, first.past, prompt_len), max_new_tokens,
                              None if forced else self.eos_token_id, sampling, forced)

    def _text(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        """inputs_embeds [1, S, D]: token embeddings with the image features at the image's position."""
        embeds = self.embeddings[input_ids].astype(self.host_dtype)
        embeds[:, self.image_start:self.image_start + self.num_visual] = image_features
        return embeds


class EngineStep:
    """runtime/generation.py's `Step` over an engine's decode graph: tokens [B] go in at positions
    prompt_len + step; `past` is the cache after the latest step."""

    def __init__(self, pipe: Pipeline, past: Any, prompt_len: int):
        self.pipe, self.past, self.prompt_len = pipe, past, prompt_len

    def __call__(self, tokens: np.ndarray, index: int) -> np.ndarray:
        embeds = self.pipe.embeddings[tokens[:, None]].astype(self.pipe.host_dtype)
        logits, self.past = self.pipe.runner.decode(embeds, self.prompt_len + index, self.past)
        return logits


def stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in `text` (None: none occurs)."""
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
