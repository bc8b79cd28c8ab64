"""`VispruneLMMs`: lmms-eval's model API (0.7.x, "simple" models) over one engine folder through `Pipeline`.

- `generate_until`: greedy, each request's `max_new_tokens` and `until` (stop strings) from its gen_kwargs;
  requests with equal gen_kwargs run as batches of `batch_size` (`Pipeline.generate_encoded`, which also keeps
  to a TensorRT engine's `max_batch`). A batch answers what its requests answer one by one (docs/runtime.md).
- `loglikelihood` (multiple-choice tasks): the continuation is teacher-forced after the context's prompt and its
  tokens' log-probabilities are summed from the engine's own logits, so it is exact for every backend.

Each document brings exactly one image (LLaVA-1.5's single-image prompt); the context is the question, wrapped in
the checkpoint's chat template as `visprune run --prompt QUESTION` wraps it. Sampling gen_kwargs are ignored:
pruning papers report greedy decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

from runtime.pipeline import Pipeline, Request
from visprune.errors import ConfigError, PromptError
from visprune.manifests.common import model_dump

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval tasks name their own; this is for those that do not


def engine_record(pipe: Pipeline) -> dict[str, Any]:
    """What identifies an engine's answers: its folder and seal, backend, model, dtype and the recipe it prunes
    with (method, content hash, per-layer counts). Written into lmms-eval's results next to the figures."""
    manifest, onnx_set = pipe.manifest, pipe.manifest.onnx_set
    return {"engine": str(pipe.engine_dir.resolve()), "engine_manifest_sha256": manifest.manifest_sha256,
            "backend": manifest.backend, "device": manifest.device, "dtype": onnx_set.dtype,
            "model": model_dump(onnx_set.model), "recipe": model_dump(onnx_set.recipe)}


class VispruneLMMs(lmms):
    """`--model visprune --model_args engine=DIR[,batch_size=N][,verify=true]`."""

    is_simple = True

    def __init__(self, engine: str | Path | None = None, batch_size: int | str = 1, verify: bool | str = False,
                 pipeline: Pipeline | None = None, **unused: Any):
        super().__init__()
        if (engine is None) == (pipeline is None):
            raise ConfigError("The visprune model needs one engine folder.",
                              "Pass --model_args engine=DIR (a folder `visprune build` wrote).")
        # `device` and `max_batch_size` come from lmms-eval's own flags; the engine was built for its device
        unused = {k: v for k, v in unused.items() if v is not None and k not in ("device", "max_batch_size")}
        if unused:
            logger.warning(f"visprune model: ignoring model_args {sorted(unused)}")
        verify = str(verify).lower() in ("1", "true", "yes")
        self.pipe = pipeline or Pipeline.from_engine_dir(Path(engine), verify)
        self.batch_size = max(1, int(batch_size))
        self.record = engine_record(self.pipe)
        logger.info(f"visprune engine: {self.record}")

    # --- generation ---------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._generation_key(request.args[1]), []).append(index)
        answers: list[str | None] = [None] * len(requests)
        for (max_new_tokens, stop), indices in groups.items():
            max_new_tokens = self._fitting_budget(max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                encoded = [self.pipe.encode_request(Request(self._image(requests[i]),
                                                            self._prompt(requests[i].args[0]), max_new_tokens,
                                                            stop=stop)) for i in chunk]
                for i, generation in zip(chunk, self.pipe.generate_encoded(encoded)):
                    answers[i] = generation.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, generation.text)
        return answers

    @staticmethod
    def _generation_key(gen_kwargs: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
        """(max_new_tokens, stop strings) from lmms-eval's gen_kwargs; `until` is a string or a list."""
        until = gen_kwargs.get("until") or ()
        stop = (until,) if isinstance(until, str) else tuple(until)
        return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), tuple(s for s in stop if s)

    def _fitting_budget(self, max_new_tokens: int) -> int:
        """A task's token budget, cut to what a TensorRT engine was built for (`build --max-new-tokens`): tasks
        allow long answers (MMBench 1024) that short-answer benchmarks never use, and an answer is the same
        unless it would run past the cut."""
        limits = self.pipe.manifest.limits
        if limits and max_new_tokens > limits.max_new_tokens:
            logger.warning(f"visprune engine: max_new_tokens {max_new_tokens} cut to the engine's "
                           f"{limits.max_new_tokens} (visprune build --max-new-tokens)")
            return limits.max_new_tokens
        return max_new_tokens

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("The visprune model answers single-round requests only (generate_until).")

    # --- log-likelihood ----------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding would produce it)."""
        results = []
        for request in requests:
            context, target = request.args[0], request.args[1]
            continuation = target if isinstance(target, str) else target(self._doc(request))
            prompt = self._prompt(context)
            forced = self._continuation_ids(prompt, continuation)
            generation = self.pipe.generate(self._image(request), prompt, keep_logits=True, forced_tokens=forced)
            logits = np.stack(generation.step_logits).astype(np.float64)  # [T, V]
            log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            chosen = log_probs[np.arange(len(forced)), forced]
            results.append((float(chosen.sum()), bool((logits.argmax(-1) == np.array(forced)).all())))
            self.cache_hook.add_partial("loglikelihood", request.args, results[-1])
        return results

    def _continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        """The continuation's tokens as they follow the prompt (tokenized together: SentencePiece spaces)."""
        tokenize = self.pipe.processor.tokenizer
        context_ids = tokenize(prompt).input_ids
        whole = tokenize(prompt + continuation).input_ids
        if whole[:len(context_ids)] != context_ids or len(whole) == len(context_ids):
            raise PromptError(f"The continuation {continuation!r} does not tokenize apart from its prompt.",
                              "This task's continuations need a leading space or separator; report the task.")
        return whole[len(context_ids):]

    # --- documents ----------------------------------------------------------------------------------------

    def _doc(self, request: Instance) -> dict[str, Any]:
        _, _, _, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _image(self, request: Instance) -> Any:
        visuals = request.args[2](self._doc(request))
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise PromptError(f"Task {request.args[4]!r} gave {len(visuals)} images for one question; a LLaVA-1.5 "
                              "engine answers about exactly one.",
                              "Evaluate single-image tasks (GQA, TextVQA, POPE, MME, MMBench, shapes_vqa).")
        return visuals[0]

    def _prompt(self, context: str) -> str:
        return self.pipe.chat_prompt(context.replace("<image>", "").strip())
