"""What the engines stage needs to know about an ONNX graph, read from the file itself.

Input names, ranks and named dynamic axes, node names, op types, the element types that Q/DQ
nodes (or ONNX Runtime's quantized ops) carry, and the external-data files the graph points to.
The graph is loaded with `load_external_data=False`, so a multi-gigabyte LLM reads in
milliseconds. `onnx` is imported inside `read_graph` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Dim = int | str | None  # fixed size, named dynamic axis, or an unnamed dynamic axis

# modelopt can write TensorRT's own Q/DQ ops (e.g. INT4 AWQ with a "*trt*" method); the type
# they carry is in their name, not in the (packed) element type of their inputs.
TRT_QDQ_OPS = {
    "TRT_INT4QuantizeLinear": "int4",
    "TRT_INT4DequantizeLinear": "int4",
    "TRT_FP8QuantizeLinear": "fp8",
    "TRT_FP8DequantizeLinear": "fp8",
}
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", *TRT_QDQ_OPS})
# ONNX Runtime's quantized operators (QOperator format and weight-only int4), by the low-bit
# type they compute in. Used for the CPU target, which runs what ONNX Runtime can run.
ORT_QUANT_OPS = {
    "QLinearMatMul": "int8",
    "QLinearConv": "int8",
    "MatMulInteger": "int8",
    "ConvInteger": "int8",
    "DynamicQuantizeLinear": "int8",
    "MatMulNBits": "int4",  # or "int8" with bits=8 (read from the node)
}
# ONNX TensorProto element types -> short names used in plans and errors.
_QUANT_TYPES = {
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",  # ORT's QDQ int8 graphs dequantize their biases from int32
    17: "fp8",  # FLOAT8E4M3FN
    18: "fp8",  # FLOAT8E4M3FNUZ
    21: "uint4",
    22: "int4",
    23: "fp4",  # FLOAT4E2M1
}
_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


@dataclass(frozen=True)
class GraphInput:
    """One graph input: name, dims (int fixed, str named dynamic axis, None unnamed), dtype."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)


@dataclass(frozen=True)
class GraphInfo:
    """The parts of an ONNX graph the plan and the builders use."""

    path: Path
    inputs: tuple[GraphInput, ...]
    node_names: tuple[str, ...]
    op_types: frozenset[str]
    quant_types: frozenset[str]  # low-bit element types of Q/DQ nodes and quantized ops
    float_types: frozenset[str]  # float element types of the initializers
    external_files: tuple[str, ...]  # graph-relative paths of external tensor data

    @property
    def has_qdq(self) -> bool:
        """True for an explicitly quantized (Q/DQ) graph: TensorRT builds it strongly typed."""
        return bool(self.op_types & QDQ_OPS)

    def input(self, name: str) -> GraphInput:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)


def _dims(value_info) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _op_quant_types(node) -> set[str]:
    """Low-bit type of a node whose op type names it (TensorRT Q/DQ, ORT quantized ops)."""
    if node.op_type in TRT_QDQ_OPS:
        return {TRT_QDQ_OPS[node.op_type]}
    if node.op_type == "MatMulNBits":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        return {f"int{bits}"}
    if node.op_type in ORT_QUANT_OPS:
        return {ORT_QUANT_OPS[node.op_type]}
    return set()


def _quant_types(graph, elem_types: dict[str, int]) -> set[str]:
    """Low-bit types carried by Q/DQ nodes (DQ data input, Q zero point) and quantized ops."""
    found: set[str] = set()
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            names = [node.input[0], *node.input[2:3]]
        elif node.op_type == "QuantizeLinear":
            names = list(node.input[2:3])
            attr = {a.name: a.i for a in node.attribute}
            if "output_dtype" in attr and attr["output_dtype"]:
                found.add(_QUANT_TYPES.get(attr["output_dtype"], f"type{attr['output_dtype']}"))
            elif not names:
                found.add("uint8")  # ONNX default output type of QuantizeLinear
        else:
            found |= _op_quant_types(node)
            continue
        for name in names:
            if name and name in elem_types:
                t = elem_types[name]
                found.add(_QUANT_TYPES.get(t, _FLOAT_TYPES.get(t, f"type{t}")))
    return found - set(_FLOAT_TYPES.values())  # a DQ of a float tensor carries no low-bit type


def _dtype_name(elem_type: int) -> str:
    """numpy name of an ONNX element type ("float32", "int64", "bool"; "bfloat16")."""
    import onnx

    if elem_type in _FLOAT_TYPES:
        return _FLOAT_TYPES[elem_type]
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, TypeError, ValueError):
        return f"type{elem_type}"


def read_graph(path: Path) -> GraphInfo:
    """Read `path`'s inputs, nodes and quantization types without loading external data."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX graph")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    elem_types = {name: t.data_type for name, t in initializers.items()}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        elem_types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for node in graph.node:  # Constant nodes carry weights in some exports
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    elem_types[node.output[0]] = a.t.data_type
    inputs = tuple(
        GraphInput(vi.name, _dims(vi), _dtype_name(vi.type.tensor_type.elem_type))
        for vi in graph.input
        if vi.name not in initializers
    )
    external = sorted(
        {
            e.value
            for t in initializers.values()
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data
            if e.key == "location"
        }
    )
    return GraphInfo(
        path=path,
        inputs=inputs,
        node_names=tuple(n.name for n in graph.node),
        op_types=frozenset(n.op_type for n in graph.node),
        quant_types=frozenset(_quant_types(graph, elem_types)),
        float_types=frozenset(
            _FLOAT_TYPES[t.data_type] for t in initializers.values() if t.data_type in _FLOAT_TYPES
        ),
        external_files=tuple(external),
    )
