"""ONNX Runtime "engines" for the `cpu` target: graphs saved after ORT's graph optimisations.

`optimize_for_cpu` runs ONNX Runtime's optimiser once (CPU execution provider) and saves the
result via `SessionOptions.optimized_model_filepath`, so the cart loads a graph that needs no
optimisation at start-up. A manifest sidecar records the ORT version, providers, level and the
source sha256; given feeds, the saved graph (run with optimisations off, so the saved graph itself
is what runs) is checked against the source: a float graph against its unoptimised run, a
quantized one against the source optimised in memory at the same level.

Levels: "basic" (constant folding, redundant node removal), "extended" (also fusions such as
LayerNorm, GELU, attention, MatMul+Add; may use com.microsoft operators), "all" (also layout
transforms tied to this CPU's instruction set: the saved graph is then machine-specific).
`onnxruntime` is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from citrus_edge.bundle import sha256_file

from .engine_errors import OptimizedGraphMismatchError
from .engines_output import write_json

if TYPE_CHECKING:
    from citrus_edge.config import CitrusVConfig

    from .engine_plan import EnginePlan

log = logging.getLogger(__name__)

ORT_SIDECAR_KIND = "citrus-edge onnxruntime optimized graph"
SIDECAR_SCHEMA = 1
PROVIDERS = ("CPUExecutionProvider",)
# Level name -> onnxruntime.GraphOptimizationLevel member.
LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
ATOL = 1e-5  # fusions reorder float sums; differences beyond this (+ RTOL x |ref|) are errors
RTOL = 1e-5
EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class OptimizedGraph:
    """An optimized graph, its sidecar, and the measured max abs difference per output."""

    path: Path
    sidecar: Path
    max_abs_diff: dict[str, float]


def sidecar_path(graph: Path) -> Path:
    """`dir/vision.ort.onnx` -> `dir/vision.ort.json`."""
    graph = Path(graph)
    return graph.with_name(graph.name.removesuffix(".onnx") + ".json")


def _level(name: str) -> Any:
    import onnxruntime as ort

    if name not in LEVELS:
        raise ValueError(f"ORT optimisation level {name!r} is not one of {list(LEVELS)}")
    return getattr(ort.GraphOptimizationLevel, LEVELS[name])


def _session(path: Path, level: str, save_to: Path | None = None, external: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(level)
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
        if external:  # graphs over 2 GiB: weights beside the graph, as in the source
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", save_to.name + ".data"
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                str(EXTERNAL_MIN_BYTES),
            )
    return ort.InferenceSession(str(path), sess_options=so, providers=list(PROVIDERS))


def random_feeds(
    onnx_path: Path, sizes: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Standard-normal feeds for a graph whose inputs are all floating point.

    `sizes` gives each named dynamic axis its size (default 2). Integer inputs (indices, masks)
    need values that mean something: build those feeds yourself (see `feeds.py`).
    """
    from .feeds import float_feeds
    from .graph_info import read_graph

    graph = read_graph(onnx_path)
    named = {d for i in graph.inputs for d in i.dims if isinstance(d, str)}
    axes = {**dict.fromkeys(named, 2), **(sizes or {})}
    return float_feeds(graph, np.random.default_rng(seed), axes)


def compare_graphs(
    source: Path,
    optimized: Path,
    feeds: Mapping[str, np.ndarray],
    atol: float = ATOL,
    rtol: float = RTOL,
    reference_level: str = "disabled",
) -> dict[str, float]:
    """Run `source` at `reference_level` and `optimized` as saved (optimisations off) on `feeds`.

    Returns the max abs difference per output. Raises OptimizedGraphMismatchError listing every
    output whose difference exceeds `atol + rtol * max|source output|`.
    """
    ref_sess = _session(source, reference_level)
    opt_sess = _session(optimized, "disabled")
    names = [o.name for o in ref_sess.get_outputs()]
    ref = ref_sess.run(names, dict(feeds))
    got = opt_sess.run(names, dict(feeds))
    diffs, bad = {}, []
    for name, r, g in zip(names, ref, got, strict=True):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        diff = float(np.max(np.abs(r - g))) if r.size else 0.0
        diffs[name] = diff
        limit = atol + rtol * (float(np.max(np.abs(r))) if r.size else 0.0)
        if r.shape != g.shape or not diff <= limit:
            bad.append(
                f"{name}: shape {r.shape} vs {g.shape}, max abs diff {diff:.3e} > {limit:.3e}"
            )
    if bad:
        raise OptimizedGraphMismatchError(
            f"{optimized.name} differs from {source.name}:\n  "
            + "\n  ".join(bad)
            + "\nUse a lower optimisation level (e.g. 'basic') and report the ONNX Runtime version."
        )
    return diffs


def optimize_for_cpu(
    onnx_path: Path,
    out_path: Path,
    level: str = "extended",
    feeds: Mapping[str, np.ndarray] | None = None,
) -> OptimizedGraph:
    """Save `onnx_path` optimised by ONNX Runtime (CPU) at `level` to `out_path`, with a sidecar.

    With `feeds`, the optimized graph is run against the source on them and must agree within
    `ATOL + RTOL x |ref|` (OptimizedGraphMismatchError otherwise). Returns the paths and the
    max abs difference per output (empty without feeds).
    """
    import onnxruntime as ort

    from .graph_info import read_graph

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    graph = read_graph(onnx_path)
    _session(onnx_path, level, save_to=out_path, external=bool(graph.external_files))
    if not out_path.is_file():
        raise RuntimeError(f"ONNX Runtime did not write {out_path}")
    # A float graph is checked against its unoptimised run. A quantized graph's unoptimised run
    # is fake-quantized float math, which nothing deploys (ORT fuses Q/DQ into integer kernels),
    # so it is checked against the source optimised in memory at the same level.
    reference = level if graph.quant_types else "disabled"
    diffs = {}
    if feeds is not None:
        diffs = compare_graphs(onnx_path, out_path, feeds, reference_level=reference)
    sidecar = {
        "schema": SIDECAR_SCHEMA,
        "kind": ORT_SIDECAR_KIND,
        "file": out_path.name,
        "sha256": sha256_file(out_path),
        "external_data": out_path.name + ".data" if graph.external_files else None,
        "source": onnx_path.name,
        "source_sha256": sha256_file(onnx_path),
        "onnxruntime_version": ort.__version__,
        "providers": list(PROVIDERS),
        "level": level,
        "verification": None
        if feeds is None
        else {"atol": ATOL, "rtol": RTOL, "reference_level": reference, "max_abs_diff": diffs},
    }
    side = write_json(sidecar_path(out_path), sidecar)
    log.info("%s: optimized (%s) -> %s", onnx_path.name, level, out_path.name)
    return OptimizedGraph(out_path, side, diffs)


def build_cpu_sessions(
    plan: EnginePlan, bundle_dir: Path, out_dir: Path, config: CitrusVConfig
) -> dict[str, Path]:
    """Optimise every graph of a `cpu` plan into `out_dir` and check each against its source.

    Writes `<component>.ort.onnx` + `<component>.ort.json` and `engines.json` into a staging
    sibling renamed into place at the end. Returns {component: optimized graph path}.
    """
    from .engine_plan import verify_sources
    from .engines_output import staged_output, write_engines_manifest
    from .feeds import component_feeds
    from .graph_info import read_graph

    if plan.backend != "onnxruntime":
        raise ValueError(f"plan for {plan.target} is a {plan.backend} plan, not ONNX Runtime")
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    verify_sources(plan, bundle_dir)
    with staged_output(out_dir) as stage:
        for comp in plan.components:
            source = bundle_dir / comp.onnx
            feeds = component_feeds(comp.component, config, read_graph(source))
            optimize_for_cpu(source, stage / comp.engine, plan.options.ort_level, feeds)
        info = {
            "backend": "onnxruntime",
            "target": plan.target,
            "bundle": str(bundle_dir),
            "engines": {c.component: c.engine for c in plan.components},
            "plan": plan.to_dict(),
        }
        write_engines_manifest(stage, info)
    return {c.component: out_dir / c.engine for c in plan.components}
