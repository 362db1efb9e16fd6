"""Benchmark one bundle on one backend: latency percentiles, stage times, decode ms/token, video
ms/frame, peak RSS and cold start, all from one call on the same bundle and inputs.

`run_bench(...)` returns a JSON-ready dict. Cold start (import + verify/load the bundle + first
result) is measured in a fresh Python process (`python -m citrus_edge.runtime.bench`), so it
includes what a cart pays at boot and nothing a warm caller has already loaded; its peak RSS is
that of a process holding only the runtime. `peak_rss_mb` of the warm runs is this process's
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


def _timed_runs(pipeline, cases: Sequence[Case], repeats: int) -> dict[str, Any]:
    totals, per_token, prefill, tokens = [], [], [], []
    stages: dict[str, list[float]] = {}
    for _ in range(repeats):
        for image, prompt in cases:
            g = pipeline.ground(image, prompt)
            t = g.result.timings_ms
            totals.append(t["total"])
            prefill.append(t["prefill"])
            tokens.append(len(g.result.token_ids))
            if g.generation.steps:
                per_token.append(t["decode"] / g.generation.steps)
            for name, ms in t.items():
                stages.setdefault(name, []).append(ms)
    return {
        "e2e_ms": summarize(totals),
        "prefill_ms": summarize(prefill),
        "decode_ms_per_token": summarize(per_token),
        "new_tokens": summarize(tokens),
        "stages_ms": {name: summarize(v) for name, v in stages.items()},
    }


def _video_runs(pipeline, video: Any, prompt: str, key_frame: int) -> dict[str, Any]:
    from .video import run_video

    key, tracked, n_seg = [], [], 0
    for fr in run_video(pipeline, video, prompt, key_frame=key_frame):
        (key if fr.key_frame else tracked).append(fr.latency_ms)
        n_seg = fr.result.n_seg
    if n_seg == 0:
        log.warning("video: the key frame's answer has no [SEG]; tracked frames ran nothing")
    return {"key_frame_ms": summarize(key), "ms_per_frame": summarize(tracked), "n_seg": n_seg}


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
    from .pipeline import Pipeline

    if not cases:
        raise ValueError("run_bench needs at least one (image, prompt) case")
    pipeline = Pipeline.from_bundle(bundle, backend, providers, max_new_tokens)
    for _ in range(warmup):
        pipeline.ground(*cases[0])
    out: dict[str, Any] = {
        "bundle_id": pipeline.bundle_id,
        "backend": pipeline.backend.label,
        "max_new_tokens": max_new_tokens,
        "load_ms": dict(pipeline.load_ms),
        **_timed_runs(pipeline, cases, repeats),
        "video": None,
    }
    if video is not None:
        out["video"] = _video_runs(pipeline, video, video_prompt or cases[0][1], key_frame)
    out["peak_rss_mb"] = peak_rss_mb()
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
    return out


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
