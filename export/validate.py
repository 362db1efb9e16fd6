"""Run an exported graph in ONNX Runtime (CPU) against PyTorch; fail with a typed error.

The samples are fresh: new random values, and sizes that differ from the traced sample in every
dynamic axis, so a size frozen by tracing fails here rather than on the cart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .spec import GraphSpec, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputError:
    """Difference of one output on one sample between ONNX Runtime and PyTorch."""

    sample: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    atol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.atol)

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "ok": self.ok}

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAIL"
        return (
            f"{self.output} [{self.sample}] shape {list(self.shape)}: max abs {self.max_abs:.3e}, "
            f"max rel {self.max_rel:.3e} (atol {self.atol:.0e}) {flag}"
        )


class ExportValidationError(RuntimeError):
    """An exported graph disagrees with PyTorch; `errors` holds every output's numbers."""

    def __init__(self, graph: str, errors: list[OutputError]):
        self.graph, self.errors = graph, errors
        lines = "\n  ".join(str(e) for e in errors)
        super().__init__(
            f"{graph}: ONNX Runtime output differs from PyTorch beyond tolerance:\n  {lines}"
        )


def compare(sample: str, name: str, got: np.ndarray, want: np.ndarray, atol: float) -> OutputError:
    """Max abs and relative error of one output; a shape mismatch counts as infinite error."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        log.error("%s %s: shape %s, expected %s", sample, name, got.shape, want.shape)
        return OutputError(sample, name, tuple(got.shape), float("inf"), float("inf"), atol)
    if got.size == 0:
        return OutputError(sample, name, tuple(got.shape), 0.0, 0.0, atol)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(np.nan_to_num(diff, nan=np.inf).max())
    scale = float(np.abs(want).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputError(sample, name, tuple(got.shape), max_abs, max_rel, atol)


def cpu_session(onnx_path: Path):
    """An ONNX Runtime session on the CPU execution provider only."""
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def validate_graph(
    onnx_path: Path,
    spec: GraphSpec,
    samples: Iterable[Sample],
    reference: Callable[[Sample], dict[str, np.ndarray]],
) -> list[OutputError]:
    """Compare every output of the graph with `reference` on every sample.

    Returns the errors of all outputs; raises `ExportValidationError` listing all of them when
    any exceeds `spec.atol`.
    """
    session = cpu_session(onnx_path)
    errors = []
    for sample in samples:
        spec.check_feeds(sample.feeds)
        got = session.run(spec.output_names, sample.feeds)
        want = reference(sample)
        for name, value in zip(spec.output_names, got, strict=True):
            errors.append(compare(sample.label, name, value, want[name], spec.atol))
    for e in errors:
        log.debug("%s: %s", spec.component, e)
    if not all(e.ok for e in errors):
        raise ExportValidationError(spec.component, errors)
    return errors
