"""On-device check of a portable bundle: engines build, a TensorRT run, parity with ONNX Runtime.

Run ON THE JETSON (or the x86 GPU the bundle targets), in the JetPack environment (README, "On a
Jetson"), with a portable bundle made on a workstation by `citrus-edge build --target orin`:

    python scripts/jetson_check.py BUNDLE [--n 6] [--out jetson_check]

What it does, printing every figure it measured (and writing them to OUT/jetson_check.json):
1. which module this is (device tree + memory) and the target it resolves to;
2. `citrus-edge engines build BUNDLE` for that target (engine build seconds, engine bytes);
3. a phantom set of N images (`citrus-edge data phantoms`), each asked the segmentation prompt,
   run with `--backend tensorrt` (the engines) and with ONNX Runtime on the bundle's own ONNX
   graphs (the reference: the graphs `build` validated; CUDA provider if present, else CPU);
4. parity: per answer, token agreement and exact sequences, mask IoU and mask score difference;
   latency per answer of each backend.

Exit status 0 when parity holds (mean token agreement >= --min-tokens and mean mask IoU >=
--min-iou), 1 when it does not, 2 when a step could not run (the message says which). It never
prints a figure it did not measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("jetson_check")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="portable bundle from `citrus-edge build`")
    p.add_argument("--target", default=None, help="default: this Jetson's module")
    p.add_argument("--n", type=int, default=6, help="phantom images (segmentation prompt)")
    p.add_argument("--out", type=Path, default=Path("jetson_check"))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=float, default=0.95, help="least mean token agreement")
    p.add_argument("--min-iou", type=float, default=0.90, help="least mean mask IoU")
    return p.parse_args(argv)


def _device() -> dict:
    from citrus_edge.engines.device import cuda_device, jetson_target
    from citrus_edge.jetson import detect_jetson

    module = detect_jetson()
    gpu = cuda_device()
    return {
        "gpu": gpu.to_dict(),
        "jetson": None if module is None else module.to_dict(),
        "target": jetson_target(),
    }


def _engines(bundle: Path, target: str | None, out: Path) -> dict:
    from citrus_edge.engines import build_bundle_engines

    t0 = time.perf_counter()
    built = build_bundle_engines(bundle, target, out / "engines")
    seconds = time.perf_counter() - t0
    sizes = {c: p.stat().st_size for c, p in built.engines.items()}
    return {"target": built.target, "seconds": round(seconds, 1), "bytes": sizes}


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider"
    return [cuda] if cuda in ort.get_available_providers() else ["CPUExecutionProvider"]


def _run(pipe, images: list, prompt: str) -> tuple[list, list[float]]:
    results, ms = [], []
    for pixels in images:
        t0 = time.perf_counter()
        results.append(pipe(pixels, prompt))
        ms.append((time.perf_counter() - t0) * 1e3)
    return results, ms


def _parity(trt_results: list, ref_results: list) -> dict:
    from citrus_edge.metrics import mask_iou, token_agreement

    agree = [
        token_agreement(a.token_ids, b.token_ids)
        for a, b in zip(trt_results, ref_results, strict=True)
    ]
    ious, score_diff = [], []
    for a, b in zip(trt_results, ref_results, strict=True):
        for ma, mb in zip(a.masks, b.masks, strict=False):  # counts may differ
            ious.append(mask_iou(ma, mb))
        for sa, sb in zip(a.mask_scores, b.mask_scores, strict=False):
            score_diff.append(abs(float(sa) - float(sb)))
    return {
        "answers": len(agree),
        "token_agreement": statistics.fmean(agree) if agree else None,
        "exact_sequences": sum(a == 1.0 for a in agree) / len(agree) if agree else None,
        "masks_compared": len(ious),
        "mean_mask_iou": statistics.fmean(ious) if ious else None,
        "min_mask_iou": min(ious) if ious else None,
        "max_mask_score_diff": max(score_diff) if score_diff else None,
    }


def check(args: argparse.Namespace) -> dict:
    """Every step, in order; returns what was measured."""
    from citrus_edge.calib_data.data_manifest import read_manifest
    from citrus_edge.calib_data.load import load_image
    from citrus_edge.calib_data.phantom_set import write_phantom_set
    from citrus_edge.runtime.pipeline import Pipeline
    from citrus_edge.tasks import SEGMENT_PROMPT

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"bundle": str(args.bundle.resolve()), "device": _device()}
    print(f"device: {json.dumps(report['device'])}", flush=True)
    report["engines"] = _engines(args.bundle, args.target, args.out)
    print(f"engines: {json.dumps(report['engines'])}", flush=True)
    manifest = write_phantom_set(args.out / "phantoms", n=args.n, seed=11)
    records = read_manifest(manifest)[: args.n]
    images = [load_image(r.abs_image(manifest.parent), frame=r.frame).pixels for r in records]
    trt = Pipeline.from_bundle(
        args.bundle,
        backend="tensorrt",
        engines=args.out / "engines",
        max_new_tokens=args.max_new_tokens,
    )
    providers = _ort_providers()
    ref = Pipeline.from_bundle(args.bundle, providers=providers, max_new_tokens=args.max_new_tokens)
    _run(trt, images[:1], SEGMENT_PROMPT)  # warm-up (first-run allocations)
    trt_results, trt_ms = _run(trt, images, SEGMENT_PROMPT)
    ref_results, ref_ms = _run(ref, images, SEGMENT_PROMPT)
    report["latency_ms"] = {
        "tensorrt_p50": statistics.median(trt_ms),
        f"onnxruntime_{providers[0]}_p50": statistics.median(ref_ms),
    }
    report["parity"] = _parity(trt_results, ref_results)
    report["backends"] = {"tensorrt": trt_results[0].backend, "reference": ref_results[0].backend}
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _args(argv)
    try:
        report = check(args)
    except (ValueError, RuntimeError, FileNotFoundError, ImportError) as e:
        print(f"jetson_check: could not run: {e}", file=sys.stderr)
        return 2
    (args.out / "jetson_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    p = report["parity"]
    ok = (p["token_agreement"] or 0) >= args.min_tokens and (
        p["mean_mask_iou"] is None or p["mean_mask_iou"] >= args.min_iou
    )
    print(
        f"parity {'holds' if ok else 'FAILS'} (tokens >= {args.min_tokens}, IoU >= {args.min_iou})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
