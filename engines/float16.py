"""An fp32-carrier Q/DQ graph rewritten with fp16 carriers, for strongly typed TensorRT builds.

A strongly typed network takes every tensor's type from the graph: the quantized GEMMs run
INT8 / FP8 / INT4 as their Q/DQ say, and every other layer in the type its tensors have. The
bundle's Q/DQ graphs keep float32 carriers (ONNX Runtime on the build machine validates them that
way, `compress.settings.ModelOptOnnxSettings`), so built as they are, every unquantized layer
(attention, norms' neighbours, activations, the whole float part) would run FP32/TF32. The
engine builder therefore parses a copy with fp16 carriers (`fp16_carrier`), made on the device
from the validated graph:

- float32 initializers and `Constant` values (weights, biases, Q/DQ scales) become float16;
  a DequantizeLinear's output takes its scale's type, so the dequantized weights are fp16;
- `Cast(to=FLOAT)` becomes `Cast(to=FLOAT16)`, `ConstantOfShape` float values fp16;
- graph inputs and outputs keep float32 (a `Cast` at each edge), so the runtime's feeds and the
  KV-cache I/O are unchanged;
- nodes matching `keep_fp32` (regexes on node names: the RMSNorms, whose sum of squares
  overflows fp16 in Qwen2.5-VL) run in float32 between casts, their own constants kept float32;
- inputs that ONNX requires in float32 whatever the data type (Resize `roi`/`scales`) stay so.

Pure `onnx` + numpy; the result is checked with `onnx.checker` and, in the tests, run in ONNX
Runtime against the fp32-carrier graph.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

F32, F16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
FP16_MAX = 65504.0
# (op type, input index) that ONNX types as float32 whatever T is.
FLOAT32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2)}


def _matches(name: str, patterns: Iterable[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def _to_f16(tensor) -> None:
    """Convert a float32 TensorProto to float16 in place (values clipped to fp16's range)."""
    from onnx import numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    half = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
    tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))


CARRIER_KEY, CARRIER_VALUE = "citrus_edge.carrier", "float16"  # metadata of a converted graph


def is_fp16_carrier(model) -> bool:
    """Whether `model` (a ModelProto) was written by `fp16_carrier` / `fp16_carrier_file`."""
    return any(p.key == CARRIER_KEY and p.value == CARRIER_VALUE for p in model.metadata_props)


def fp16_carrier(model, keep_fp32: Iterable[str] = ()):
    """A copy of `model` with float16 carriers (see the module docstring); `keep_fp32`: regexes
    on node names of nodes that stay float32. Raises ValueError for a Q/DQ graph below opset 19
    (fp16 Q/DQ scales need 19). A graph already converted is returned as it is (a copy).
    In memory: for a graph over 2 GiB use `fp16_carrier_file`."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if is_fp16_carrier(m):
        return m
    for init in _restructure(m, keep_fp32):
        _to_f16(init)
    onnx.checker.check_model(m)
    return m


def fp16_carrier_file(src: Path, dst: Path, keep_fp32: Iterable[str] = ()) -> Path:
    """`fp16_carrier` of the graph at `src`, written to `dst` one weight at a time: the graph is
    analysed without its weights, each float32 weight is converted in chunks, external data goes
    to `<dst>.data` (any size; the 8B's LLM graph is past protobuf's 2 GiB). Returns `dst`."""
    import onnx

    from citrus_edge.external_data import CHUNK_BYTES, ExternalWriter, TensorReader

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    convert = [] if is_fp16_carrier(model) else _restructure(model, keep_fp32)
    converting = {t.name for t in convert}
    reader = TensorReader(src)
    writer = ExternalWriter(Path(f"{dst}.data")) if external else None
    try:
        for init in model.graph.initializer:
            stored = onnx.TensorProto()
            stored.CopyFrom(init)
            if init.name in converting and init.data_location != onnx.TensorProto.EXTERNAL:
                _to_f16(init)
            elif init.name in converting:
                values = reader.array(stored).reshape(-1)
                init.data_type = F16
                step = CHUNK_BYTES // 4

                def halves(values=values, step=step):
                    for i in range(0, values.size, step):
                        chunk = np.asarray(values[i : i + step], dtype=np.float32)
                        yield np.clip(chunk, -FP16_MAX, FP16_MAX).astype(np.float16).tobytes()

                writer.put(init, halves())
            elif writer is not None and init.data_location == onnx.TensorProto.EXTERNAL:
                writer.put(init, reader.raw_chunks(stored))
    finally:
        if writer is not None:
            writer.close()
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return dst


def _restructure(m, keep_fp32: Iterable[str]) -> list:
    """Rewrite `m`'s nodes and I/O for float16 carriers in place; returns the float32
    initializers to convert (their data untouched: the caller converts them)."""
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    if qdq and opset < 19:
        raise ValueError(f"opset {opset}: fp16 Q/DQ scales need opset 19 or later")
    g = m.graph
    patterns = [re.compile(p) for p in keep_fp32]
    kept = {n.name for n in g.node if _matches(n.name, patterns)}
    floats = _float_tensors(m)
    f32_only = _float32_only_tensors(g, kept)
    convert = [i for i in g.initializer if i.data_type == F32 and i.name not in f32_only]
    for node in g.node:
        _convert_node(node, node.name in kept, f32_only)
    _cast_edges(g, kept, floats)
    del g.value_info[:]  # stale float32 types; the parser and checker infer them again
    m.metadata_props.add(key=CARRIER_KEY, value=CARRIER_VALUE)
    return convert


def _float_tensors(model) -> set[str]:
    """Names of the float32 tensors of `model` (ONNX type inference on the original graph)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    typed = [*g.value_info, *g.input, *g.output]
    names = {v.name for v in typed if v.type.tensor_type.elem_type == F32}
    return names | {i.name for i in g.initializer if i.data_type == F32}


def _float32_only_tensors(g, kept: set[str]) -> set[str]:
    """Tensors that stay float32: inputs ONNX types as float32, and kept nodes' constants."""
    inits = {i.name for i in g.initializer}
    out = set()
    for node in g.node:
        for i, name in enumerate(node.input):
            if (node.op_type, i) in FLOAT32_ONLY_INPUTS or (node.name in kept and name in inits):
                out.add(name)
    constants = {o: n for n in g.node if n.op_type == "Constant" for o in n.output}
    return out | {c for c in out if c in constants}


def _convert_node(node, keep: bool, f32_only: set[str]) -> None:
    from onnx import helper

    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == F32 and not keep:
            attr.i = F16
        if attr.name == "value" and attr.type == helper.AttributeProto.TENSOR:
            const_out = node.output[0] if node.output else ""
            if attr.t.data_type == F32 and not keep and const_out not in f32_only:
                _to_f16(attr.t)


def _cast_edges(g, kept: set[str], floats: set[str]) -> None:
    """float32 graph I/O kept by Casts; kept nodes wrapped in Casts to and from float32."""
    from onnx import helper

    float_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == F32}
    float_outputs = {o.name for o in g.output if o.type.tensor_type.elem_type == F32}
    new_nodes, renamed = [], {}
    for name in sorted(float_inputs):
        renamed[name] = f"{name}__fp16"
        new_nodes.append(
            helper.make_node("Cast", [name], [renamed[name]], to=F16, name=f"{name}__to_fp16")
        )
    body = []
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.name in kept:
            body.extend(_wrap_fp32(node, floats))
        else:
            body.append(node)
    tail, out_renamed = [], {}
    for node in body:
        for i, name in enumerate(node.input):  # graph outputs read inside the graph
            if name in float_outputs:
                node.input[i] = f"{name}__fp16"
        for j, name in enumerate(node.output):
            if name in float_outputs:
                node.output[j] = out_renamed[name] = f"{name}__fp16"
                tail.append(
                    helper.make_node(
                        "Cast", [node.output[j]], [name], to=F32, name=f"{name}__to_fp32"
                    )
                )
    del g.node[:]
    g.node.extend(new_nodes + body + tail)


def _wrap_fp32(node, floats: set[str]) -> list:
    """`node` fed float32 copies of its float inputs, its float outputs cast back to float16."""
    from onnx import helper

    before, after = [], []
    for i, name in enumerate(node.input):
        if name in floats:
            cast = f"{node.name}__in{i}_fp32"
            before.append(helper.make_node("Cast", [name], [cast], to=F32, name=cast))
            node.input[i] = cast
    for j, name in enumerate(node.output):
        if name not in floats:
            continue
        raw = f"{node.name}__out{j}_fp32"
        after.append(helper.make_node("Cast", [raw], [name], to=F16, name=f"{raw}_to_fp16"))
        node.output[j] = raw
    return [*before, node, *after]
