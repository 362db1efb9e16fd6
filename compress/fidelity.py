"""How far a quantized graph or pipeline is from FP32: SQNR, first-mask Dice, token agreement.

Graph outputs are compared on the recorded inputs of the validation split (`calibrate`); the
pipeline's answers are compared record by record (`calibrate.PipelineRun`). All numpy + ONNX
Runtime, no torch.

ONNX Runtime runs a graph here in one of two modes (`ort_mode`):
- "deploy": default graph optimizations, as the CPU runtime runs it (QDQ fused into integer
  kernels): the numbers are the CPU target's own;
- "reference": optimizations OFF, so every Q/DQ node runs as written (quantize, dequantize, float
  op). This is how the TensorRT-target INT8 Q/DQ graphs are checked on the CPU. It is never used
  for graphs holding ops ORT cannot run faithfully (TensorRT FP8 / INT4 custom ops); those are
  checked structurally only (`qdq_check`), and no accuracy is reported for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from citrus_edge.metrics import dice, token_agreement

from .calibrate import Feeds, Outcome, PipelineRun

ORT_MODES = ("deploy", "reference")
# Which outputs of each graph SQNR is measured on (None: every float output). The LLM's KV cache
# outputs are intermediate; its logits and hidden states are kept for the last
# `LLM_SQNR_POSITIONS` positions of each prefill only (where the answer starts), because the
# 8B's logits over whole prompts would take gigabytes (60 prompts x 300 tokens x 151k x 4 B).
SQNR_OUTPUTS: dict[str, tuple[str, ...] | None] = {
    "vision": None,
    "llm": ("logits", "last_hidden_state"),
    "sam_encoder": None,
    "mask_decoder": None,
}
LLM_SQNR_POSITIONS = 8
# Reported when a graph's outputs equal FP32 exactly (nothing quantized).
EXACT_DB = math.inf


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio `10 log10(sum ref^2 / sum (ref - test)^2)` in dB."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return EXACT_DB
    if signal == 0.0:
        return -EXACT_DB
    return 10.0 * math.log10(signal / noise)


def ort_session(path: Path | bytes, mode: str = "deploy"):
    """An ONNX Runtime CPU session of `path` (or a serialized graph) in `mode`."""
    import onnxruntime as ort

    if mode not in ORT_MODES:
        raise ValueError(f"ort mode {mode!r} is not one of {ORT_MODES}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if mode == "reference":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    graph = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def run_graph(session, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs (float32 where float) of `session` on each feeds dict."""
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    out = []
    for f in feeds:
        values = session.run(None, {n: f[n] for n in inputs})
        out.append({n: np.asarray(v) for n, v in zip(names, values, strict=True)})
    return out


@dataclass(frozen=True)
class GraphFidelity:
    """SQNR of each float output of a graph against FP32, over the recorded samples."""

    component: str
    sqnr_db: dict[str, float]
    n_samples: int

    @property
    def worst_db(self) -> float:
        return min(self.sqnr_db.values()) if self.sqnr_db else EXACT_DB


def output_sqnr(
    reference: Sequence[Mapping[str, np.ndarray]], test: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """SQNR per float output, the signal and the noise summed over all samples."""
    result = {}
    for name in reference[0]:
        if reference[0][name].dtype.kind != "f":
            continue
        ref = np.concatenate([r[name].ravel() for r in reference])
        got = np.concatenate([t[name].ravel().astype(np.float64) for t in test])
        result[name] = sqnr_db(ref, got)
    return result


def sqnr_view(component: str, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of a graph's outputs SQNR is measured on (`SQNR_OUTPUTS`)."""
    keep = SQNR_OUTPUTS.get(component)
    view = {k: v for k, v in outputs.items() if keep is None or k in keep}
    if component == "llm":
        view = {k: v[:, -LLM_SQNR_POSITIONS:] for k, v in view.items()}  # [B, S', ...]
    return view


def reference_outputs(
    component: str, graph: Path, feeds: Sequence[Feeds], mode: str = "deploy"
) -> list[dict[str, np.ndarray]]:
    """The FP32 graph's `sqnr_view` outputs on each feeds dict, kept to compare against."""
    return [sqnr_view(component, o) for o in run_graph(ort_session(graph, mode), feeds)]


def graph_fidelity(
    component: str,
    reference: Sequence[Mapping[str, np.ndarray]],
    quantized: Path | bytes,
    feeds: Sequence[Feeds],
    mode: str = "deploy",
) -> GraphFidelity:
    """SQNR of `quantized` against the FP32 graph's `reference` (from `reference_outputs`) on
    the same `feeds`."""
    outputs = [sqnr_view(component, o) for o in run_graph(ort_session(quantized, mode), feeds)]
    return GraphFidelity(component, output_sqnr(reference, outputs), len(feeds))


@dataclass(frozen=True)
class PipelineFidelity:
    """Answer-level agreement of a quantized pipeline with FP32 on the validation split.

    `dice_drop` compares the masks the two pipelines answer with: a segmentation answer without
    `[SEG]` answers "no mask", so two such answers agree (Dice 1, both empty) and a mask against
    none scores 0. `probe_dice_drop` compares the probe masks (the decoder fed the final state,
    `calibrate.Outcome.probe`) of the records both answered without a mask: the decoder's
    fidelity there, which no user sees; reported, not budgeted.
    """

    dice_drop: float | None  # 1 - mean Dice(quantized answer mask, FP32 answer mask)
    token_agreement: float | None
    n_records: int
    n_masks: int
    n_probes: int
    per_record: dict[str, dict[str, float]]
    probe_dice_drop: float | None = None


def answer_dice(ref: Outcome, got: Outcome) -> float:
    """Dice of the quantized answer's first mask against FP32's (a probe is no answer mask)."""
    if ref.probe or got.probe:
        return 1.0 if ref.probe and got.probe else 0.0
    return dice(got.first_mask, ref.first_mask)


def compare_runs(reference: PipelineRun, test: PipelineRun) -> PipelineFidelity:
    """Compare two runs of the same records: first-mask Dice and greedy token agreement."""
    if [o.id for o in reference.outcomes] != [o.id for o in test.outcomes]:
        raise ValueError("the two runs cover different records")
    dices, probes, agreements, per_record = [], [], [], {}
    for ref, got in zip(reference.outcomes, test.outcomes, strict=True):
        scores = {"token_agreement": token_agreement(ref.tokens, got.tokens)}
        agreements.append(scores["token_agreement"])
        if ref.first_mask is not None:
            scores["dice"] = answer_dice(ref, got)
            dices.append(scores["dice"])
            if ref.probe and got.probe:
                scores["probe_dice"] = dice(got.first_mask, ref.first_mask)
                probes.append(scores["probe_dice"])
        per_record[ref.id] = scores
    return PipelineFidelity(
        dice_drop=1.0 - float(np.mean(dices)) if dices else None,
        token_agreement=float(np.mean(agreements)) if agreements else None,
        n_records=len(agreements),
        n_masks=len(dices),
        n_probes=reference.n_probes,
        per_record=per_record,
        probe_dice_drop=1.0 - float(np.mean(probes)) if probes else None,
    )
