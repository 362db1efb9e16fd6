"""NVIDIA ModelOpt ONNX PTQ for the TensorRT targets: explicit Q/DQ graphs, INT8 or FP8.

Registered for ("tensorrt", "int8") and ("tensorrt", "fp8") for the encoders and the mask
decoder (the int8 / fp8 LLM goes through `modelopt_llm`, ModelOpt's PyTorch path), and for
("tensorrt", "int4"): the LLM step graph's INT4 weight-only AWQ (`ModelOptInt4Quantizer`).
ModelOpt is imported inside the functions that call it, never at module import (seconds).

Calling `modelopt.onnx.quantization.quantize` (signature checked against nvidia-modelopt 0.47):
- `calibration_data_reader`: the recorded real inputs (`calibrate.as_calibration_reader`);
- `calibration_method`: "max" for our "minmax", "entropy"; ModelOpt has no percentile for
  int8/fp8, so "percentile" is refused rather than replaced;
- `calibration_eps`: the settings' providers, ["cpu"] by default (no GPU needed to build);
- `high_precision_dtype="fp32"`: its default "fp16" converts the rest of the graph to float16,
  which ONNX Runtime on the CPU cannot validate; TensorRT picks fp16 at engine build anyway;
- `op_types_to_quantize` = GEMM-like ops: ModelOpt's int8 heuristics would otherwise put Q/DQ on
  the residual Adds and, in the vision encoder, on its decomposed RMSNorm (Pow, Mul) and rotary
  Muls (observed on the TINY export) — kept float per ANCHORS.md;
- `nodes_to_exclude`: regular expressions (`re.match`), so node names are escaped and anchored.

How the result is checked (see `fidelity`): INT8 Q/DQ graphs run in ONNX Runtime with graph
optimizations OFF ("reference": each Q/DQ as written), which is what their SQNR is read from.
FP8 graphs are checked structurally only (`qdq_check`: Q/DQ around the GEMMs, finite scales,
FLOAT8E4M3FN zero points): ONNX Runtime on the CPU has no FP8 GEMM and was seen to give silently
wrong FP8 results with optimizations on, so no accuracy is ever reported from such a run.
INT4 graphs use only standard opset-21 blocked DequantizeLinear, which ONNX Runtime 1.24 runs on
the CPU with the same result with optimizations on and off (TINY LLM logits 18.6 dB either way,
and MatMulNBits int4 gives 18.7-19.7 dB on the same graph): they are checked in "reference" mode.

AWQ-lite runs with node fusion off (`awqlite_fuse_nodes=False`, `ModelOptInt4Settings.
awq_fuse_nodes`): ModelOpt 0.23-0.47's fused path calls cupy's `.get()` on numpy arrays on every
machine without a GPU, Jetsons included (`AttributeError: 'numpy.ndarray' object has no
attribute 'get'`); `test_quantize_modelopt.py` fails once an upgrade fixes it.

ModelOpt's ONNX AWQ concatenates the calibration activations of all samples, so they must share
one sequence length: the recorded prefill feeds are cut to the shortest one (a shorter prompt
prefix is still a valid prefill: same positions, mask and cache).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import onnx

from .calibrate import as_calibration_reader
from .ort_isolation import ort_patches_undone
from .ort_quant import skipped_ends
from .qdq_check import QuantizedGraphError
from .registry import Candidate, QuantRequest, UnsupportedQuantizationError, register_quantizer
from .settings import ModelOptInt4Settings, ModelOptOnnxSettings, settings_to_dict

log = logging.getLogger(__name__)

# Our calibration method names -> ModelOpt's (int8 / fp8 support "max" and "entropy").
METHODS = {"minmax": "max", "entropy": "entropy"}
# Which ONNX Runtime mode can check each mode's graphs faithfully (None: structural only).
ORT_MODE = {"int8": "reference", "fp8": None}


def _anchored(name: str) -> str:
    return f"^{re.escape(name)}$"


class ModelOptOnnxQuantizer:
    """ModelOpt `quantize` of one graph; re-run for each set of nodes left float."""

    qdq_graph = True  # node names kept: sensitivity trials may rewire nodes to float inputs

    def __init__(self, request: QuantRequest, settings: ModelOptOnnxSettings):
        _check_onnx(request)
        self.component, self.precision = request.component, request.precision
        self.settings, self.method, self.src = settings, request.method, Path(request.src)
        self.scheme, self.ort_mode = settings.scheme, ORT_MODE[settings.mode]
        self.per_channel_weights = settings.mode == "int8"  # ModelOpt int8: per-channel weights
        self.calib = list(request.calib)
        model = onnx.load(str(self.src), load_external_data=False)
        self.input_names = [i.name for i in model.graph.input]
        excluded_types = set(settings.op_types_to_exclude)
        self._candidates = [
            Candidate(n.name, n.op_type)
            for n in model.graph.node
            if n.op_type in settings.op_types and n.op_type not in excluded_types
        ]
        self.external = Path(f"{self.src}.data").is_file()

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        from modelopt.onnx.quantization import quantize as modelopt_quantize

        s = self.settings
        fixed = set(s.nodes_to_exclude) | skipped_ends(self._candidates, s.skip_first, s.skip_last)
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), ort_patches_undone():
            modelopt_quantize(
                onnx_path=str(self.src),
                quantize_mode=s.mode,
                calibration_data_reader=as_calibration_reader(self.calib, self.input_names),
                calibration_method=METHODS[self.method],
                calibration_eps=list(s.calibration_eps),
                op_types_to_quantize=[t for t in s.op_types if t not in s.op_types_to_exclude],
                op_types_to_exclude=list(s.op_types_to_exclude),
                nodes_to_exclude=[_anchored(n) for n in sorted(fixed | set(exclude))],
                use_external_data_format=self.external,
                output_path=str(dst),
                high_precision_dtype=s.high_precision_dtype,
                disable_mha_qdq=s.disable_mha_qdq,
                log_level="WARNING",
            )
        log.debug("%s: modelopt said %s", self.component, quiet.getvalue()[-2000:])

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "settings": settings_to_dict(self.settings),
            "calibration": {"method": METHODS[self.method], "samples": len(self.calib)},
            "validated_by": "ort-reference" if self.ort_mode else "structure only",
        }


def _check_onnx(request: QuantRequest) -> None:
    settings = request.settings
    if not isinstance(settings, ModelOptOnnxSettings):
        raise UnsupportedQuantizationError(
            f"{request.component}: TensorRT {request.precision} graphs come from ModelOpt "
            f"(ModelOptOnnxSettings), got {type(settings).__name__}"
        )
    if request.method not in METHODS:
        raise UnsupportedQuantizationError(
            f"{request.component}: ModelOpt calibrates {settings.mode} with "
            f"{' or '.join(METHODS)}, not {request.method!r}; choose one of those"
        )
    if settings.mode != request.precision:
        raise UnsupportedQuantizationError(
            f"{request.component}: the recipe asks for {request.precision}, the settings "
            f"for {settings.mode}; a precision is never changed silently"
        )


def _check(request: QuantRequest) -> None:
    """The LLM takes the PyTorch path (`modelopt_llm`); every other graph the ONNX path."""
    if request.component == "llm":
        from .modelopt_llm import check_llm_request

        check_llm_request(request)
    else:
        _check_onnx(request)


def _factory(request: QuantRequest):
    if request.component == "llm":
        from .modelopt_llm import modelopt_llm_quantizer

        return modelopt_llm_quantizer(request)
    return ModelOptOnnxQuantizer(request, request.settings)


register_quantizer("tensorrt", "int8", check=_check)(_factory)
register_quantizer("tensorrt", "fp8", check=_check)(_factory)


def same_length_prefills(feeds: list[dict]) -> list[dict]:
    """Prefill feeds cut to the shortest sequence (AWQ on ONNX stacks them)."""
    n = min(f["inputs_embeds"].shape[1] for f in feeds)
    out = []
    for f in feeds:
        g = dict(f)
        g["inputs_embeds"] = f["inputs_embeds"][:, :n]  # [B, S, H]
        g["position_ids"] = f["position_ids"][:, :, :n]  # [3, B, S]
        g["attention_mask"] = f["attention_mask"][:, :n]  # [B, S] (empty cache: P = 0)
        out.append(g)
    return out


class ModelOptInt4Quantizer:
    """ModelOpt ONNX INT4 weight-only (AWQ or RTN) of the LLM step graph, blocked DQ weights."""

    ort_mode = "reference"
    qdq_graph = True  # DQ-only weights, node names kept: trials may rewire nodes to float
    per_channel_weights = False

    def __init__(self, request: QuantRequest, settings: ModelOptInt4Settings):
        _check_int4(request)
        self.component, self.precision = request.component, request.precision
        self.settings, self.src = settings, Path(request.src)
        self.scheme, self.method = settings.scheme, settings.method
        self.calib = same_length_prefills(list(request.calib))
        model = onnx.load(str(self.src), load_external_data=False)
        self.input_names = [i.name for i in model.graph.input]
        weights = {i.name for i in model.graph.initializer}
        self._candidates = [
            Candidate(n.name, n.op_type)
            for n in model.graph.node
            if n.op_type in settings.op_types and n.input[1] in weights
        ]
        self.external = Path(f"{self.src}.data").is_file()

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        from modelopt.onnx.quantization import quantize as modelopt_quantize

        s = self.settings
        fixed = set(s.nodes_to_exclude) | skipped_ends(self._candidates, s.skip_first, s.skip_last)
        with contextlib.redirect_stdout(io.StringIO()), ort_patches_undone():
            modelopt_quantize(
                onnx_path=str(self.src),
                quantize_mode="int4",
                calibration_data_reader=as_calibration_reader(self.calib, self.input_names),
                calibration_method=s.method,
                calibration_eps=list(s.calibration_eps),
                nodes_to_exclude=[_anchored(n) for n in sorted(fixed | set(exclude))],
                block_size=s.block_size,
                use_external_data_format=self.external,
                output_path=str(dst),
                log_level="WARNING",
                **_awq_options(s),
            )
        if self.external:
            adopt_external_data(Path(dst))

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "settings": settings_to_dict(self.settings),
            "calibration": {
                "method": self.method,
                "samples": len(self.calib),
                "tokens_per_sample": int(self.calib[0]["inputs_embeds"].shape[1]),
            },
            "validated_by": "ort-reference",
        }


def adopt_external_data(graph: Path) -> None:
    """Rename the external data ModelOpt writes (`<name>.onnx_data`, or any other file name) to
    ours (`<name>.onnx.data`, what the rest of compress/ and the bundle expect), rewriting the
    tensors' `location` in place: offsets are unchanged, no weight is loaded."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(graph), load_external_data=False)
    ours = f"{graph.name}.data"
    renamed: set[str] = set()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        if location == ours:
            continue
        renamed.add(location)
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = ours
    if not renamed:
        return
    if len(renamed) > 1:
        raise QuantizedGraphError(
            f"{graph}: ModelOpt wrote external data to {sorted(renamed)}; one file was expected"
        )
    (graph.parent / renamed.pop()).rename(graph.parent / ours)
    onnx.save(model, str(graph))


def _awq_options(s: ModelOptInt4Settings) -> dict:
    """ModelOpt INT4 keyword options of `s`: node fusion off unless asked (see the settings)."""
    if s.method != "awq_lite":
        return {}
    if s.awq_fuse_nodes and not _cupy_on_gpu():
        raise UnsupportedQuantizationError(
            "llm: awq_fuse_nodes=True needs cupy on a CUDA GPU (ModelOpt's fused AWQ-lite calls "
            "cupy's .get() and fails on numpy); build with awq_fuse_nodes=False"
        )
    return {"awqlite_fuse_nodes": s.awq_fuse_nodes}


def _cupy_on_gpu() -> bool:
    from modelopt.onnx.quantization import int4

    return bool(getattr(int4, "has_cupy", False))


def _check_int4(request: QuantRequest) -> None:
    if request.component != "llm":
        raise UnsupportedQuantizationError(
            f"{request.component}: int4 is the LLM's weight-only format (recipes.Precision)"
        )
    if not isinstance(request.settings, ModelOptInt4Settings):
        raise UnsupportedQuantizationError(
            f"llm: TensorRT int4 takes ModelOptInt4Settings, got {type(request.settings).__name__}"
        )
