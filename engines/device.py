"""The GPU and TensorRT of the machine building or running engines (imported lazily).

`tensorrt` and cuda-python are imported inside the functions: this module is importable, and
its callers' errors are clear, on a machine without either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .errors import INSTALL_HINT, TensorRTUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaDevice:
    """One CUDA device: index, name and compute capability ("8.7")."""

    index: int
    name: str
    sm: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "sm": self.sm}


def import_tensorrt() -> Any:
    """The `tensorrt` module, or `TensorRTUnavailableError` saying where engines are built."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed here ({e}); {INSTALL_HINT}"
        ) from e
    if not hasattr(trt, "Builder"):  # PyPI's `tensorrt` placeholder without the real bindings
        raise TensorRTUnavailableError(
            f"the installed `tensorrt` package has no bindings (a placeholder?); {INSTALL_HINT}"
        )
    return trt


def _cudart() -> Any:
    try:  # cuda-python >= 12.6.1 / 13
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python 12.x before the `cuda.bindings` layout
            from cuda import cudart
        except ImportError as e:
            raise TensorRTUnavailableError(
                f"cuda-python is not installed ({e}); it reports the GPU an engine is built "
                f"for. {INSTALL_HINT}"
            ) from e
    return cudart


def _check(cudart: Any, result: tuple, what: str) -> Any:
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise TensorRTUnavailableError(
            f"CUDA {what} failed ({err}); no usable NVIDIA GPU here. {INSTALL_HINT}"
        )
    return values[0] if len(values) == 1 else values


def cuda_device(index: int | None = None) -> CudaDevice:
    """Name and SM of CUDA device `index` (the current device by default), via cuda-python."""
    cudart = _cudart()
    if index is None:
        index = _check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    props = _check(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return CudaDevice(index=int(index), name=str(name), sm=f"{props.major}.{props.minor}")
