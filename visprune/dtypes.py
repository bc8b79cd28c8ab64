"""The export dtypes and what each one is in every library that handles it: one table.

torch is imported only when a torch dtype is asked for (the ONNX Runtime path and the CLI run without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dtype:
    name: str  # as the CLI, ExportConfig and the ONNX-set manifest spell it; torch's attribute of that name
    host: str  # numpy dtype of host-side arrays (embeddings, inputs); numpy has no bfloat16: those stay float32 and
    # the backend casts on the way in
    ort: str  # ONNX Runtime's type name of such a tensor
    itemsize: int  # bytes per element on the device

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.name)

    @property
    def numpy(self) -> Any:
        import numpy as np

        return np.dtype(self.host)


DTYPE_TABLE = {d.name: d for d in (Dtype("float32", "float32", "tensor(float)", 4),
                                   Dtype("float16", "float16", "tensor(float16)", 2),
                                   Dtype("bfloat16", "float32", "tensor(bfloat16)", 2))}
DTYPES = tuple(DTYPE_TABLE)  # the choices, in the order help texts list them


def torch_dtype(name: str) -> Any:
    """torch's dtype of an export dtype name ("float16" -> torch.float16)."""
    return DTYPE_TABLE[name].torch


def host_dtype(name: str) -> Any:
    """The numpy dtype host arrays of a set of this dtype have (bfloat16: float32)."""
    return DTYPE_TABLE[name].numpy
