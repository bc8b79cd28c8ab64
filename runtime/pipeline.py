"""`Pipeline`: image + prompt -> text over an engine folder of any backend (runtime/runners.py), one request or
a batch of them.

Flow: the checkpoint's own processor tokenizes each prompt (its `<image>` expanded) and preprocesses its image;
the vision graph gives image features for the whole batch; token embeddings come from the saved matrix, with the
features spliced in at each row's own image offset, the rows left-padded to one length (`RowLayout`); prefill
prunes as the recipe says and returns the first logits and per-layer KV; decode then runs one token at a time
for all rows, each at logical positions continuing from its own unpruned length, until every row has met its
end (EOS, its token budget, a stop string). Over ONNX Runtime the whole path is NumPy and ONNX Runtime: no
PyTorch is imported.

Shape legend: B batch, S prompt length (padded), N visual tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engines.profiles import check_request_fits
from runtime.generation import GREEDY, Sampling, iterate_tokens
from runtime.runner_api import RowLayout, Runner, VisionOutput
from runtime.runners import open_runner
from visprune.dtypes import host_dtype
from visprune.errors import ConfigError, ImageLoadError, PromptError
from visprune.manifests.engine_set import EngineManifest, read_engine_set
from visprune.models.anyres import AnyresLayout, anyres_layout, pack_tile_features, pack_tile_scores
from visprune.models.inputs import check_single_image_placeholder, image_span, load_image


# How many times each engine folder (resolved path) has been opened in this process. An engine at 7B holds
# gigabytes of device memory, so a stage that opens one again instead of taking the open one costs that twice;
# tests count opens here to see that a pipeline run opens each engine once.
ENGINE_OPENS: Counter[str] = Counter()


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Prefill always yields one token, so a request for none (or fewer) is a mistake, not an empty answer."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.",
                          "Ask for at least one token, e.g. --max-new-tokens 32.")


@dataclass(frozen=True)
class Request:
    """One generation request. `image`: a path, a PIL image or the bytes of an encoded image (PNG, JPEG, ...);
    `prompt`: a full prompt with one `<image>` (`Pipeline.chat_prompt` makes one from a question)."""

    image: Any
    prompt: str
    max_new_tokens: int = 32
    sampling: Sampling = GREEDY
    stop: tuple[str, ...] = ()


@dataclass
class EncodedRequest:
    """A checked, tokenized request: input_ids [S], pixel_values [3, H, W], its image at `image_start`."""

    request: Request
    input_ids: np.ndarray
    pixel_values: np.ndarray  # LLaVA-NeXT: [V, 3, H, W], the base view and the crops
    image_start: int
    anyres: AnyresLayout | None = None  # LLaVA-NeXT: how the views pack into the image's N tokens

    @property
    def num_visual(self) -> int | None:
        return None if self.anyres is None else self.anyres.num_visual


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    # vision_s, prefill_s, ttft_s, decode_s_per_token, decode_tokens, kv_bytes: of the batch the request ran in
    # (batch rows, padded_tokens long); prompt_tokens: its own
    timings: dict[str, float]
    kept_indices: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept image indices
    step_logits: list[np.ndarray] = field(default_factory=list)  # [V] per generated token
    # the PyTorch reference of a score-based method only: layer -> each image index's selection score [N]
    selection_scores: dict[int, np.ndarray] | None = None


class Pipeline:
    """Loads an engine folder once; `generate` runs one image and prompt, `generate_batch` a list of requests as
    batches. Not thread-safe: one call at a time (a server serializes them)."""

    def __init__(self, engine_dir: Path, manifest: EngineManifest, runner: Runner, embeddings: np.ndarray,
                 processor: Any, image_newline: np.ndarray | None = None):
        self.engine_dir = Path(engine_dir)
        self.anyres, self.image_newline = manifest.onnx_set.anyres, image_newline  # LLaVA-NeXT: [D]
        self.manifest = manifest
        self.runner = runner
        self.embeddings = embeddings  # [V, D]
        self.processor = processor
        prompt = manifest.onnx_set.prompt
        self.image_start, self.num_visual = prompt.image_start, prompt.num_visual_tokens  # the template's offset
        self.max_seq, self.eos_token_id = prompt.max_seq, prompt.eos_token_id
        self.image_token_id = prompt.image_token_id
        self.host_dtype = host_dtype(manifest.onnx_set.dtype)  # bfloat16 sets: float32, the backend casts
        self.max_batch = manifest.limits.max_batch if manifest.limits else None  # TensorRT profiles; else any

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, verify: bool = False) -> "Pipeline":
        """Load an engine folder after checking its manifest and files (`verify`: re-hash every file)."""
        from transformers import AutoProcessor

        engine_dir = Path(engine_dir)
        manifest = read_engine_set(engine_dir, verify)
        runner = open_runner(engine_dir, manifest)
        ENGINE_OPENS[str(engine_dir.resolve())] += 1
        embeddings = np.load(engine_dir / "embed_tokens.npy")
        processor = AutoProcessor.from_pretrained(engine_dir / "processor")
        anyres = manifest.onnx_set.anyres
        newline = np.load(engine_dir / anyres.image_newline) if anyres else None
        return cls(engine_dir, manifest, runner, embeddings, processor, newline)

    def with_runner(self, runner: Runner) -> "Pipeline":
        """The same prompt handling over another runner (e.g. the PyTorch reference of this engine)."""
        return Pipeline(self.engine_dir, self.manifest, runner, self.embeddings, self.processor, self.image_newline)

    def chat_prompt(self, question: str) -> str:
        from visprune.models.inputs import chat_prompt

        return chat_prompt(self.processor, question)

    def encode(self, image: Any, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """input_ids [1, S] and pixel_values [1, 3, H, W] for one image and a prompt with one `<image>`."""
        encoded = self._encode(image, prompt)
        return encoded.input_ids[None], encoded.pixel_values[None]

    def encode_request(self, request: Request) -> EncodedRequest:
        """Check and tokenize one request: ConfigError for a bad budget, ImageLoadError for an image that does not
        decode, PromptError for a prompt without exactly one `<image>` or one that does not fit the engine."""
        check_max_new_tokens(request.max_new_tokens)  # before the image is read and encoded
        encoded = self._encode(request.image, request.prompt, request)
        self.check_request(len(encoded.input_ids), request.max_new_tokens)
        return encoded

    def _encode(self, image: Any, prompt: str, request: Request | None = None) -> EncodedRequest:
        check_single_image_placeholder(prompt)
        image = _as_image(image)
        layout = self._anyres_layout(image) if self.anyres else None  # a bad size fails before the processor
        batch = self.processor(images=image, text=prompt, return_tensors="np")
        input_ids = batch["input_ids"][0].astype(np.int64)
        start, count = image_span(input_ids, self.image_token_id)
        expected = layout.num_visual if layout else self.num_visual
        if count != expected:
            raise PromptError(f"The prompt's image became {count} tokens; this engine takes {expected}.",
                              "Use the processor saved with the engine (its image size and patch size).")
        pixels = batch["pixel_values"][0][:layout.num_views] if layout else batch["pixel_values"][0]
        return EncodedRequest(request or Request(image, prompt), input_ids, pixels.astype(self.host_dtype), start,
                              layout)

    def _anyres_layout(self, image: Any) -> AnyresLayout:
        """LLaVA-NeXT: the image's views and N from its size (visprune/models/anyres.py)."""
        width, height = image.size
        layout = anyres_layout((height, width), self.anyres.image_grid_pinpoints,
                               self.processor.image_processor.crop_size["height"], self.processor.patch_size)
        if layout.num_visual < self.anyres.min_image_tokens:
            raise PromptError(f"This {width}x{height} image brings {layout.num_visual} visual tokens; the engine's "
                              f"absolute budget keeps {self.anyres.min_image_tokens} at its first cut.",
                              "Send a larger image, or use an engine built from a 'ratio' recipe.")
        return layout

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
        budget = len(forced_tokens or []) or max_new_tokens
        encoded = self.encode_request(Request(image, prompt, budget, sampling, stop))
        return self._generate_rows([encoded], keep_logits, forced_tokens)[0]

    def generate_batch(self, requests: list[Request], keep_logits: bool = False) -> list[Generation]:
        """Every request's generation, in order; each is checked first, so a bad one fails before any runs."""
        return self.generate_encoded([self.encode_request(r) for r in requests], keep_logits)

    def generate_encoded(self, encoded: list[EncodedRequest], keep_logits: bool = False) -> list[Generation]:
        """Checked requests run as batches of at most `max_batch` rows; each row's result equals what it gives
        alone (greedy: the same tokens; fp32 logits within 1e-4)."""
        size = self.max_batch or len(encoded) or 1
        results: dict[int, Generation] = {}
        for group in _same_visual_count(encoded):  # LLaVA-NeXT: a batch's rows share N (one graph shape)
            for start in range(0, len(group), size):
                rows = group[start:start + size]
                results.update(zip(rows, self._generate_rows([encoded[i] for i in rows], keep_logits)))
        return [results[i] for i in range(len(encoded))]

    def stream(self, image: Any, prompt: str, max_new_tokens: int = 32, sampling: Sampling = GREEDY,
               stop: tuple[str, ...] = (), timings: dict[str, float] | None = None) -> Iterator[str]:
        """`generate`'s text in pieces as tokens are decoded; text that could begin a stop string is held back
        until it cannot. `timings`, if given, receives `generate`'s timings once the stream ends."""
        encoded = self.encode_request(Request(image, prompt, max_new_tokens, sampling, stop))
        first, layout, measured = self.prefill_batch([encoded])
        row, sent, seconds = _RowText(self, encoded.request, self.eos_token_id), 0, []
        for tokens, _, spent in self._tokens(first, layout, [encoded], ended=lambda t: np.array([row.add(t[0])])):
            seconds += [] if spent is None else [spent]
            ready = row.ready()
            if ready > sent:
                yield row.text[sent:ready]
                sent = ready
        if timings is not None:
            timings.update(measured, decode_s_per_token=float(np.mean(seconds)) if seconds else 0.0,
                           decode_tokens=len(seconds), prompt_tokens=len(encoded.input_ids))
        if len(row.final_text()) > sent:
            yield row.final_text()[sent:]

    def _generate_rows(self, encoded: list[EncodedRequest], keep_logits: bool = False,
                       forced: list[int] | None = None) -> list[Generation]:
        first, layout, timings = self.prefill_batch(encoded)
        rows = [_RowText(self, e.request, None if forced else self.eos_token_id) for e in encoded]
        step_logits, seconds = [], []
        ended = lambda tokens: np.array([r.add(t) for r, t in zip(rows, tokens)])  # noqa: E731
        for _, logits, spent in self._tokens(first, layout, encoded, forced, ended):
            step_logits.append(logits)
            seconds += [] if spent is None else [spent]
        timings.update(decode_s_per_token=float(np.mean(seconds)) if seconds else 0.0, decode_tokens=len(seconds))
        return [Generation(row.final_text(), row.tokens, dict(timings, prompt_tokens=len(e.input_ids)),
                           _row_kept(first.kept, b),
                           [logits[b] for logits in step_logits[:len(row.tokens)]] if keep_logits else [],
                           None if first.scores is None else {layer: s[b] for layer, s in first.scores.items()})
                for b, (row, e) in enumerate(zip(rows, encoded))]

    def prefill_batch(self, encoded: list[EncodedRequest]):
        """(the prefill's output, the batch's RowLayout, timings so far): vision, embed, prefill."""
        layout = RowLayout.of_rows([len(e.input_ids) for e in encoded], [e.image_start for e in encoded])
        timings: dict[str, float] = {"padded_tokens": max(len(e.input_ids) for e in encoded), "batch": len(encoded)}
        start = time.perf_counter()
        vision = self.image_features_of(encoded)
        timings["vision_s"] = time.perf_counter() - start
        prefill_start = time.perf_counter()
        embeds, layout = self.embed_batch(encoded, vision)
        first = self.runner.prefill(embeds, layout, vision.scores)
        timings["prefill_s"] = time.perf_counter() - prefill_start
        timings["ttft_s"] = time.perf_counter() - start
        timings["kv_bytes"] = self.runner.kv_bytes(first.past)
        return first, layout, timings

    def embed_batch(self, encoded: list[EncodedRequest], vision: VisionOutput) -> tuple[np.ndarray, RowLayout]:
        """inputs_embeds [B, S, D] of checked requests and their layout (LLaVA-NeXT: with the rows' visual_mask)."""
        layout = RowLayout.of_rows([len(e.input_ids) for e in encoded], [e.image_start for e in encoded])
        if self.anyres:
            layout = replace(layout, visual_mask=np.ones(vision.features.shape[:2], dtype=np.int64))
        return self.embed_rows([e.input_ids for e in encoded], vision.features, layout), layout

    def image_features_of(self, encoded: list[EncodedRequest]) -> VisionOutput:
        """[B, N, D] features (and scores) of the rows' images. LLaVA-NeXT: every row's views go through the
        vision graph as one batch; each row's are then packed (unpad, a newline per grid row) on the host."""
        if not self.anyres:
            return self.runner.image_features(np.stack([e.pixel_values for e in encoded]))
        out = self.runner.image_features(np.concatenate([e.pixel_values for e in encoded]))
        ends = np.cumsum([e.anyres.num_views for e in encoded])[:-1]
        features = [pack_tile_features(f, e.anyres, self.image_newline)
                    for f, e in zip(np.split(out.features, ends), encoded)]
        scores = None if out.scores is None else np.stack(  # newlines score 0: below every [CLS] attention
            [pack_tile_scores(s, e.anyres, 0.0) for s, e in zip(np.split(out.scores, ends), encoded)])
        return VisionOutput(np.stack(features).astype(self.host_dtype), scores)

    def _tokens(self, first, layout: RowLayout, encoded: list[EncodedRequest], forced: list[int] | None = None,
                ended=None):
        """runtime/generation.py's loop over this engine's decode graph, from a prefill's output."""
        lengths = np.array([len(e.input_ids) for e in encoded])
        budgets = [e.request.max_new_tokens for e in encoded]
        return iterate_tokens(first.logits, EngineStep(self, first.past, lengths, layout), budgets,
                              None if forced else self.eos_token_id, [e.request.sampling for e in encoded], forced,
                              ended=ended)

    def text_of(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray) -> tuple[np.ndarray, RowLayout]:
        """inputs_embeds [1, S, D] and its layout for one prompt (input_ids [1, S]), image features [1, N, D]."""
        start, _ = image_span(input_ids[0], self.image_token_id)
        layout = RowLayout.of_rows([input_ids.shape[1]], [start])
        return self.embed_rows([input_ids[0]], image_features, layout), layout

    def embed_rows(self, rows: list[np.ndarray], image_features: np.ndarray, layout: RowLayout) -> np.ndarray:
        """inputs_embeds [B, S, D]: each row's token embeddings after its pads (zeros), the image features
        [B, N, D] at its image offset."""
        seq = len(rows[0]) + int(layout.pad_lengths[0])
        embeds = np.zeros((len(rows), seq, self.embeddings.shape[1]), dtype=self.host_dtype)
        for b, (ids, pad, start) in enumerate(zip(rows, layout.pad_lengths, layout.image_starts)):
            embeds[b, pad:] = self.embeddings[ids]
            embeds[b, start:start + image_features.shape[1]] = image_features[b]
        return embeds


class _RowText:
    """One row's tokens as they come, until its end: EOS, its budget, or a stop string in its text (the text
    then ends before it). `add` returns whether the row has ended. The text is decoded only when read (a stop
    string to look for, streaming, the end), not on every step of every row."""

    def __init__(self, pipe: Pipeline, request: Request, eos: int | None):
        self.pipe, self.stop, self.eos, self.budget = pipe, request.stop, eos, request.max_new_tokens
        self.tokens, self.done, self._decoded = [], False, (0, "")

    @property
    def text(self) -> str:
        if self._decoded[0] != len(self.tokens):
            self._decoded = (len(self.tokens), self.pipe.text_of(self.tokens))
        return self._decoded[1]

    def add(self, token: int) -> bool:
        if self.done:
            return True
        self.tokens.append(int(token))
        self.done = (token == self.eos or len(self.tokens) >= self.budget
                     or bool(self.stop) and stop_index(self.text, self.stop) is not None)
        return self.done

    def ready(self) -> int:
        """How much of the text is final (streaming)."""
        end = stop_index(self.text, self.stop)
        return end if end is not None else len(self.text) - held_back(self.text, self.stop)

    def final_text(self) -> str:
        return self.text[:stop_index(self.text, self.stop)]


class EngineStep:
    """runtime/generation.py's `Step` over an engine's decode graph: tokens [B] go in at positions
    prompt_lengths [B] + step; `past` is the cache after the latest step."""

    def __init__(self, pipe: Pipeline, past: Any, prompt_lengths: np.ndarray, layout: RowLayout):
        self.pipe, self.past, self.prompt_lengths, self.layout = pipe, past, prompt_lengths, layout

    def __call__(self, tokens: np.ndarray, index: int) -> np.ndarray:
        embeds = self.pipe.embeddings[tokens[:, None]].astype(self.pipe.host_dtype)
        logits, self.past = self.pipe.runner.decode(embeds, self.prompt_lengths + index, self.layout, self.past)
        return logits


def _same_visual_count(encoded: list[EncodedRequest]) -> list[list[int]]:
    """Indices of the requests grouped by their image's N, in order of first appearance (LLaVA-1.5: one group)."""
    groups: dict[int | None, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e.num_visual, []).append(i)
    return list(groups.values())


def _row_kept(kept: dict[int, np.ndarray], row: int) -> dict[int, list[int]]:
    return {layer: indices[row].tolist() for layer, indices in kept.items()}


def _as_image(image: Any) -> Any:
    """A PIL image from a path, encoded bytes, or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    from visprune.models.inputs import to_rgb

    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    if not isinstance(image, (bytes, bytearray)):
        return image
    try:
        with Image.open(io.BytesIO(image)) as opened:
            return to_rgb(opened)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageLoadError(f"The image ({len(image)} bytes) does not decode ({e}).",
                             "Send the bytes of a PNG or JPEG file.") from e


def stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in `text` (None: none occurs)."""
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
