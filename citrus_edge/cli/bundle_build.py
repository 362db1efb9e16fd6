"""`citrus-edge build`: export -> quantize -> (engine plan | engines) -> validate -> bundle.

Only chains the stage functions. `--out` is checked first (`bundle.check_bundle_out`: absent,
empty, or a bundle holding nothing but its listed files), before any model is loaded. The bundle
is assembled in a temporary sibling directory and renamed at the end
(`bundle.staged_directory`): an interrupted build (an error, Ctrl-C or SIGTERM) leaves no half
bundle and no scratch folder, and does not damage the previous one.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citrus_edge.bundle import (
    check_bundle_out,
    sigterm_cleanup,
    staged_directory,
    tool_versions,
    write_manifest,
)
from citrus_edge.host_inputs import (
    TABLE_DTYPES,
    TABLE_PRECISIONS,
    check_table_dtype,
    table_dtype,
)
from citrus_edge.recipes import LOW_BIT, Recipe, get_recipe
from citrus_edge.targets import Target, check_recipe, get_target

log = logging.getLogger(__name__)

BUILD_CONFIG_VERSION = 1
OPTIMIZE = (None, "latency", "size")
# Precisions whose graphs only TensorRT executes faithfully (modelopt custom ops / FP8 types).
TENSORRT_ONLY = frozenset({"fp8", "int4", "nvfp4"})


@dataclass(frozen=True)
class BuildConfig:
    """One build. `recipe=None` takes the target's default recipe."""

    target: str
    model_dir: Path
    recipe: str | None = None
    calib: Path | None = None  # manifest; None: the default phantom set's calib split
    eval_data: Path | None = None  # manifest; None: the default phantom set's eval split
    eval_limit: int = 90  # records of the eval split measured at build time
    budget: str | None = None  # e.g. "dice=1,tokens=99" (see compress.budget)
    # "latency": time each quantized component against FP32 here and keep it only where it pays
    # (`compress.latency_choice`); "size": the recipe as named. None: `optimization()`.
    optimize: str | None = None
    # How a quantized LLM's token table is stored (`host_inputs.TABLE_DTYPES`): "float16", or
    # "int8" rows with a scale each (a quarter of the float32 bytes: 0.54 GB less for the 8B).
    embeddings: str = TABLE_DTYPES[0]
    version: int = BUILD_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        for name in ("calib", "eval_data"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int):
            raise ValueError(
                f"eval_limit must be a whole number of records, got {self.eval_limit!r}"
            )
        if self.eval_limit < 1:
            raise ValueError(
                f"eval_limit {self.eval_limit}: the build measures the bundle on at least one "
                "eval record; pass --eval-limit 1 or more"
            )
        if self.optimize not in OPTIMIZE:
            raise ValueError(
                f"optimize {self.optimize!r} is not one of {', '.join(o for o in OPTIMIZE if o)}"
            )
        check_table_dtype(self.embeddings)
        if self.version != BUILD_CONFIG_VERSION:
            raise ValueError(f"build config version {self.version} is not {BUILD_CONFIG_VERSION}")

    def resolved(self) -> tuple[Target, Recipe]:
        """Target and recipe, refusing a precision the target cannot run."""
        target = get_target(self.target)
        recipe = get_recipe(self.recipe or target.default_recipe)
        check_recipe(target, recipe)
        return target, recipe

    def optimization(self, target: Target) -> str:
        """What the build optimises: as asked, else "latency" for a CPU target's default recipe
        (the user gets the faster bundle on the machine that builds it, never a slower one than
        FP32) and "size" otherwise (a recipe named with --precision is built as named; TensorRT
        engines are timed on their device, not here). Refuses latency for a TensorRT target."""
        if self.optimize is None:
            return "latency" if self.recipe is None and not target.tensorrt else "size"
        if self.optimize == "latency" and target.tensorrt:
            raise ValueError(
                f"--optimize latency times the graphs with ONNX Runtime on this CPU; {target.name} "
                "runs TensorRT engines, which only its own GPU can time: use --optimize size"
            )
        return self.optimize

    def to_dict(self) -> dict[str, Any]:
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
        }


Progress = Callable[[str], None]


def build(cfg: BuildConfig, out: Path, progress: Progress = lambda stage: None) -> dict:
    """Build a bundle for `cfg.target` at `out`; returns the bundle manifest.

    Refuses before any work (`bundle.OutputFolderError`) an `out` that exists and is not a
    bundle holding only the files its manifest lists; a user's files are never touched.
    """
    out = Path(out)
    check_bundle_out(out)  # first: a wrong --out costs no export
    target, recipe = cfg.resolved()
    cfg.optimization(target)  # refuses latency for a TensorRT target before any work
    with sigterm_cleanup():
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
        try:
            return _build_in(cfg, out, target, recipe, scratch, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _build_in(
    cfg: BuildConfig, out: Path, target: Target, recipe: Recipe, scratch: Path, progress: Progress
) -> dict:
    from citrus_edge.export.export_manifest import checkpoint_source_hash
    from citrus_edge.export.export_run import export_all
    from citrus_edge.modelling.checkpoint import load_checkpoint

    progress("export")
    fp32_dir = scratch / "fp32"
    # The model is loaded for this call only: export frees each part once exported (peak
    # memory), and nothing is left of it before quantization loads what it needs.
    export_all(
        load_checkpoint(cfg.model_dir),
        fp32_dir,
        source_hash=checkpoint_source_hash(cfg.model_dir),
        tokenizer_json=cfg.model_dir / "tokenizer.json",
        release_weights=True,
    )
    gc.collect()
    graphs_dir, quant, choice = fp32_dir, None, None
    if any(p in LOW_BIT for _, p in recipe.items()):
        progress("quantize")
        graphs_dir, quant = _quantize(cfg, fp32_dir, recipe, target, scratch / "quantized")
        if cfg.optimization(target) == "latency":
            progress("time components")
            graphs_dir, recipe, choice = _choose_by_latency(
                cfg, fp32_dir, graphs_dir, recipe, scratch
            )
    with staged_directory(out) as tmp:
        _copy_tree(graphs_dir, tmp)
        carriers = _fp16_carriers(tmp) if target.tensorrt else None
        info = _describe(cfg, target, recipe, quant)
        info["optimize"] = cfg.optimization(target)
        if choice is not None:
            info["latency_choice"] = choice.to_dict()
        if carriers is not None:
            info["fp16_carriers"] = carriers
        info["components"] = _components(tmp, recipe)
        if target.tensorrt:
            progress("engine plan")
            info["engine_plan"] = _engine_plan(tmp, target, recipe)
        write_manifest(tmp, info)  # hashes first, so the runtime can verify what it measures
        progress("validate")
        info["accuracy"] = measure_accuracy(cfg, tmp, target, recipe)
        manifest = write_manifest(tmp, info)
    if target.tensorrt and matching_gpu(target) is not None:
        progress("engines")
        from citrus_edge.engines import build_bundle_engines

        built = build_bundle_engines(out, target.name)
        log.info("compiled %d engines into %s", len(built.engines), built.out_dir)
    return manifest


def matching_gpu(target: Target):
    """The local CUDA device when TensorRT is installed and the GPU is the target's, else None.

    Without one, `build` writes a portable bundle (ONNX + engine plan) and the engines are
    compiled on the device with `citrus-edge engines build` — engines are not portable.
    """
    from citrus_edge.engines.device import cuda_device, import_tensorrt
    from citrus_edge.engines.engine_errors import TensorRTUnavailableError

    try:
        import_tensorrt()
        device = cuda_device()
    except TensorRTUnavailableError as e:
        log.info("portable bundle for %s: %s", target.name, e)
        return None
    if device.sm != target.sm:
        log.info(
            "portable bundle: local GPU %s (SM %s) is not %s's", device.name, device.sm, target.name
        )
        return None
    return device


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy the files of `src` into `dst`; new files, so their mode follows the umask (copy2
    would keep a source's owner-only mode, e.g. of external data written by onnx)."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            rel = p.relative_to(src)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)


def _fp16_carriers(folder: Path) -> dict:
    """Every graph of a TensorRT bundle rewritten with fp16 carriers (`engines.float16`): the
    weights TensorRT consumes, half the bytes of fp32; graph inputs and outputs stay float32
    (the runtime's feeds are unchanged), Q/DQ weights and scales as quantized, the RMSNorms
    float32 (`FP16_CARRIER_KEEP_FP32`). Streamed one weight at a time; `engines build` parses
    them as they are. Export and quantization run in fp32 on the build machine because ONNX
    Runtime on a CPU runs fp16 graphs by casting every weight back to fp32 at load (measured: the
    optimised graph holds fp32 copies), which would double their memory there.

    Each fp16 graph is checked against its fp32 original on the export's validation samples
    with its component's tolerance (`engines.carrier_check.FP16_RTOL`); returns the measured
    differences per component (the manifest's `fp16_carriers`), raises `CarrierCheckError`."""
    from citrus_edge.config import CitrusVConfig
    from citrus_edge.engines.carrier_check import (
        SPECS,
        check_or_raise,
        compare_outputs,
        run_graph,
        validation_samples,
    )
    from citrus_edge.engines.component import FP16_CARRIER_KEEP_FP32
    from citrus_edge.engines.float16 import fp16_carrier_file

    model_cfg = CitrusVConfig.load(folder / "config.json")
    measured = {}
    for graph in sorted(folder.glob("*.onnx")):
        work = folder / f".{graph.stem}.fp16"
        work.mkdir()
        try:
            keep = FP16_CARRIER_KEEP_FP32.get(graph.stem, ())
            checked = graph.stem in SPECS
            if checked:
                spec, samples = validation_samples(graph.stem, model_cfg)
                want = run_graph(graph, spec, samples)
            written = fp16_carrier_file(graph, work / graph.name, keep)
            if checked:
                got = run_graph(written, spec, samples)
                measured[graph.stem] = compare_outputs(graph.stem, want, got)
                del want, got
            data, new_data = Path(f"{graph}.data"), Path(f"{written}.data")
            data.unlink(missing_ok=True)
            if new_data.exists():
                new_data.replace(data)
            written.replace(graph)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return check_or_raise([e for errors in measured.values() for e in errors])


def _describe(cfg: BuildConfig, target: Target, recipe: Recipe, quant: Any) -> dict:
    from citrus_edge.targets import resolve_target

    request = resolve_target(cfg.target).to_dict()  # the name typed and the target it became
    assert request["resolved"] == target.name, (request, target.name)
    return {
        "target": target.to_dict(),
        "target_request": request,
        "recipe": recipe.to_dict(),
        "build_config": cfg.to_dict(),
        "model": {"dir_name": cfg.model_dir.name},
        "versions": tool_versions(("transformers", "nvidia-modelopt", "tensorrt")),
        "quantization": None if quant is None else quant.to_dict(),
    }


def _components(bundle_dir: Path, recipe: Recipe) -> dict:
    """Component -> files and precision, as the runtime reads them."""
    import numpy as np

    from citrus_edge.bundle import bundle_components

    comps = bundle_components(bundle_dir)
    graphs = dict(recipe.items())
    for name, entry in comps.items():
        if name in graphs:
            entry["precision"] = graphs[name]
        else:  # the embedding table: float16 or int8 rows where the LLM was quantized
            table = np.load(bundle_dir / entry["file"], mmap_mode="r")
            stored = table_dtype(table)
            if stored not in TABLE_PRECISIONS:
                raise ValueError(f"{entry['file']}: embedding table stored as {stored}")
            entry["precision"] = TABLE_PRECISIONS[stored]
    return comps


def _quantize(cfg: BuildConfig, fp32_dir: Path, recipe: Recipe, target: Target, out: Path):
    from citrus_edge.compress.budget import default_budget, parse_budget
    from citrus_edge.compress.quantize import quantize
    from citrus_edge.compress.settings import QuantizeConfig

    base = default_budget(recipe.llm)
    budget = parse_budget(cfg.budget, base) if cfg.budget else base
    report = quantize(
        fp32_dir,
        recipe,
        target,
        calib_manifest=cfg.calib,
        budget=budget,
        out_dir=out,
        config=QuantizeConfig(embeddings_dtype=cfg.embeddings),
        checkpoint=cfg.model_dir,
    )
    return out, report


def _choose_by_latency(
    cfg: BuildConfig, fp32_dir: Path, quant_dir: Path, recipe: Recipe, scratch: Path
) -> tuple[Path, Recipe, Any]:
    """Time the quantized export against the FP32 one on a few eval images (the runtime, this
    CPU) and set back to FP32 each component whose low-bit graph does not pay here; returns the
    graphs folder to ship, its recipe and the `LatencyChoice` (recorded in the manifest)."""
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.phantom_set import default_phantom_manifest
    from citrus_edge.compress.calibrate import bundle_view
    from citrus_edge.compress.latency_choice import distinct_images, measure_latency
    from citrus_edge.compress.quantized_output import write_with_float_components

    manifest = cfg.eval_data or default_phantom_manifest()
    records = distinct_images(read_manifest(manifest, split="eval"))
    with (
        bundle_view(fp32_dir, scratch, "timed-fp32") as fp32_view,
        bundle_view(quant_dir, scratch, "timed-quantized") as quant_view,
    ):
        choice = measure_latency(fp32_view, quant_view, recipe, records, manifest.parent)
    for t in choice.timings:
        log.info(
            "%s: fp32 %.2f ms, %s %.2f ms -> %s",
            t.component,
            t.fp32_ms,
            t.precision,
            t.quantized_ms,
            t.kept,
        )
    if not choice.reverted:
        return quant_dir, recipe, choice
    out = scratch / "chosen"
    why = {t.component: t.why() for t in choice.timings if t.component in choice.reverted}
    write_with_float_components(
        quant_dir, fp32_dir, list(choice.reverted), choice.recipe.to_dict(), out, why
    )
    return out, choice.recipe, choice


def _engine_plan(bundle_dir: Path, target: Target, recipe: Recipe) -> dict:
    """The portable bundle's plan for `citrus-edge engines build` on the device (also a file)."""
    from citrus_edge.engines.engine_plan import make_engine_plan

    plan = make_engine_plan(bundle_dir, target, recipe)
    plan.save(bundle_dir / "engine_plan.json")
    return plan.to_dict()


class _Recording:
    """Wraps a pipeline and keeps every result, so one run feeds two comparisons."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.results = pipeline, []

    def __call__(self, rgb: Any, prompt: str) -> Any:
        self.results.append(self.pipeline(rgb, prompt))
        return self.results[-1]


def not_measurable(target: Target, recipe: Recipe) -> str | None:
    """Why ONNX Runtime here cannot score a bundle of `recipe` for `target` (None: it can).
    Only TensorRT graphs of TENSORRT_ONLY precisions: a CPU target's int4 is ONNX Runtime's own
    MatMulNBits (recipe int8-w4), which it runs."""
    trt_only = sorted({p for _, p in recipe.items()} & TENSORRT_ONLY)
    if target.tensorrt and trt_only:
        return f"{trt_only} graphs run only in TensorRT"
    return None


def measure_accuracy(cfg: BuildConfig, bundle_dir: Path, target: Target, recipe: Recipe) -> dict:
    """Eval-split metrics of the bundle and its agreement with the FP32 PyTorch reference.

    Measured with ONNX Runtime on this machine, where it executes the bundle's graphs faithfully
    (fp32 and INT8 Q/DQ graphs). FP8/INT4 TensorRT graphs are not scored here (ORT CPU cannot run
    modelopt's TensorRT ops, and a wrong run must never be reported); their accuracy is measured
    on the device. For a TensorRT target the figures are those of the bundle's ONNX graphs, not
    of the fp16 engines TensorRT will build from them.
    """
    why = not_measurable(target, recipe)
    if why is not None:
        return {"measured": False, "reason": why}
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.phantom_set import default_phantom_manifest
    from citrus_edge.cli.evaluate import evaluate
    from citrus_edge.metrics import mask_iou, token_agreement
    from citrus_edge.modelling.reference import ReferencePipeline
    from citrus_edge.runtime.pipeline import Pipeline

    manifest = cfg.eval_data or default_phantom_manifest()
    records = read_manifest(manifest, split="eval")[: cfg.eval_limit]
    # One after the other, the PyTorch model freed before the bundle opens: both at once would
    # hold the weights twice (the 8B: 34 GB fp32 in torch + the bundle's graphs).
    ref = _Recording(ReferencePipeline.from_checkpoint(cfg.model_dir))
    ref_report = evaluate(ref, records, manifest.parent)
    ref_results = ref.results
    del ref
    gc.collect()
    run = _Recording(Pipeline.from_bundle(bundle_dir))
    report = evaluate(run, records, manifest.parent)
    agree = [
        token_agreement(a.token_ids, b.token_ids)
        for a, b in zip(ref_results, run.results, strict=True)
    ]
    ious = [
        mask_iou(ma, mb)
        for a, b in zip(ref_results, run.results, strict=True)
        for ma, mb in zip(a.masks, b.masks, strict=False)  # counts may differ
    ]
    return {
        "measured": True,
        "engine": "onnxruntime CPU on the bundle's ONNX graphs",
        "data": str(manifest),
        "split": "eval",
        "records": len(records),
        "metrics": report.summary(),
        "fp32_reference_metrics": ref_report.summary(),
        "vs_fp32": {
            "token_agreement": sum(agree) / len(agree) if agree else None,
            "exact_sequences": sum(a == 1.0 for a in agree) / len(agree) if agree else None,
            "mean_mask_iou": sum(ious) / len(ious) if ious else None,
            # Ground-truth Dice of the FP32 reference minus the bundle's (not the quantize
            # gate's answer-vs-answer Dice drop, which is in the quantize report).
            "gt_dice_drop": _drop(ref_report.dice, report.dice),
        },
    }


def _drop(ref: float | None, new: float | None) -> float | None:
    return None if ref is None or new is None else ref - new
