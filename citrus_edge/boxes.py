"""Parse the two box forms Qwen2.5-VL emits and map them back to original pixels (torch-free)."""

from __future__ import annotations

import json
import math
import re

from citrus_edge.result import Box

_JSON_BLOCK = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_BBOX_2D = re.compile(r'"bbox_2d"\s*:\s*\[([^\]]*)\](?:[^{}]*?"label"\s*:\s*"([^"]*)")?')
_BOX_TOKENS = re.compile(
    r"<\|box_start\|>\s*\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>"
)


def _from_json(text: str) -> list[tuple[list[float], str]] | None:
    m = _JSON_BLOCK.search(text)
    try:
        items = json.loads(m.group(1) if m else text)
    except (json.JSONDecodeError, TypeError):
        return None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return None
    out = []
    for it in items:
        if isinstance(it, dict) and isinstance(it.get("bbox_2d"), list) and len(it["bbox_2d"]) == 4:
            try:
                out.append(([float(v) for v in it["bbox_2d"]], str(it.get("label", ""))))
            except (TypeError, ValueError):
                continue
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def detection_list(text: str) -> list[tuple[list[float], str]] | None:
    """The boxes of an answer that is exactly a detection list, else None.

    Strict, unlike `parse_boxes_resized`: the (optionally fenced) JSON must parse and be a
    non-empty list of objects (or one object) whose every `bbox_2d` holds 4 numbers.
    """
    m = _JSON_BLOCK.search(text)
    try:
        items = json.loads(m.group(1) if m else text)
    except (json.JSONDecodeError, TypeError):
        return None
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not items:
        return None
    out = []
    for it in items:
        box = it.get("bbox_2d") if isinstance(it, dict) else None
        if not isinstance(box, list) or len(box) != 4:
            return None
        if not all(_is_number(v) for v in box):
            return None
        out.append(([float(v) for v in box], str(it.get("label", ""))))
    return out


def _from_regex(text: str) -> list[tuple[list[float], str]]:
    """Tolerant fallback for JSON that does not parse (e.g. cut off by max-new-tokens)."""
    out = []
    for m in _BBOX_2D.finditer(text):
        try:
            vals = [float(v) for v in m.group(1).split(",")]
        except ValueError:
            continue
        if len(vals) == 4:
            out.append((vals, m.group(2) or ""))
    return out


def parse_boxes_resized(text: str) -> list[tuple[list[float], str]]:
    """Boxes as the model wrote them (resized-input pixels), JSON `bbox_2d` and box tokens."""
    found = _from_json(text)
    if found is None:
        found = _from_regex(text)
    for m in _BOX_TOKENS.finditer(text):
        found.append(([float(v) for v in m.groups()], ""))
    return found


def map_box(
    box: list[float], resized_hw: tuple[int, int], orig_hw: tuple[int, int], label: str = ""
) -> Box:
    """Scale a box from resized-input pixels to original pixels, clipped to the image."""
    sy, sx = orig_hw[0] / resized_hw[0], orig_hw[1] / resized_hw[1]
    x1, y1, x2, y2 = box
    if x2 < x1:
        x1, x2 = x2, x1
    if y2 < y1:
        y1, y2 = y2, y1

    def clip(v: float, hi: int) -> float:
        return float(min(max(v, 0.0), hi))

    return Box(
        clip(x1 * sx, orig_hw[1]),
        clip(y1 * sy, orig_hw[0]),
        clip(x2 * sx, orig_hw[1]),
        clip(y2 * sy, orig_hw[0]),
        label,
    )


def parse_boxes(text: str, resized_hw: tuple[int, int], orig_hw: tuple[int, int]) -> list[Box]:
    """All boxes in `text`, mapped from resized-input pixels to original-image pixels."""
    return [map_box(b, resized_hw, orig_hw, lab) for b, lab in parse_boxes_resized(text)]
