"""Export one registered component: trace, save, check, validate, write its manifest.

The graph is traced by the one tracer (`citrus_edge.modelling.onnx_trace.trace_graph`) into a
staging folder beside the output, validated there in ONNX Runtime against the stock PyTorch
modules, and only then moved into place with its manifest; a graph that fails validation is
never left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from citrus_edge.modelling.onnx_trace import ALIGN, EXPORTER, save_graph, trace_graph
from citrus_edge.modelling.onnx_trace import weight_bytes as _weight_bytes

from .export_config import ExportConfig
from .export_manifest import (
    MANIFEST_SCHEMA,
    library_versions,
    manifest_path,
    sha256_file,
    write_json_atomic,
)
from .spec import REGISTRY, Component, GraphSpec
from .validate import OutputError, validate_graph

if TYPE_CHECKING:
    from citrus_edge.modelling.model import CitrusV

log = logging.getLogger(__name__)

# Opset of graphs over 2 GiB: the TorchScript exporter's highest (ReduceMean takes `axes` as an
# input from 18; INT4 Q/DQ needs 21, a relabelling from 20 changes no operator we use).
LARGE_GRAPH_OPSET = 20
# Kept importable here: the tracer's pieces (citrus_edge.modelling.onnx_trace).
__all__ = [
    "ALIGN",
    "EXPORTER",
    "LARGE_GRAPH_OPSET",
    "GraphResult",
    "export_component",
    "get_component",
    "graph_opset",
    "opset_of",
]
_save_graph = save_graph


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
    release: Callable[[], None] | None = None,
) -> GraphResult:
    """Export component `name` of `model` to `out_dir/<name>.onnx` (+ manifest), validated.

    `release`, when given, frees the torch weights this component used; it is called once the
    graph is traced and PyTorch's outputs on the validation samples are computed, before ONNX
    Runtime loads the graph, so that the weights and the session's copy of them are never held
    together (the full 8B's LLM: 28 GB each in fp32).

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
    files, errors = _export_validated(component, model, spec, out_dir, export_cfg, release)
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
    component: Component,
    model: CitrusV,
    spec: GraphSpec,
    out_dir: Path,
    cfg: ExportConfig,
    release: Callable[[], None] | None,
) -> tuple[list[Path], list[OutputError]]:
    """Trace into a staging folder, validate there, then move the files into `out_dir`.

    PyTorch's outputs are computed first (a few samples, small), then the weights are released
    (`release`) and only then does ONNX Runtime open the graph."""
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.component}.", dir=out_dir))
    try:
        wrapper = component.wrapper(model).eval()
        external = _weight_bytes(wrapper) > cfg.external_data_bytes
        staged = trace_graph(
            wrapper,
            spec,
            staging / f"{spec.component}.onnx",
            opset=graph_opset(cfg.opset, external),
            external=external,
        )
        del wrapper  # it may hold views of the weights (the LLM's lm_head slices)
        samples = [spec.make_sample(c, seed) for seed, c in enumerate(spec.validation_cases, 1)]
        wanted = [component.reference(model, s) for s in samples]
        if release is not None:
            release()
        by_sample = {id(s): w for s, w in zip(samples, wanted, strict=True)}
        errors = validate_graph(staged[0], spec, samples, lambda s: by_sample[id(s)])
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


def opset_of(path: Path) -> int:
    """The default-domain opset a saved graph declares (its weights are not read)."""
    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


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
