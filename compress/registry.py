"""The registry of graph quantizers, keyed by (backend, precision) (torch-free).

A quantizer module registers a factory for each (backend, precision) it serves:

    @register_quantizer("onnxruntime", "int8")
    def _ort_int8(request: QuantRequest) -> GraphQuantizer: ...

`get_quantizer` imports the built-in modules on first use, so `modelopt` loads only when a
TensorRT target asks for it. A (backend, precision) nobody serves is an
`UnsupportedQuantizationError`, never a fallback to another precision.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .calibrate import Feeds
from .settings import Settings

# Built-in quantizer modules, imported on first use by `get_quantizer`.
BUILTIN_MODULES = (
    "citrus_edge.compress.ort_quant",
    "citrus_edge.compress.modelopt_quant",
    "citrus_edge.compress.modelopt_llm",
    "citrus_edge.compress.int4_awq",
)


class UnsupportedQuantizationError(ValueError):
    """No quantizer serves a (backend, precision, component), or its settings do not fit."""


@dataclass(frozen=True)
class QuantRequest:
    """What a factory needs to prepare one graph's quantization.

    src: the FP32 graph, copied into `workdir` (quantizers may write beside it);
    calib: recorded feeds of the calibration split; method: "minmax", "entropy", "percentile";
    checkpoint: the float checkpoint, for quantizers that work on PyTorch weights.
    """

    component: str
    precision: str
    backend: str
    src: Path
    workdir: Path
    settings: Settings
    calib: Sequence[Feeds]
    method: str
    checkpoint: Path | None = None


@dataclass(frozen=True)
class Candidate:
    """One node a quantizer would quantize: its name and op type, in graph order."""

    name: str
    op_type: str


class GraphQuantizer(Protocol):
    """A graph calibrated once and written any number of times with nodes left float.

    ort_mode: how ONNX Runtime on the CPU can check the written graph's outputs ("deploy",
    "reference", see `fidelity`), or None when it cannot run it faithfully (structural checks
    only).
    """

    component: str
    precision: str
    scheme: str
    ort_mode: str | None

    def candidates(self) -> list[Candidate]:
        """The nodes quantized when nothing is excluded, in graph order."""
        ...

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        """Write the quantized graph to `dst`, leaving the nodes named in `exclude` float."""
        ...

    def describe(self) -> dict:
        """JSON-ready description (scheme, settings, calibration) for the report."""
        ...


QuantizerFactory = Callable[[QuantRequest], GraphQuantizer]
RequestCheck = Callable[[QuantRequest], None]
REGISTRY: dict[tuple[str, str], QuantizerFactory] = {}
# Cheap checks run by `quantize` before any work (settings that fit, methods, checkpoint).
CHECKS: dict[tuple[str, str], RequestCheck] = {}


def register_quantizer(
    backend: str, precision: str, check: RequestCheck | None = None
) -> Callable[[QuantizerFactory], QuantizerFactory]:
    """Decorator: `factory` serves `precision` on `backend`; a second registration is an error.

    `check(request)` (optional) raises `UnsupportedQuantizationError` for a request the factory
    would refuse; it must not touch `request.src` or `request.calib` (a dry request has none).
    """

    def add(factory: QuantizerFactory) -> QuantizerFactory:
        key = (backend, precision)
        if key in REGISTRY and REGISTRY[key] is not factory:
            raise ValueError(f"a quantizer for {key} is already registered")
        REGISTRY[key] = factory
        if check is not None:
            CHECKS[key] = check
        return factory

    return add


def check_request(request: QuantRequest) -> None:
    """Run the registered check of (request.backend, request.precision), if any."""
    get_quantizer(request.backend, request.precision)
    check = CHECKS.get((request.backend, request.precision))
    if check is not None:
        check(request)


def load_builtin() -> None:
    """Import the built-in quantizer modules (each registers itself; modelopt stays lazy)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def get_quantizer(backend: str, precision: str) -> QuantizerFactory:
    """The factory for (backend, precision); UnsupportedQuantizationError naming what exists."""
    load_builtin()
    try:
        return REGISTRY[(backend, precision)]
    except KeyError:
        known = ", ".join(f"{b}/{p}" for b, p in sorted(REGISTRY))
        raise UnsupportedQuantizationError(
            f"no quantizer produces {precision} graphs for the {backend} backend "
            f"(available: {known}); choose a recipe with another precision for this component"
        ) from None
