"""The GPU and TensorRT of the machine building or running engines (imported lazily).

`tensorrt` and cuda-python are imported inside the functions: this module is importable, and
its callers' errors are clear, on a machine without either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .engine_errors import INSTALL_HINT, TensorRTUnavailableError

log = logging.getLogger(__name__)

TENSORRT_MAJOR = "10"  # the API used here; pyproject's `tensorrt` extra is >=10.3,<11


@dataclass(frozen=True)
class CudaDevice:
    """One CUDA device: index, name, compute capability ("8.7") and, on a Jetson, the module
    (the device tree's model string and memory, `citrus_edge.jetson`): CUDA names every Orin GPU
    "Orin" and all are sm_87, so only the module tells an AGX, an NX and a Nano apart."""

    index: int
    name: str
    sm: str
    module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "sm": self.sm, "module": self.module}


def jetson_module() -> str | None:
    """This Jetson's module (`JetsonModule.describe()`), or None off a Jetson."""
    from citrus_edge.jetson import detect_jetson

    module = detect_jetson()
    return None if module is None else module.describe()


def jetson_target() -> str | None:
    """The target this Jetson is (`targets.module_target`), None off a Jetson or on a Jetson
    no target describes (its builds then name the target explicitly)."""
    from citrus_edge.jetson import detect_jetson
    from citrus_edge.targets import UnknownModuleError, module_target

    module = detect_jetson()
    if module is None:
        return None
    try:
        return module_target(module).name
    except UnknownModuleError as e:
        log.warning("%s", e)
        return None


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
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if major != TENSORRT_MAJOR:
        # TensorRT 11 drops the weakly typed builder (BuilderFlag.FP16/BF16/INT8,
        # ILayer.precision) that fp16 float graphs are built with here.
        raise TensorRTUnavailableError(
            f"TensorRT {trt.__version__} is installed; citrus-edge builds engines with TensorRT "
            f"{TENSORRT_MAJOR}.x (10.3 or later, JetPack 6.1/6.2 ships 10.3). {INSTALL_HINT}"
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
    sm = f"{props.major}.{props.minor}"
    return CudaDevice(index=int(index), name=str(name), sm=sm, module=jetson_module())
