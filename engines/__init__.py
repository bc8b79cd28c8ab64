"""Stage 3, engines: build runnable engines from an exported ONNX set (ONNX Runtime here; TensorRT next).

    from engines import BuildConfig, build_engine
    build_engine(BuildConfig(backend="onnxruntime"), "runs/demo/onnx", "runs/demo/engine")
"""

from engines.build import BuildConfig, build_engine, load_engine_manifest

__all__ = ["BuildConfig", "build_engine", "load_engine_manifest"]
