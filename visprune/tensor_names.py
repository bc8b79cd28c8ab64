"""The names of the ONNX graphs' inputs and outputs: written by the exporter, bound by every runner, checked by
the manifest schema. One place, so a renamed tensor cannot drift between them.

Shape legend: B batch, S prompt length, N visual tokens, K kept, D hidden, V vocabulary, Hkv KV heads.
"""

from __future__ import annotations

GRAPH_NAMES = ("vision", "prefill", "decode")

PIXEL_VALUES = "pixel_values"  # [B, 3, H, W]
IMAGE_FEATURES = "image_features"  # [B, N, D]
INPUTS_EMBEDS = "inputs_embeds"  # [B, S, D] (prefill), [B, 1, D] (decode)
POSITION_IDS = "position_ids"  # [B, 1]
LOGITS = "logits"  # [B, V], last position
KV_KINDS = ("key", "value")
KEPT_PREFIX = "kept_indices."
BATCH_DIM, SEQ_DIM = "batch", "seq"  # the dynamic dims' names (TensorRT profiles are keyed by them)


def past_len_dim(stage: int) -> str:
    """The length dim of the KV caches of stage k (the layers after the k-th pruning layer)."""
    return f"past_len_s{stage}"


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """`past.{l}.key/value` (decode inputs) or `present.{l}.key/value` (outputs), layer-major."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in KV_KINDS]


def kept_name(layer: int) -> str:
    """The prefill output holding the image indices kept at a pruning layer, [B, K]."""
    return f"{KEPT_PREFIX}{layer}"


def kept_layer(name: str) -> int | None:
    """The pruning layer of a `kept_indices.{l}` name, or None for any other tensor."""
    suffix = name.removeprefix(KEPT_PREFIX)
    return int(suffix) if suffix != name and suffix.isdigit() else None


def input_dim_names(kv_stages: list[int]) -> set[str]:
    """Every dynamic dim name a graph input may carry for these KV stages."""
    return {BATCH_DIM, SEQ_DIM, *(past_len_dim(stage) for stage in kv_stages)}


def graph_io_names(graph: str, removed: list[int]) -> tuple[list[str], list[str]]:
    """(inputs, outputs) each graph must have for a recipe's per-layer `removed` counts."""
    num_layers = len(removed)
    if graph == "vision":
        return [PIXEL_VALUES], [IMAGE_FEATURES]
    if graph == "prefill":
        kept = [kept_name(layer) for layer, count in enumerate(removed) if count]
        return [INPUTS_EMBEDS], [LOGITS, *kv_names("present", num_layers), *kept]
    return [INPUTS_EMBEDS, POSITION_IDS, *kv_names("past", num_layers)], [LOGITS, *kv_names("present", num_layers)]
