"""citrus_edge.engines: turn a bundle's ONNX graphs into engines on the device they run on.

- `make_engine_plan(bundle_or_onnx_dir, target, recipe, config)` -> `EnginePlan`: per component
  the ONNX file, precision, strongly-typed flag, builder flags, FP32 layers, optimisation
  profiles, DLA core; workspace, TensorRT version and timing cache for the whole build. Pure
  Python (reads the graphs with `onnx`, no weights); JSON round trip with `to_json`/`from_json`.
- `build_bundle_engines(bundle_dir, target=None, out=None)`: what `citrus-edge engines build`
  calls; TensorRT engines (`build_engines`) or, for the `cpu` target, ONNX Runtime-optimized
  graphs (`optimize_for_cpu`).
- `check_engine_compat(sidecar, runtime_trt_version, device_sm)`: refuse an engine built for
  another TensorRT or GPU, with the command that rebuilds it.

Importing this package imports neither TensorRT nor ONNX Runtime nor onnx; the builders load
them on first use.
"""

from __future__ import annotations

from typing import Any

from .compat import check_engine_compat
from .engine_errors import (
    DeviceMismatchError,
    EngineBuildError,
    EngineMismatchError,
    EnginePlanError,
    OnnxParseError,
    OptimizedGraphMismatchError,
    TensorRTUnavailableError,
    TimingCacheError,
)
from .engine_plan import PLAN_FILE, ComponentEngine, EngineOptions, EnginePlan, make_engine_plan
from .profiles import ProfileConfig

__all__ = [
    "PLAN_FILE",
    "ComponentEngine",
    "DeviceMismatchError",
    "EngineBuildError",
    "EngineMismatchError",
    "EngineOptions",
    "EnginePlan",
    "EnginePlanError",
    "OnnxParseError",
    "OptimizedGraphMismatchError",
    "ProfileConfig",
    "TensorRTUnavailableError",
    "TimingCacheError",
    "build_bundle_engines",
    "build_engines",
    "check_engine_compat",
    "make_engine_plan",
    "optimize_for_cpu",
]

_LAZY = {
    "build_bundle_engines": "bundle_engines",
    "build_engines": "tensorrt_builder",
    "optimize_for_cpu": "ort_sessions",
}


def __getattr__(name: str) -> Any:
    # Lazy: the builders import onnxruntime / tensorrt when they run.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
