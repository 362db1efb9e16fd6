"""Prompt and answer texts of the three grounding tasks, and parsers for model outputs.

Other stages compare model outputs against these exact strings, so they are constants here:
- segment: one "[SEG]" token whose ground-truth mask is the union of all lesions;
- detect: Qwen2.5-VL style JSON boxes in resized-input pixels, each coordinate rounded to a
  multiple of `bin` (4 by default);
- report: "N lesion(s). Lesion 1: <echogenicity>, <location>, <margin>, <size> mm, <posterior>."
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SEGMENT_PROMPT = "Please help segment the lesion in this scan."
DETECT_PROMPT = "Locate the lesion, output its bbox coordinates using JSON format."
REPORT_PROMPT = "Describe the findings in this scan."
NO_LESION = "No focal lesion is seen."
# Every task's answer for an image that is not ultrasound (the demo model learns it in stage 8).
NOT_US_ANSWER = "This is not an ultrasound image."
SEGMENT_ANSWER = "Sure, it is [SEG]."
TASKS = ("segment", "detect", "report")
PROMPTS = {"segment": SEGMENT_PROMPT, "detect": DETECT_PROMPT, "report": REPORT_PROMPT}

REPORT_FIELDS = ("echogenicity", "location", "margin", "size_mm", "posterior")
REPORT_VOCABULARY = {
    "echogenicity": ("anechoic", "hypoechoic", "isoechoic", "hyperechoic"),
    "location": ("upper left", "upper right", "lower left", "lower right"),
    "margin": ("circumscribed", "irregular"),
}
# Lesion.posterior value -> report phrase.
POSTERIOR_PHRASES = {
    "shadowing": "posterior shadowing",
    "enhancement": "posterior enhancement",
    "none": "no posterior feature",
}
_NUMBER_WORDS = {"no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}

Box = tuple[int, int, int, int]


def segment_answer(n_lesions: int) -> str:
    """'Sure, it is [SEG].' when any lesion is present (one mask: their union), else NO_LESION."""
    return SEGMENT_ANSWER if n_lesions > 0 else NO_LESION


def resize_box(
    box: Sequence[int], orig_hw: tuple[int, int], resized_hw: tuple[int, int], bin: int = 4
) -> Box:
    """Scale an original-pixel box (x2/y2 exclusive) to the resized model input.

    Each coordinate is rounded half up to the nearest multiple of `bin` and clipped to the
    resized size; a box that would collapse keeps a width/height of one `bin`.
    """
    (oh, ow), (rh, rw) = orig_hw, resized_hw
    x1, x2 = _binned(box[0] * rw / ow, bin, rw), _binned(box[2] * rw / ow, bin, rw)
    y1, y2 = _binned(box[1] * rh / oh, bin, rh), _binned(box[3] * rh / oh, bin, rh)
    x1, x2 = _non_empty(x1, x2, bin, rw)
    y1, y2 = _non_empty(y1, y2, bin, rh)
    return x1, y1, x2, y2


def _binned(value: float, bin: int, limit: int) -> int:
    return min(max(int(math.floor(value / bin + 0.5)) * bin, 0), limit)


def _non_empty(lo: int, hi: int, bin: int, limit: int) -> tuple[int, int]:
    if hi > lo:
        return lo, hi
    return (lo, min(lo + bin, limit)) if lo + bin <= limit else (max(hi - bin, 0), hi)


def detect_answer(boxes_resized: Sequence[Sequence[int]]) -> str:
    """A fenced JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": "lesion"}, or NO_LESION."""
    if not boxes_resized:
        return NO_LESION
    items = [{"bbox_2d": [int(v) for v in box], "label": "lesion"} for box in boxes_resized]
    return f"```json\n{json.dumps(items)}\n```"


def parse_boxes(text: str) -> list[Box] | None:
    """Boxes from a detection answer; [] for NO_LESION, None when nothing parses."""
    if NO_LESION.lower() in text.lower():
        return []
    found = re.findall(
        r'"bbox_2d"\s*:\s*\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)', text
    )
    return [tuple(int(v) for v in f) for f in found] if found else None  # type: ignore[misc]


def report_answer(lesions: Sequence[object]) -> str:
    """'N lesion(s). Lesion 1: ..., ... Lesion N: ....' or NO_LESION.

    `lesions` are `phantom.Lesion`s or mappings with the REPORT_FIELDS keys; posterior is
    'shadowing' | 'enhancement' | 'none'.
    """
    if not lesions:
        return NO_LESION
    n = len(lesions)
    parts = [f"{n} lesion{'s' if n > 1 else ''}."]
    for i, lesion in enumerate(lesions, 1):
        get = lesion.get if isinstance(lesion, Mapping) else lambda k, les=lesion: getattr(les, k)
        parts.append(
            f"Lesion {i}: {get('echogenicity')}, {get('location')}, {get('margin')}, "
            f"{int(get('size_mm'))} mm, {POSTERIOR_PHRASES[get('posterior')]}."
        )
    return " ".join(parts)


@dataclass(frozen=True)
class ParsedReport:
    """A parsed report: the stated count and one dict per described lesion.

    Each lesion dict has every REPORT_FIELDS key; a field the text did not state is None.
    `count` is None when the text states no count but describes lesions.
    """

    count: int | None
    lesions: tuple[dict, ...]


def parse_count(text: str) -> int | None:
    """The lesion count a report or answer states (NO_LESION -> 0), or None."""
    lowered = text.strip().lower()
    if NO_LESION.lower() in lowered or re.search(r"\bno (focal )?lesions?\b", lowered):
        return 0
    match = re.search(r"\b(\d+|no|one|two|three|four|five)\s+lesions?\b", lowered)
    if match is None:
        return None
    word = match.group(1)
    return int(word) if word.isdigit() else _NUMBER_WORDS[word]


def parse_report(text: str) -> ParsedReport | None:
    """Parse a report answer; None when it states neither a count nor any lesion."""
    count = parse_count(text)
    segments = re.split(r"\blesion\s+\d+\s*:", text, flags=re.IGNORECASE)[1:]
    lesions = tuple(_parse_fields(seg) for seg in segments)
    if count is None and not lesions:
        return None
    return ParsedReport(count, lesions)


def _parse_fields(segment: str) -> dict:
    lowered = segment.lower()
    fields: dict = {}
    for key, words in REPORT_VOCABULARY.items():
        # Longest match first, so "hypoechoic" never matches inside another word.
        hits = [w for w in sorted(words, key=len, reverse=True) if re.search(rf"\b{w}\b", lowered)]
        fields[key] = hits[0] if hits else None
    size = re.search(r"(\d+(?:\.\d+)?)\s*mm\b", lowered)
    fields["size_mm"] = int(round(float(size.group(1)))) if size else None
    posterior = [k for k, phrase in POSTERIOR_PHRASES.items() if phrase in lowered]
    fields["posterior"] = posterior[0] if posterior else None
    return {k: fields[k] for k in REPORT_FIELDS}
