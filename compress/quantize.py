"""Post-training quantization of an export folder, held to an accuracy budget.

    report = quantize(export_dir, "int8", "cpu", out_dir=out)          # calib: default phantoms

Steps (each a function below):
1. refuse what cannot be honoured: `check_recipe` (e.g. FP8 on Orin), a (backend, precision)
   no quantizer serves, a calibration method the backend lacks;
2. run the FP32 export through the runtime's own pipeline over the calib and eval splits,
   recording every graph's real inputs (`calibrate`);
3. calibrate each graph to quantize once, and write it (`registry` quantizers: ONNX Runtime for
   the CPU target, ModelOpt for TensorRT targets);
4. validate each graph structurally (`qdq_check`), measure SQNR of its outputs against FP32 on the
   recorded eval inputs, and the pipeline's first-mask Dice and token agreement against FP32;
5. over budget: the sensitivity search returns the most sensitive layer groups to float one at a
   time until the budget holds (`sensitivity`), else `BudgetNotMetError` with the numbers;
6. write the quantized export folder (same layout, graphs replaced, manifests updated,
   `quantize_report.json`) into a temporary folder and rename it into place.

`progress(QuantizeProgress)` is called at every stage and record. What the quantizer libraries
print goes to this module's log (`quantizer_output_to_log`), never to stdout.
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

    UnsupportedPrecisionError: the target cannot run the recipe (e.g. FP8 on Orin).
    UnsupportedQuantizationError: no quantizer, no settings, settings that would change the
    precision, a calibration method the backend lacks, or a missing checkpoint.
    """
    check_recipe(target, recipe)
    backend = _backend(target)
    method = resolve_method(target, method)
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
    overwrite: bool = False,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Quantize the graphs of `export_dir` per `recipe` for `target` into `out_dir`.

    Args:
        export_dir: an `export.export_all` folder (FP32 graphs).
        recipe / target: presets or their names (`recipes.get_recipe`, `targets.get_target`).
        calib_manifest: a calib_data manifest with "calib" and "eval" splits; None: the default
            phantom set (`defaults.default_phantom_manifest`).
        budget: the accuracy budget against FP32 (`budget.parse_budget` reads the CLI form);
            "recipe": the recipe's default (`budget.default_budget`: 4-bit LLMs get a lower
            token-agreement floor); None measures and reports without a gate.
        out_dir: the folder to create (same layout as `export_dir`, plus `quantize_report.json`).
        method: activation calibration, "minmax", "entropy" or "percentile"; None: the
            backend's measured default (`settings.DEFAULT_METHODS`: percentile for ONNX
            Runtime, minmax for ModelOpt).
        config: per-component settings, answer length, search limits (`QuantizeConfig`).
        checkpoint: the float checkpoint, needed by the TensorRT LLM path (ModelOpt PyTorch).
        overwrite: replace an existing `out_dir` that a previous `quantize` wrote.
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
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    target = get_target(target) if isinstance(target, str) else target
    budget = default_budget(recipe.llm) if budget == "recipe" else budget
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    method = resolve_method(target, method)
    plans = plan_components(recipe, target, config, method, checkpoint)
    if out_dir is None:
        raise ValueError("out_dir is required: the folder to write the quantized export into")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    export = read_export(export_dir)
    check_out_dir(out_dir, overwrite)
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
        job = _Job(export_dir, Path(s), recipe, target, method, budget, config, progress)
        job.checkpoint, job.embeddings_file = checkpoint, export["embeddings"]["file"]
        job.record(calib, evals, manifest.parent)
        job.prepare(plans)
        job.run_search()
        report = job.report(export_dir, out_dir, manifest, t0)
        write_quantized_export(export_dir, export, job.qdir, report, out_dir, overwrite)
    log.info("quantized %s -> %s (%s on %s)", export_dir, out_dir, recipe.name, target.name)
    return report


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


class _Job:
    """The state of one `quantize` run inside its scratch folder."""

    def __init__(self, export_dir, scratch, recipe, target, method, budget, config, progress):
        self.export_dir, self.scratch = export_dir, scratch
        self.recipe, self.target, self.backend = recipe, target, _backend(target)
        self.method, self.budget, self.config = method, budget, config
        self.progress = progress or (lambda event: None)
        self.checkpoint: Path | None = None
        self.qdir = scratch / "quantized"  # the graphs as written now, under their own names
        self.qdir.mkdir()
        self.quantizers: dict[str, GraphQuantizer] = {}
        self.plans: dict[str, _Plan] = {}
        self.excluded: dict[str, set[str]] = {}
        self.checks: dict[str, dict] = {}
        self.reference: dict[str, list[dict[str, np.ndarray]]] = {}  # FP32 outputs, eval feeds
        self.steps: list[SearchStep] = []
        self.notes: list[str] = []
        self._solo: dict[str, Measured] = {}
        self.compacted: dict[str, CompactFacts] = {}
        self.embeddings_file = "embeddings.npy"  # the export's table (export manifest)
        self.embeddings: Path | None = None  # the table as the quantized export stores it
        self._history: list[Measured] = []  # measurements after each search step

    # -- 2. record ------------------------------------------------------------------------
    def record(self, calib: list[Record], evals: list[Record], data_dir: Path) -> None:
        """Run the FP32 export over both splits, keeping every graph's inputs."""
        with bundle_view(self.export_dir, self.scratch, "fp32") as view:
            for split, records in (("calib", calib), ("eval", evals)):
                run = run_pipeline(
                    view,
                    records,
                    data_dir,
                    self.config.max_new_tokens,
                    True,
                    lambda d, n, s=split: self.progress(QuantizeProgress("record", d, n, s)),
                )
                setattr(self, f"{split}_run", run)
        self.data_dir, self.eval_records = data_dir, evals
        for split in ("calib", "eval"):
            run: PipelineRun = getattr(self, f"{split}_run")
            if run.n_probes:
                self.notes.append(
                    f"{split}: {run.n_probes} segmentation answer(s) had no [SEG]; the mask "
                    "decoder was fed the final hidden state of the last step instead (probe: "
                    "calibration feeds and the reported probe Dice; the budgeted Dice compares "
                    "answer masks)"
                )

    def _fp32_outputs(self, component: str) -> list[dict[str, np.ndarray]]:
        graph = self.export_dir / f"{component}.onnx"
        return reference_outputs(component, graph, self.eval_run.feeds[component])

    # -- 3. calibrate and write ---------------------------------------------------------
    def prepare(self, plans: dict[str, _Plan]) -> None:
        """Calibrate every graph to quantize once and write it with nothing excluded."""
        self.plans = plans
        todo = [c for c, p in plans.items() if p.status == "quantize"]
        for i, component in enumerate(todo):
            self.progress(QuantizeProgress("calibrate", i, len(todo), component))
            work = self.scratch / "work" / component
            work.mkdir(parents=True)
            src = copy_graph(self.export_dir / f"{component}.onnx", work)
            request = QuantRequest(
                component,
                plans[component].precision,
                self.backend,
                src,
                work,
                plans[component].settings,
                self.calib_run.feeds[component],
                self.method,
                self.checkpoint,
            )
            self.quantizers[component] = get_quantizer(self.backend, request.precision)(request)
            self.reference[component] = self._fp32_outputs(component)
            self.excluded[component] = set()
            self._write(component)
        if "llm" in self.quantizers and self.config.embeddings_dtype != "float32":
            name = self.embeddings_file
            self.embeddings = self.qdir / name
            store_embeddings(self.export_dir / name, self.embeddings, self.config.embeddings_dtype)
        self.progress(QuantizeProgress("calibrate", len(todo), len(todo), ""))

    def _write(self, component: str) -> None:
        q = self.quantizers[component]
        path = self.qdir / f"{component}.onnx"
        written = self._written(component)
        q.write(written, frozenset(self.excluded[component]))
        if self._compacts:
            if written != path:
                shutil.copyfile(written, path)
            self.compacted[component] = compact_graph(path)
        n_candidates = len(q.candidates())
        all_float = n_candidates and len(self.excluded[component]) >= n_candidates
        per_channel = getattr(q, "per_channel_weights", False)
        facts = check_graph(path, q.precision, q.scheme, per_channel, 0 if all_float else 1)
        require_ok(component, facts)
        self.checks[component] = facts
        self._solo.pop(component, None)

    # -- 4. measure ---------------------------------------------------------------------
    @property
    def _compacts(self) -> bool:
        return self.backend == "onnxruntime" and self.config.compact

    def _written(self, component: str) -> Path:
        """The graph as the quantizer wrote it: the sensitivity search edits this one (its
        tensor names are the source's); `qdir` holds it compacted (`compact.compact_graph`).
        A graph with external data is written and compacted in place (only its `value_info`
        goes: its names stay)."""
        external = Path(f"{self.export_dir / component}.onnx.data").is_file()
        if self._compacts and not external:
            return self.scratch / "work" / component / f"{component}.written.onnx"
        return self.qdir / f"{component}.onnx"

    def graph_sqnr(self, component: str) -> dict[str, float] | None:
        q = self.quantizers[component]
        if q.ort_mode is None:
            return None
        path = self.qdir / f"{component}.onnx"
        feeds = self.eval_run.feeds[component]
        return graph_fidelity(component, self.reference[component], path, feeds, q.ort_mode).sqnr_db

    def measure(self, only: str | None = None) -> Measured:
        """SQNR of every quantized graph and the pipeline against FP32 on the eval split.

        `only`: quantize just that graph (the others FP32), to attribute a violation.
        """
        names = [only] if only else list(self.quantizers)
        sqnr = {c: min(db.values()) for c in names if (db := self.graph_sqnr(c))}
        blind = [c for c in names if self.quantizers[c].ort_mode is None]
        if blind:
            why = (
                f"{', '.join(blind)}: ONNX Runtime on this CPU cannot run these "
                f"{self.backend} graphs faithfully; checked structurally only"
            )
            return Measured(None, None, sqnr, unmeasured_why=why)
        files = {f"{c}.onnx": self.qdir / f"{c}.onnx" for c in names}
        if self.embeddings is not None and (only is None or only == "llm"):
            files[self.embeddings.name] = self.embeddings
        with bundle_view(self.export_dir, self.scratch, "measure", files) as view:
            run = run_pipeline(view, self.eval_records, self.data_dir, self.config.max_new_tokens)
        fid = compare_runs(self.eval_run, run)
        return Measured(
            fid.dice_drop,
            fid.token_agreement,
            sqnr,
            fid.n_records,
            fid.n_masks,
            probe_dice_drop=fid.probe_dice_drop,
        )

    # -- 5. budget and search -------------------------------------------------------------
    def run_search(self) -> None:
        """Measure; while over budget, return the most sensitive layer group to float."""
        self.progress(QuantizeProgress("measure", 0, 1, "all graphs"))
        self.measured = self.initial = self.measure()
        budget = self.budget
        if budget is None or not self.quantizers:
            return
        if self.measured.unmeasured_why:
            raise BudgetNotMeasurableError(
                f"budget {budget} asked, but {self.measured.unmeasured_why}; measure accuracy "
                "with engines on the target, or pass budget=None to write unverified graphs"
            )
        while violations := self.measured.violations(budget):
            self._check_can_search(violations)
            self.progress(
                QuantizeProgress(
                    "search", len(self.steps), self.config.max_search_steps, "; ".join(violations)
                )
            )
            self._step(violations)

    def _stalled(self) -> bool:
        """The last `search_patience` steps brought the measurements no closer to the budget."""
        n = self.config.search_patience
        if len(self.steps) < n:
            return False
        excess = [m.excess(self.budget) for m in (self.initial, *self._history)]
        return min(excess[-n:]) >= min(excess[:-n]) - 1e-9

    def _check_can_search(self, violations: list[str]) -> None:
        searchable = [c for c in self.quantizers if self._groups(c)]
        reason = None
        if not self.config.search:
            reason = "the sensitivity search is off (QuantizeConfig.search=False)"
        elif len(self.steps) >= self.config.max_search_steps:
            reason = f"{len(self.steps)} layer groups returned to float (max_search_steps)"
        elif not searchable:
            reason = "every quantized node is already float"
        elif self._stalled():
            reason = (
                f"the last {self.config.search_patience} steps did not get closer (search_patience)"
            )
        if reason:
            raise BudgetNotMetError(
                f"{self.recipe.name} on {self.target.name} misses budget {self.budget}: "
                f"{'; '.join(violations)} ({reason}). Measured: {self.measured.to_dict()}",
                self.budget,
                self.measured,
                {c: sorted(v) for c, v in self.excluded.items()},
            )

    def _groups(self, component: str) -> dict[str, list[str]]:
        q = self.quantizers[component]
        return layer_groups(q.candidates(), self.excluded[component])

    def _step(self, violations: list[str]) -> None:
        component = self._attribute()
        best = self._next_group(component)
        before = self.measured
        self.excluded[component] |= set(best.nodes)
        self._write(component)
        self.measured = self.measure()
        step = SearchStep(
            component,
            best.group,
            best.nodes,
            "; ".join(violations),
            best,
            before.to_dict(),
            self.measured.to_dict(),
        )
        self.steps.append(step)
        self._history.append(self.measured)
        log.info(
            "search: %s %s back to float (%+.1f dB); now %s",
            component,
            best.group,
            best.gain_db,
            "; ".join(self.measured.violations(self.budget)) or "within budget",
        )

    def _next_group(self, component: str) -> GroupEffect:
        """The most sensitive group still quantized (`sensitivity.most_sensitive_group`)."""
        q = self.quantizers[component]
        return most_sensitive_group(
            q,
            self.excluded[component],
            self.reference[component],
            self.eval_run.feeds[component],
            q.ort_mode,
            self._written(component),
            self.scratch / "work" / component,
        )

    def _attribute(self) -> str:
        """The quantized graph (with groups left) whose solo quantization is furthest over."""
        candidates = [c for c in self.quantizers if self._groups(c)]
        if len(candidates) == 1:
            return candidates[0]
        sqnr_bound = self.budget.min_sqnr_db
        if sqnr_bound is not None:
            low = [c for c in candidates if self.measured.sqnr_db.get(c, np.inf) < sqnr_bound]
            if low:
                return min(low, key=lambda c: self.measured.sqnr_db[c])
        for c in candidates:
            if c not in self._solo:
                self._solo[c] = self.measure(only=c)
        # Rank by the bounds broken now only: a graph that costs Dice says nothing about a
        # token-agreement violation (and the LLM's solo run rarely costs Dice).
        broken = self.measured.broken_bounds(self.budget)
        return max(candidates, key=lambda c: self._solo[c].excess(broken))

    # -- 6. report ----------------------------------------------------------------------
    def report(self, export_dir: Path, out_dir: Path, manifest: Path, t0: float) -> QuantizeReport:
        self.progress(QuantizeProgress("write", 0, 1, str(out_dir)))
        components = {c: self._component_report(c) for c in COMPONENTS}
        return QuantizeReport(
            recipe=self.recipe.to_dict(),
            target=self.target.name,
            backend=self.backend,
            method=self.method,
            export_dir=str(export_dir),
            out_dir=str(out_dir),
            components=components,
            budget=None if self.budget is None else self.budget.to_dict(),
            measured=self.measured.to_dict(),
            measured_initial=self.initial.to_dict(),
            search=[s.to_dict() for s in self.steps],
            calibration=self._calibration_facts(manifest),
            config=self.config.to_dict(),
            notes=self.notes + _scheme_notes(self.quantizers),
            seconds=time.perf_counter() - t0,
            versions=tool_versions(("nvidia-modelopt", "onnxscript")),
            **self._payload(export_dir, components),
        )

    def _payload(self, export_dir: Path, components: dict[str, ComponentReport]) -> dict[str, int]:
        """Payload bytes of the FP32 export and of the output written from it."""
        files = [p for p in export_dir.iterdir() if p.is_file()]
        before = payload_bytes(files)
        after = before + sum(c.bytes_after - c.bytes_before for c in components.values())
        if self.embeddings is not None:
            after += (
                self.embeddings.stat().st_size - (export_dir / self.embeddings.name).stat().st_size
            )
        return {"payload_bytes_before": before, "payload_bytes_after": after}

    def _calibration_facts(self, manifest: Path) -> dict[str, Any]:
        return {
            "manifest": str(manifest),
            "method": self.method,
            "calib_records": len(self.calib_run.outcomes),
            "eval_records": len(self.eval_run.outcomes),
            "samples": {g: len(v) for g, v in self.calib_run.feeds.items()},
            "eval_samples": {g: len(v) for g, v in self.eval_run.feeds.items()},
            "probes": {"calib": self.calib_run.n_probes, "eval": self.eval_run.n_probes},
            "max_new_tokens": self.config.max_new_tokens,
        }

    def _component_report(self, component: str) -> ComponentReport:
        plan = self.plans[component]
        src = self.export_dir / f"{component}.onnx"
        before, weights_before = graph_bytes(src)
        if component not in self.quantizers:
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
        q = self.quantizers[component]
        path = self.qdir / f"{component}.onnx"
        after, weights_after = graph_bytes(path)
        sqnr = self.graph_sqnr(component)
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
            self.checks[component],
            len(q.candidates()),
            sorted(self.excluded[component]),
            {**q.describe(), **self._compact_facts(component)},
        )

    def _compact_facts(self, component: str) -> dict[str, Any]:
        facts = self.compacted.get(component)
        return {} if facts is None else {"compact": facts.to_dict()}


def _scheme_notes(quantizers: dict[str, GraphQuantizer]) -> list[str]:
    notes = []
    for q in quantizers.values():
        note = getattr(q, "note", None)
        if note:
            notes.append(f"{q.component}: {note}")
    return notes


def describe_plan(
    recipe: Recipe | str, target: Target | str, method: str | None = None
) -> list[tuple[str, str, str]]:
    """(component, precision, what will be done) rows, for a CLI dry run; raises like
    `quantize` when the recipe cannot be honoured (without a checkpoint check)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    target = get_target(target) if isinstance(target, str) else target
    plans = plan_components(recipe, target, method=method, checkpoint=Path("<checkpoint>"))
    return [(c, p.precision, getattr(p.settings, "scheme", p.status)) for c, p in plans.items()]


__all__ = [
    "STAGES",
    "QuantizeProgress",
    "describe_plan",
    "plan_components",
    "quantize",
]
