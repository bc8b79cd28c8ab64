"""Stage 3, engines: build runnable engines from an exported ONNX set: ONNX Runtime (CPU or CUDA), TensorRT
(NVIDIA GPUs), or the PyTorch backend's record of the pruned model.

    from engines import BuildConfig, build_engine
    build_engine(BuildConfig(backend="onnxruntime"), "runs/demo/onnx", "runs/demo/engine")
"""

from engines.build import BuildConfig, auto_backend, build_engine

__all__ = ["BuildConfig", "auto_backend", "build_engine"]
