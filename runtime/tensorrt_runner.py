"""TensorRT engines at run time: device buffers through `set_tensor_address` and `execute_async_v3`.

CUDA memory and the stream come from PyTorch (every GPU host of ours has its CUDA build). The KV cache of each
layer lives in two preallocated buffers sized from the manifest's `kv_capacity` (prompt + generated tokens, less
the tokens pruned before that layer, times the built `max_batch`): a decode step reads `past` from one and writes
`present` (one longer) into the other, then they swap, so decoding allocates nothing. One batch at a time per
runner.

Shape legend: B batch, S prompt length (left-padded), L_l KV length of layer l, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.tensorrt import check_engine_compatible, gpu_identity, import_tensorrt
from runtime.runner_api import PrefillOutput, RowLayout, VisionOutput
from visprune.dtypes import DTYPE_TABLE, torch_dtype
from visprune.errors import ArtifactMismatchError, PromptError
from visprune.manifests.engine_set import EngineManifest
from visprune.tensor_names import (
    IMAGE_FEATURES,
    IMAGE_SCORES,
    IMAGE_STARTS,
    INPUTS_EMBEDS,
    PAD_LENGTHS,
    PIXEL_VALUES,
    POSITION_IDS,
    kept_layer,
    kv_names,
)


class TensorRTGraph:
    """One deserialized engine and its execution context."""

    def __init__(self, runtime, plan: bytes, path: Path):
        import tensorrt as trt

        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactMismatchError(f"TensorRT cannot deserialize {path}.",
                                        "The plan is damaged or from another TensorRT; rebuild with `visprune build`.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any], stream, torch_dtypes: dict) -> dict[str, Any]:
        """Run with device tensors `inputs`; outputs go into `outputs` where given, else into new tensors."""
        import torch

        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise PromptError(f"Input {name} of shape {tuple(tensor.shape)} is outside the engine's profile.",
                                  "Rebuild with larger --max-prompt-tokens / --max-new-tokens / --max-batch.")
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch_dtypes[self.engine.get_tensor_dtype(name)]
            given = outputs.get(name)
            results[name] = given(shape) if given else torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; run with --verbose for TensorRT's log")
        return results


@dataclass
class KVBuffers:
    """Two flat buffers per layer and kind; `current[i]` holds the live cache of tensor i as its first L_l rows."""

    buffers: list[tuple[Any, Any]]
    lengths: list[int]
    current: list[int]
    batch: int = 1

    def view(self, index: int, which: int, length: int, shape: tuple[int, ...]):
        batch, heads, _, head_dim = shape
        flat = self.buffers[index][which]
        return flat[: batch * heads * length * head_dim].view(batch, heads, length, head_dim)


class TensorRTRunner:
    backend, device = "tensorrt", "cuda"

    def __init__(self, graphs: dict[str, TensorRTGraph], manifest: EngineManifest):
        import torch
        import tensorrt as trt

        self.graphs, self.manifest = graphs, manifest
        self.stream = torch.cuda.Stream()
        self.torch_dtypes = {**{getattr(trt, d.name): d.torch for d in DTYPE_TABLE.values()},  # trt.float16, ...
                             trt.int64: torch.int64, trt.int32: torch.int32}
        self.dtype = torch_dtype(manifest.onnx_set.dtype)
        self.num_layers = manifest.onnx_set.num_layers
        self.max_batch = manifest.limits.max_batch
        self.kv_shape = _kv_shape(manifest)
        self.kv = self._allocate_kv()

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest) -> "TensorRTRunner":
        trt = import_tensorrt()
        check_engine_compatible(manifest, trt.__version__, gpu_identity(), engine_dir)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        graphs = {g: TensorRTGraph(runtime, (Path(engine_dir) / f"{g}.plan").read_bytes(), Path(engine_dir) / f"{g}.plan")
                  for g in ("vision", "prefill", "decode")}
        return cls(graphs, manifest)

    def image_features(self, pixel_values: np.ndarray) -> VisionOutput:
        out = self._run("vision", {PIXEL_VALUES: self._tensor(pixel_values)}, {})
        scores = out[IMAGE_SCORES].float().cpu().numpy() if IMAGE_SCORES in out else None
        return VisionOutput(out[IMAGE_FEATURES].float().cpu().numpy(), scores)

    def prefill(self, inputs_embeds: np.ndarray, layout: RowLayout,
                image_scores: np.ndarray | None = None) -> PrefillOutput:
        import torch

        batch = len(inputs_embeds)  # the profile's range is checked in TensorRTGraph.run
        self.kv.current, self.kv.batch = [0] * len(self.kv.current), batch
        targets = {name: self._kv_target(i, 0) for i, name in enumerate(self._kv_names("present"))}
        feed = {INPUTS_EMBEDS: self._tensor(inputs_embeds), IMAGE_STARTS: _ints(layout.image_starts),
                PAD_LENGTHS: _ints(layout.pad_lengths)}
        if image_scores is not None:  # a float32 island whatever the engine's dtype
            feed[IMAGE_SCORES] = torch.from_numpy(np.ascontiguousarray(image_scores)).to("cuda", torch.float32)
        out = self._run("prefill", feed, targets)
        self.kv.lengths = [int(out[name].shape[2]) for name in self._kv_names("present")]
        kept = {kept_layer(n): t.cpu().numpy() for n, t in out.items() if kept_layer(n) is not None}
        return PrefillOutput(out["logits"].float().cpu().numpy(), self.kv, kept)

    def decode(self, inputs_embeds: np.ndarray, positions: np.ndarray, layout: RowLayout, past: KVBuffers):
        feed = {INPUTS_EMBEDS: self._tensor(inputs_embeds), POSITION_IDS: _ints(positions)[:, None],
                PAD_LENGTHS: _ints(layout.pad_lengths)}
        shape = (past.batch, *self.kv_shape[1:])
        for i, name in enumerate(self._kv_names("past")):
            feed[name] = past.view(i, past.current[i], past.lengths[i], shape)
        targets = {name: self._kv_target(i, 1 - past.current[i]) for i, name in enumerate(self._kv_names("present"))}
        out = self._run("decode", feed, targets)
        past.current = [1 - c for c in past.current]
        past.lengths = [length + 1 for length in past.lengths]
        return out["logits"].float().cpu().numpy(), past

    def kv_bytes(self, past: KVBuffers) -> int:
        _, heads, _, head_dim = self.kv_shape
        return sum(past.batch * heads * length * head_dim for length in past.lengths) * self.dtype.itemsize

    def _run(self, graph: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        # the inputs were copied on the current stream: TensorRT's stream must not start before those copies end
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            result = self.graphs[graph].run(inputs, outputs, self.stream, self.torch_dtypes)
        self.stream.synchronize()
        return result

    def _allocate_kv(self) -> KVBuffers:
        """Two buffers per layer and kind at that layer's capacity (manifest `kv_capacity`)."""
        import torch

        _, heads, _, head_dim = self.kv_shape
        buffers = []
        for layer, capacity in enumerate(self.manifest.kv_capacity):
            for _ in ("key", "value"):
                size = self.max_batch * heads * capacity * head_dim
                buffers.append((torch.empty(size, dtype=self.dtype, device="cuda"),
                                torch.empty(size, dtype=self.dtype, device="cuda")))
        return KVBuffers(buffers, [0] * len(buffers), [0] * len(buffers))

    def _kv_target(self, index: int, which: int):
        return lambda shape: self.kv.view(index, which, shape[2], shape)

    def _kv_names(self, prefix: str) -> list[str]:
        return kv_names(prefix, self.num_layers)

    def _tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to("cuda", self.dtype)


def _ints(array: np.ndarray):
    import torch

    return torch.as_tensor(np.asarray(array, dtype=np.int64), device="cuda")


def _kv_shape(manifest: EngineManifest) -> tuple[int, int, int, int]:
    """(B, Hkv, -, Dh) from the decode graph's first past input as exported."""
    shape = manifest.onnx_set.io_shape("decode", kv_names("past", 1)[0])
    return 1, shape[1], -1, shape[3]
