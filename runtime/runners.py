"""The runners: ONNX Runtime's here, TensorRT's and PyTorch's in their own modules, and `open_runner`, which
picks one for an engine folder. Their interface is `runtime/runner_api.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.runner_api import PrefillOutput, RowLayout, Runner, VisionOutput, prefill_feeds
from visprune.dtypes import DTYPE_TABLE
from visprune.errors import ConfigError
from visprune.manifests.engine_set import EngineManifest
from visprune.tensor_names import (GRAPH_NAMES, INPUTS_EMBEDS, LOGITS, PAD_LENGTHS, PIXEL_VALUES, POSITION_IDS,
                                   kept_layer, kv_names)


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


_ORT_ITEMSIZE = {**{d.ort: d.itemsize for d in DTYPE_TABLE.values()}, "tensor(int64)": 8}
