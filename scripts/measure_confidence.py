"""Distribution of the quality signals on a phantom eval split: the numbers behind the
thresholds of `citrus_edge.quality` (answer-token log-probabilities, mask predicted IoU, format).

Usage: python scripts/measure_confidence.py [--model DIR] [--data MANIFEST] [--limit 180]
Runs the PyTorch reference (about 0.2-0.5 s per answer here) on the first `--limit` records of
the eval split (default: the shipped demo model on the default phantom set) and prints, per
task and overall, percentiles of each answer's mean and minimum token log-probability, of the
kept masks' predicted IoU, and the share of answers that parse in their task's format. With
`--ood`, the same on out-of-distribution inputs (pydicom's ultrasound examples, noise) with the
three task prompts, to show how the thresholds separate them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from citrus_edge.calib_data.data_manifest import read_manifest
from citrus_edge.calib_data.load import load_image
from citrus_edge.calib_data.phantom_set import default_phantom_manifest
from citrus_edge.defaults import resolve_model
from citrus_edge.modelling.reference import ReferencePipeline
from citrus_edge.result import GroundingResult
from citrus_edge.tasks import PROMPTS

PERCENTILES = (1, 5, 10, 25, 50)


def _row(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<22} n=0"
    cells = "  ".join(f"p{p}={np.percentile(values, p):8.4f}" for p in PERCENTILES)
    return f"  {name:<22} n={len(values):<4} min={min(values):8.4f}  {cells}"


def _summary(title: str, results: list[tuple[str, GroundingResult]]) -> None:
    print(title)
    for task in (*sorted({t for t, _ in results}), "all"):
        chosen = [r for t, r in results if task in (t, "all")]
        quality = [r.quality for r in chosen if r.quality and r.quality.n_tokens]
        parses = [q.parses for q in quality if q.parses is not None]
        print(f" {task}: {len(chosen)} answers, parse rate {np.mean(parses) if parses else 0:.3f}")
        print(_row("mean log-prob", [q.mean_logprob for q in quality]))
        print(_row("min log-prob", [q.min_logprob for q in quality]))
        print(_row("mask predicted IoU", [s for r in chosen for s in r.mask_scores]))


def _eval_split(pipe: ReferencePipeline, data: Path, limit: int) -> list[tuple[str, object]]:
    records = read_manifest(data, split="eval")[:limit]
    out = []
    for rec in records:
        rgb = load_image(rec.abs_image(data.parent), frame=rec.frame).pixels
        out.append((rec.task, pipe(rgb, rec.prompt)))
    return out


def _ood(pipe: ReferencePipeline) -> list[tuple[str, object]]:
    from pydicom import examples

    images = [load_image(examples.get_path(n)).pixels for n in ("palette_color", "ybr_color")]
    images.append(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return [(task, pipe(rgb, prompt)) for rgb in images for task, prompt in PROMPTS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--data", type=Path, default=None, help="default: the phantom set")
    parser.add_argument("--limit", type=int, default=180, help="eval records to run")
    parser.add_argument("--ood", action="store_true", help="also out-of-distribution inputs")
    args = parser.parse_args()

    pipe = ReferencePipeline.from_checkpoint(resolve_model(args.model))
    data = args.data or default_phantom_manifest()
    start = time.perf_counter()
    results = _eval_split(pipe, data, args.limit)
    print(f"{data}: eval split, {len(results)} answers in {time.perf_counter() - start:.0f} s")
    _summary("eval split (natural-log probabilities of the answer tokens)", results)
    if args.ood:
        _summary("out of distribution (pydicom US examples, noise)", _ood(pipe))


if __name__ == "__main__":
    main()
