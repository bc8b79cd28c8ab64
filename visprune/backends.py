"""The engine backends and the export targets, and which backends run each target: one list of each.

Export targets (flavours) -> their default opset. "tensorrt": standard opset-18 ops only, attention in the
pre-scaled MatMul -> Softmax -> MatMul form TensorRT fuses; every backend runs it. "onnxruntime": opset 23's
Attention, RMSNormalization and RotaryEmbedding, which ONNX Runtime runs as fused kernels and TensorRT's parser
does not promise. exporter/graphs.py maps each to its decoder kernels.
"""

from __future__ import annotations

BACKENDS = ("onnxruntime", "tensorrt", "pytorch")  # what an engine folder runs on (engine.json `backend`)
AUTO = "auto"  # a choice, not a backend: TensorRT where available (and the set is exported for it), else onnxruntime
BACKEND_CHOICES = (*BACKENDS, AUTO)
EXPORT_TARGETS = {"onnxruntime": 23, "tensorrt": 18}
TARGET_BACKENDS = {"onnxruntime": ("onnxruntime", "pytorch"), "tensorrt": ("tensorrt", "onnxruntime", "pytorch")}
