"""Benchmark bundles on one backend: latency percentiles, stage times, decode ms/token, video
ms/frame, peak RSS and cold start, all from one call on the same bundles and inputs.

`run_bench(...)` returns a JSON-ready dict for one bundle. `run_bench_alternating(...)` returns
one per bundle, all loaded in one process and run in turn, case by case: the fair way to compare
recipes on a shared machine, where load that comes and goes would otherwise fall on whichever
bundle ran at the time. Cold start (import + verify/load the bundle + first result) is measured
in a fresh Python process (`python -m citrus_edge.runtime.bench`), so it includes what a cart
pays at boot and nothing a warm caller has already loaded; its peak RSS is that of a process
holding only the runtime. `peak_rss_mb` of the warm runs is this process's
(it includes whatever the caller imported, e.g. torch for a side-by-side comparison).

`bench_report(...)` is what `citrus-edge bench` prints: `run_bench`'s figures plus the machine
(processor and its instruction sets, cores, GPUs), every installed library's version and the
bundle's bytes, because a latency means nothing without the machine and software it ran on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Case = tuple[Any, str]  # (image: array / path / LoadedImage, prompt)
HEAVY_MODULES = ("torch", "transformers")  # the cold-start probe reports if these got imported


class BenchInputError(ValueError):
    """A benchmark asked for with nothing to run (no bundle, no case)."""


BENCH_SCHEMA = "citrus-edge.bench/1"
PERCENTILES = (50, 90, 95, 99)
# Stages that run before the first new token exists (its logits come out of the prefill): their
# sum is the time to first token.
FIRST_TOKEN_STAGES = ("load", "preprocess", "vision_encoder", "llm_inputs", "grammar", "prefill")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n / min / p50 / p90 / p95 / p99 / mean / max of a list of figures (linear interpolation
    between samples, numpy's default); an empty list gives {"n": 0} only."""
    if not values:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    out: dict[str, float] = {"n": len(v), "min": float(v.min())}
    out.update({f"p{q}": float(np.percentile(v, q)) for q in PERCENTILES})
    out.update({"mean": float(v.mean()), "max": float(v.max())})
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this process's own address
    space (`ru_maxrss` survives fork + exec, so a child would report its parent's peak).
    Elsewhere `ru_maxrss` (bytes on macOS, KiB on other systems).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


class _Samples:
    """The per-run figures of one bundle, gathered one grounding at a time (so that runs of
    several bundles can be interleaved and each bundle still gets its own summary)."""

    def __init__(self) -> None:
        self.totals: list[float] = []
        self.per_token: list[float] = []
        self.tokens_per_s: list[float] = []
        self.prefill: list[float] = []
        self.ttft: list[float] = []
        self.tokens: list[float] = []
        self.mask_per_seg: list[float] = []
        self.vision_tokens: list[float] = []
        self.prefill_tokens: list[float] = []
        self.stages: dict[str, list[float]] = {}

    def add(self, grounding, token_counts: tuple[int, int] | None = None) -> None:
        """One run; `token_counts` = (vision tokens, prefill tokens) of its case."""
        t = grounding.result.timings_ms
        self.totals.append(t["total"])
        self.prefill.append(t["prefill"])
        self.ttft.append(sum(t.get(name, 0.0) for name in FIRST_TOKEN_STAGES))
        self.tokens.append(len(grounding.result.token_ids))
        steps = grounding.generation.steps
        if steps and t.get("decode", 0.0) > 0:
            self.per_token.append(t["decode"] / steps)
            self.tokens_per_s.append(steps / t["decode"] * 1e3)
        n_seg = grounding.result.n_seg
        if n_seg and "mask_decoder" in t:
            self.mask_per_seg.append(t["mask_decoder"] / n_seg)
        if token_counts is not None:
            self.vision_tokens.append(token_counts[0])
            self.prefill_tokens.append(token_counts[1])
        for name, ms in t.items():
            self.stages.setdefault(name, []).append(ms)

    def summary(self) -> dict[str, Any]:
        return {
            "e2e_ms": summarize(self.totals),
            "ttft_ms": summarize(self.ttft),
            "prefill_ms": summarize(self.prefill),
            "decode_ms_per_token": summarize(self.per_token),
            "decode_tokens_per_s": summarize(self.tokens_per_s),
            "new_tokens": summarize(self.tokens),
            "vision_tokens": summarize(self.vision_tokens),
            "prefill_tokens": summarize(self.prefill_tokens),
            "mask_decoder_ms_per_seg": summarize(self.mask_per_seg),
            "stages_ms": {name: summarize(v) for name, v in self.stages.items()},
        }


def token_counts(pipeline: Any, grounding: Any) -> tuple[int, int]:
    """(vision tokens, prefill tokens) of one run: the image tokens the LLM sees after the patch
    merger, and the whole prompt (template + image + text) the prefill processes. Recomputed
    from the run's loaded image with the pipeline's own preprocessing, outside any timing."""
    from citrus_edge.preprocess import qwen_pixels
    from citrus_edge.prompts import n_image_tokens, prompt_ids

    cfg = pipeline.model_config
    qp = qwen_pixels(grounding.image.pixels, cfg.preprocess)
    n_img = n_image_tokens(qp.grid_thw, cfg.vision.spatial_merge_size)
    ids = prompt_ids(pipeline.tokenizer, grounding.result.prompt, n_img)
    return n_img, len(ids)


class _VideoSamples:
    """The per-frame latencies of one bundle's video run, gathered one frame at a time."""

    def __init__(self) -> None:
        self.key: list[float] = []
        self.tracked: list[float] = []
        self.n_seg = 0

    def add(self, frame) -> None:
        (self.key if frame.key_frame else self.tracked).append(frame.latency_ms)
        self.n_seg = frame.result.n_seg

    def summary(self) -> dict[str, Any]:
        if self.n_seg == 0:
            log.warning("video: the key frame's answer has no [SEG]; tracked frames ran nothing")
        return {
            "key_frame_ms": summarize(self.key),
            "ms_per_frame": summarize(self.tracked),
            "n_seg": self.n_seg,
        }


def run_bench(
    bundle: str | Path,
    cases: Sequence[Case],
    *,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    max_new_tokens: int = 96,
    repeats: int = 3,
    warmup: int = 1,
    video: Any = None,
    video_prompt: str | None = None,
    key_frame: int = 0,
    cold_start: bool = True,
    threads: int = 0,
) -> dict[str, Any]:
    """Measure `bundle` on `backend` over `cases` (each `(image, prompt)`), `repeats` times each
    after `warmup` untimed runs of the first case; with `video` (a multi-frame file or an
    iterable of RGB frames) also the per-frame latency of video mode. `threads` > 0 sets ONNX
    Runtime's intra-op threads (0: its default, one per core).

    Returns {"bundle_id", "backend", "threads", "max_new_tokens", "load_ms", "e2e_ms", "ttft_ms",
    "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "new_tokens", "vision_tokens",
    "prefill_tokens", "mask_decoder_ms_per_seg", "stages_ms", "video", "peak_rss_mb",
    "cold_start"}, where every entry is `summarize`'s n/min/p50/p90/p95/p99/mean/max (ms unless
    named otherwise; `mask_decoder_ms_per_seg` counts only runs whose answer had a [SEG]); "video"
    holds "key_frame_ms", "ms_per_frame" (tracked frames: SAM2 only) and "n_seg" (states tracked).
    """
    if not cases:
        raise BenchInputError("run_bench needs at least one (image, prompt) case")
    return run_bench_alternating(
        [bundle],
        cases,
        backend=backend,
        providers=providers,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        warmup=warmup,
        video=video,
        video_prompt=video_prompt,
        key_frame=key_frame,
        cold_start=cold_start,
        threads=threads,
    )[0]


def run_bench_alternating(
    bundles: Sequence[str | Path],
    cases: Sequence[Case],
    *,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    max_new_tokens: int = 96,
    repeats: int = 3,
    warmup: int = 1,
    video: Any = None,
    video_prompt: str | None = None,
    key_frame: int = 0,
    cold_start: bool = True,
    threads: int = 0,
) -> list[dict[str, Any]]:
    """`run_bench` for several bundles loaded in one process and run in turn, so that a busy
    machine slows all of them alike and their ratios stay fair.

    Every bundle is loaded first, then warmed up (`warmup` runs of the first case each, in turn);
    the timed runs go round-robin per case and repeat (bundle 0 on case 0, bundle 1 on case 0,
    ..., bundle 0 on case 1, ...), and video mode advances every bundle's sweep one frame at a
    time in the same order. Returns one dict per bundle, in the order given, with `run_bench`'s
    keys. Their `peak_rss_mb` is this process's, which holds every bundle at once; the cold
    start (a fresh process per bundle, one after the other) gives each bundle's own peak RSS.
    The same path may be given twice (its two pipelines are timed as two bundles).
    """

    if not bundles:
        raise BenchInputError("run_bench_alternating needs at least one bundle")
    if not cases:
        raise BenchInputError("run_bench_alternating needs at least one (image, prompt) case")
    pipelines = [open_pipeline(b, backend, providers, max_new_tokens, threads) for b in bundles]
    for _ in range(warmup):
        for pipeline in pipelines:
            pipeline.ground(*cases[0])
    samples = [_Samples() for _ in pipelines]
    counts: dict[tuple[int, int], tuple[int, int]] = {}  # (pipeline, case) -> token counts
    for _ in range(repeats):
        for c, (image, prompt) in enumerate(cases):
            for p, (pipeline, sample) in enumerate(zip(pipelines, samples, strict=True)):
                grounding = pipeline.ground(image, prompt)
                if (p, c) not in counts:
                    counts[p, c] = token_counts(pipeline, grounding)
                sample.add(grounding, counts[p, c])
    videos: list[dict[str, Any] | None] = [None] * len(pipelines)
    if video is not None:
        prompt = video_prompt or cases[0][1]
        videos = _video_runs_alternating(pipelines, video, prompt, key_frame)
    peak = peak_rss_mb()
    outs = []
    for bundle, pipeline, sample, vid in zip(bundles, pipelines, samples, videos, strict=True):
        out: dict[str, Any] = {
            "bundle_id": pipeline.bundle_id,
            "backend": pipeline.backend.label,
            "threads": threads,
            "max_new_tokens": max_new_tokens,
            "load_ms": dict(pipeline.load_ms),
            **sample.summary(),
            "video": vid,
            "peak_rss_mb": peak,
        }
        if cold_start:
            image, prompt = cases[0]
            out["cold_start"] = measure_cold_start(
                bundle,
                image,
                prompt,
                backend=backend,
                providers=providers,
                max_new_tokens=max_new_tokens,
                threads=threads,
            )
        outs.append(out)
    return outs


def open_pipeline(
    bundle: str | Path,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    max_new_tokens: int = 96,
    threads: int = 0,
) -> Any:
    """`Pipeline.from_bundle`, with `threads` > 0 giving ONNX Runtime that many intra-op threads
    (what `--threads` compares: a cart shares its cores with the probe's other software)."""
    from .pipeline import Pipeline

    if threads < 0:
        raise BenchInputError(f"threads must be 0 (the runtime's default) or more, got {threads}")
    if not threads:
        return Pipeline.from_bundle(bundle, backend, providers, max_new_tokens)
    if backend != "onnxruntime":
        raise BenchInputError(f"threads applies to the onnxruntime backend, not {backend!r}")
    from citrus_edge.timing import StageTimer

    from .artifacts import open_bundle
    from .ort_backend import OnnxRuntimeBackend
    from .pipeline import RuntimeConfig, _engines

    config = RuntimeConfig(backend=backend, providers=providers, max_new_tokens=max_new_tokens)
    timer = StageTimer()
    with timer.stage("open_bundle"):
        artifacts = open_bundle(Path(bundle), verify=config.verify_bundle)
    with timer.stage("create_backend"):
        ort = OnnxRuntimeBackend(providers, threads=threads)
    with timer.stage("open_engines"):
        engines = _engines(artifacts, ort, config)
    with timer.stage("open_graphs"):
        pipeline = Pipeline(artifacts, ort, config, engines)
    pipeline.load_ms = timer.ms
    return pipeline


def bundle_bytes(bundle: str | Path) -> int:
    """Bytes of the files the bundle's manifest lists (what a cart downloads and stores)."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    return int(sum(f["bytes"] for f in manifest["files"].values()))


def _gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs as `nvidia-smi` names them ([] without one or without the tool)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = "--query-gpu=name,memory.total,driver_version,compute_cap"
    try:
        proc = subprocess.run(
            [smi, query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append(dict(zip(("name", "memory", "driver", "compute_cap"), parts, strict=True)))
    return gpus


def _memory_gb() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return None


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on: processor model and instruction sets (they decide
    ONNX Runtime's kernels), logical cores and the cores this process may use, memory, OS,
    GPUs and ONNX Runtime's execution providers. Never raises."""
    from citrus_edge.cpu_features import describe, instruction_sets

    cpu = instruction_sets()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = []
    return {
        "cpu": cpu,
        "cpu_line": describe(cpu),
        "cores": cpu.get("cores"),
        "cores_usable": usable,
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": _gpus(),
        "onnxruntime_providers": providers,
    }


# The libraries a bundle's speed depends on, shown first; `library_versions` lists all.
KEY_LIBRARIES = ("citrus-edge", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def library_versions() -> dict[str, Any]:
    """{"key": versions of `KEY_LIBRARIES` installed, "all": every installed distribution}."""
    from importlib import metadata

    every: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            every.setdefault(name.lower(), dist.version)
    key = {"python": platform.python_version()}
    key.update({n: every[n] for n in KEY_LIBRARIES if n in every})
    return {"key": key, "all": dict(sorted(every.items()))}


def bench_report(bundle: str | Path, cases: Sequence[Case], **options: Any) -> dict[str, Any]:
    """`citrus-edge bench`'s record of one bundle (`bench_reports`' options): `run_bench` over
    `cases` (`iterations` timed rounds of every case after `warmup` untimed runs), video mode over
    `video_frames` frames made from the first case's image (shifted a pixel per frame: what a
    probe sweep tracks; 0: no video), cold start in a fresh process, plus "schema", "bundle",
    "bundle_bytes", "settings", "cases" (each case's image name and prompt), "machine" and
    "versions"."""
    return bench_reports([bundle], cases, **options)[0]


def bench_reports(
    bundles: Sequence[str | Path],
    cases: Sequence[Case],
    *,
    warmup: int = 1,
    iterations: int = 3,
    threads: int = 0,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    max_new_tokens: int = 96,
    video_frames: int = 8,
    cold_start: bool = True,
) -> list[dict[str, Any]]:
    """`bench_report` of several bundles timed in one run (`run_bench_alternating`: loaded in
    one process, run in turn case by case and frame by frame), so that their ratios hold on a
    busy machine. One report per bundle, in the order given; "schedule" says how they ran."""
    if iterations < 1:
        raise BenchInputError(f"iterations must be 1 or more, got {iterations}")
    if warmup < 0 or video_frames < 0:
        raise BenchInputError(
            f"warmup and video frames must be 0 or more, got {warmup}, {video_frames}"
        )
    if not cases:
        raise BenchInputError("bench needs at least one image")
    video = None
    if video_frames:
        from .inputs import load_input

        first = load_input(cases[0][0], 0, None).pixels
        video = [np.roll(first, shift=i, axis=1) for i in range(video_frames + 1)]
    results = run_bench_alternating(
        bundles,
        cases,
        backend=backend,
        providers=providers,
        max_new_tokens=max_new_tokens,
        repeats=iterations,
        warmup=warmup,
        video=video,
        video_prompt=cases[0][1] if video is not None else None,
        cold_start=cold_start,
        threads=threads,
    )
    machine, versions = machine_info(), library_versions()
    settings = {
        "warmup": warmup,
        "iterations": iterations,
        "runs": iterations * len(cases),
        "threads": threads,
        "backend": backend,
        "max_new_tokens": max_new_tokens,
        "video_frames": video_frames,
    }
    case_names = [{"image": _case_name(image), "prompt": prompt} for image, prompt in cases]
    return [
        {
            "schema": BENCH_SCHEMA,
            "bundle": os.fspath(bundle),
            "bundle_bytes": bundle_bytes(bundle),
            "schedule": "alternating" if len(bundles) > 1 else "single",
            "settings": dict(settings),
            "cases": list(case_names),
            **result,
            "machine": machine,
            "versions": versions,
        }
        for bundle, result in zip(bundles, results, strict=True)
    ]


# The components whose speed-up over a base bundle is printed: (label, how to read its median
# from one bundle's report, unit suffix). Stage names are those of `GroundingResult.timings_ms`.
SPEEDUP_COMPONENTS = (
    ("end-to-end", lambda r: r["e2e_ms"], ""),
    ("vision", lambda r: r["stages_ms"].get("vision_encoder"), ""),
    ("sam_encoder", lambda r: r["stages_ms"].get("sam_encoder"), ""),
    ("mask_decoder", lambda r: r["stages_ms"].get("mask_decoder"), ""),
    ("prefill", lambda r: r["prefill_ms"], ""),
    ("decode", lambda r: r["decode_ms_per_token"], "/token"),
    ("video", lambda r: (r.get("video") or {}).get("ms_per_frame"), "/frame"),
)


def _median(entry: dict | None) -> float | None:
    """The p50 of a `summarize` entry, None when the entry is missing or empty."""
    if not entry or not entry.get("n"):
        return None
    return entry["p50"]


def speedups(base: dict, r: dict) -> dict[str, float | None]:
    """Per component, the base bundle's median / this bundle's median (> 1: this one is faster),
    both from the same alternating run; a component either bundle did not run (e.g. SAM2 without
    a [SEG]) is None. Also "bytes": this bundle's size as a fraction of the base's."""
    out: dict[str, float | None] = {}
    for label, read, _ in SPEEDUP_COMPONENTS:
        b, x = _median(read(base)), _median(read(r))
        out[label] = b / x if b is not None and x else None
    out["bytes"] = r["bundle_bytes"] / base["bundle_bytes"]
    return out


def format_speedups(s: dict, base: str = "fp32") -> str:
    """One line, e.g. "vs fp32: end-to-end 1.08x, vision 1.45x, ..., decode 1.12x/token; 29.4% of
    the bytes" (components without a figure are left out)."""
    parts = [
        f"{label} {s[label]:.2f}x{unit}"
        for label, _, unit in SPEEDUP_COMPONENTS
        if s.get(label) is not None
    ]
    return f"vs {base}: {', '.join(parts)}; {s['bytes']:.1%} of the bytes"


def _case_name(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    shape = getattr(image, "shape", None)
    return f"array{list(shape)}" if shape is not None else type(image).__name__


def _video_runs_alternating(
    pipelines: Sequence[Any], video: Any, prompt: str, key_frame: int
) -> list[dict[str, Any]]:
    """One video sweep per pipeline, advanced one frame at a time in turn (key frames first)."""
    from .video import run_video

    if len(pipelines) > 1 and not isinstance(video, (str, os.PathLike)):
        video = list(video)  # each pipeline walks the same frames; an iterator walks once
    streams = [run_video(p, video, prompt, key_frame=key_frame) for p in pipelines]
    samples = [_VideoSamples() for _ in pipelines]
    live = list(range(len(streams)))
    while live:
        for i in list(live):
            frame = next(streams[i], None)
            if frame is None:
                live.remove(i)
            else:
                samples[i].add(frame)
    return [s.summary() for s in samples]


def measure_cold_start(
    bundle: str | Path,
    image: Any,
    prompt: str,
    *,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    max_new_tokens: int = 96,
    timeout_s: float = 600.0,
    threads: int = 0,
) -> dict[str, Any]:
    """Cold start in a fresh process: {"process_ms" (spawn to exit), "import_ms", "load_ms"
    (verify + open the bundle), "first_result_ms", "cold_start_ms" (load + first result),
    "peak_rss_mb", "heavy_modules" (torch / transformers if imported: always [] for a sound
    runtime)}. An in-memory image is handed over as a temporary .npy file."""
    with tempfile.TemporaryDirectory(prefix="citrus-cold-") as tmp:
        if isinstance(image, np.ndarray):
            path = Path(tmp) / "image.npy"
            np.save(path, image)
            image = path
        args = {
            "bundle": os.fspath(bundle),
            "image": os.fspath(image),
            "prompt": prompt,
            "backend": backend,
            "providers": list(providers) if providers else None,
            "max_new_tokens": max_new_tokens,
            "threads": threads,
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "citrus_edge.runtime.bench", "--cold-start", json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        process_ms = (time.perf_counter() - t0) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"process_ms": process_ms, **result}


def _cold_start_child(args: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from .pipeline import Pipeline  # noqa: F401  (the import a cart pays, timed)

    t1 = time.perf_counter()
    pipeline = open_pipeline(
        args["bundle"],
        args["backend"],
        args["providers"],
        args["max_new_tokens"],
        args.get("threads", 0),
    )
    t2 = time.perf_counter()
    image = args["image"]
    image = np.load(image) if image.endswith(".npy") else image
    pipeline(image, args["prompt"])
    t3 = time.perf_counter()
    return {
        "import_ms": (t1 - t0) * 1e3,
        "load_ms": (t2 - t1) * 1e3,
        "first_result_ms": (t3 - t2) * 1e3,
        "cold_start_ms": (t3 - t1) * 1e3,
        "peak_rss_mb": peak_rss_mb(),
        "heavy_modules": sorted(m for m in HEAVY_MODULES if m in sys.modules),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="citrus-edge runtime cold-start probe")
    parser.add_argument("--cold-start", required=True, help="JSON arguments")
    ns = parser.parse_args(argv)
    sys.stdout.write(json.dumps(_cold_start_child(json.loads(ns.cold_start))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
