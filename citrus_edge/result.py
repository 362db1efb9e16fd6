"""The one result type every backend returns (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RESULT_SCHEMA = 1


@dataclass(frozen=True)
class Box:
    """A box in original-image pixels (x2, y2 exclusive), with its label from the text."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


@dataclass(frozen=True)
class Measurement:
    """Physical size of one mask; only made when the input carried a pixel spacing."""

    area_mm2: float
    longest_diameter_mm: float
    spacing_source: str


@dataclass
class GroundingResult:
    """Text, boxes and masks (original resolution) for one image and prompt.

    `masks[i]` is the mask of the i-th generated `[SEG]` token; `mask_scores[i]` is the predicted
    IoU of the mask kept among SAM2's three. `timings_ms` maps a stage name to milliseconds.
    """

    text: str
    token_ids: list[int]
    boxes: list[Box] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # each [H, W] bool
    mask_scores: list[float] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    image_hw: tuple[int, int] = (0, 0)
    stopped_by: str = "eos"  # "eos" or "max_new_tokens"
    backend: str = "torch"
    bundle_id: str | None = None

    @property
    def n_seg(self) -> int:
        return len(self.masks)
