"""Shrink a quantized CPU graph's file; ONNX Runtime computes the same but for float16 tables.

Applied to every graph the CPU (ONNX Runtime) backend writes, before it is measured, so the
accuracy reported is that of the compacted file. Three steps, each counted in `CompactFacts`:

- `value_info` is dropped: intermediate shapes that ONNX Runtime infers again at load;
- float32 constants of `FP16_MIN_BYTES` or more that no quantized op reads (in the SAM2 graphs:
  the folded position tables, 64 x 64 x 16 and 128 x 16 x 16) are stored as float16 and cast
  back by a `Cast` that ONNX Runtime folds at load: half the bytes, a relative error of 2^-11;
- the graph's internal tensor names (`/vision_encoder/backbone/blocks.0/attn/...`, written
  several times each) become short ids. Graph inputs and outputs keep their names (the runtime
  binds by them) and node names are kept (ORT's profiler reports by node name).

Measured on the demo model's CPU INT8 graphs: 4.69 MB -> 3.90 MB in all (SAM2 encoder
0.98 -> 0.61 MB, mask decoder 1.31 -> 1.01 MB); a 3 M parameter model's metadata is not small next
to its weights (an 8B's is negligible). Graphs with external data, or with subgraphs, only lose
their `value_info`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FP16_MIN_BYTES = 16 * 1024


@dataclass(frozen=True)
class CompactFacts:
    bytes_before: int
    bytes_after: int
    value_info_dropped: int
    constants_to_fp16: int
    names_shortened: int

    def to_dict(self) -> dict:
        return asdict(self)


def compact_graph(path: Path) -> CompactFacts:
    """Compact the graph at `path` in place (written to a temp file, then renamed)."""
    import onnx

    path = Path(path)
    before = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    n_info = len(graph.value_info)
    del graph.value_info[:]
    inline = not Path(f"{path}.data").exists() and not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer
    )
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    flat = not any(a.type in subgraph for n in graph.node for a in n.attribute)
    n_fp16 = _constants_to_fp16(graph) if inline and flat else 0
    n_names = _shorten_names(graph) if inline and flat else 0
    tmp = path.with_name(f".{path.name}.compact")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return CompactFacts(before, path.stat().st_size, n_info, n_fp16, n_names)


def _constants_to_fp16(graph) -> int:
    """Large float32 constants read only by float ops -> float16 + Cast (see the module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Q/DQ scales and zero points stay as they are: a float16 scale is another scale, and a DQ
    # whose scale is a Cast's output is no longer a constant (a per-channel scale of 4096+
    # channels, 16 KiB, was: the 8B-width vision merger's, 5,120 channels).
    quantized_readers = {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulNBits",
    }

    def eligible(name: str, t) -> bool:
        users = consumers.get(name, [])
        return (
            t.data_type == TensorProto.FLOAT
            and int(np.prod(t.dims)) * 4 >= FP16_MIN_BYTES
            and bool(users)
            and not any(u.op_type in quantized_readers for u in users)
        )

    count, nodes = 0, []
    for init in graph.initializer:
        if eligible(init.name, init):
            original = init.name
            half = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(half, f"{original}_fp16"))
            nodes.append(helper.make_node("Cast", [init.name], [original], to=TensorProto.FLOAT))
            count += 1
    for node in graph.node:
        nodes.append(node)
        is_value = (
            node.op_type == "Constant" and node.attribute[:1] and node.attribute[0].name == "value"
        )
        if is_value and eligible(node.output[0], node.attribute[0].t):
            original, new = node.output[0], f"{node.output[0]}_fp16"
            half = numpy_helper.to_array(node.attribute[0].t).astype(np.float16)
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(half, new))
            node.output[0] = new
            nodes.append(helper.make_node("Cast", [new], [original], to=TensorProto.FLOAT))
            count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _shorten_names(graph) -> int:
    """Rename every tensor that is not a graph input or output to a short unique id."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            new = _base36(len(names))
            while new in keep:  # never take a graph input's or output's name
                new += "_"
            names[name] = new
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    return len(names)


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return "t" + out
