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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
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


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean / min / max of a list of milliseconds (empty list: n = 0 only)."""
    if not values:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {
        "n": len(v),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "mean": float(v.mean()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


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
        self.prefill: list[float] = []
        self.tokens: list[float] = []
        self.stages: dict[str, list[float]] = {}

    def add(self, grounding) -> None:
        t = grounding.result.timings_ms
        self.totals.append(t["total"])
        self.prefill.append(t["prefill"])
        self.tokens.append(len(grounding.result.token_ids))
        if grounding.generation.steps:
            self.per_token.append(t["decode"] / grounding.generation.steps)
        for name, ms in t.items():
            self.stages.setdefault(name, []).append(ms)

    def summary(self) -> dict[str, Any]:
        return {
            "e2e_ms": summarize(self.totals),
            "prefill_ms": summarize(self.prefill),
            "decode_ms_per_token": summarize(self.per_token),
            "new_tokens": summarize(self.tokens),
            "stages_ms": {name: summarize(v) for name, v in self.stages.items()},
        }


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
) -> dict[str, Any]:
    """Measure `bundle` on `backend` over `cases` (each `(image, prompt)`), `repeats` times each
    after `warmup` untimed runs of the first case; with `video` (a multi-frame file or an
    iterable of RGB frames) also the per-frame latency of video mode.

    Returns {"bundle_id", "backend", "max_new_tokens", "load_ms", "e2e_ms", "prefill_ms",
    "decode_ms_per_token", "new_tokens", "stages_ms", "video", "peak_rss_mb", "cold_start"},
    where every latency entry is `summarize`'s p50/p95/mean/min/max in ms; "video" holds
    "key_frame_ms", "ms_per_frame" (tracked frames: SAM2 only) and "n_seg" (states tracked).
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
    from .pipeline import Pipeline

    if not bundles:
        raise BenchInputError("run_bench_alternating needs at least one bundle")
    if not cases:
        raise BenchInputError("run_bench_alternating needs at least one (image, prompt) case")
    pipelines = [Pipeline.from_bundle(b, backend, providers, max_new_tokens) for b in bundles]
    for _ in range(warmup):
        for pipeline in pipelines:
            pipeline.ground(*cases[0])
    samples = [_Samples() for _ in pipelines]
    for _ in range(repeats):
        for image, prompt in cases:
            for pipeline, sample in zip(pipelines, samples, strict=True):
                sample.add(pipeline.ground(image, prompt))
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
            )
        outs.append(out)
    return outs


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
    from .pipeline import Pipeline

    t1 = time.perf_counter()
    pipeline = Pipeline.from_bundle(
        args["bundle"], args["backend"], args["providers"], args["max_new_tokens"]
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
