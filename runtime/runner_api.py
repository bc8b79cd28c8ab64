"""The interface every backend's runner implements for `Pipeline` (ONNX Runtime, TensorRT, PyTorch).

A runner takes and returns host (NumPy) arrays at the edges the pipeline touches: pixel values in and image
features out, input embeddings in and last-position logits out. The KV cache stays wherever the backend keeps it
(OrtValues, CUDA buffers, torch tensors) and is opaque to the pipeline. Because every call ends with host data,
a call's wall time includes the device work: timings need no extra synchronization.

A batch is left-padded to one length (exporter/pruned_lm.py): `RowLayout` says where each row's pads end and its
image starts, and is passed to prefill and to every decode step.

Shape legend: B batch, S prompt length (padded), N visual tokens, K kept, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from visprune.tensor_names import IMAGE_SCORES, IMAGE_STARTS, INPUTS_EMBEDS, PAD_LENGTHS, VISUAL_MASK


@dataclass
class VisionOutput:
    features: np.ndarray  # [B, N, D]
    scores: np.ndarray | None = None  # [B, N] float32: the vision-side score of methods that use one (VisionZip)


@dataclass
class PrefillOutput:
    logits: np.ndarray  # [B, V] float32
    past: Any  # the backend's KV cache
    kept: dict[int, np.ndarray]  # pruning layer -> kept image indices [B, K] (ascending per row)
    # the PyTorch reference only: pruning layer -> each image index's selection score [B, N] (NaN where the token
    # was gone already), for score-based methods; parity tells TopK ties from errors with it
    scores: dict[int, np.ndarray] | None = None


@dataclass(frozen=True)
class RowLayout:
    """Where the rows of a left-padded batch keep their parts: image_starts [B] (the row's image offset, pads
    included) and pad_lengths [B], both int64."""

    image_starts: np.ndarray
    pad_lengths: np.ndarray
    visual_mask: np.ndarray | None = None  # [B, N] int64 ones, LLaVA-NeXT only: its length is the rows' N

    @classmethod
    def of_rows(cls, lengths: list[int], image_starts: list[int]) -> "RowLayout":
        """Rows of these token lengths, each image at its own offset, left-padded to the longest."""
        pads = max(lengths) - np.asarray(lengths, dtype=np.int64)
        return cls(pads + np.asarray(image_starts, dtype=np.int64), pads)

    @classmethod
    def unpadded(cls, batch: int, image_start: int) -> "RowLayout":
        """`batch` rows of one length, each image at `image_start`."""
        return cls.of_rows([1] * batch, [image_start] * batch)

    @property
    def batch(self) -> int:
        return len(self.pad_lengths)


def prefill_feeds(inputs_embeds: np.ndarray, layout: RowLayout, image_scores: np.ndarray | None = None) -> dict:
    """The prefill graph's inputs by name (host arrays)."""
    scores = {} if image_scores is None else {IMAGE_SCORES: image_scores}
    mask = {} if layout.visual_mask is None else {VISUAL_MASK: layout.visual_mask}
    return {INPUTS_EMBEDS: inputs_embeds, IMAGE_STARTS: layout.image_starts, PAD_LENGTHS: layout.pad_lengths, **scores,
            **mask}


class Runner(Protocol):
    backend: str
    device: str

    def image_features(self, pixel_values: np.ndarray) -> VisionOutput: ...  # [B, 3, H, W] -> [B, N, D]

    def prefill(self, inputs_embeds: np.ndarray, layout: RowLayout,  # [B, S, D]
                image_scores: np.ndarray | None = None) -> PrefillOutput: ...

    def decode(self, inputs_embeds: np.ndarray, positions: np.ndarray, layout: RowLayout,  # [B, 1, D], [B]
               past: Any) -> tuple[np.ndarray, Any]: ...

    def kv_bytes(self, past: Any) -> int: ...
