"""Structural validation of a quantized graph, where it is made (torch-free).

ONNX Runtime on the CPU cannot run TensorRT's FP8 / INT4 graphs faithfully, so their accuracy
is never read from an ORT run; instead every quantized graph is checked for what TensorRT (or
ORT) will rely on:

- Q/DQ pairs feed the GEMM-like ops (MatMul, Gemm, Conv, ConvTranspose) that were quantized;
- every scale is present, finite and > 0; weight scales are per channel where asked;
- the zero points have the asked type: int8/uint8 for INT8, FLOAT8E4M3FN for FP8 (or, in
  ModelOpt's PyTorch export, TensorRT's own `trt::TRT_FP8*` ops, whose type is the op's);
- weight-only / dynamic graphs hold their integer kernels (MatMulNBits, DynamicQuantizeLinear).

`check_graph` returns a JSON-ready dict; `require_ok` raises `QuantizedGraphError` listing every
problem.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

GEMM_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# ModelOpt's PyTorch export writes FP8 as TensorRT custom ops (domain "trt", no zero point, the
# FP8 type implied by the op) and INT4 as `trt::DequantizeLinear` with a `block_size`.
Q_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")
DQ_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")
TRT_FP8_OPS = ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear")
# Zero-point element types each low-bit precision may use in Q/DQ (INT32: the biases of
# quantized Gemm/Conv, stored as int32 with scale = input scale x weight scale).
ZERO_POINT_TYPES = {
    "int8": {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32},
    "fp8": {TensorProto.FLOAT8E4M3FN},
}


class QuantizedGraphError(RuntimeError):
    """A quantized graph fails its structural validation; the message lists every problem."""


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    values = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def _elem_type(tensor) -> int:
    return tensor.data_type


def _scale_problems(name: str, scale, base_dir: Path) -> list[str]:
    try:  # a large per-channel scale may live in the external data file beside the graph
        values = numpy_helper.to_array(scale, str(base_dir)).astype(np.float64)
    except Exception as e:  # unreadable constant: report, do not crash the check
        return [f"{name}: scale unreadable ({e})"]
    if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values > 0):
        return [f"{name}: scale not finite and positive (min {values.min(initial=np.nan)})"]
    return []


def _is_weight(name: str, consts: dict, producer: dict) -> bool:
    """A DQ input that is a weight: a constant (ORT stores int8 weights), or a QuantizeLinear
    of a constant (ModelOpt keeps float weights behind Q/DQ for TensorRT to fold)."""
    if name in consts:
        return True
    q = producer.get(name)
    return q is not None and q.op_type in Q_OPS and q.input[0] in consts


def _dq_facts(
    model: onnx.ModelProto, consts: dict, base_dir: Path
) -> tuple[list[str], Counter, int, Counter]:
    """Problems with the DQ nodes' scales and zero points, zero-point types, weight DQs per
    channel, and the element types of the weights stored quantized."""
    problems, zp_types, per_channel, weight_types = [], Counter(), 0, Counter()
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type not in DQ_OPS + Q_OPS:
            continue
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            problems.append(f"{node.name}: scale {node.input[1:2]} is not a constant")
            continue
        problems += _scale_problems(node.name, scale, base_dir)
        if len(node.input) > 2 and node.input[2] in consts:
            zp_types[TensorProto.DataType.Name(_elem_type(consts[node.input[2]]))] += 1
        weight = node.op_type in DQ_OPS and _is_weight(node.input[0], consts, producer)
        if weight and np.prod(scale.dims or [1]) > 1:
            per_channel += 1
        if node.op_type in DQ_OPS and node.input[0] in consts:
            weight_types[TensorProto.DataType.Name(_elem_type(consts[node.input[0]]))] += 1
    return problems, zp_types, per_channel, weight_types


def _quantized_ops(model: onnx.ModelProto) -> Counter:
    """Op types of the nodes with at least one input produced by a DequantizeLinear."""
    producer = {o: n for n in model.graph.node for o in n.output}
    ops = Counter()
    for node in model.graph.node:
        if node.op_type in DQ_OPS + Q_OPS:
            continue
        if any(i in producer and producer[i].op_type in DQ_OPS for i in node.input):
            ops[node.op_type] += 1
    return ops


def check_graph(
    path: Path,
    precision: str,
    scheme: str,
    per_channel: bool = False,
    expect_quantized: int = 1,
) -> dict[str, Any]:
    """Structural facts and problems of the quantized graph at `path`.

    precision: "int8", "int4" or "fp8"; scheme: the settings' scheme (what kind of graph to
    expect); per_channel: weight scales must be per channel; expect_quantized: the least number
    of quantized GEMM-like ops (0 when every node was left float).
    """
    model = onnx.load(str(path), load_external_data=False)  # weights stay on disk; scales on demand
    ops = Counter(n.op_type for n in model.graph.node)
    consts = _constants(model)
    problems, zp_types, per_channel_dq, weight_types = _dq_facts(model, consts, Path(path).parent)
    quantized = _quantized_ops(model)
    kernels = {k: ops[k] for k in ("MatMulNBits", "DynamicQuantizeLinear", "MatMulInteger")}
    custom = Counter(f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == "trt")
    n_gemm = sum(quantized[o] for o in GEMM_OPS) + kernels["MatMulNBits"] + kernels["MatMulInteger"]
    if n_gemm < expect_quantized:
        problems.append(f"{n_gemm} quantized GEMM-like ops, expected at least {expect_quantized}")
    allowed = ZERO_POINT_TYPES.get(precision)
    fp8_by_op = precision == "fp8" and any(ops[o] for o in TRT_FP8_OPS)
    if fp8_by_op and zp_types:
        problems.append(f"TensorRT FP8 ops next to zero points {dict(zp_types)}")
    if allowed and not fp8_by_op and scheme not in ("ort-dynamic", "ort-matmulnbits"):
        names = {TensorProto.DataType.Name(t) for t in allowed}
        wrong = sorted(set(zp_types) - names)
        if wrong or (expect_quantized and not zp_types):
            problems.append(
                f"zero points of type {wrong or 'none'}; {precision} needs {sorted(names)}"
            )
    if precision == "int4" and scheme != "ort-matmulnbits" and expect_quantized:
        if not {"INT4", "UINT4"} & set(weight_types):
            problems.append(f"no INT4 weights behind DequantizeLinear ({dict(weight_types)})")
    if per_channel and expect_quantized and per_channel_dq == 0:
        problems.append("no per-channel weight scales, but per-channel weights were asked")
    return {
        "ok": not problems,
        "problems": problems,
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "quantized_ops": dict(quantized),
        "zero_point_types": dict(zp_types),
        "per_channel_weight_dq": per_channel_dq,
        "weight_types": dict(weight_types),
        "kernels": {k: v for k, v in kernels.items() if v},
        "custom_ops": dict(custom),
    }


def require_ok(component: str, facts: dict[str, Any]) -> None:
    """Raise `QuantizedGraphError` when `check_graph` found problems."""
    if not facts["ok"]:
        raise QuantizedGraphError(
            f"{component}: the quantized graph fails its structural check:\n  "
            + "\n  ".join(facts["problems"])
        )
