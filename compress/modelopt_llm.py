"""The LLM for TensorRT targets: ModelOpt PyTorch PTQ, then re-export of its step graph.

INT8 SmoothQuant (W8A8) or FP8 per `settings.TRT_LLM`, calibrated with a forward loop over the
recorded prefill feeds of the calib split (the real prompt embeddings with the vision features
spliced in, real mRoPE positions), then traced with the LLM component's own wrapper and spec
(`modelling.export_wrappers.LlmStepExport`, `component_specs.llm_spec`) by the tracer the
export stage uses (`modelling.onnx_trace.torch_export`), so the graph has the same inputs,
outputs and dynamic axes as the FP32 one.

INT4-AWQ does not take this path: with nvidia-modelopt 0.47, `torch.onnx.export` of an
`INT4_AWQ_CFG` model folds the static block quantizer of each weight into a float constant (the
graph holds no `trt::DequantizeLinear`, so no int4 weights — measured on the TINY export, and
caught by `qdq_check`). The int4 LLM therefore goes through ModelOpt's ONNX AWQ on the exported
step graph (`modelopt_quant.ModelOptInt4Quantizer`), which writes the blocked INT4
DequantizeLinear graph TensorRT takes.

`modelopt.torch` takes ~20 s to import and torch itself is heavy: both are imported inside the
functions here, never at module import. The tests of this path carry `@pytest.mark.slow`.

Validation: ModelOpt exports INT8 fake quantization as standard QuantizeLinear/DequantizeLinear
(ONNX Runtime runs it with optimizations off: "reference"), but FP8 as `trt::TRT_FP8*` custom
ops that ONNX Runtime cannot run: those graphs are checked structurally only and their accuracy
is never reported from an ORT run. The sensitivity search does not re-run PyTorch PTQ per layer
group: `candidates()` is empty, so a missed budget on this path raises `BudgetNotMetError`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .registry import Candidate, QuantRequest, UnsupportedQuantizationError
from .settings import ModelOptLlmSettings, settings_to_dict

log = logging.getLogger(__name__)

# ModelOpt PyTorch preset per algorithm (names in modelopt.torch.quantization).
PRESETS = {
    "smoothquant": "INT8_SMOOTHQUANT_CFG",
    "awq_lite": "INT4_AWQ_CFG",
    "max": "FP8_DEFAULT_CFG",
}
ALGORITHM_PRECISION = {"smoothquant": "int8", "awq_lite": "int4", "max": "fp8"}
ORT_MODE = {"int8": "reference", "int4": None, "fp8": None}
# Opset of the re-exported graph: FP8 / INT4 custom ops and per-channel Q/DQ need >= 19 for
# TensorRT's parser to take the float8 / blocked types.
OPSET = 19


class ModelOptLlmQuantizer:
    """PTQ of the checkpoint's LLM with ModelOpt PyTorch, traced to the LLM step graph."""

    def __init__(self, request: QuantRequest, settings: ModelOptLlmSettings):
        check_llm_request(request)
        precision = ALGORITHM_PRECISION[settings.algorithm]
        self.component, self.precision = request.component, request.precision
        self.settings, self.checkpoint = settings, Path(request.checkpoint)
        self.scheme, self.ort_mode = settings.scheme, ORT_MODE[precision]
        self.per_channel_weights = False
        self.calib = list(request.calib)[: settings.max_calib_samples]
        self.seconds = 0.0

    def candidates(self) -> list[Candidate]:
        return []  # no per-group search on this path (see the module docstring)

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        t0 = time.perf_counter()
        wrapper, model_config = _quantized_llm(self.checkpoint, self.settings, self.calib)
        export_llm_graph(wrapper, model_config, Path(dst))
        self.seconds = time.perf_counter() - t0
        log.info("llm: ModelOpt %s + export in %.0f s", self.settings.algorithm, self.seconds)

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "settings": settings_to_dict(self.settings),
            "preset": PRESETS[self.settings.algorithm],
            "calibration": {"samples": len(self.calib), "source": "recorded prefill feeds"},
            "validated_by": "ort-reference" if self.ort_mode else "structure only",
            "seconds": round(self.seconds, 1),
        }


def _quantized_llm(checkpoint: Path, settings: ModelOptLlmSettings, calib: list):
    """The checkpoint's LLM step wrapper, fake-quantized and calibrated, and the model config."""
    import modelopt.torch.quantization as mtq
    import torch

    from citrus_edge.modelling.checkpoint import load_checkpoint
    from citrus_edge.modelling.export_wrappers import LlmStepExport

    model = load_checkpoint(checkpoint)
    wrapper = LlmStepExport(model).eval()
    names = _input_names(wrapper)
    config = getattr(mtq, PRESETS[settings.algorithm])

    def forward_loop(module) -> None:
        with torch.no_grad():
            for feeds in calib:
                module(*(torch.from_numpy(feeds[n]) for n in names))

    return mtq.quantize(wrapper, config, forward_loop), model.config


def _input_names(wrapper) -> list[str]:
    from citrus_edge.host_inputs import past_names

    return ["inputs_embeds", "position_ids", "attention_mask", *past_names(len(wrapper.lm.layers))]


def export_llm_graph(wrapper, model_config, dst: Path) -> None:
    """Trace the (quantized) LLM step wrapper with the LLM spec's names and dynamic axes."""
    from citrus_edge.component_specs import llm_spec
    from citrus_edge.graph_specs import ExportConfig
    from citrus_edge.modelling.onnx_trace import torch_export

    spec = llm_spec(model_config, ExportConfig(opset=OPSET))
    torch_export(wrapper, spec, Path(dst), OPSET)


def check_llm_request(request: QuantRequest) -> None:
    """Refuse before any work: wrong component or settings, precision change, no checkpoint."""
    if request.component != "llm":
        raise UnsupportedQuantizationError(
            f"{request.component}: the ModelOpt PyTorch path quantizes the LLM only"
        )
    settings = request.settings
    if not isinstance(settings, ModelOptLlmSettings):
        raise UnsupportedQuantizationError(
            f"llm: TensorRT LLM quantization takes ModelOptLlmSettings, got "
            f"{type(settings).__name__}"
        )
    precision = ALGORITHM_PRECISION[settings.algorithm]
    if precision != request.precision:
        raise UnsupportedQuantizationError(
            f"llm: {settings.algorithm} gives {precision}, the recipe asks for "
            f"{request.precision}; a precision is never changed silently"
        )
    if request.checkpoint is None:
        raise UnsupportedQuantizationError(
            "llm: TensorRT LLM quantization runs ModelOpt on the PyTorch weights; pass "
            "checkpoint=<the float checkpoint folder the export was made from>"
        )


def modelopt_llm_quantizer(request: QuantRequest) -> ModelOptLlmQuantizer:
    """Factory used by `modelopt_quant` for the "llm" component on TensorRT targets."""
    return ModelOptLlmQuantizer(request, request.settings)
