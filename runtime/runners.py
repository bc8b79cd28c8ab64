"""Backends behind `Pipeline`: one small interface over ONNX Runtime, TensorRT and PyTorch.

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
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from visprune.errors import ConfigError
from visprune.manifests import EngineManifest
from visprune.tensor_names import (
    GRAPH_NAMES,
    IMAGE_SCORES,
    IMAGE_STARTS,
    INPUTS_EMBEDS,
    LOGITS,
    PAD_LENGTHS,
    PIXEL_VALUES,
    POSITION_IDS,
    kept_layer,
    kv_names,
)


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
    return {INPUTS_EMBEDS: inputs_embeds, IMAGE_STARTS: layout.image_starts, PAD_LENGTHS: layout.pad_lengths, **scores}


class Runner(Protocol):
    backend: str
    device: str

    def image_features(self, pixel_values: np.ndarray) -> VisionOutput: ...  # [B, 3, H, W] -> [B, N, D]

    def prefill(self, inputs_embeds: np.ndarray, layout: RowLayout,  # [B, S, D]
                image_scores: np.ndarray | None = None) -> PrefillOutput: ...

    def decode(self, inputs_embeds: np.ndarray, positions: np.ndarray, layout: RowLayout,  # [B, 1, D], [B]
               past: Any) -> tuple[np.ndarray, Any]: ...

    def kv_bytes(self, past: Any) -> int: ...


def open_runner(engine_dir: Path, manifest: EngineManifest) -> Runner:
    """The runner for an engine folder's backend (imported lazily: each backend needs only its own packages)."""
    backend = manifest.backend
    if backend == "onnxruntime":
        return OrtRunner.open(engine_dir, manifest)
    if backend == "tensorrt":
        from runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner.open(engine_dir, manifest)
    from runtime.static_torch_runner import StaticTorchRunner

    return StaticTorchRunner.open(engine_dir, manifest)


class OrtRunner:
    """ONNX Runtime sessions with IO binding: prefill and decode outputs stay on the session's device (CPU or CUDA)
    and the next decode step binds them as inputs, so the KV cache never round-trips through host memory."""

    backend = "onnxruntime"

    def __init__(self, sessions: dict[str, Any], device: str, num_layers: int,
                 session_facts: dict[str, Any] | None = None):
        self.sessions, self.device, self.num_layers = sessions, device, num_layers
        self.session_facts = session_facts  # the serving options the sessions were opened with
        self._outputs = {graph: [o.name for o in s.get_outputs()] for graph, s in sessions.items()}

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest) -> "OrtRunner":
        from engines.build import (check_ort_cuda_attention, check_session_providers, open_ort_session,
                                   ort_providers, ort_session_options, serving_session_options)

        if manifest.onnx_set.dtype == "bfloat16":
            raise ConfigError("ONNX Runtime engines take float32 or float16 sets; this one is bfloat16.",
                              "Export with --dtype float16 (or float32), or build a TensorRT engine.")
        check_ort_cuda_attention(manifest.onnx_set.target, manifest.device)  # the ORT here, not the builder's
        providers = manifest.providers
        session_facts = serving_session_options(manifest.session_options)
        options = ort_session_options(session_facts)
        sessions = {}
        for graph in GRAPH_NAMES:
            sessions[graph] = open_ort_session(Path(engine_dir) / f"{graph}.onnx",
                                               ort_providers(providers, manifest.tf32), options,
                                               hint="The engine folder is damaged; rebuild it with `visprune build`.")
            check_session_providers(sessions[graph], providers)
        return cls(sessions, manifest.device, manifest.onnx_set.num_layers, session_facts)

    def image_features(self, pixel_values: np.ndarray) -> VisionOutput:
        return VisionOutput(*self.sessions["vision"].run(None, {PIXEL_VALUES: pixel_values}))

    def prefill(self, inputs_embeds: np.ndarray, layout: RowLayout,
                image_scores: np.ndarray | None = None) -> PrefillOutput:
        values = self._run_bound("prefill", prefill_feeds(inputs_embeds, layout, image_scores), {})
        kept = {kept_layer(name): value.numpy() for name, value in values.items() if kept_layer(name) is not None}
        return PrefillOutput(values[LOGITS].numpy(), self._presents(values), kept)

    def decode(self, inputs_embeds: np.ndarray, positions: np.ndarray, layout: RowLayout,
               past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        host = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: np.asarray(positions, dtype=np.int64)[:, None],
                PAD_LENGTHS: layout.pad_lengths}
        values = self._run_bound("decode", host, dict(zip(kv_names("past", self.num_layers), past)))
        return values[LOGITS].numpy(), self._presents(values)

    def kv_bytes(self, past: list[Any]) -> int:
        return sum(int(np.prod(v.shape())) * _ORT_ITEMSIZE[v.data_type()] for v in past)

    def _run_bound(self, graph: str, host: dict[str, np.ndarray], device: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        for name, value in device.items():
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs[graph]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return dict(zip(self._outputs[graph], binding.get_outputs()))

    def _presents(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in kv_names("present", self.num_layers)]


_ORT_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(int64)": 8}
