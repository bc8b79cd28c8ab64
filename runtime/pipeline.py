"""`Pipeline`: image + prompt -> text over an engine folder. NumPy and ONNX Runtime only on the engine path.

Flow: the checkpoint's own processor tokenizes the prompt (its `<image>` expanded) and preprocesses the image;
vision.onnx gives image features; token embeddings come from the saved matrix, with the features spliced in at
the image's position; prefill.onnx prunes as the recipe says and returns the first logits and per-layer KV;
decode.onnx then runs one token at a time at logical positions continuing from the unpruned length.

Shape legend: B batch (1 here), S prompt length, N visual tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.build import load_engine_manifest, open_ort_session
from visprune.artifacts import GRAPH_NAMES
from visprune.errors import PromptError
from visprune.models.inputs import IMAGE_PLACEHOLDER, check_single_image_placeholder, image_span, load_image


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    timings: dict[str, float]
    kept_indices: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept image indices
    step_logits: list[np.ndarray] = field(default_factory=list)  # [V] per generated token


class Pipeline:
    """Loads an engine folder once; `generate` runs one image and prompt (batch 1)."""

    def __init__(self, engine_dir: Path, manifest: dict[str, Any], sessions: dict[str, Any], embeddings: np.ndarray,
                 processor: Any):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.sessions = sessions
        self.embeddings = embeddings  # [V, D]
        self.processor = processor
        prompt = manifest["onnx_set"]["prompt"]
        self.image_start, self.num_visual = prompt["image_start"], prompt["num_visual_tokens"]
        self.max_seq, self.eos_token_id = prompt["max_seq"], prompt["eos_token_id"]
        self.image_token_id = prompt["image_token_id"]
        self.num_layers = len(manifest["onnx_set"]["kv_stages"])

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, providers: list[str] | None = None) -> "Pipeline":
        from transformers import AutoProcessor

        engine_dir = Path(engine_dir)
        manifest = load_engine_manifest(engine_dir)
        providers = providers or manifest["providers"]
        sessions = {graph: open_ort_session(engine_dir / f"{graph}.onnx", providers,
                                            hint="The engine folder is damaged; rebuild it with `visprune build`.")
                    for graph in GRAPH_NAMES}
        embeddings = np.load(engine_dir / "embed_tokens.npy")
        processor = AutoProcessor.from_pretrained(engine_dir / "processor")
        return cls(engine_dir, manifest, sessions, embeddings, processor)

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
        return input_ids, batch["pixel_values"].astype(self._input_dtype("vision", 0))

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 32, keep_logits: bool = False) -> Generation:
        """Greedy decoding from `prompt` (a full prompt with one `<image>`) about `image` (a path or PIL image)."""
        input_ids, pixel_values = self.encode(image, prompt)
        if input_ids.shape[1] + max_new_tokens > self.max_seq:
            raise PromptError(f"The prompt has {input_ids.shape[1]} tokens; with {max_new_tokens} new tokens that "
                              f"exceeds the {self.max_seq} this engine allows.",
                              "Shorten the prompt, lower --max-new-tokens, or export with a larger --max-seq.")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        features = self.sessions["vision"].run(None, {"pixel_values": pixel_values})[0]
        timings["vision_s"] = time.perf_counter() - start
        logits, past, kept = self.prefill(self.embed(input_ids, features), timings)
        tokens, step_logits = self._decode_greedy(logits, past, input_ids.shape[1], max_new_tokens, timings)
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text=text, token_ids=tokens, timings=timings, kept_indices=kept,
                          step_logits=step_logits if keep_logits else [])

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        """inputs_embeds [1, S, D]: token embeddings with the image features at the image's position."""
        embeds = self.embeddings[input_ids].astype(self._input_dtype("prefill", 0))
        embeds[:, self.image_start:self.image_start + self.num_visual] = image_features
        return embeds

    def prefill(self, inputs_embeds: np.ndarray, timings: dict[str, float] | None = None):
        """First-token logits [1, V], the per-layer KV list, and kept image indices per pruning layer."""
        start = time.perf_counter()
        outputs = self.sessions["prefill"].run(None, {"inputs_embeds": inputs_embeds})
        if timings is not None:
            timings["prefill_s"] = time.perf_counter() - start
        names = [o.name for o in self.sessions["prefill"].get_outputs()]
        named = dict(zip(names, outputs))
        past = [named[f"present.{layer}.{kind}"] for layer in range(self.num_layers) for kind in ("key", "value")]
        kept = {int(n.split(".")[1]): named[n][0].tolist() for n in names if n.startswith("kept_indices.")}
        return named["logits"], past, kept

    def decode_step(self, token_id: int, position: int, past: list[np.ndarray]):
        """Logits [1, V] and the grown per-layer KV list after feeding one token at logical `position`."""
        feed = {"inputs_embeds": self.embeddings[[[token_id]]].astype(self._input_dtype("decode", 0)),
                "position_ids": np.array([[position]], dtype=np.int64)}
        for layer in range(self.num_layers):
            feed[f"past.{layer}.key"], feed[f"past.{layer}.value"] = past[2 * layer], past[2 * layer + 1]
        logits, *presents = self.sessions["decode"].run(None, feed)
        return logits, presents

    def _decode_greedy(self, logits, past, prompt_len, max_new_tokens, timings):
        tokens, step_logits, step_times = [], [], []
        for step in range(max_new_tokens):
            step_logits.append(logits[0])
            token = int(np.argmax(logits[0]))
            tokens.append(token)
            if token == self.eos_token_id or step == max_new_tokens - 1:
                break
            start = time.perf_counter()
            logits, past = self.decode_step(token, prompt_len + step, past)
            step_times.append(time.perf_counter() - start)
        timings["decode_s_per_token"] = float(np.mean(step_times)) if step_times else 0.0
        timings["decode_tokens"] = len(step_times)
        return tokens, step_logits

    def _input_dtype(self, graph: str, index: int):
        kind = self.sessions[graph].get_inputs()[index].type  # e.g. "tensor(float)"
        return {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kind, np.float32)
