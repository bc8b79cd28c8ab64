"""The names of the ONNX graphs' inputs and outputs: written by the exporter, bound by every runner, checked by
the manifest schema. One place, so a renamed tensor cannot drift between them.

Shape legend: B batch, S prompt length, N visual tokens, K kept, D hidden, V vocabulary, Hkv KV heads.
"""

from __future__ import annotations

GRAPH_NAMES = ("vision", "prefill", "decode")

PIXEL_VALUES = "pixel_values"  # [B, 3, H, W]
IMAGE_FEATURES = "image_features"  # [B, N, D]
IMAGE_SCORES = "image_scores"  # [B, N] float32: a vision-side score (VisionZip's [CLS] attention), vision -> prefill
INPUTS_EMBEDS = "inputs_embeds"  # [B, S, D] (prefill), [B, 1, D] (decode)
POSITION_IDS = "position_ids"  # [B, 1]
IMAGE_STARTS = "image_starts"  # [B] int64: each row's image offset, its left padding included (prefill)
PAD_LENGTHS = "pad_lengths"  # [B] int64: each row's left padding, masked as keys (prefill and decode)
# [B, N] int64, LLaVA-NeXT prefill only: 1 for each visual token; its length is the image's N (a dynamic dim)
VISUAL_MASK = "visual_mask"
LOGITS = "logits"  # [B, V], last position
KV_KINDS = ("key", "value")
KEPT_PREFIX = "kept_indices."
BATCH_DIM, SEQ_DIM = "batch", "seq"  # the dynamic dims' names (TensorRT profiles are keyed by them)
VISUAL_DIM = "num_visual"  # LLaVA-NeXT: the image's N, per request


def past_len_dim(stage: int) -> str:
    """The length dim of the KV caches of stage k (the layers after the k-th pruning layer)."""
    return f"past_len_s{stage}"


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """`past.{l}.key/value` (decode inputs) or `present.{l}.key/value` (outputs), layer-major."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in KV_KINDS]


PRE_LLM = -1  # the "layer" of a selection before the first decoder layer (pre-LLM methods)
_PRE_LLM_SUFFIX = "pre_llm"


def kept_name(layer: int) -> str:
    """The prefill output holding the image indices kept at a pruning layer (or PRE_LLM), [B, K]."""
    return f"{KEPT_PREFIX}{_PRE_LLM_SUFFIX if layer == PRE_LLM else layer}"


def kept_layer(name: str) -> int | None:
    """The pruning layer of a `kept_indices.{l}` name (PRE_LLM for `kept_indices.pre_llm`), or None for any other
    tensor."""
    suffix = name.removeprefix(KEPT_PREFIX)
    if suffix == name:
        return None
    return PRE_LLM if suffix == _PRE_LLM_SUFFIX else int(suffix) if suffix.isdigit() else None


def pruning_layers(removed: list[int], removed_before_llm: int = 0) -> list[int]:
    """Where a recipe selects tokens, in order: PRE_LLM if it prunes before the LLM, then the layers that prune."""
    return [PRE_LLM] * bool(removed_before_llm) + [layer for layer, count in enumerate(removed) if count]


def input_dim_names(kv_stages: list[int]) -> set[str]:
    """Every dynamic dim name a graph input may carry for these KV stages."""
    return {BATCH_DIM, SEQ_DIM, VISUAL_DIM, *(past_len_dim(stage) for stage in kv_stages)}


def graph_io_names(graph: str, removed: list[int], removed_before_llm: int = 0,
                   image_scores: bool = False, anyres: bool = False) -> tuple[list[str], list[str]]:
    """(inputs, outputs) each graph must have for a recipe's per-layer `removed` counts, its pre-LLM count,
    whether its selection reads a vision-side score (`image_scores`, from the vision graph to prefill), and
    whether N is per image (`anyres`, LLaVA-NeXT: prefill takes `visual_mask`)."""
    num_layers = len(removed)
    scores = [IMAGE_SCORES] if image_scores else []
    if graph == "vision":
        return [PIXEL_VALUES], [IMAGE_FEATURES, *scores]
    if graph == "prefill":
        kept = [kept_name(layer) for layer in pruning_layers(removed, removed_before_llm)]
        mask = [VISUAL_MASK] if anyres else []
        return ([INPUTS_EMBEDS, IMAGE_STARTS, PAD_LENGTHS, *scores, *mask],
                [LOGITS, *kv_names("present", num_layers), *kept])
    past = kv_names("past", num_layers)
    return [INPUTS_EMBEDS, POSITION_IDS, PAD_LENGTHS, *past], [LOGITS, *kv_names("present", num_layers)]
