"""A TensorRT bundle's fp16-carrier graphs checked against their fp32 originals, per component.

TensorRT targets consume fp16 weights (`engines.float16`): `build` rewrites each validated fp32
graph with fp16 carriers before it goes into the bundle. The fp32 graph was validated against
PyTorch at the export's tolerance (max abs 1e-4; measured ≤ 1.2e-5 at the 8B's widths), so the
fp16 graph is compared with it on the same validation samples (`GraphSpec.validation_cases`,
the sizes that differ from the traced one in every dynamic axis) — what ONNX Runtime on the
build machine can run of an fp16 graph: it casts the fp16 weights to fp32 kernel by kernel, so
the figure is fp16 *storage* error (weights, scales and intermediate tensors rounded to fp16),
not TensorRT's fp16 accumulation, which only the device measures (`scripts/jetson_check.py`).

The tolerance is relative: max |fp16 - fp32| / max |fp32| per output, at most `FP16_RTOL[c]`.
fp16 keeps 11 significant bits (relative rounding 4.9e-4 per value); a graph's error grows
with its depth and with how much an output is a difference of large terms. Measured
(2026-12-02) on the trained demo model and on the 8B-width random slice, INT4 LLM included:
see `FP16_RTOL`'s comment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from citrus_edge.component_specs import (
    LLM,
    MASK_DECODER,
    SAM_ENCODER,
    VISION,
    llm_spec,
    mask_decoder_spec,
    sam_encoder_spec,
    vision_spec,
)
from citrus_edge.config import CitrusVConfig
from citrus_edge.graph_specs import ExportConfig, GraphSpec

log = logging.getLogger(__name__)

SPECS: dict[str, Callable[[CitrusVConfig, ExportConfig], GraphSpec]] = {
    LLM: llm_spec,
    SAM_ENCODER: sam_encoder_spec,
    MASK_DECODER: mask_decoder_spec,
    VISION: vision_spec,
}
# Max |fp16 - fp32| / max |fp32| per output, worst over outputs and samples. Measured on the
# trained demo model, `build --target orin` (2026-12-02): vision 3.1e-3, sam_encoder 1.0e-3,
# mask_decoder 5.7e-4; the LLM 1.6e-3 with fp16 weights (`--precision fp16`) but 1.4e-2 (a KV
# output; logits 5.1e-3) with the default INT4 weights, whose dequantized weights, AWQ input
# scales and activations all round to fp16 (the same INT4 values: the difference is fp16's
# alone; ONNX Runtime's optimization level and MatMulNBits accuracy level change none of it).
# The bounds leave 3-6x over those; a conversion defect (an overflow to inf, a lost Cast, a
# scale turned to zero) is off by O(1).
FP16_RTOL: dict[str, float] = {
    VISION: 1e-2,
    LLM: 5e-2,
    SAM_ENCODER: 1e-2,
    MASK_DECODER: 1e-2,
}


class CarrierCheckError(RuntimeError):
    """An fp16-carrier graph differs from its fp32 original beyond the component's tolerance."""


@dataclass(frozen=True)
class CarrierError:
    """The largest relative difference of one component's outputs over its samples."""

    component: str
    output: str
    max_abs: float
    max_rel: float
    rtol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.rtol)

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "rtol": self.rtol,
            "reference": "the validated fp32 graph (itself within the export's atol of PyTorch)",
        }


def validation_samples(component: str, cfg: CitrusVConfig):
    """The spec of `component` and its validation samples (the export's default config)."""
    spec = SPECS[component](cfg, ExportConfig())
    samples = [spec.make_sample(c, seed) for seed, c in enumerate(spec.validation_cases, 1)]
    return spec, samples


def run_graph(path: Path, spec: GraphSpec, samples) -> list[dict[str, np.ndarray]]:
    """Every output of the graph at `path` on every sample (ONNX Runtime, CPU), then the session
    is dropped (the 8B's LLM: one session's weights at a time)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    try:
        return [
            dict(zip(spec.output_names, session.run(spec.output_names, s.feeds), strict=True))
            for s in samples
        ]
    finally:
        del session


def compare_outputs(
    component: str,
    want: list[dict[str, np.ndarray]],
    got: list[dict[str, np.ndarray]],
    rtol: float | None = None,
) -> list[CarrierError]:
    """Per output, the worst max abs and max relative difference over the samples."""
    rtol = FP16_RTOL[component] if rtol is None else rtol
    worst: dict[str, tuple[float, float]] = {}
    for w, g in zip(want, got, strict=True):
        for name, ref in w.items():
            ref64, new64 = np.asarray(ref, np.float64), np.asarray(g[name], np.float64)
            if ref64.shape != new64.shape:
                max_abs = max_rel = float("inf")
            elif ref64.size == 0:
                max_abs = max_rel = 0.0
            else:
                diff = np.abs(new64 - ref64)
                max_abs = float(np.where(np.isnan(diff), np.inf, diff).max())
                scale = float(np.abs(ref64).max())
                max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
            a, r = worst.get(name, (0.0, 0.0))
            worst[name] = (max(a, max_abs), max(r, max_rel))
    return [CarrierError(component, n, a, r, rtol) for n, (a, r) in worst.items()]


def check_or_raise(errors: list[CarrierError]) -> dict[str, dict]:
    """The errors as the manifest records them (component -> output -> figures);
    `CarrierCheckError` naming every output over its component's bound."""
    bad = [e for e in errors if not e.ok]
    if bad:
        detail = "; ".join(
            f"{e.component} {e.output} max rel {e.max_rel:.2e} > {e.rtol:.0e} "
            f"(max abs {e.max_abs:.2e})"
            for e in bad
        )
        raise CarrierCheckError(f"fp16 graphs differ from the validated fp32 graphs: {detail}")
    out: dict[str, dict] = {}
    for e in errors:
        out.setdefault(e.component, {})[e.output] = e.to_dict()
    return out
