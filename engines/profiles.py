"""Shape ranges of an engine: TensorRT optimization profiles derived from two user limits.

The ONNX set names each dynamic dim (`batch`, `seq`, and one `past_len_s{k}` per KV stage, see exporter/graphs.py).
From `max_prompt_tokens` (the whole prompt, image tokens included), `max_new_tokens` and `max_batch` every range
follows:

- `batch`: 1 .. max_batch, tuned for max_batch (a server's full batch);
- `seq` (prefill): from the shortest possible prompt (N visual + 1 text token; the text before the image is each
  request's own) to `max_prompt_tokens` (a batch's padded length);
- `past_len_s{k}` (decode): the prompt length minus the tokens pruned before stage k, plus 0 .. max_new - 2
  generated tokens (the first new token comes from prefill, so decode runs at most max_new - 1 times).

The runtime checks requests against the same ranges before running (`check_request_fits`), so a prompt outside
them is a PromptError with a hint, not a TensorRT failure deep inside a step.

Shape legend: B batch, S prompt length, N visual tokens, R_k tokens pruned before KV stage k.
"""

from __future__ import annotations

from typing import Any

from visprune.errors import ConfigError, PromptError
from visprune.manifests.engine_set import Limits
from visprune.manifests.onnx_set import OnnxSetManifest
from visprune.tensor_names import BATCH_DIM, SEQ_DIM, past_len_dim

OPT_TEXT_TOKENS = 64  # typical question + answer-prefix length the kernels are tuned for


def derive_profiles(onnx_set: OnnxSetManifest, max_prompt_tokens: int, max_new_tokens: int,
                    max_batch: int = 1) -> dict[str, Any]:
    """{graph: {input: {"min": shape, "opt": shape, "max": shape}}} for every input of the set's graphs."""
    ranges = dim_ranges(onnx_set, max_prompt_tokens, max_new_tokens, max_batch)
    profiles = {}
    for graph, io in onnx_set.graphs.items():
        profiles[graph] = {
            value.name: {bound: [dim if isinstance(dim, int) else ranges[dim][i] for dim in value.shape]
                         for i, bound in enumerate(("min", "opt", "max"))}
            for value in io.inputs}
    return profiles


def dim_ranges(onnx_set: OnnxSetManifest, max_prompt_tokens: int, max_new_tokens: int,
               max_batch: int = 1) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dim."""
    shortest, longest = prompt_length_range(onnx_set, max_prompt_tokens, max_new_tokens)
    opt = min(longest, shortest - 1 + OPT_TEXT_TOKENS)
    ranges = {BATCH_DIM: (1, max_batch, max_batch), SEQ_DIM: (shortest, opt, longest)}
    for stage, pruned in enumerate(pruned_before_stage(onnx_set)):
        most = longest - pruned + max(max_new_tokens - 2, 0)
        ranges[past_len_dim(stage)] = (shortest - pruned, min(opt - pruned + max_new_tokens // 2, most), most)
    return ranges


def prompt_length_range(onnx_set: OnnxSetManifest, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """Shortest possible and longest allowed prompt; ConfigError if the limits do not fit the export."""
    prompt = onnx_set.prompt
    shortest = prompt.num_visual_tokens + 1
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {max_new_tokens}.", "Pass e.g. 64.")
    if max_prompt_tokens < shortest:
        raise ConfigError(f"--max-prompt-tokens {max_prompt_tokens} is shorter than the shortest prompt this model "
                          f"can take ({shortest}: {prompt.num_visual_tokens} image tokens and one text token).",
                          f"Pass --max-prompt-tokens of at least {shortest}, e.g. {shortest + 127}.")
    if max_prompt_tokens + max_new_tokens > prompt.max_seq:
        raise ConfigError(f"--max-prompt-tokens {max_prompt_tokens} plus --max-new-tokens {max_new_tokens} exceeds "
                          f"the {prompt.max_seq} tokens the ONNX set was exported for.",
                          "Lower the limits, or export again with a larger `visprune export --max-seq`.")
    return shortest, max_prompt_tokens


def pruned_before_stage(onnx_set: OnnxSetManifest) -> list[int]:
    """R_k: visual tokens removed before KV stage k (stage k starts after the k-th pruning layer; a pre-LLM
    method's tokens are gone before stage 0)."""
    total = onnx_set.recipe.removed_before_llm
    counts = [total]
    for removed in onnx_set.recipe.removed:
        if removed:
            total += removed
            counts.append(total)
    return counts[:max(onnx_set.kv_stages) + 1]


def kv_capacity(onnx_set: OnnxSetManifest, max_prompt_tokens: int, max_new_tokens: int) -> list[int]:
    """Longest KV length each layer ever holds (prompt and all generated tokens), for preallocated caches."""
    pruned = pruned_before_stage(onnx_set)
    return [max_prompt_tokens + max_new_tokens - pruned[stage] for stage in onnx_set.kv_stages]


def check_request_fits(limits: Limits, prompt_tokens: int, max_new_tokens: int, engine_dir: Any) -> None:
    """PromptError when a request (or a batch: its padded prompt length and largest budget) falls outside the
    shape ranges the engine was built for."""
    if prompt_tokens > limits.max_prompt_tokens or max_new_tokens > limits.max_new_tokens:
        raise PromptError(
            f"The request ({prompt_tokens} prompt tokens, {max_new_tokens} new tokens) is outside the shapes the "
            f"engine in {engine_dir} was built for (at most {limits.max_prompt_tokens} prompt tokens and "
            f"{limits.max_new_tokens} new tokens).",
            "Shorten the prompt or lower --max-new-tokens, or rebuild with larger `visprune build "
            "--max-prompt-tokens/--max-new-tokens`.")
