"""The one result type every backend returns (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# 2: `quality`, `warnings`, `token_logprobs`; `masks[i].predicted_iou`; `measurements[i].mask`
# is the index of the measured mask (a mask that cannot be measured has no entry).
RESULT_SCHEMA = 2


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
    """Physical size of mask `mask`; only made when every pixel of that mask lies where the
    input states a plausible pixel spacing (one calibrated region, or the whole image)."""

    area_mm2: float
    longest_diameter_mm: float
    spacing_source: str
    mask: int  # index into GroundingResult.masks


@dataclass(frozen=True)
class AnswerQuality:
    """How far the answer text can be trusted (see `citrus_edge.quality` for the thresholds).

    `task` is the product task the prompt asks for ("segment", "detect", "report"), None for a
    prompt of no known task; `parses` says whether the answer is in that task's format (None
    when the task is unknown). Log-probabilities are natural logs of the answer tokens (EOS not
    included); None for an empty answer.
    """

    task: str | None
    parses: bool | None
    mean_logprob: float | None
    min_logprob: float | None
    n_tokens: int
    low_confidence: bool


@dataclass(frozen=True)
class InputRecord:
    """Which input a result answers: the file (its path and sha256) and frame, or pixels that
    came from memory (`path` and `sha256` None), so a result can be traced to its image."""

    path: str | None
    sha256: str | None
    frame: int


@dataclass
class GroundingResult:
    """Text, boxes and masks (original resolution) for one image and prompt.

    `masks[i]` is the mask of the i-th generated `[SEG]` token; `mask_scores[i]` is the predicted
    IoU of the mask kept among SAM2's three. `measurements` hold one entry per measurable mask
    (`Measurement.mask` names it). `token_logprobs[i]` is the log-probability of `token_ids[i]`;
    `quality` summarises them with the answer's format check; `warnings` are one-line reasons
    not to trust part of the result (low confidence, an answer off its format, an image that is
    not ultrasound, a mask that could not be measured). `timings_ms` maps a stage name to ms.
    `prompt`, `input`, `bundle_id` and `runtime` trace the result to what produced it.
    """

    text: str
    token_ids: list[int]
    boxes: list[Box] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # each [H, W] bool
    mask_scores: list[float] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    quality: AnswerQuality | None = None  # None only where nobody assessed the answer
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    image_hw: tuple[int, int] = (0, 0)
    stopped_by: str = "eos"  # "eos" or "max_new_tokens"
    backend: str = "torch"
    bundle_id: str | None = None
    prompt: str = ""
    input: InputRecord | None = None
    runtime: dict = field(default_factory=dict)  # the settings it ran with (RuntimeConfig)

    @property
    def n_seg(self) -> int:
        return len(self.masks)
