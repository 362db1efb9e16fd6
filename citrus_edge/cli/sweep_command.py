"""`citrus-edge sweep`: models x targets x recipes (x vision input sizes), each built, timed and
scored on one manifest.

Per cell: a build (reused from the cache when its inputs hash the same: model weights, target,
recipe, budget, the build's code and library versions), `bench` on a few images of the manifest
(a model's cells together, in turn image by image, so their latency ratios come from one run),
then every record of the chosen split through the bundle, scored with the eval metrics (Dice,
lesion count, Precision@1, report fields) and against the FP32 PyTorch reference (token
agreement, mask IoU, Dice drop). The accuracy budget (the recipe's default, or `--budget`)
marks the cell VALID or INVALID, as MLPerf does: a fast cell outside the budget is not a choice.

TensorRT targets are never timed here without their GPU: their cells are "not measured" and show
the memory planner's projection in columns labelled as such. Each finished cell is written to
`results.json` at once, so an interrupted sweep started again with the same `--out` resumes from
the finished cells (and the cached builds). The reports (`results.csv`, `report.md`,
`report.html`) are made from `results.json` by `citrus_edge.report`. `--resolutions` sweeps each
model at given vision input sizes: a checkpoint per size (the weights linked, the pixel budget
in its config.json changed) under the build cache, named `<model>@<side>px`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from citrus_edge.cli.cli_app import MaxNewTokensOption, _stdout, app, console

log = logging.getLogger(__name__)

SWEEP_VERSION = 1
DEFAULT_RECIPE = "default"  # the target's default recipe, as `build` without --precision
# Source folders and files whose code decides what a build writes: part of the build cache key,
# so an edited quantizer never reuses a bundle it did not make.
BUILD_CODE = ("compress", "export", "citrus_edge/cli/bundle_build.py", "citrus_edge/recipes.py")


class SweepInputError(ValueError):
    """A sweep asked for with an unknown model, target, recipe or data, or nothing to run."""


@dataclass(frozen=True)
class SweepConfig:
    """One sweep. `split=None` scores every record of the manifest; `limit` the first N."""

    models: tuple[str, ...]
    targets: tuple[str, ...]
    recipes: tuple[str, ...]
    data: Path
    out: Path
    split: str | None = "eval"
    limit: int | None = None
    cache: Path | None = None  # default: <out>/builds
    budget: str | None = None
    bench_images: int = 4
    iterations: int = 3
    warmup: int = 1
    video_frames: int = 8
    threads: int = 0
    max_new_tokens: int = 96
    build_eval_limit: int = 8
    cold_start: bool = True
    # Vision input sides in pixels: each model is also swept at an input of side x side pixels
    # (its checkpoint's min/max pixel budget set to side^2; the vision tower's rotary positions
    # take any size). (): each model at its own budget.
    resolutions: tuple[int, ...] = ()

    def settings(self) -> dict[str, Any]:
        """What the cells' figures depend on besides the models, data and versions."""
        d = asdict(self)
        for k in ("models", "targets", "recipes", "data", "out", "cache"):
            d.pop(k)
        return d


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def code_hash(root: Path | None = None) -> str:
    """sha256 over the build's source files (`BUILD_CODE`), in path order."""
    root = root or Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for entry in BUILD_CODE:
        p = root / entry
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _model_name(spec: str, model_dir: Path) -> str:
    from citrus_edge.defaults import SHIPPED_MODELS

    return spec if spec in SHIPPED_MODELS else model_dir.name


def resolve_inputs(cfg: SweepConfig) -> dict[str, Any]:
    """Everything the sweep needs, checked before any work: models (dir, hash), targets,
    recipes per target (or why not), the manifest's records. Typed errors otherwise."""
    from citrus_edge.bundle import sha256_file
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.defaults import resolve_model
    from citrus_edge.export.export_manifest import checkpoint_source_hash
    from citrus_edge.recipes import get_recipe
    from citrus_edge.targets import resolve_target

    if not (cfg.models and cfg.targets and cfg.recipes):
        raise SweepInputError("a sweep needs at least one model, one target and one recipe")
    models = {}
    for spec in cfg.models:
        try:
            model_dir = resolve_model(spec)
        except FileNotFoundError as e:
            raise SweepInputError(str(e)) from None
        name, digest = _model_name(spec, model_dir), checkpoint_source_hash(model_dir)
        if not cfg.resolutions:
            models[name] = {"dir": str(model_dir), "hash": digest}
        for side in cfg.resolutions:
            _check_side(model_dir, side)
            models[f"{name}@{side}px"] = {
                "dir": None,  # written by `at_resolution` once the sweep's folder is checked
                "base_dir": str(model_dir),
                "pixels": side * side,
                "hash": f"{digest}@{side}px",
            }
    targets = {}
    for name in cfg.targets:
        try:
            targets[name] = resolve_target(name).target
        except ValueError as e:
            raise SweepInputError(str(e)) from None
    for r in cfg.recipes:
        if r != DEFAULT_RECIPE:
            try:
                get_recipe(r)
            except ValueError as e:
                raise SweepInputError(f"{e} (or {DEFAULT_RECIPE!r})") from None
    if not cfg.data.is_file():
        raise SweepInputError(f"{cfg.data}: no such manifest (make one: citrus-edge data phantoms)")
    records = read_manifest(cfg.data, split=cfg.split)[: cfg.limit]
    if not records:
        raise SweepInputError(f"{cfg.data}: no records in split {cfg.split or 'all'}")
    return {
        "models": models,
        "targets": targets,
        "records": records,
        "data": {
            "manifest": str(cfg.data.resolve()),
            "sha256": "sha256:" + sha256_file(cfg.data),
            "split": cfg.split or "all",
            "records": len(records),
            "bench_images": cfg.bench_images,
        },
    }


def _check_side(model_dir: Path, side: int) -> None:
    """A side the model's vision input can take: a multiple of its patch x merge, and at least
    its minimum area; a typed error naming the model otherwise."""
    pp = json.loads((model_dir / "config.json").read_text()).get("preprocess", {})
    factor = pp.get("patch_size", 14) * pp.get("merge_size", 2)
    if side % factor or side * side < 4 * factor * factor:
        raise SweepInputError(
            f"--resolutions {side}: {model_dir.name} takes sides that are multiples of {factor} "
            f"pixels (its patch x merge), at least {2 * factor}"
        )


def at_resolution(model: dict, cache: Path) -> Path:
    """The checkpoint of `model` (a `--resolutions` variant) at its pixel budget: the base
    checkpoint's files linked (copied where links fail) under `cache/models`, its config.json
    with min_pixels = max_pixels = side^2. Reused when already there (its name holds the hash of
    the base weights, so changed weights get a new folder)."""
    from citrus_edge.atomic import link_or_copy, staged_directory

    base, pixels = Path(model["base_dir"]), model["pixels"]
    digest = model["hash"].removeprefix("sha256:")[:16]  # new weights: a new folder, never stale
    out = cache / "models" / f"{base.name}@{math.isqrt(pixels)}px-{digest}"
    if (out / "config.json").is_file():
        return out
    config = json.loads((base / "config.json").read_text())
    config["preprocess"] = {**config.get("preprocess", {}), "min_pixels": pixels,
                            "max_pixels": pixels}  # fmt: skip
    with staged_directory(out, _absent) as tmp:
        for f in base.iterdir():
            if f.is_file() and f.name != "config.json":
                link_or_copy(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _absent(path: Path) -> None:
    if path.exists():  # without its config.json: not a checkpoint this sweep wrote
        raise SweepOutError(f"{path}: exists and is not a checkpoint of this sweep; move it away")


def _recipe_of(target: Any, name: str) -> Any:
    from citrus_edge.recipes import get_recipe

    return get_recipe(target.default_recipe if name == DEFAULT_RECIPE else name)


def _budget(cfg: SweepConfig, recipe: Any) -> Any:
    from citrus_edge.compress.budget import default_budget, parse_budget

    base = default_budget(recipe.llm)
    return parse_budget(cfg.budget, base) if cfg.budget else base


def _versions() -> dict[str, str]:
    from citrus_edge.runtime.bench import library_versions

    key = dict(library_versions()["key"])
    from importlib import metadata

    for name in ("torch", "matplotlib"):
        try:
            key[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return key


class _Recording:
    """Wraps a pipeline and keeps the token ids and masks of every answer."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.tokens, self.masks = pipeline, [], []

    def __call__(self, rgb: Any, prompt: str) -> Any:
        result = self.pipeline(rgb, prompt)
        self.tokens.append(list(result.token_ids))
        self.masks.append([m.astype(bool) for m in result.masks])
        return result


def _reference(
    cfg: SweepConfig, model: dict, records: list, cache: Path, tick: Callable[[int], None]
) -> dict:
    """The FP32 PyTorch reference's answers on the records (tokens, masks, metrics), cached on
    disk per model weights and data, so a resumed sweep does not recompute it."""
    import numpy as np

    key = _sha([model["hash"], cfg.data.resolve(), cfg.split, len(records), cfg.max_new_tokens])
    path = cache / f"reference-{key[:20]}.npz"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        stored = json.loads(meta.read_text())
        arrays = np.load(path)
        masks = [
            [arrays[f"m{i}_{j}"] for j in range(n)] for i, n in enumerate(stored["mask_counts"])
        ]
        return {"tokens": stored["tokens"], "masks": masks, "metrics": stored["metrics"]}
    from citrus_edge.atomic import atomic_path, write_json_atomic
    from citrus_edge.cli.evaluate import evaluate
    from citrus_edge.modelling.reference import ReferencePipeline

    reference = ReferencePipeline.from_checkpoint(
        Path(model["dir"]), max_new_tokens=cfg.max_new_tokens
    )
    run = _Recording(reference)
    report = evaluate(run, records, cfg.data.parent, tick)
    out = {"tokens": run.tokens, "masks": run.masks, "metrics": report.summary()}
    del run, reference
    gc.collect()
    cache.mkdir(parents=True, exist_ok=True)
    arrays = {f"m{i}_{j}": m for i, ms in enumerate(out["masks"]) for j, m in enumerate(ms)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    counts = [len(ms) for ms in out["masks"]]
    write_json_atomic(
        meta, {"tokens": out["tokens"], "mask_counts": counts, "metrics": out["metrics"]}
    )
    return out


def _build(cfg: SweepConfig, model: dict, target: Any, recipe_name: str, cache: Path) -> Path:
    """The cell's bundle: cached under `cache` by the hash of everything that makes it."""
    from citrus_edge.cli.bundle_build import BUILD_CONFIG_VERSION, BuildConfig, build

    recipe = None if recipe_name == DEFAULT_RECIPE else recipe_name
    key = _sha(
        {
            "model": model["hash"],
            "target": target.name,
            "recipe": _recipe_of(target, recipe_name).to_dict(),
            "budget": cfg.budget,
            "build_eval_limit": cfg.build_eval_limit,
            "eval_data": str(cfg.data.resolve()),
            "build_config": BUILD_CONFIG_VERSION,
            "code": code_hash(),
            "versions": _versions(),
        }
    )
    out = cache / f"{Path(model['dir']).name}-{target.name}-{recipe_name}-{key[:16]}"
    if (out / "manifest.json").is_file():
        log.info("reusing the cached build %s", out)
        return out
    bc = BuildConfig(
        target=target.name,
        model_dir=Path(model["dir"]),
        recipe=recipe,
        eval_data=cfg.data,
        eval_limit=cfg.build_eval_limit,
        budget=cfg.budget,
    )
    build(bc, out)
    return out


def _p50(entry: dict | None) -> float | None:
    return entry["p50"] if entry and entry.get("n") else None


def latency_of(bench: dict) -> dict[str, Any]:
    """The cell's latency figures from a `bench_report`: medians (p50) unless named p90/p99."""
    e2e = bench["e2e_ms"]
    cold = bench.get("cold_start") or {}
    video = bench.get("video") or {}
    return {
        "e2e_p50_ms": _p50(e2e),
        "e2e_p90_ms": e2e.get("p90"),
        "e2e_p99_ms": e2e.get("p99"),
        "e2e_min_ms": e2e.get("min"),
        "ttft_p50_ms": _p50(bench["ttft_ms"]),
        "decode_ms_per_token": _p50(bench["decode_ms_per_token"]),
        "decode_tokens_per_s": _p50(bench["decode_tokens_per_s"]),
        "mask_decoder_ms_per_seg": _p50(bench["mask_decoder_ms_per_seg"]),
        "video_ms_per_frame": _p50(video.get("ms_per_frame")),
        "cold_start_ms": cold.get("cold_start_ms"),
        # The cold process holds this bundle only (the sweep's own process holds torch and
        # the reference too): the cart's figure.
        "peak_rss_mb": cold.get("peak_rss_mb", bench.get("peak_rss_mb")),
        "stages_p50_ms": {k: _p50(v) for k, v in bench["stages_ms"].items() if k != "total"},
    }


def accuracy_of(report: Any, run: _Recording, ref: dict) -> dict[str, Any]:
    """Eval metrics of the cell and its fidelity to the FP32 reference's answers."""
    from citrus_edge.metrics import mask_iou, token_agreement

    agree = [token_agreement(a, b) for a, b in zip(ref["tokens"], run.tokens, strict=True)]
    ious = [
        mask_iou(ma, mb)
        for a, b in zip(ref["masks"], run.masks, strict=True)
        for ma, mb in zip(a, b, strict=False)  # counts may differ
    ]
    s = report.summary()
    ref_dice = ref["metrics"]["dice"]
    return {
        "records": s["n"],
        "dice": s["dice"],
        "precision_at_1": s["precision_at_1"],
        "count_accuracy": s["count_accuracy"],
        "report_field_accuracy": s["report_field_accuracy"],
        "field_accuracy": s["field_accuracy"],
        "token_agreement": sum(agree) / len(agree) if agree else None,
        "exact_sequences": sum(a == 1.0 for a in agree) / len(agree) if agree else None,
        "mask_iou": sum(ious) / len(ious) if ious else None,
        "reference_dice": ref_dice,
        "dice_drop": None if ref_dice is None or s["dice"] is None else ref_dice - s["dice"],
    }


def validity_of(accuracy: dict, budget: Any) -> tuple[str, list[str]]:
    """VALID when token agreement and Dice drop are inside the budget; the violations else."""
    from citrus_edge.report.sweep_results import INVALID, VALID

    bad = []
    agree, drop = accuracy.get("token_agreement"), accuracy.get("dice_drop")
    if agree is None:
        bad.append("no token agreement measured")
    elif agree < budget.min_token_agreement:
        bad.append(f"token agreement {agree:.4f} < {budget.min_token_agreement:.4f}")
    if drop is not None and drop > budget.max_dice_drop:
        bad.append(f"Dice drop {drop:.4f} > {budget.max_dice_drop:.4f}")
    return (INVALID if bad else VALID), bad


def _projection(model: dict, target: Any, recipe: Any) -> dict[str, Any]:
    from citrus_edge.cli.memory_plan import plan
    from citrus_edge.config import CitrusVConfig

    p = plan(CitrusVConfig.load(Path(model["dir"]) / "config.json"), target, recipe)
    return {
        "kind": "projection (memory planner), not a measurement",
        "weight_bytes": p.weight_bytes,
        "total_bytes": p.total_bytes,
        "fits": p.fits,
        "bandwidth_gbs": p.bandwidth_gbs,
        "decode_tokens_per_s_upper_bound": p.decode_tokens_per_s,
    }


def _why_not_here(target: Any) -> str | None:
    """Why this machine does not time `target` (None: it does: the ONNX Runtime CPU target)."""
    if not target.tensorrt:
        return None
    from citrus_edge.cli.bundle_build import matching_gpu

    if matching_gpu(target) is None:
        return (
            f"TensorRT target {target.name}: its GPU ({target.gpu}) with TensorRT is not on "
            "this machine"
        )
    return (
        f"TensorRT target {target.name}: the sweep times ONNX Runtime CPU cells; time the "
        "engines with `citrus-edge bench --backend tensorrt` on this GPU"
    )


def cell_key(cfg: SweepConfig, inputs: dict, model: str, target: str, recipe: str) -> str:
    """What a finished cell's figures depend on; a resumed sweep reuses a cell with this key."""
    return _sha(
        {
            "version": SWEEP_VERSION,
            "model": inputs["models"][model]["hash"],
            "target": target,
            "recipe": recipe,
            "data": inputs["data"],
            "settings": cfg.settings(),
            "code": code_hash(),
            "versions": inputs.get("versions"),
        }
    )


# What a sweep writes in its --out folder (`report.png`: `make report-check`'s screenshot).
SWEEP_OUTPUTS = ("results.json", "results.csv", "report.md", "report.html", "report.png", "builds")


class SweepOutError(ValueError):
    """--out holds something a sweep did not write: it is never overwritten."""


def check_sweep_out(out: Path) -> None:
    """Refuse, before any work, an `out` that is a file, or a non-empty folder that is not a
    sweep's (its `results.json` must load as one and it must hold only `SWEEP_OUTPUTS`, hidden
    temporary files aside): a user's files are never replaced."""
    from citrus_edge.report.sweep_results import SweepResultsError, load_results

    if out.exists() and not out.is_dir():
        raise SweepOutError(f"--out {out} is a file; give a folder for the sweep's results")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in SWEEP_OUTPUTS and not p.name.startswith(".")
    )
    if foreign:
        raise SweepOutError(
            f"--out {out} holds files a sweep did not write ({', '.join(foreign[:5])}); "
            "choose an empty or new folder"
        )
    try:
        load_results(out / "results.json")
    except (OSError, SweepResultsError) as e:
        raise SweepOutError(
            f"--out {out} is not a sweep's folder ({e}); choose an empty or new folder"
        ) from None


def _previous_cells(path: Path) -> dict[str, dict]:
    from citrus_edge.report.sweep_results import FAILED, load_results

    if not path.is_file():
        return {}
    old = load_results(path)  # checked by `check_sweep_out`
    return {c["key"]: c for c in old["cells"] if c.get("status") != FAILED and "key" in c}


def write_reports(results: dict, out: Path) -> dict[str, Path]:
    """results.json, results.csv, report.md and report.html in `out` (atomically each)."""
    from citrus_edge.atomic import write_json_atomic, write_text_atomic
    from citrus_edge.report.sweep_html import results_html
    from citrus_edge.report.sweep_results import mark_pareto, results_csv, results_markdown

    mark_pareto(results)
    files = {
        "json": write_json_atomic(out / "results.json", results),
        "csv": write_text_atomic(out / "results.csv", results_csv(results)),
        "md": write_text_atomic(out / "report.md", results_markdown(results)),
        "html": write_text_atomic(out / "report.html", results_html(results)),
    }
    return {k: Path(v) for k, v in files.items()}


def run_sweep(cfg: SweepConfig, progress: Any = None) -> dict:
    """Run every cell (resuming finished ones from `<out>/results.json`) and write the reports.
    `progress`: a rich `Progress` to show the cells and each cell's records on (or None)."""
    from citrus_edge.atomic import write_json_atomic
    from citrus_edge.bundle import created_now
    from citrus_edge.cli.bench_command import bench_cases
    from citrus_edge.report.sweep_results import (
        NOT_APPLICABLE,
        NOT_MEASURED,
        SCHEMA,
        mark_pareto,
    )
    from citrus_edge.runtime.bench import machine_info
    from citrus_edge.targets import check_recipe

    inputs = resolve_inputs(cfg)  # typed errors before any work
    check_sweep_out(cfg.out)
    inputs["versions"] = _versions()
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache = cfg.cache or cfg.out / "builds"
    for model in inputs["models"].values():
        if model["dir"] is None:
            model["dir"] = str(at_resolution(model, cache))
    previous = _previous_cells(cfg.out / "results.json")
    records = inputs["records"]
    cases = bench_cases([cfg.data], split=cfg.split or None, limit=cfg.bench_images)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": created_now(),
        "machine": machine_info(),
        "versions": inputs["versions"],
        "models": inputs["models"],
        "data": inputs["data"],
        "budget": {},
        "settings": cfg.settings(),
        "cells": [],
    }
    if not (cfg.out / "results.json").is_file():  # marks the folder as this sweep's at once
        write_json_atomic(cfg.out / "results.json", results)
    plan = [(m, t, r) for m in inputs["models"] for t in cfg.targets for r in cfg.recipes]
    overall = progress.add_task("sweep", total=len(plan)) if progress else None
    references: dict[str, dict] = {}
    cells: list[dict | None] = [None] * len(plan)

    def status(text: str) -> None:
        if progress is not None:
            progress.update(overall, description=text)

    def finish(i: int, cell: dict) -> None:
        cells[i] = cell
        results["cells"] = [c for c in cells if c is not None]
        results["elapsed_s"] = time.perf_counter() - t_start
        mark_pareto(results)
        write_json_atomic(cfg.out / "results.json", results)  # resume point
        if progress is not None:
            progress.advance(overall)

    to_measure: dict[str, list[_Pending]] = {}  # per model, in plan order
    for i, (model_name, target_name, recipe_name) in enumerate(plan):
        target = inputs["targets"][target_name]
        key = cell_key(cfg, inputs, model_name, target_name, recipe_name)
        label = f"{model_name}/{target_name}/{recipe_name}"
        cell: dict[str, Any] = {
            "key": key,
            "model": model_name,
            "target": target.name,
            "recipe": recipe_name,
        }
        recipe = _recipe_of(target, recipe_name)
        cell["recipe_components"] = recipe.to_dict()
        budget = _budget(cfg, recipe)
        results["budget"][recipe.name] = str(budget)
        if key in previous:
            status(f"{label}: finished before (resumed)")
            finish(i, previous[key])
            continue
        try:
            check_recipe(target, recipe)
        except ValueError as e:
            cell.update(status=NOT_APPLICABLE, reason=" ".join(str(e).split()))
            finish(i, cell)
            continue
        why = _why_not_here(target)
        if why is not None:
            model = inputs["models"][model_name]
            projection = _projection(model, target, recipe)
            cell.update(status=NOT_MEASURED, reason=why, projection=projection)
            finish(i, cell)
            continue
        to_measure.setdefault(model_name, []).append(
            _Pending(i, cell, target, recipe_name, budget, label)
        )
    for model_name, pending in to_measure.items():
        model = inputs["models"][model_name]
        _measure(cfg, model, pending, cache, cases, records, references, progress, status, finish)
    results["elapsed_s"] = time.perf_counter() - t_start
    write_reports(results, cfg.out)
    return results


@dataclass
class _Pending:
    """A cell this machine measures: its place in the plan and what it is built from."""

    index: int
    cell: dict
    target: Any
    recipe_name: str
    budget: Any
    label: str


# Loaded sessions take about this many times their bundle's bytes (weights, arena, I/O buffers).
SESSION_MEMORY_FACTOR = 3.0


def alternation_fits(bundles: list[Path], memory_bytes: int | None = None) -> bool:
    """Whether `bundles` may be loaded at once for the alternating bench: their bytes times
    SESSION_MEMORY_FACTOR within half this machine's memory (an 8B-width model's three bundles
    together would not be); otherwise each is benched alone."""
    from citrus_edge.runtime.bench import bundle_bytes

    if len(bundles) < 2:
        return True
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = SESSION_MEMORY_FACTOR * sum(bundle_bytes(b) for b in bundles)
    return need <= memory_bytes / 2


def _failed(cell: dict, label: str, e: Exception) -> dict:
    """One broken cell must not cost the others: it is recorded with the reason and skipped."""
    from citrus_edge.report.sweep_results import FAILED

    log.warning("%s failed: %s: %s", label, type(e).__name__, e)
    cell.update(status=FAILED, reason=" ".join(f"{type(e).__name__}: {e}".split()))
    return cell


def _measure(
    cfg: SweepConfig,
    model: dict,
    pending: list[_Pending],
    cache: Path,
    cases: list,
    records: list,
    references: dict,
    progress: Any,
    status: Callable[[str], None],
    finish: Callable[[int, dict], None],
) -> None:
    """Build one model's cells, bench them together, then score each; `finish` every cell.

    The bench loads the model's bundles in one process and runs them in turn, image by image
    (`bench_reports`), so the latency ratios between its cells come from one run and hold on a
    busy machine; each cell's `seconds["bench"]` is that shared run's time over its bundles."""
    from citrus_edge.cli.evaluate import evaluate
    from citrus_edge.report.sweep_results import MEASURED
    from citrus_edge.runtime.bench import bench_reports, open_pipeline

    def ticker(what: str) -> tuple[Callable[[int], None], Any]:
        if progress is None:
            return (lambda i: None), None
        task = progress.add_task(what, total=len(records))
        return (lambda i: progress.update(task, completed=i)), task

    if model["hash"] not in references:
        status(f"{pending[0].label}: FP32 PyTorch reference")
        tick, task = ticker(f"reference {Path(model['dir']).name}")
        references[model["hash"]] = _reference(cfg, model, records, cache, tick)
        if task is not None:
            progress.remove_task(task)
    built: list[tuple[_Pending, Path, float]] = []
    for p in pending:
        status(f"{p.label}: build")
        t0 = time.perf_counter()
        try:
            bundle = _build(cfg, model, p.target, p.recipe_name, cache)
        except Exception as e:
            finish(p.index, _failed(p.cell, p.label, e))
        else:
            built.append((p, bundle, time.perf_counter() - t0))
    if not built:
        return
    bundles = [bundle for _, bundle, _ in built]
    options = dict(warmup=cfg.warmup, iterations=cfg.iterations, threads=cfg.threads,
                   max_new_tokens=cfg.max_new_tokens, video_frames=cfg.video_frames,
                   cold_start=cfg.cold_start)  # fmt: skip
    together = alternation_fits(bundles)
    status(f"{Path(model['dir']).name}: bench of {len(built)} bundles"
           + (" in turn" if together else " one at a time (together they would not fit memory)"))  # fmt: skip
    t0 = time.perf_counter()
    try:
        if together:
            benches = bench_reports(bundles, cases, **options)
        else:
            benches = [bench_reports([b], cases, **options)[0] for b in bundles]
    except Exception as e:
        for p, _, _ in built:
            finish(p.index, _failed(p.cell, p.label, e))
        return
    bench_s = time.perf_counter() - t0
    for (p, bundle, build_s), bench in zip(built, benches, strict=True):
        status(f"{p.label}: eval")
        t2 = time.perf_counter()
        try:
            tick, task = ticker(f"eval {p.label}")
            run = _Recording(
                open_pipeline(bundle, max_new_tokens=cfg.max_new_tokens, threads=cfg.threads)
            )
            report = evaluate(run, records, cfg.data.parent, tick)
            if task is not None:
                progress.remove_task(task)
        except Exception as e:
            finish(p.index, _failed(p.cell, p.label, e))
            continue
        accuracy = accuracy_of(report, run, references[model["hash"]])
        validity, violations = validity_of(accuracy, p.budget)
        for k in ("machine", "versions"):
            bench.pop(k, None)  # in the sweep's header
        p.cell.update(
            bundle={
                "path": str(bundle),
                "bundle_id": bench["bundle_id"],
                "bytes": bench["bundle_bytes"],
            },
            latency=latency_of(bench),
            accuracy=accuracy,
            validity=validity,
            violations=violations,
            budget=str(p.budget),
            bench=bench,
            seconds={
                "build": build_s,
                "bench": bench_s / len(built),
                "eval": time.perf_counter() - t2,
            },
            status=MEASURED,
        )
        finish(p.index, p.cell)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _sides(text: str) -> tuple[int, ...]:
    """`--resolutions` "224,336" -> (224, 336); a typed error for anything else."""
    sides = []
    for part in _split_list(text):
        if not part.isdigit() or int(part) < 1:
            raise SweepInputError(f"--resolutions {text!r}: {part!r} is not a side in pixels")
        sides.append(int(part))
    if len(set(sides)) != len(sides):
        raise SweepInputError(f"--resolutions {text!r}: a side is given twice")
    return tuple(sides)


@app.command("sweep")
def sweep_cmd(
    models: Annotated[
        str,
        typer.Option(
            help="Models, comma-separated: demo, demo-lite, demo-lite-s or checkpoint dirs."
        ),
    ] = "demo",
    targets: Annotated[str, typer.Option(help="Targets, comma-separated.")] = "cpu",
    recipes: Annotated[
        str,
        typer.Option(
            help="Recipes, comma-separated (see `citrus-edge recipes`; 'default': the "
            "target's default)."
        ),  # fmt: skip
    ] = "fp32,int8,int8-w4",
    data: Annotated[
        Path | None, typer.Option(help="Manifest to score on (default: the phantom set).")
    ] = None,
    split: Annotated[str, typer.Option(help="Manifest split, or 'all'.")] = "eval",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Score only the first N records.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for results and reports (resumed).")] = Path(
        "out/sweep"
    ),
    cache: Annotated[
        Path | None, typer.Option(help="Build cache folder (default: OUT/builds).")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Accuracy budget vs FP32, e.g. 'dice=1,tokens=99' (default: each recipe's own)."
        ),  # fmt: skip
    ] = None,
    bench_images: Annotated[int, typer.Option(min=1, help="Images timed per cell.")] = 4,
    iterations: Annotated[int, typer.Option(min=1, help="Timed rounds per cell.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs per cell.")] = 1,
    video_frames: Annotated[int, typer.Option(min=0, help="Tracked frames timed.")] = 8,
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads (0: default).")] = 0,
    max_new_tokens: MaxNewTokensOption = 96,
    build_eval_limit: Annotated[
        int, typer.Option(min=1, help="Eval records each build validates on.")
    ] = 8,
    resolutions: Annotated[
        str,
        typer.Option(
            help="Vision input sides in pixels, comma-separated (e.g. 224,336): each model is "
            "swept at side x side pixels (default: each model's own)."
        ),
    ] = "",
    cold_start: Annotated[bool, typer.Option(help="Time a cold start per cell.")] = True,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(help="Print B/A ratios of two results.json (or sweep folders); no sweep."),
    ] = None,
) -> None:
    """Sweep models x targets x recipes: build, bench and score each; write JSON/CSV/MD/HTML."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from citrus_edge.report.sweep_results import compare as compare_results
    from citrus_edge.report.sweep_results import compare_lines, load_results

    if compare is not None:
        comparison = compare_results(load_results(compare[0]), load_results(compare[1]))
        for line in compare_lines(comparison):
            _stdout().print(Text(line))
        return
    from citrus_edge.calib_data.phantom_set import default_phantom_manifest

    cfg = SweepConfig(
        models=_split_list(models),
        targets=_split_list(targets),
        recipes=_split_list(recipes),
        data=data or default_phantom_manifest(),
        out=out,
        split=None if split == "all" else split,
        limit=limit,
        cache=cache,
        budget=budget,
        bench_images=bench_images,
        iterations=iterations,
        warmup=warmup,
        video_frames=video_frames,
        threads=threads,
        max_new_tokens=max_new_tokens,
        build_eval_limit=build_eval_limit,
        cold_start=cold_start,
        resolutions=_sides(resolutions),
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        results = run_sweep(cfg, progress)
    from citrus_edge.report.sweep_results import results_markdown

    _stdout().print(Text(results_markdown(results)))
    console.print(Text(f"wrote {out}/results.json, results.csv, report.md, report.html "
                       f"in {results['elapsed_s']:.0f} s"))  # fmt: skip
