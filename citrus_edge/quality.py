"""Quality signals a cart can act on, beside every result (torch-free).

- answer confidence: mean and minimum natural log-probability of the answer tokens, "low
  confidence" below `QualityThresholds` (measured on the phantom eval split, see below);
- format: whether the answer parses in the format of the task its prompt asks for (the product's
  three task prompts of `calib_data.tasks`: detection JSON list, `[SEG]` answer, report); None
  for any other prompt, since the pipeline itself is prompt-agnostic;
- masks: SAM2's predicted IoU of each kept mask, "low predicted IoU" below the threshold;
- the image: "not an ultrasound image" when a DICOM's Modality is not US, and the contradiction
  when the model answers "This is not an ultrasound image." for a DICOM whose Modality is US.

Each concern becomes one line in `GroundingResult.warnings`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from citrus_edge.boxes import detection_list
from citrus_edge.result import AnswerQuality
from citrus_edge.tasks import NOT_US_ANSWER

QUALITY_THRESHOLDS_VERSION = 1

_TASK_FORMAT = {  # the words a "does not parse" warning uses for each task's format
    "segment": "a segmentation answer ([SEG] or no lesion)",
    "detect": "a detection list",
    "report": "a report (lesion count and every field of each lesion)",
}


@dataclass(frozen=True)
class LogprobBounds:
    """An answer is "low confidence" when the mean or the minimum of its answer-token natural
    log-probabilities falls below these."""

    mean: float
    min: float

    def __post_init__(self) -> None:
        if not (self.mean <= 0 and self.min <= 0):
            raise ValueError(f"log-probability bounds must be <= 0, got {self.mean}, {self.min}")


# Measured 2026-12-03 with `scripts/measure_confidence.py` (PyTorch reference, shipped demo model
# stage 10, constrained decoding, default phantom set n600 seed 0, eval split: 180 answers, 60
# per task):
#   task     mean log-prob: min / p1 / p5 / p50          min log-prob: min / p1 / p5 / p50
#   segment  -0.090 / -0.078 / -0.017 / -0.001            -0.538 / -0.466 / -0.100 / -0.008
#   detect   -0.382 / -0.380 / -0.369 / -0.317            -1.998 / -1.990 / -1.971 / -1.850
#   report   -0.262 / -0.262 / -0.255 / -0.218            -2.107 / -2.102 / -2.095 / -1.972
#   all      -0.382 / -0.377 / -0.356 / -0.192            -2.107 / -2.098 / -2.062 / -1.625
#   mask predicted IoU (46 masks): min 0.393, p1 0.398, p5 0.415, p50 0.763
# Each bound is the task's 1st percentile rounded outwards (about 1 in 100 in-distribution
# answers is flagged); prompts of no known task use the bounds of all answers. The tasks differ
# four-fold, so one bound would never flag a segmentation answer: pydicom's ultrasound examples
# get answers of mean -0.69 to -1.92 (all flagged). (Stage 7's bounds, 2026-12-02: segment
# -0.05 / -0.30, detect -0.37 / -1.95, report -0.26 / -2.10, other -0.36 / -2.10, mask IoU
# 0.41; stage 8's, not shipped: segment -0.10 / -0.67, mask IoU 0.37.)
DEMO_LOGPROB_BOUNDS = {
    "segment": LogprobBounds(mean=-0.08, min=-0.47),
    "detect": LogprobBounds(mean=-0.38, min=-2.00),
    "report": LogprobBounds(mean=-0.27, min=-2.11),
}
DEMO_OTHER_BOUNDS = LogprobBounds(mean=-0.38, min=-2.10)
DEMO_MASK_IOU = 0.39  # below every mask of the eval split (min 0.393)


@dataclass(frozen=True)
class QualityThresholds:
    """Below these a result is flagged: answer-token log-probabilities per task (`other` for a
    prompt of no known task) and the kept masks' predicted IoU.

    The defaults belong to the shipped demo model; another model needs its own (measure them
    with scripts/measure_confidence.py on its eval split).
    """

    segment: LogprobBounds = DEMO_LOGPROB_BOUNDS["segment"]
    detect: LogprobBounds = DEMO_LOGPROB_BOUNDS["detect"]
    report: LogprobBounds = DEMO_LOGPROB_BOUNDS["report"]
    other: LogprobBounds = DEMO_OTHER_BOUNDS
    mask_iou: float = DEMO_MASK_IOU
    version: int = QUALITY_THRESHOLDS_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.mask_iou <= 1:
            raise ValueError(f"the mask IoU threshold must lie in [0, 1], got {self.mask_iou}")
        if self.version != QUALITY_THRESHOLDS_VERSION:
            raise ValueError(
                f"quality thresholds version {self.version} is not {QUALITY_THRESHOLDS_VERSION}"
            )

    def for_task(self, task: str | None) -> LogprobBounds:
        """The log-probability bounds of `task` (None: `other`)."""
        return self.other if task is None else getattr(self, task)


DEFAULT_THRESHOLDS = QualityThresholds()


@functools.cache
def _tasks() -> dict[str, str]:
    """Normalised prompt -> task name. calib_data holds the task texts; imported here, on
    first use, so that the shared core does not import a stage when it is imported."""
    from citrus_edge.tasks import PROMPTS

    return {_normalise(prompt): task for task, prompt in PROMPTS.items()}


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def recognise_task(prompt: str) -> str | None:
    """The product task `prompt` asks for (case and spacing ignored), or None."""
    return _tasks().get(_normalise(prompt))


def answer_parses(task: str | None, text: str) -> bool | None:
    """Whether `text` is in the answer format of `task`; None when `task` is None."""
    if task is None:
        return None
    from citrus_edge.tasks import NO_LESION, NOT_US_ANSWER, parse_report

    if _normalise(text) in (_normalise(NO_LESION), _normalise(NOT_US_ANSWER)):
        return True  # the no-lesion and not-ultrasound sentences answer every task
    if task == "segment":
        return "[SEG]" in text
    if task == "detect":
        return detection_list(text) is not None
    if task == "report":
        report = parse_report(text)
        return (
            report is not None
            and report.count is not None
            and report.count == len(report.lesions) > 0
            and all(v is not None for lesion in report.lesions for v in lesion.values())
        )
    raise ValueError(f"unknown task {task!r}; expected one of {tuple(_TASK_FORMAT)}")


def answer_quality(
    text: str,
    prompt: str,
    logprobs: Sequence[float],
    thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
) -> AnswerQuality:
    """Task, format check and log-probability summary of one answer."""
    task = recognise_task(prompt)
    values = [float(v) for v in logprobs]
    mean = math.fsum(values) / len(values) if values else None
    low = min(values) if values else None
    bounds = thresholds.for_task(task)
    flagged = mean is not None and (mean < bounds.mean or low < bounds.min)
    return AnswerQuality(task, answer_parses(task, text), mean, low, len(values), flagged)


def answer_warnings(
    quality: AnswerQuality, stopped_by: str, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
) -> list[str]:
    """One line per reason not to trust the answer text."""
    out = []
    if quality.parses is False:
        out.append(f"answer does not parse as {_TASK_FORMAT[quality.task]}")
    if quality.n_tokens == 0:
        out.append("empty answer: the model stopped before its first token")
    if quality.low_confidence:
        bounds = thresholds.for_task(quality.task)
        out.append(
            f"low confidence: answer-token log-probability mean {quality.mean_logprob:.3f}, "
            f"min {quality.min_logprob:.3f} (flagged below mean {bounds.mean} or min {bounds.min} "
            f"for {quality.task or 'a prompt of no known task'})"
        )
    if stopped_by == "max_new_tokens":
        out.append(f"answer cut off after {quality.n_tokens} tokens (max_new_tokens)")
    return out


def mask_warnings(
    scores: Sequence[float], thresholds: QualityThresholds = DEFAULT_THRESHOLDS
) -> list[str]:
    """A line for each mask whose predicted IoU is below the threshold."""
    return [
        f"masks[{i}]: low predicted IoU {s:.3f} (flagged below {thresholds.mask_iou})"
        for i, s in enumerate(scores)
        if s < thresholds.mask_iou
    ]


# How the warning for a US DICOM whose answer grammar overrode a "not ultrasound" first choice
# begins (scripts and callers match on it).
NOT_US_OVERRIDDEN = "the model's first choice was 'This is not an ultrasound image.'"


def image_warnings(
    modality: str, dicom: bool, answer: str = "", judged_not_us: bool = False
) -> list[str]:
    """The "not an ultrasound image" warning for a DICOM whose Modality is not US (the model was
    made for ultrasound only); for a DICOM that states US but was answered "not an ultrasound
    image" (free-form decoding), or whose answer grammar overrode the model's first choice of
    that sentence (`judged_not_us`), that the two disagree: the image is unlike what the model
    learnt, and the answer is not to be trusted. Nothing for ordinary images and arrays, which
    state no modality."""
    if dicom and modality != "US":
        stated = f"Modality {modality}" if modality else "no Modality"
        return [f"not an ultrasound image: the DICOM states {stated}; the model reads US only"]
    if dicom and answer.strip() == NOT_US_ANSWER:
        return [
            "the model answered that this is not an ultrasound image, but the DICOM states "
            "Modality US: no finding was read from it (the image is unlike what the model "
            "learnt); check it by eye"
        ]
    if dicom and judged_not_us:
        return [
            f"{NOT_US_OVERRIDDEN}, but the DICOM states Modality US: the answer was kept to the task's format and is not to be "
            "trusted (the image is unlike what the model learnt); check it by eye"
        ]
    return []


def assess(
    text: str,
    prompt: str,
    logprobs: Sequence[float],
    stopped_by: str,
    mask_scores: Sequence[float],
    thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
) -> tuple[AnswerQuality, list[str]]:
    """`answer_quality` of one answer and its warnings (answer, then masks)."""
    quality = answer_quality(text, prompt, logprobs, thresholds)
    warnings = answer_warnings(quality, stopped_by, thresholds)
    return quality, warnings + mask_warnings(mask_scores, thresholds)
