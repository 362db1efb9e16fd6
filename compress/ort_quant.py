"""ONNX Runtime quantizers for the CPU target: static INT8 QDQ, dynamic INT8, MatMulNBits.

Registered for ("onnxruntime", "int8") and ("onnxruntime", "int4"); the settings type chooses
the scheme (`settings.DEFAULT_SETTINGS`: static QDQ for the encoders and the mask decoder,
`CPU_LLM_INT8` for the LLM, MatMulNBits 4-bit for an int4 LLM).

Static QDQ calibrates once (`create_calibrator` over recorded real inputs, then
`compute_data`) and reuses the ranges for every write, so the sensitivity search re-quantizes
with other nodes left float without calibrating again — the same two steps
`onnxruntime.quantization.quantize_static` runs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from .calibrate import FeedsReader
from .registry import Candidate, QuantRequest, UnsupportedQuantizationError, register_quantizer
from .settings import (
    DynamicSettings,
    StaticQdqSettings,
    WeightOnlySettings,
    settings_to_dict,
)

log = logging.getLogger(__name__)


def _constant_names(model: onnx.ModelProto) -> set[str]:
    """Initializers and Constant-node outputs: the graph's weights."""
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def gemm_candidates(
    model: onnx.ModelProto, op_types: Sequence[str], const_b_only: bool
) -> list[Candidate]:
    """Nodes of `op_types` in graph order; MatMuls only with a constant B when `const_b_only`."""
    consts = _constant_names(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        if node.op_type == "MatMul" and const_b_only and node.input[1] not in consts:
            continue
        out.append(Candidate(node.name, node.op_type))
    return out


def skipped_ends(candidates: Sequence[Candidate], first: int, last: int) -> set[str]:
    """Names of the first `first` and last `last` candidates (kept float by settings)."""
    names = [c.name for c in candidates]
    return set(names[:first]) | (set(names[len(names) - last :]) if last else set())


def _excluded(
    settings, candidates: Sequence[Candidate], exclude: Iterable[str], others: Iterable[str] = ()
) -> list[str]:
    fixed = set(settings.nodes_to_exclude) | skipped_ends(
        candidates, settings.skip_first, settings.skip_last
    )
    return sorted(fixed | set(exclude) | set(others))


def float_for_unquantized(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Rewire every node that is not quantized to the float tensor behind an activation DQ.

    ORT shares one Q/DQ pair among all consumers of a tensor when a single consumer asked for
    it, so a residual Add that reads the same tensor as a quantized MatMul would add the int8-
    rounded value (seen in the SAM2 mask decoder). Weight DQs (fed by an initializer, not a
    QuantizeLinear) are left alone: an Identity of a shared weight must keep its DQ. Returns
    the number of inputs rewired.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in quantized:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    return rewired


def has_external_data(src: Path) -> bool:
    """The graph keeps its weights in `<name>.onnx.data` (export/ does so above ~2 GiB); its
    quantized form is then written the same way (protobuf cannot hold 2 GiB)."""
    return Path(f"{src}.data").is_file()


def shape_groups(
    feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]
) -> list[list[Mapping[str, np.ndarray]]]:
    """The recorded feeds split by the shapes of the graph's inputs, in first-seen order.

    ORT's histogram calibrators (percentile, entropy) stack each tensor over all the samples of
    one `collect_data` call (`np.asarray` of a list), which fails ("inhomogeneous shape") when
    the samples differ in shape: the mask decoder gets one row per `[SEG]` of an answer, and a
    student that answers with 1, 2 or 3 `[SEG]`s records `seg_hidden` of [1|2|3, D]. Each call
    merges into the histograms of the earlier ones (ORT widens the bins as needed), so one call
    per shape calibrates on every sample; feeds of one shape stay one call (ranges unchanged).
    """
    groups: dict[tuple, list[Mapping[str, np.ndarray]]] = {}
    for f in feeds:
        key = tuple((n, np.shape(f[n])) for n in input_names)
        groups.setdefault(key, []).append(f)
    return list(groups.values())


# Bytes of recorded tensors one `collect_data` call may hold (`calib_chunks`).
CALIB_CALL_BYTES = 2 * 1024**3


def calib_chunks(
    session, group: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str], budget: int,
) -> list[Sequence[Mapping[str, np.ndarray]]]:  # fmt: skip
    """A shape group cut into `collect_data` calls whose recorded tensors fit in `budget` bytes.

    ONNX Runtime's calibrators keep every calibrated tensor of every sample of one call in
    memory (and the histogram calibrators stack them once more): for SAM2's full-depth Hiera-L at
    1024 px that is several GB a sample, and one call over 3 samples of it peaked at 22.2 GiB
    (the build's quantize stage).
    The augmented session (`session`, the calibrator's own) runs the group's first sample once
    to measure a sample's bytes; a group that fits stays one call (its ranges unchanged: the
    demo's groups all fit), a larger one is cut, and the calls merge as `shape_groups` says.
    """
    if len(group) < 2:
        return [group]
    outputs = session.run(None, {n: group[0][n] for n in input_names})
    per_sample = max(1, sum(o.nbytes for o in outputs))
    del outputs
    size = max(1, budget // per_sample)
    return [group[i : i + size] for i in range(0, len(group), size)]


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


class StaticQdqQuantizer:
    """Static INT8 QDQ with per-channel weights, calibrated once on recorded inputs."""

    ort_mode = "deploy"
    qdq_graph = True  # node names kept: sensitivity trials may rewire nodes to float inputs

    def __init__(self, request: QuantRequest, settings: StaticQdqSettings):
        from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

        self.component, self.precision = request.component, request.precision
        self.settings, self.method = settings, request.method
        self.scheme = settings.scheme
        self.per_channel_weights = settings.per_channel  # checked in qdq_check
        self.src = Path(request.src)
        self.model = load_model_with_shape_infer(self.src)
        self._candidates = gemm_candidates(
            self.model, settings.op_types, settings.matmul_const_b_only
        )
        # QDQQuantizer ignores "MatMulConstBOnly" (only the QOperator path reads it): the
        # activation x activation MatMuls are kept float by naming them.
        every = gemm_candidates(self.model, settings.op_types, const_b_only=False)
        kept = {c.name for c in self._candidates}
        self._float_matmuls = [c.name for c in every if c.name not in kept]
        self.n_calib = len(request.calib)
        self.ranges = self._calibrate(request)

    def _calibrate(self, request: QuantRequest):
        from onnxruntime.quantization import calibrate

        s = self.settings
        augmented = str(Path(request.workdir) / f"{self.component}.augmented.onnx")
        args = (Path(request.src), list(s.op_types), augmented)
        # create_calibrator's construction, with the options it would pass for these methods
        if self.method == "minmax":
            calibrator = calibrate.MinMaxCalibrater(*args, symmetric=False)
        elif self.method == "entropy":
            calibrator = calibrate.EntropyCalibrater(
                *args,
                symmetric=False,
                num_bins=s.entropy_bins,
                num_quantized_bins=s.entropy_quantized_bins,
            )
        else:
            calibrator = calibrate.PercentileCalibrater(
                *args, symmetric=True, num_bins=2048, percentile=s.percentile
            )
        needed = self.calibrated_tensors()
        select = calibrator.select_tensors_to_calibrate

        def only_needed(model):  # ORT records every tensor in or out of a MatMul / Gemm
            tensors, value_infos = select(model)
            return tensors & needed, value_infos

        calibrator.select_tensors_to_calibrate = only_needed
        calibrator.augment_graph()
        # `only_needed` holds a bound method of the calibrator: left in place, that cycle keeps
        # the calibrator's session alive after `del` until the garbage collector runs; measured
        # on the full-depth Hiera-L SAM2 encoder, 6.4 GiB held through the reference run and the
        # graph write that follow (the quantize stage's peak, 11.3 GiB instead of 8.7).
        del calibrator.select_tensors_to_calibrate
        calibrator.execution_providers = ["CPUExecutionProvider"]
        calibrator.create_inference_session()
        inputs = [i.name for i in self.model.graph.input]
        for group in shape_groups(request.calib, inputs):
            for chunk in calib_chunks(calibrator.infer_session, group, inputs, CALIB_CALL_BYTES):
                calibrator.collect_data(FeedsReader(chunk, inputs))
        ranges = calibrator.compute_data()
        del calibrator
        return ranges

    def calibrated_tensors(self) -> set[str]:
        """The tensors whose ranges the QDQ quantizer reads: every input of a candidate node
        that is not an initializer (ORT quantizes those from their values), and the candidates'
        outputs only where `quantize_outputs` puts a Q on them.

        ONNX Runtime's calibrators record the inputs and outputs of every node of the op types,
        candidate or not: for SAM2's full-depth Hiera-L at 1024 px, 16.1 GiB for one sample, of
        which the MatMul outputs and the attention MatMuls' operands (kept float) are never
        read. Their ranges, and the graphs written from them, are unchanged.
        """
        names = {c.name for c in self._candidates}
        initializers = {t.name for t in self.model.graph.initializer}
        needed: set[str] = set()
        for node in self.model.graph.node:
            if node.name in names:
                needed |= {t for t in node.input if t and t not in initializers}
                if self.settings.quantize_outputs:
                    needed |= set(node.output)
        return needed

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        from onnxruntime.quantization import QDQQuantizer

        s = self.settings
        quantizer = QDQQuantizer(
            copy.deepcopy(self.model),
            s.per_channel,
            s.reduce_range,
            _quant_type(s.weight_type),
            _quant_type(s.activation_type),
            self.ranges,
            [],  # nodes_to_quantize: all of op_types
            _excluded(s, self._candidates, exclude, self._float_matmuls),
            list(s.op_types),
            {
                "MatMulConstBOnly": s.matmul_const_b_only,
                "WeightSymmetric": True,
                "OpTypesToExcludeOutputQuantization": []
                if s.quantize_outputs
                else list(s.op_types),
            },
        )
        quantizer.quantize_model()
        quantized = {c.name for c in self._candidates} - set(
            _excluded(s, self._candidates, exclude, self._float_matmuls)
        )
        float_for_unquantized(quantizer.model.model, quantized)
        quantizer.model.save_model_to_file(str(dst), has_external_data(self.src))

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "settings": settings_to_dict(self.settings),
            "calibration": {"method": self.method, "samples": self.n_calib},
        }


class _ConstGemmQuantizer:
    """Shared set-up of the weight-side quantizers: candidates are the constant-B GEMMs."""

    ort_mode = "deploy"

    def __init__(self, request: QuantRequest, settings: DynamicSettings | WeightOnlySettings):
        self.component, self.precision = request.component, request.precision
        self.settings, self.src = settings, Path(request.src)
        self.scheme = settings.scheme
        self._candidates = gemm_candidates(onnx.load(self.src), settings.op_types, True)

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)


class DynamicQuantizer(_ConstGemmQuantizer):
    """Dynamic INT8: int8 weights per channel, activations quantized at run time."""

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        from onnxruntime.quantization import quantize_dynamic

        s = self.settings
        quantize_dynamic(
            self.src,
            dst,
            op_types_to_quantize=list(s.op_types),
            per_channel=s.per_channel,
            reduce_range=s.reduce_range,
            weight_type=_quant_type(s.weight_type),
            nodes_to_exclude=_excluded(s, self._candidates, exclude),
            use_external_data_format=has_external_data(self.src),
            extra_options={"MatMulConstBOnly": True},
        )

    def describe(self) -> dict:
        return {"scheme": self.scheme, "settings": settings_to_dict(self.settings)}


class WeightOnlyQuantizer(_ConstGemmQuantizer):
    """MatMulNBits: block-wise 4- or 8-bit weights of the constant-B MatMuls.

    The block is `settings.block_size`, or less where the graph's smallest reduction dimension
    is shorter (a power of two, at least 16): a block longer than K is padded, which doubled
    the weight bytes of the TINY LLM (K = 64) at block 128.
    """

    def __init__(self, request: QuantRequest, settings: WeightOnlySettings):
        super().__init__(request, settings)
        model = onnx.load(str(self.src), load_external_data=False)
        dims = {t.name: list(t.dims) for t in model.graph.initializer}
        ks = [
            dims[n.input[1]][0]
            for n in model.graph.node
            if n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2
        ]
        block = settings.block_size
        while ks and block > 16 and block > min(ks):
            block //= 2
        self.block_size = block

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        s = self.settings
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(self.src)),
            bits=s.bits,
            block_size=self.block_size,
            is_symmetric=s.symmetric,
            accuracy_level=s.accuracy_level,
            nodes_to_exclude=_excluded(s, self._candidates, exclude),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=tuple(s.op_types),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), has_external_data(self.src))

    def describe(self) -> dict:
        settings = settings_to_dict(self.settings)
        return {"scheme": self.scheme, "settings": settings, "block_size": self.block_size}


# settings type -> quantizer class, and the weight bits each precision must keep.
_SCHEMES = {
    StaticQdqSettings: StaticQdqQuantizer,
    DynamicSettings: DynamicQuantizer,
    WeightOnlySettings: WeightOnlyQuantizer,
}
_WEIGHT_BITS = {"int8": 8, "int4": 4}


def _weight_bits(settings) -> int:
    return settings.bits if isinstance(settings, WeightOnlySettings) else 8


def _check_ort(request: QuantRequest) -> None:
    """Refuse settings that do not fit the component and precision (before any work)."""
    settings = request.settings
    if type(settings) not in _SCHEMES:
        raise UnsupportedQuantizationError(
            f"{request.component}: {type(settings).__name__} is not an ONNX Runtime scheme; "
            f"use one of {', '.join(t.__name__ for t in _SCHEMES)}"
        )
    bits = _weight_bits(settings)
    if bits != _WEIGHT_BITS[request.precision]:
        raise UnsupportedQuantizationError(
            f"{request.component}: the recipe asks for {request.precision} but the settings give "
            f"{bits}-bit weights; a precision is never changed silently"
        )
    if request.precision == "int4" and request.component != "llm":
        raise UnsupportedQuantizationError(
            f"{request.component}: int4 is the LLM's weight-only format (recipes.Precision)"
        )


def _ort_factory(request: QuantRequest):
    _check_ort(request)
    return _SCHEMES[type(request.settings)](request, request.settings)


register_quantizer("onnxruntime", "int8", check=_check_ort)(_ort_factory)
register_quantizer("onnxruntime", "int4", check=_check_ort)(_ort_factory)
