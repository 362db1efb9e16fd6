"""The one ONNX tracer: a wrapper `nn.Module` and its `GraphSpec` to a checked `.onnx` file.

Every graph of the project is traced here with the TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`) on the spec's export sample, with the spec's input and
output names and dynamic axes: the float graphs of the export stage (`export/graph.py`, through
`trace_graph`) and the ModelOpt-quantized LLM step of compress/ (`compress/modelopt_llm.py`,
through `torch_export`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import (
    ExternalDataInfo,
    _get_all_tensors,
    uses_external_data,
)

from citrus_edge.atomic import umask_mode
from citrus_edge.graph_specs import GraphSpec, Sample

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"
ALIGN = 4096  # byte alignment of each tensor in a graph's external data file


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def trace_graph(
    wrapper: torch.nn.Module, spec: GraphSpec, dst: Path, opset: int, external: bool
) -> list[Path]:
    """Trace `wrapper` to `dst` (+ `<dst>.data` when `external`), shapes declared, checked.

    The exporter writes into a raw folder beside `dst` (over 2 GiB one file per tensor); the
    graph's inputs and outputs get the spec's shapes (`_declare_shapes`) and the weights are
    streamed into the one data file (`save_graph`). Returns the files written, graph first.
    """
    dst = Path(dst)
    raw_dir = Path(tempfile.mkdtemp(prefix=f".{spec.component}.raw.", dir=dst.parent))
    try:
        raw = raw_dir / f"{spec.component}.onnx"
        torch_export(wrapper, spec, raw, opset)
        proto = onnx.load(str(raw), load_external_data=False)
        _declare_shapes(proto.graph, spec)
        files = save_graph(proto, dst, external=external, raw_dir=raw_dir)
        del proto
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    return files


def torch_export(wrapper: torch.nn.Module, spec: GraphSpec, path: Path, opset: int) -> None:
    """`torch.onnx.export` of `wrapper` on the spec's export sample to `path`, as it comes.

    Over 2 GiB the exporter writes each weight to its own file beside `path`.
    """
    sample: Sample = spec.make_sample(spec.export_case, 0)
    spec.check_feeds(sample.feeds)
    args = tuple(torch.from_numpy(sample.feeds[n]) for n in spec.input_names)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    for w in caught:  # tracer warnings; frozen sizes are caught by validation instead
        log.debug("%s export: %s", spec.component, w.message)


def save_graph(
    proto: onnx.ModelProto, path: Path, external: bool, raw_dir: Path | None = None
) -> list[Path]:
    """Save (weights in one `<name>.onnx.data` file when `external`) and check the graph.

    Tensors the exporter left in files under `raw_dir` are copied into the data file one at a
    time, so the weights are never held in memory here. The checker runs with full shape
    inference (`full_check`).
    """
    files = [path]
    if any(uses_external_data(t) for t in _get_all_tensors(proto)):
        if raw_dir is None:
            raise RuntimeError(f"{path.name}: the graph has external tensors and no raw_dir")
        files.append(path.with_name(path.name + ".data"))
        _gather_external(proto, raw_dir, files[1])
        onnx.save_model(proto, str(path))
    elif external:
        files.append(path.with_name(path.name + ".data"))
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=files[1].name,
            size_threshold=1024,
        )
        os.chmod(files[1], umask_mode(0o666))  # onnx writes external data owner-only (0600)
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return files


def _gather_external(proto: onnx.ModelProto, src_dir: Path, data_path: Path) -> None:
    """Copy every external tensor of `proto` (files in `src_dir`) into `data_path`, tensor by
    tensor, and point the tensors there. Offsets are 4 KiB-aligned, so a runtime may map them."""
    offset = 0
    with open(data_path, "wb") as out:  # a new file: its mode follows the umask
        for tensor in _get_all_tensors(proto):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            src = src_dir / info.location
            start = info.offset or 0
            length = info.length if info.length is not None else src.stat().st_size - start
            out.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            with open(src, "rb") as fh:
                fh.seek(start)
                copied = _copy_bytes(fh, out, length)
            if copied != length:
                raise RuntimeError(f"{src.name}: {copied} bytes, the graph says {length}")
            del tensor.external_data[:]  # (onnx's set_external_data wants the bytes in memory)
            for key, value in (
                ("location", data_path.name),
                ("offset", offset),
                ("length", length),
            ):
                tensor.external_data.add(key=key, value=str(value))
            offset += length


def _copy_bytes(src: Any, dst: Any, n: int, chunk: int = 64 << 20) -> int:
    done = 0
    while done < n:
        block = src.read(min(chunk, n - done))
        if not block:
            break
        dst.write(block)
        done += len(block)
    return done


class UnexportableModelError(ValueError):
    """A model whose traced graph cannot serve the component's spec (one line, names why)."""


def _declare_shapes(graph: onnx.GraphProto, spec: GraphSpec) -> None:
    """Write the spec's shapes (named dynamic axes, fixed sizes) on the graph's inputs/outputs.

    The tracer leaves made-up names where its shape inference gives up; the graph should
    declare what its manifest says. A dtype that differs from the spec is an internal error.
    """
    values = {v.name: v for v in (*graph.input, *graph.output)}
    missing = [t.name for t in spec.inputs + spec.outputs if t.name not in values]
    if missing:
        raise UnexportableModelError(
            f"{spec.component}: the traced graph has no {missing}: this model does not use "
            "them (e.g. a vision tower without a windowed block ignores the window layout), "
            "and the runtime feeds every input its spec names; keep such a block"
        )
    for t in spec.inputs + spec.outputs:
        tensor = values[t.name].type.tensor_type
        expected = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
        if tensor.elem_type != expected:
            raise RuntimeError(f"{spec.component}: {t.name} exported as type {tensor.elem_type}")
        tensor.shape.ClearField("dim")
        for d in t.shape:
            dim = tensor.shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
