"""`make bench`: latency of the runtime (ONNX Runtime, per recipe) vs the PyTorch eager reference.

Builds CPU bundles of the shipped demo model under out/bench/ (reused when present), then prints,
in one run on the same model and inputs: the processor's instruction sets (they decide which
ONNX Runtime kernels an INT8 graph reaches), end-to-end p50/p95, per-stage times, decode
ms/token, video ms/frame, peak RSS and cold start; and each recipe's per-component speed-up over
the FP32 bundle. All bundles are loaded in one process and run in turn, case by case and frame
by frame (`run_bench_alternating`), so a machine busy with other work slows every recipe alike
and the ratios are fair; each figure is a median of that one run. JSON: out/bench/bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from citrus_edge.atomic import write_text_atomic
from citrus_edge.bundle import load_bundle
from citrus_edge.calib_data.data_manifest import read_manifest
from citrus_edge.calib_data.load import load_image
from citrus_edge.calib_data.phantom_set import default_phantom_manifest
from citrus_edge.cpu_features import describe, instruction_sets
from citrus_edge.defaults import DEMO_MODEL_DIR
from citrus_edge.runtime.bench import format_speedups, speedups
from citrus_edge.tasks import REPORT_PROMPT, SEGMENT_PROMPT

OUT = Path("out/bench")


def cases(n: int) -> list[tuple[np.ndarray, str]]:
    """Eval-split phantoms with a lesion: segmentation prompts, and a few reports."""
    manifest = default_phantom_manifest()
    recs = [r for r in read_manifest(manifest, split="eval") if r.task == "segment" and r.masks]
    imgs = [load_image(r.abs_image(manifest.parent)).pixels for r in recs[:n]]
    return [(im, SEGMENT_PROMPT) for im in imgs] + [(imgs[0], REPORT_PROMPT)]


def sweep(rgb: np.ndarray, frames: int = 16) -> list[np.ndarray]:
    """A probe sweep: the image shifted a pixel per frame (what video mode tracks)."""
    return [np.roll(rgb, shift=i, axis=1) for i in range(frames)]


def bundle_for(recipe: str) -> Path:
    """The demo model's CPU bundle for `recipe` ("default": what `build --target cpu` gives, each
    component kept INT8 only where it was measured faster here), built (default budget) unless
    one of the current demo model is already there."""
    from citrus_edge.cli.bundle_build import BuildConfig, build
    from citrus_edge.export.export_manifest import checkpoint_source_hash

    out = OUT / f"bundle-cpu-{recipe}"
    export = out / "export_manifest.json"
    current = export.is_file() and (
        json.loads(export.read_text()).get("source") == checkpoint_source_hash(DEMO_MODEL_DIR)
    )
    if not current:
        named = None if recipe == "default" else recipe
        build(BuildConfig("cpu", DEMO_MODEL_DIR, recipe=named, eval_limit=30), out)
    return out


def torch_eager(cs: list[tuple[np.ndarray, str]], repeats: int) -> dict:
    """The PyTorch reference on the same inputs (its own per-stage timings)."""
    import torch

    from citrus_edge.modelling.reference import ReferencePipeline

    torch.set_num_threads(2)
    pipe = ReferencePipeline.from_checkpoint(DEMO_MODEL_DIR)
    pipe(*cs[0])
    e2e, stages, decode = [], {}, []
    for _ in range(repeats):
        for rgb, prompt in cs:
            t0 = time.perf_counter()
            r = pipe(rgb, prompt)
            e2e.append((time.perf_counter() - t0) * 1e3)
            for k, v in r.timings_ms.items():
                stages.setdefault(k, []).append(v)
            decode.append(r.timings_ms["generate"] / max(1, len(r.token_ids)))
    return {
        "e2e_ms": _pct(e2e),
        "stages_ms": {k: statistics.median(v) for k, v in stages.items()},
        "generate_ms_per_token": statistics.median(decode),
    }


def _pct(v: list[float]) -> dict:
    return {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}


def main() -> None:
    from citrus_edge.runtime.bench import run_bench_alternating

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--recipes",
        default="fp32,default,int8",
        help="CPU recipes to build and time (default: the target's default build)",
    )
    ap.add_argument("--repeats", type=int, default=15)  # 3 rounds of 5 cases: ratios +-15 %
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    cs = cases(args.images)
    report = {"cpu": instruction_sets(), "schedule": "alternating", "onnxruntime": {}}
    report["torch_eager"] = torch_eager(cs, args.repeats)
    paths = [bundle_for(recipe) for recipe in recipes]
    runs = run_bench_alternating(paths, cs, repeats=args.repeats, video=sweep(cs[0][0]))
    for recipe, path, r in zip(recipes, paths, runs, strict=True):
        r["bundle_bytes"] = sum(f["bytes"] for f in load_bundle(path).manifest["files"].values())
        report["onnxruntime"][recipe] = r
    base = report["onnxruntime"].get("fp32")
    if base is not None:
        report["speedup_vs_fp32"] = {
            recipe: speedups(base, r) for recipe, r in report["onnxruntime"].items()
        }
    OUT.mkdir(parents=True, exist_ok=True)
    write_text_atomic(OUT / "bench.json", json.dumps(report, indent=2))
    print_report(report)


def print_report(report: dict) -> None:
    print(f"CPU: {describe(report['cpu'])}")
    t = report["torch_eager"]
    print(f"{'':34}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{'PyTorch eager (reference)':34}{t['e2e_ms']['p50']:10.1f}{t['e2e_ms']['p95']:10.1f}")
    for recipe, r in report["onnxruntime"].items():
        e = r["e2e_ms"]
        print(f"{'ONNX Runtime CPU ' + recipe:34}{e['p50']:10.1f}{e['p95']:10.1f}")
    print(f"\nPyTorch stages (median ms): {_fmt(t['stages_ms'])}")
    print(f"PyTorch generate ms/token: {t['generate_ms_per_token']:.2f}")
    base = report["onnxruntime"].get("fp32")
    for recipe, r in report["onnxruntime"].items():
        print(f"\n[{recipe}] bundle {r['bundle_id']}, {r['bundle_bytes'] / 1e6:.2f} MB")
        print(f"  stages p50 ms: {_fmt({k: v['p50'] for k, v in r['stages_ms'].items()})}")
        print(f"  decode ms/token p50: {r['decode_ms_per_token']['p50']:.2f}")
        if r.get("video"):
            v = r["video"]
            print(
                f"  video: {v['ms_per_frame']['p50']:.1f} ms/frame p50 ({v['n_seg']} [SEG] tracked)"
            )
        print(f"  peak RSS {r['peak_rss_mb']:.0f} MB; cold start {_fmt(r['cold_start'])}")
        if base is not None and recipe != "fp32":
            print(f"  {format_speedups(speedups(base, r))}")
    if base is None:
        print("\n(no fp32 recipe in --recipes: no speed-ups printed)")


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


if __name__ == "__main__":
    main()
