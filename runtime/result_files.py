"""Result files: JSON (masks as COCO-style uncompressed RLE) and a PNG overlay, written atomically.

RLE follows COCO's uncompressed form: `{"size": [H, W], "counts": [...]}`, run lengths over the
mask read in column-major (Fortran) order, starting with a run of zeros (0 when the first pixel is
set). `decode_rle(encode_rle(m))` gives `m` back exactly.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from citrus_edge.atomic import atomic_path, write_json_atomic
from citrus_edge.result import RESULT_SCHEMA, AnswerQuality, GroundingResult

OVERLAY_ALPHA = 0.45
PALETTE = (  # RGB, one per mask / box in order
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a [H, W] bool mask (column-major runs, zeros first)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {mask.shape}")
    flat = mask.ravel(order="F")  # [H*W] column-major
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist() if flat.size else []
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The [H, W] bool mask of a COCO uncompressed RLE; raises ValueError on a malformed one."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, the size {h}x{w} needs {h * w}")
    values = np.arange(len(counts)) % 2 == 1  # zeros, ones, zeros, ...
    return np.repeat(values, counts).reshape((h, w), order="F")


def quality_to_dict(quality: AnswerQuality | None) -> dict[str, Any] | None:
    """JSON-ready `AnswerQuality` (None when the answer was not assessed)."""
    if quality is None:
        return None
    return {
        "task": quality.task,
        "answer_parses": quality.parses,
        "mean_logprob": quality.mean_logprob,
        "min_logprob": quality.min_logprob,
        "n_tokens": quality.n_tokens,
        "low_confidence": quality.low_confidence,
    }


def result_to_dict(result: GroundingResult) -> dict[str, Any]:
    """JSON-ready content of a result (schema `RESULT_SCHEMA`).

    `input` (path, sha256, frame; path and sha256 null for in-memory pixels), `prompt`,
    `bundle_id` and `runtime` (the runtime settings) trace the result to what produced it.
    `masks[i].predicted_iou` is SAM2's predicted IoU of the kept mask (schema 1 called it
    `score`). `measurements[j].mask` is the index of the measured mask: a
    measurement exists only for a mask lying wholly where the image states a plausible pixel
    spacing, so without one the list is empty and no mm value appears anywhere; `warnings`
    says why each missing one is missing. `quality` holds the answer's task, format check and
    token log-probability summary (`token_logprobs` one per `token_ids`).
    """
    source = result.input
    return {
        "schema": RESULT_SCHEMA,
        "input": None if source is None else asdict(source),
        "prompt": result.prompt,
        "bundle_id": result.bundle_id,
        "backend": result.backend,
        "runtime": dict(result.runtime),
        "image_hw": list(result.image_hw),
        "text": result.text,
        "token_ids": list(result.token_ids),
        "token_logprobs": [float(v) for v in result.token_logprobs],
        "stopped_by": result.stopped_by,
        "quality": quality_to_dict(result.quality),
        "warnings": list(result.warnings),
        "boxes": [{"bbox": [b.x1, b.y1, b.x2, b.y2], "label": b.label} for b in result.boxes],
        "masks": [
            {
                **encode_rle(m),
                "predicted_iou": float(s),
                "area_px": int(np.count_nonzero(m)),
            }
            for m, s in zip(result.masks, result.mask_scores, strict=True)
        ],
        "measurements": [
            {
                "mask": m.mask,
                "area_mm2": m.area_mm2,
                "longest_diameter_mm": m.longest_diameter_mm,
                "spacing_source": m.spacing_source,
            }
            for m in result.measurements
        ],
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
    }


def write_json(result: GroundingResult, path: str | os.PathLike) -> Path:
    """Write `result_to_dict(result)` as JSON at `path`, atomically."""
    return write_json_atomic(path, result_to_dict(result), indent=1)


def render_overlay(rgb: np.ndarray, result: GroundingResult) -> Image.Image:
    """The image with each mask tinted (translucent colour) and each box outlined + labelled."""
    base = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGBA")
    layer = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)  # [H, W, RGBA]
    for i, mask in enumerate(result.masks):
        layer[mask] = (*PALETTE[i % len(PALETTE)], round(255 * OVERLAY_ALPHA))
    image = Image.alpha_composite(base, Image.fromarray(layer, "RGBA")).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i, box in enumerate(result.boxes):
        colour = PALETTE[i % len(PALETTE)]
        x2, y2 = max(box.x1, box.x2 - 1), max(box.y1, box.y2 - 1)  # x2, y2 are exclusive
        draw.rectangle([box.x1, box.y1, x2, y2], outline=colour, width=2)
        if box.label:
            draw.text((box.x1 + 2, box.y1 + 2), box.label, fill=colour)
    return image


def write_overlay(rgb: np.ndarray, result: GroundingResult, path: str | os.PathLike) -> Path:
    """Write `render_overlay(rgb, result)` as a PNG at `path`, atomically."""
    image = render_overlay(rgb, result)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
