"""Post-training quantization of an export folder, held to an accuracy budget.

    report = quantize(export_dir, "int8", "cpu", out_dir=out)          # calib: default phantoms

`quantize` composes a few functions; each takes frozen values and returns a new one:
1. refuse what cannot be honoured (`plan_components`): `check_recipe` (e.g. FP8 on Orin), a
   (backend, precision) no quantizer serves, a calibration method the backend lacks;
2. `record(inputs, manifest, calib, evals) -> Recorded`: run the FP32 export through the
   runtime's own pipeline over the calib and eval splits, recording every graph's real inputs
   (`calibrate`);
3. `prepare(inputs, recorded, plans) -> Prepared`: calibrate each graph to quantize once, and
   write it (`registry` quantizers: ONNX Runtime for the CPU target, ModelOpt for TensorRT
   targets), validated structurally (`qdq_check`);
4. `measure(inputs, recorded, prepared) -> Measured`: SQNR of each graph's outputs against FP32
   on the recorded eval inputs, and the pipeline's first-mask Dice and token agreement;
5. `search(inputs, recorded, prepared) -> SearchResult`: measure; over budget, the sensitivity
   search returns the most sensitive layer groups to float one at a time until the budget holds
   (`sensitivity`), else `BudgetNotMetError` with the numbers;
6. `report(...) -> QuantizeReport`, then the quantized export folder (same layout, graphs
   replaced, manifests updated, `quantize_report.json`) is written into a temporary folder and
   renamed into place.

`Inputs` holds what a run is given (resolved, fixed throughout); the graphs written so far live
in its scratch folder. `progress(QuantizeProgress)` is called at every stage and record. What
the quantizer libraries print goes to this module's log (`quantizer_output_to_log`), never to
stdout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from citrus_edge.bundle import sigterm_cleanup, tool_versions
from citrus_edge.calib_data.data_manifest import Record, read_manifest
from citrus_edge.recipes import COMPONENTS, Recipe, get_precision, get_recipe
from citrus_edge.targets import Target, check_recipe, get_target

from .budget import (
    Budget,
    BudgetNotMeasurableError,
    BudgetNotMetError,
    Measured,
    default_budget,
)
from .calibrate import PipelineRun, bundle_view, run_pipeline
from .compact import CompactFacts, compact_graph
from .fidelity import compare_runs, graph_fidelity, reference_outputs
from .qdq_check import check_graph, require_ok
from .quantized_output import (
    check_out_dir,
    copy_graph,
    graph_bytes,
    payload_bytes,
    read_export,
    store_embeddings,
    write_quantized_export,
)
from .quantizer_log import quantizer_output_to_log
from .registry import (
    GraphQuantizer,
    QuantRequest,
    UnsupportedQuantizationError,
    check_request,
    get_quantizer,
)
from .report import ComponentReport, QuantizeReport
from .sensitivity import GroupEffect, SearchStep, layer_groups, most_sensitive_group
from .settings import CALIBRATION_METHODS, DEFAULT_CONFIG, DEFAULT_METHODS, QuantizeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeProgress:
    """One progress event: `stage` (see `STAGES`), `done` of `total` units, a short message."""

    stage: str
    done: int
    total: int
    message: str = ""


STAGES = ("record", "calibrate", "measure", "search", "write")
Progress = Callable[[QuantizeProgress], None]


def _backend(target: Target) -> str:
    return "tensorrt" if target.tensorrt else "onnxruntime"


def _no_progress(event: QuantizeProgress) -> None:
    pass


# -- 1. plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Per component: requested precision, status, and the quantizer settings (if quantized)."""

    precision: str
    status: str  # "quantize", "float", "engine-build"
    settings: Any = None


def plan_components(
    recipe: Recipe,
    target: Target,
    config: QuantizeConfig = DEFAULT_CONFIG,
    method: str | None = None,
    checkpoint: Path | None = None,
) -> dict[str, _Plan]:
    """What `quantize` will do to each component; raises before any heavy work.

    `method` / `checkpoint`: None takes `config.method` / `config.checkpoint`.
    UnsupportedPrecisionError: the target cannot run the recipe (e.g. FP8 on Orin).
    UnsupportedQuantizationError: no quantizer, no settings, settings that would change the
    precision, a calibration method the backend lacks, or a missing checkpoint.
    """
    check_recipe(target, recipe)
    backend = _backend(target)
    method = resolve_method(target, config.method if method is None else method)
    checkpoint = config.checkpoint if checkpoint is None else checkpoint
    plans = {}
    for component, precision in recipe.items():
        if not get_precision(precision).low_bit:
            status = "float" if precision == "fp32" else "engine-build"
            plans[component] = _Plan(precision, status)
            continue
        get_quantizer(backend, precision)  # raises if nobody serves it
        settings = config.settings_for(backend, precision, component)
        if settings is None:
            raise UnsupportedQuantizationError(
                f"{component}: no {precision} settings for the {backend} backend; pass "
                f"QuantizeConfig(settings={{'{component}': ...}}) or choose another recipe"
            )
        check_request(
            QuantRequest(
                component, precision, backend, Path(), Path(), settings, (), method, checkpoint
            )
        )
        plans[component] = _Plan(precision, "quantize", settings)
    return plans


def resolve_method(target: Target, method: str | None) -> str:
    """`method`, or the backend's measured default (`settings.DEFAULT_METHODS`) when None."""
    method = DEFAULT_METHODS[_backend(target)] if method is None else method
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    return method


def describe_plan(
    recipe: Recipe | str, target: Target | str, method: str | None = None
) -> list[tuple[str, str, str]]:
    """(component, precision, what will be done) rows, for a CLI dry run; raises like
    `quantize` when the recipe cannot be honoured (without a checkpoint check)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    target = get_target(target) if isinstance(target, str) else target
    plans = plan_components(recipe, target, method=method, checkpoint=Path("<checkpoint>"))
    return [(c, p.precision, getattr(p.settings, "scheme", p.status)) for c, p in plans.items()]


# -- the run ---------------------------------------------------------------------------------
def quantize(
    export_dir: str | os.PathLike,
    recipe: Recipe | str,
    target: Target | str,
    calib_manifest: str | os.PathLike | None = None,
    budget: Budget | None | Literal["recipe"] = "recipe",
    out_dir: str | os.PathLike | None = None,
    method: str | None = None,
    *,
    config: QuantizeConfig = DEFAULT_CONFIG,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool | None = None,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Quantize the graphs of `export_dir` per `recipe` for `target` into `out_dir`.

    Args:
        export_dir: an `export.export_all` folder (FP32 graphs).
        recipe / target: presets or their names (`recipes.get_recipe`, `targets.get_target`).
        calib_manifest: a calib_data manifest with "calib" and "eval" splits; None: the default
            phantom set (`calib_data.phantom_set.default_phantom_manifest`).
        budget: the accuracy budget against FP32 (`budget.parse_budget` reads the CLI form);
            "recipe": the recipe's default (`budget.default_budget`: 4-bit LLMs get a lower
            token-agreement floor); None measures and reports without a gate.
        out_dir: the folder to create (same layout as `export_dir`, plus `quantize_report.json`).
        config: per-component settings, answer length, search limits, calibration method,
            checkpoint, overwrite (`QuantizeConfig`).
        method / checkpoint / overwrite: when given, override `config.method` (activation
            calibration: "minmax", "entropy" or "percentile"; None: the backend's measured
            default, `settings.DEFAULT_METHODS`), `config.checkpoint` (the float checkpoint,
            needed by the TensorRT LLM path, ModelOpt PyTorch) and `config.overwrite` (replace an
            existing `out_dir` that a previous `quantize` wrote).
        progress: called with a `QuantizeProgress` at every stage and record.

    Returns the `QuantizeReport` (also saved as `out_dir/quantize_report.json`).
    Raises `UnsupportedPrecisionError` / `UnsupportedQuantizationError` before any work when the
    recipe cannot be honoured, `BudgetNotMetError` (with the measured numbers) when the budget
    holds neither at once nor after the sensitivity search, `BudgetNotMeasurableError` when a
    budget is asked for graphs whose accuracy cannot be measured on this machine, and
    `QuantizedGraphError` when a graph fails its structural check. Nothing is written at
    `out_dir` on any error.
    """
    t0 = time.perf_counter()
    options = {"method": method, "checkpoint": checkpoint, "overwrite": overwrite}
    config = dataclasses.replace(config, **{k: v for k, v in options.items() if v is not None})
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    target = get_target(target) if isinstance(target, str) else target
    budget = default_budget(recipe.llm) if budget == "recipe" else budget
    config = dataclasses.replace(config, method=resolve_method(target, config.method))
    plans = plan_components(recipe, target, config)
    if out_dir is None:
        raise ValueError("out_dir is required: the folder to write the quantized export into")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    export = read_export(export_dir)
    check_out_dir(out_dir, config.overwrite)
    manifest = _calib_manifest(calib_manifest)
    calib, evals = (
        _split(manifest, "calib", config.max_calib_records),
        _split(manifest, "eval", config.max_eval_records),
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        sigterm_cleanup(),
        quantizer_output_to_log(),
        tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.quantize-", dir=out_dir.parent) as s,
    ):
        inputs = Inputs(
            export_dir,
            Path(s),
            recipe,
            target,
            budget,
            config,
            progress or _no_progress,
            export["embeddings"]["file"],
        )
        inputs.qdir.mkdir()
        recorded = record(inputs, manifest, calib, evals)
        prepared = prepare(inputs, recorded, plans)
        result = search(inputs, recorded, prepared)
        quantize_report = report(inputs, recorded, result, out_dir, t0)
        write_quantized_export(
            export_dir, export, inputs.qdir, quantize_report, out_dir, config.overwrite
        )
    log.info("quantized %s -> %s (%s on %s)", export_dir, out_dir, recipe.name, target.name)
    return quantize_report


def _calib_manifest(path: str | os.PathLike | None) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"calibration manifest {path} is not a file")
        return Path(path)
    from citrus_edge.calib_data.phantom_set import default_phantom_manifest

    return default_phantom_manifest()


def _split(manifest: Path, split: str, cap: int | None) -> list[Record]:
    records = read_manifest(manifest, split)
    if not records:
        raise ValueError(f"{manifest}: no {split!r} records; quantization needs calib and eval")
    return records[:cap] if cap else records


@dataclass(frozen=True)
class Inputs:
    """What one run is given, resolved (`config.method` is set): fixed from `record` to
    `report`. `scratch` is the run's temporary folder; `qdir` in it holds the graphs as
    written now, under their own names."""

    export_dir: Path
    scratch: Path
    recipe: Recipe
    target: Target
    budget: Budget | None
    config: QuantizeConfig
    progress: Progress = _no_progress
    embeddings_file: str = "embeddings.npy"  # the export's table (export manifest)

    @property
    def backend(self) -> str:
        return _backend(self.target)

    @property
    def qdir(self) -> Path:
        return self.scratch / "quantized"

    @property
    def compacts(self) -> bool:
        return self.backend == "onnxruntime" and self.config.compact

    def workdir(self, component: str) -> Path:
        return self.scratch / "work" / component

    def written(self, component: str) -> Path:
        """The graph as the quantizer wrote it: the sensitivity search edits this one (its
        tensor names are the source's); `qdir` holds it compacted (`compact.compact_graph`).
        A graph with external data is written and compacted in place (only its `value_info`
        goes: its names stay)."""
        external = Path(f"{self.export_dir / component}.onnx.data").is_file()
        if self.compacts and not external:
            return self.workdir(component) / f"{component}.written.onnx"
        return self.qdir / f"{component}.onnx"


# -- 2. record -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recorded:
    """The FP32 pipeline's runs over both splits, with every graph's inputs (`record`)."""

    manifest: Path
    calib_run: PipelineRun
    eval_run: PipelineRun
    eval_records: tuple[Record, ...]
    notes: tuple[str, ...] = ()

    @property
    def data_dir(self) -> Path:
        return self.manifest.parent


def record(
    inputs: Inputs, manifest: Path, calib: Sequence[Record], evals: Sequence[Record]
) -> Recorded:
    """Run the FP32 export over both splits, keeping every graph's inputs."""
    runs = {}
    with bundle_view(inputs.export_dir, inputs.scratch, "fp32") as view:
        for split, records in (("calib", calib), ("eval", evals)):
            runs[split] = run_pipeline(
                view,
                records,
                manifest.parent,
                inputs.config.max_new_tokens,
                True,
                lambda d, n, s=split: inputs.progress(QuantizeProgress("record", d, n, s)),
            )
    notes = tuple(
        f"{split}: {run.n_probes} segmentation answer(s) had no [SEG]; the mask "
        "decoder was fed the final hidden state of the last step instead (probe: "
        "calibration feeds and the reported probe Dice; the budgeted Dice compares "
        "answer masks)"
        for split, run in runs.items()
        if run.n_probes
    )
    return Recorded(manifest, runs["calib"], runs["eval"], tuple(evals), notes)


# -- 3. calibrate and write ------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedGraph:
    """One calibrated graph, as written now in `Inputs.qdir` with `excluded` left float."""

    quantizer: GraphQuantizer
    reference: Sequence[Mapping[str, np.ndarray]]  # FP32 outputs on the recorded eval feeds
    excluded: frozenset[str]
    check: dict  # `qdq_check.check_graph` facts of the written graph
    compacted: CompactFacts | None = None


@dataclass(frozen=True)
class Prepared:
    """What each component gets, the quantized graphs (recipe order), and the embedding table
    as the quantized export stores it (None: unchanged)."""

    plans: Mapping[str, _Plan]
    graphs: Mapping[str, QuantizedGraph]
    embeddings: Path | None = None

    def with_graph(self, component: str, graph: QuantizedGraph) -> Prepared:
        return dataclasses.replace(self, graphs={**self.graphs, component: graph})


def prepare(inputs: Inputs, recorded: Recorded, plans: Mapping[str, _Plan]) -> Prepared:
    """Calibrate every graph to quantize once and write it with nothing excluded."""
    todo = [c for c, p in plans.items() if p.status == "quantize"]
    graphs = {}
    for i, component in enumerate(todo):
        inputs.progress(QuantizeProgress("calibrate", i, len(todo), component))
        work = inputs.workdir(component)
        work.mkdir(parents=True)
        src = copy_graph(inputs.export_dir / f"{component}.onnx", work)
        request = QuantRequest(
            component,
            plans[component].precision,
            inputs.backend,
            src,
            work,
            plans[component].settings,
            recorded.calib_run.feeds[component],
            inputs.config.method,
            inputs.config.checkpoint,
        )
        quantizer = get_quantizer(inputs.backend, request.precision)(request)
        graph = inputs.export_dir / f"{component}.onnx"
        reference = reference_outputs(component, graph, recorded.eval_run.feeds[component])
        graphs[component] = write_graph(inputs, quantizer, reference, frozenset())
    embeddings = None
    if "llm" in graphs and inputs.config.embeddings_dtype != "float32":
        name = inputs.embeddings_file
        embeddings = inputs.qdir / name
        store_embeddings(inputs.export_dir / name, embeddings, inputs.config.embeddings_dtype)
    inputs.progress(QuantizeProgress("calibrate", len(todo), len(todo), ""))
    return Prepared(dict(plans), graphs, embeddings)


def write_graph(
    inputs: Inputs,
    q: GraphQuantizer,
    reference: Sequence[Mapping[str, np.ndarray]],
    excluded: frozenset[str],
) -> QuantizedGraph:
    """Write `q`'s graph into `qdir` with `excluded` left float, compacted on the CPU backend,
    and check it structurally (`QuantizedGraphError` when it fails)."""
    component = q.component
    path = inputs.qdir / f"{component}.onnx"
    written = inputs.written(component)
    q.write(written, excluded)
    compacted = None
    if inputs.compacts:
        if written != path:
            shutil.copyfile(written, path)
        compacted = compact_graph(path)
    n_candidates = len(q.candidates())
    all_float = n_candidates and len(excluded) >= n_candidates
    per_channel = getattr(q, "per_channel_weights", False)
    facts = check_graph(path, q.precision, q.scheme, per_channel, 0 if all_float else 1)
    require_ok(component, facts)
    return QuantizedGraph(q, reference, excluded, facts, compacted)


# -- 4. measure ------------------------------------------------------------------------------
def graph_sqnr(
    inputs: Inputs, recorded: Recorded, graph: QuantizedGraph
) -> dict[str, float] | None:
    """SQNR (dB) of each output of the graph as written now against FP32; None when ONNX
    Runtime on this CPU cannot run it faithfully."""
    q = graph.quantizer
    if q.ort_mode is None:
        return None
    path = inputs.qdir / f"{q.component}.onnx"
    feeds = recorded.eval_run.feeds[q.component]
    return graph_fidelity(q.component, graph.reference, path, feeds, q.ort_mode).sqnr_db


def measure(
    inputs: Inputs, recorded: Recorded, prepared: Prepared, only: str | None = None
) -> Measured:
    """SQNR of every quantized graph and the pipeline against FP32 on the eval split.

    `only`: quantize just that graph (the others FP32), to attribute a violation.
    """
    graphs = prepared.graphs
    names = [only] if only else list(graphs)
    sqnr = {c: min(db.values()) for c in names if (db := graph_sqnr(inputs, recorded, graphs[c]))}
    blind = [c for c in names if graphs[c].quantizer.ort_mode is None]
    if blind:
        why = (
            f"{', '.join(blind)}: ONNX Runtime on this CPU cannot run these "
            f"{inputs.backend} graphs faithfully; checked structurally only"
        )
        return Measured(None, None, sqnr, unmeasured_why=why)
    files = {f"{c}.onnx": inputs.qdir / f"{c}.onnx" for c in names}
    if prepared.embeddings is not None and (only is None or only == "llm"):
        files[prepared.embeddings.name] = prepared.embeddings
    with bundle_view(inputs.export_dir, inputs.scratch, "measure", files) as view:
        run = run_pipeline(
            view, recorded.eval_records, recorded.data_dir, inputs.config.max_new_tokens
        )
    fid = compare_runs(recorded.eval_run, run)
    return Measured(
        fid.dice_drop,
        fid.token_agreement,
        sqnr,
        fid.n_records,
        fid.n_masks,
        probe_dice_drop=fid.probe_dice_drop,
    )


# -- 5. budget and search --------------------------------------------------------------------
@dataclass(frozen=True)
class SearchResult:
    """The graphs after the search, the first and last measurements, the steps taken, and the
    measurements after each step."""

    prepared: Prepared
    initial: Measured
    measured: Measured
    steps: tuple[SearchStep, ...] = ()
    history: tuple[Measured, ...] = ()


def search(inputs: Inputs, recorded: Recorded, prepared: Prepared) -> SearchResult:
    """Measure; while over budget, return the most sensitive layer group to float."""
    inputs.progress(QuantizeProgress("measure", 0, 1, "all graphs"))
    initial = measure(inputs, recorded, prepared)
    result = SearchResult(prepared, initial, initial)
    budget = inputs.budget
    if budget is None or not prepared.graphs:
        return result
    if initial.unmeasured_why:
        raise BudgetNotMeasurableError(
            f"budget {budget} asked, but {initial.unmeasured_why}; measure accuracy "
            "with engines on the target, or pass budget=None to write unverified graphs"
        )
    solo: dict[str, Measured] = {}  # each graph quantized alone, as written now
    while violations := result.measured.violations(budget):
        _check_can_search(inputs, result, violations)
        inputs.progress(
            QuantizeProgress(
                "search", len(result.steps), inputs.config.max_search_steps, "; ".join(violations)
            )
        )
        result = _step(inputs, recorded, result, violations, solo)
    return result


def _groups(graph: QuantizedGraph) -> dict[str, list[str]]:
    return layer_groups(graph.quantizer.candidates(), graph.excluded)


def _stalled(inputs: Inputs, result: SearchResult) -> bool:
    """The last `search_patience` steps brought the measurements no closer to the budget."""
    n = inputs.config.search_patience
    if len(result.steps) < n:
        return False
    excess = [m.excess(inputs.budget) for m in (result.initial, *result.history)]
    return min(excess[-n:]) >= min(excess[:-n]) - 1e-9


def _check_can_search(inputs: Inputs, result: SearchResult, violations: list[str]) -> None:
    graphs = result.prepared.graphs
    searchable = [c for c in graphs if _groups(graphs[c])]
    config = inputs.config
    reason = None
    if not config.search:
        reason = "the sensitivity search is off (QuantizeConfig.search=False)"
    elif len(result.steps) >= config.max_search_steps:
        reason = f"{len(result.steps)} layer groups returned to float (max_search_steps)"
    elif not searchable:
        reason = "every quantized node is already float"
    elif _stalled(inputs, result):
        reason = f"the last {config.search_patience} steps did not get closer (search_patience)"
    if reason:
        raise BudgetNotMetError(
            f"{inputs.recipe.name} on {inputs.target.name} misses budget {inputs.budget}: "
            f"{'; '.join(violations)} ({reason}). Measured: {result.measured.to_dict()}",
            inputs.budget,
            result.measured,
            {c: sorted(g.excluded) for c, g in graphs.items()},
        )


def _step(
    inputs: Inputs,
    recorded: Recorded,
    result: SearchResult,
    violations: list[str],
    solo: dict[str, Measured],
) -> SearchResult:
    """Return one layer group to float: the most sensitive of the graph to blame."""
    component = _attribute(inputs, recorded, result, solo)
    graph = result.prepared.graphs[component]
    best = _next_group(inputs, recorded, graph)
    graph = write_graph(
        inputs, graph.quantizer, graph.reference, graph.excluded | frozenset(best.nodes)
    )
    solo.pop(component, None)
    prepared = result.prepared.with_graph(component, graph)
    measured = measure(inputs, recorded, prepared)
    step = SearchStep(
        component,
        best.group,
        best.nodes,
        "; ".join(violations),
        best,
        result.measured.to_dict(),
        measured.to_dict(),
    )
    log.info(
        "search: %s %s back to float (%+.1f dB); now %s",
        component,
        best.group,
        best.gain_db,
        "; ".join(measured.violations(inputs.budget)) or "within budget",
    )
    return dataclasses.replace(
        result,
        prepared=prepared,
        measured=measured,
        steps=(*result.steps, step),
        history=(*result.history, measured),
    )


def _next_group(inputs: Inputs, recorded: Recorded, graph: QuantizedGraph) -> GroupEffect:
    """The most sensitive group still quantized (`sensitivity.most_sensitive_group`)."""
    q = graph.quantizer
    return most_sensitive_group(
        q,
        set(graph.excluded),
        graph.reference,
        recorded.eval_run.feeds[q.component],
        q.ort_mode,
        inputs.written(q.component),
        inputs.workdir(q.component),
    )


def _attribute(
    inputs: Inputs, recorded: Recorded, result: SearchResult, solo: dict[str, Measured]
) -> str:
    """The quantized graph (with groups left) whose solo quantization is furthest over.
    `solo` caches each graph's solo measurement until that graph is rewritten."""
    graphs, measured = result.prepared.graphs, result.measured
    candidates = [c for c in graphs if _groups(graphs[c])]
    if len(candidates) == 1:
        return candidates[0]
    sqnr_bound = inputs.budget.min_sqnr_db
    if sqnr_bound is not None:
        low = [c for c in candidates if measured.sqnr_db.get(c, np.inf) < sqnr_bound]
        if low:
            return min(low, key=lambda c: measured.sqnr_db[c])
    for c in candidates:
        if c not in solo:
            solo[c] = measure(inputs, recorded, result.prepared, only=c)
    # Rank by the bounds broken now only: a graph that costs Dice says nothing about a
    # token-agreement violation (and the LLM's solo run rarely costs Dice).
    broken = measured.broken_bounds(inputs.budget)
    return max(candidates, key=lambda c: solo[c].excess(broken))


# -- 6. report -------------------------------------------------------------------------------
def report(
    inputs: Inputs, recorded: Recorded, result: SearchResult, out_dir: Path, t0: float
) -> QuantizeReport:
    """The run's `QuantizeReport` (`t0`: its start, `time.perf_counter`)."""
    inputs.progress(QuantizeProgress("write", 0, 1, str(out_dir)))
    prepared = result.prepared
    components = {c: _component_report(inputs, recorded, prepared, c) for c in COMPONENTS}
    quantizers = {c: g.quantizer for c, g in prepared.graphs.items()}
    return QuantizeReport(
        recipe=inputs.recipe.to_dict(),
        target=inputs.target.name,
        backend=inputs.backend,
        method=inputs.config.method,
        export_dir=str(inputs.export_dir),
        out_dir=str(out_dir),
        components=components,
        budget=None if inputs.budget is None else inputs.budget.to_dict(),
        measured=result.measured.to_dict(),
        measured_initial=result.initial.to_dict(),
        search=[s.to_dict() for s in result.steps],
        calibration=_calibration_facts(inputs, recorded),
        config=inputs.config.to_dict(),
        notes=[*recorded.notes, *_scheme_notes(quantizers)],
        seconds=time.perf_counter() - t0,
        versions=tool_versions(("nvidia-modelopt", "onnxscript")),
        **_payload(inputs.export_dir, prepared.embeddings, components),
    )


def _payload(
    export_dir: Path, embeddings: Path | None, components: dict[str, ComponentReport]
) -> dict[str, int]:
    """Payload bytes of the FP32 export and of the output written from it."""
    files = [p for p in export_dir.iterdir() if p.is_file()]
    before = payload_bytes(files)
    after = before + sum(c.bytes_after - c.bytes_before for c in components.values())
    if embeddings is not None:
        after += embeddings.stat().st_size - (export_dir / embeddings.name).stat().st_size
    return {"payload_bytes_before": before, "payload_bytes_after": after}


def _calibration_facts(inputs: Inputs, recorded: Recorded) -> dict[str, Any]:
    calib_run, eval_run = recorded.calib_run, recorded.eval_run
    return {
        "manifest": str(recorded.manifest),
        "method": inputs.config.method,
        "calib_records": len(calib_run.outcomes),
        "eval_records": len(eval_run.outcomes),
        "samples": {g: len(v) for g, v in calib_run.feeds.items()},
        "eval_samples": {g: len(v) for g, v in eval_run.feeds.items()},
        "probes": {"calib": calib_run.n_probes, "eval": eval_run.n_probes},
        "max_new_tokens": inputs.config.max_new_tokens,
    }


def _component_report(
    inputs: Inputs, recorded: Recorded, prepared: Prepared, component: str
) -> ComponentReport:
    plan = prepared.plans[component]
    src = inputs.export_dir / f"{component}.onnx"
    before, weights_before = graph_bytes(src)
    graph = prepared.graphs.get(component)
    if graph is None:
        status = "float" if plan.status == "float" else "engine-build"
        return ComponentReport(
            component,
            plan.precision,
            status,
            None,
            before,
            before,
            weights_before,
            weights_before,
        )
    q = graph.quantizer
    after, weights_after = graph_bytes(inputs.qdir / f"{component}.onnx")
    sqnr = graph_sqnr(inputs, recorded, graph)
    compact = {} if graph.compacted is None else {"compact": graph.compacted.to_dict()}
    return ComponentReport(
        component,
        plan.precision,
        "quantized",
        q.scheme,
        before,
        after,
        weights_before,
        weights_after,
        sqnr,
        q.ort_mode if sqnr is not None else None,
        graph.check,
        len(q.candidates()),
        sorted(graph.excluded),
        {**q.describe(), **compact},
    )


def _scheme_notes(quantizers: Mapping[str, GraphQuantizer]) -> list[str]:
    notes = []
    for q in quantizers.values():
        note = getattr(q, "note", None)
        if note:
            notes.append(f"{q.component}: {note}")
    return notes


__all__ = [
    "STAGES",
    "Inputs",
    "Prepared",
    "QuantizeProgress",
    "QuantizedGraph",
    "Recorded",
    "SearchResult",
    "describe_plan",
    "measure",
    "plan_components",
    "prepare",
    "quantize",
    "record",
    "report",
    "search",
    "write_graph",
]
