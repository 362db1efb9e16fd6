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

import onnx
import torch

from citrus_edge.export.config import ExportConfig
from citrus_edge.export.manifest import (
    MANIFEST_SCHEMA,
    library_versions,
    manifest_path,
    sha256_file,
    write_json_atomic,
)
from citrus_edge.export.spec import REGISTRY, Component, GraphSpec, Sample
from citrus_edge.export.validate import OutputError, validate_graph
from citrus_edge.model import CitrusV

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"


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
    import citrus_edge.export.components  # noqa: F401  (registers every component)

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
    tolerance on the validation samples.
    """
    t0 = time.perf_counter()
    export_cfg = export_cfg or ExportConfig()
    component = get_component(name)
    spec = component.spec(model.config, export_cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        staged = _trace(component.wrapper(model).eval(), spec, staging, export_cfg)
        samples = [spec.make_sample(c, seed) for seed, c in enumerate(spec.validation_cases, 1)]
        reference = functools.partial(component.reference, model)
        errors = validate_graph(staged[0], spec, samples, reference)
        for f in staged:
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    onnx_path = out_dir / staged[0].name
    seconds = time.perf_counter() - t0
    manifest = _manifest(spec, model, onnx_path, errors, export_cfg, source_hash, seconds)
    write_json_atomic(manifest_path(onnx_path), manifest)
    result = GraphResult(name, onnx_path, manifest_path(onnx_path), tuple(errors), seconds)
    log.info(
        "%s: exported in %.1f s, max abs error %.2e (max rel %.2e) over %d samples",
        name, seconds, result.max_abs, result.max_rel, len(samples),
    )
    return result


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _trace(
    wrapper: torch.nn.Module, spec: GraphSpec, staging: Path, export_cfg: ExportConfig
) -> list[Path]:
    """Trace `wrapper` on the spec's export sample; returns the staged files, graph first."""
    sample: Sample = spec.make_sample(spec.export_case, 0)
    spec.check_feeds(sample.feeds)
    args = tuple(torch.from_numpy(sample.feeds[n]) for n in spec.input_names)
    raw_dir = staging / "raw"  # the exporter may write one file per tensor here
    raw_dir.mkdir()
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
            opset_version=export_cfg.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    for w in caught:  # tracer warnings; frozen sizes are caught by validation instead
        log.debug("%s export: %s", spec.component, w.message)
    graph = staging / raw.name
    if _weight_bytes(wrapper) > export_cfg.external_data_bytes:
        data = staging / f"{raw.name}.data"
        model = onnx.load(str(raw), load_external_data=True)
        onnx.save_model(
            model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024,
        )
        files = [graph, data]
    else:
        os.replace(raw, graph)
        files = [graph]
    shutil.rmtree(raw_dir)
    onnx.checker.check_model(str(graph))
    return files


def _manifest(
    spec: GraphSpec,
    model: CitrusV,
    onnx_path: Path,
    errors: list[OutputError],
    export_cfg: ExportConfig,
    source_hash: str,
    seconds: float,
) -> dict[str, Any]:
    data_file = onnx_path.with_name(onnx_path.name + ".data")
    external = None
    if data_file.exists():
        external = {"file": data_file.name, "sha256": sha256_file(data_file)}
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": "onnx",
        "component": spec.component,
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "external_data": external,
        **spec.to_dict(),
        "precision": "float32",
        "opset": export_cfg.opset,
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
