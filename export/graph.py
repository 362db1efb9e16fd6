"""Export one registered component: trace, save, check, validate, write its manifest.

The graph is traced with the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) into a
staging folder beside the output, validated there in ONNX Runtime against the stock PyTorch
modules, and only then moved into place with its manifest; a graph that fails validation is
never left behind.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
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
from citrus_edge.modelling.model import CitrusV

from .export_config import ExportConfig
from .export_manifest import (
    MANIFEST_SCHEMA,
    library_versions,
    manifest_path,
    sha256_file,
    write_json_atomic,
)
from .spec import REGISTRY, Component, GraphSpec, Sample
from .validate import OutputError, validate_graph

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"
# Opset of graphs over 2 GiB: the TorchScript exporter's highest (ReduceMean takes `axes` as an
# input from 18; INT4 Q/DQ needs 21, a relabelling from 20 changes no operator we use).
LARGE_GRAPH_OPSET = 20
ALIGN = 4096  # byte alignment of each tensor in a graph's external data file


@dataclass(frozen=True)
class GraphResult:
    """An exported, validated graph and what was measured."""

    component: str
    onnx_path: Path
    manifest_path: Path
    errors: tuple[OutputError, ...]
    seconds: float

    @property
    def max_abs(self) -> float:
        return max((e.max_abs for e in self.errors), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((e.max_rel for e in self.errors), default=0.0)


def get_component(name: str) -> Component:
    """The registered component `name` (the component modules register on import)."""
    from . import components  # noqa: F401  (registers every component)

    if name not in REGISTRY:
        raise ValueError(f"unknown component {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def export_component(
    name: str,
    model: CitrusV,
    out_dir: Path,
    *,
    source_hash: str,
    export_cfg: ExportConfig | None = None,
) -> GraphResult:
    """Export component `name` of `model` to `out_dir/<name>.onnx` (+ manifest), validated.

    Raises `ExportValidationError` when ONNX Runtime and PyTorch disagree beyond the spec's
    tolerance on the validation samples; nothing is written then.
    """
    t0 = time.perf_counter()
    _check_float32_cpu(model)
    export_cfg = export_cfg or ExportConfig()
    component = get_component(name)
    spec = component.spec(model.config, export_cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, errors = _export_validated(component, model, spec, out_dir, export_cfg)
    seconds = time.perf_counter() - t0
    manifest = _manifest(spec, model, files, errors, export_cfg, source_hash, seconds)
    write_json_atomic(manifest_path(files[0]), manifest)
    result = GraphResult(name, files[0], manifest_path(files[0]), tuple(errors), seconds)
    log.info(
        "%s: exported in %.1f s, max abs error %.2e (max rel %.2e)",
        name,
        seconds,
        result.max_abs,
        result.max_rel,
    )
    return result


def _check_float32_cpu(model: CitrusV) -> None:
    kinds = {f"{p.dtype} on {p.device.type}" for p in model.parameters()}
    if kinds != {"torch.float32 on cpu"}:
        raise ValueError(
            f"export takes a float32 model on the CPU, got {sorted(kinds)}; load it with "
            "dtype=torch.float32 (engines/ chooses lower precisions)"
        )


def _export_validated(
    component: Component, model: CitrusV, spec: GraphSpec, out_dir: Path, cfg: ExportConfig
) -> tuple[list[Path], list[OutputError]]:
    """Trace into a staging folder, validate there, then move the files into `out_dir`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.component}.", dir=out_dir))
    try:
        wrapper = component.wrapper(model).eval()
        raw_dir = staging / "raw"
        external = _weight_bytes(wrapper) > cfg.external_data_bytes
        proto = _torch_export(wrapper, spec, raw_dir, graph_opset(cfg.opset, external))
        _declare_shapes(proto.graph, spec)
        staged = _save_graph(
            proto, staging / f"{spec.component}.onnx", external=external, raw_dir=raw_dir
        )
        del proto
        shutil.rmtree(raw_dir)
        samples = [spec.make_sample(c, seed) for seed, c in enumerate(spec.validation_cases, 1)]
        reference = functools.partial(component.reference, model)
        errors = validate_graph(staged[0], spec, samples, reference)
        for f in staged:
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / f.name for f in staged], errors


def graph_opset(opset: int, external: bool) -> int:
    """The opset a graph is exported at: `opset`, or at least LARGE_GRAPH_OPSET for a graph
    whose weights go to external data. Tools cannot version-convert such a graph: the
    converter serializes the whole graph, over protobuf's 2 GiB (ModelOpt's INT4 AWQ then falls
    back to relabelling the opset, which leaves ReduceMean's opset-17 `axes` attribute invalid)."""
    return max(opset, LARGE_GRAPH_OPSET) if external else opset


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _torch_export(
    wrapper: torch.nn.Module, spec: GraphSpec, raw_dir: Path, opset: int
) -> onnx.ModelProto:
    """Trace `wrapper` on the spec's export sample into `raw_dir`; returns the graph.

    Over 2 GiB the exporter writes each weight to its own file in `raw_dir`; those stay on disk
    (the proto holds references, not a second copy of the weights) until `_save_graph` streams
    them into the graph's one data file.
    """
    sample: Sample = spec.make_sample(spec.export_case, 0)
    spec.check_feeds(sample.feeds)
    args = tuple(torch.from_numpy(sample.feeds[n]) for n in spec.input_names)
    raw_dir.mkdir()  # over 2 GiB the exporter writes one file per tensor here
    raw = raw_dir / f"{spec.component}.onnx"
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper,
            args,
            str(raw),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    for w in caught:  # tracer warnings; frozen sizes are caught by validation instead
        log.debug("%s export: %s", spec.component, w.message)
    return onnx.load(str(raw), load_external_data=False)


def _save_graph(
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


def opset_of(path: Path) -> int:
    """The default-domain opset a saved graph declares (its weights are not read)."""
    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


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


def _declare_shapes(graph: onnx.GraphProto, spec: GraphSpec) -> None:
    """Write the spec's shapes (named dynamic axes, fixed sizes) on the graph's inputs/outputs.

    The tracer leaves made-up names where its shape inference gives up; the graph should
    declare what its manifest says. A dtype that differs from the spec is an internal error.
    """
    values = {v.name: v for v in (*graph.input, *graph.output)}
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


def _manifest(
    spec: GraphSpec,
    model: CitrusV,
    files: list[Path],
    errors: list[OutputError],
    export_cfg: ExportConfig,
    source_hash: str,
    seconds: float,
) -> dict[str, Any]:
    onnx_path, *data = files
    external = {"file": data[0].name, "sha256": sha256_file(data[0])} if data else None
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": "onnx",
        "component": spec.component,
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "external_data": external,
        **spec.to_dict(),
        "precision": "float32",
        "opset": opset_of(files[0]),
        "exporter": EXPORTER,
        "versions": library_versions(),
        "model_config": model.config.name,
        "model_config_version": model.config.version,
        "source": source_hash,
        "export_config": export_cfg.to_dict(),
        "export_case": dict(spec.export_case),
        "validation": {
            "atol": spec.atol,
            "max_abs": max((e.max_abs for e in errors), default=0.0),
            "max_rel": max((e.max_rel for e in errors), default=0.0),
            "errors": [e.to_dict() for e in errors],
        },
        "export_seconds": round(seconds, 2),
    }
