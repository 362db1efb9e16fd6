"""Evaluate any backend on a manifest with the seed's metrics (torch-free).

`evaluate` takes a callable `(rgb, prompt) -> GroundingResult`, so the PyTorch reference, the
ONNX Runtime pipeline and TensorRT engines are scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from citrus_edge.atomic import write_json_atomic
from citrus_edge.calib_data.data_manifest import Record
from citrus_edge.calib_data.load import load_image
from citrus_edge.metrics import dice, precision_at_1
from citrus_edge.result import GroundingResult
from citrus_edge.tasks import NOT_US_ANSWER, REPORT_FIELDS, parse_report

Pipeline = Callable[[np.ndarray, str], GroundingResult]


@dataclass
class SampleScore:
    """Scores of one record; a metric that does not apply to the task is None."""

    id: str
    task: str
    text: str
    dice: float | None = None
    precision_at_1: float | None = None
    count_correct: float | None = None
    count_true: int | None = None  # report tasks: lesions in the ground truth
    count_pred: int | None = None  # report tasks: the count the text states (None: none stated)
    fields_correct: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    # Records of a non-ultrasound image (answer `NOT_US_ANSWER`): 1.0 when the answer is that
    # sentence; their other metrics stay None (no lesion to score, no mask for Dice).
    not_us_correct: float | None = None
    # Ultrasound records: 1.0 when the model answered the not-ultrasound sentence anyway.
    not_us_false_alarm: float | None = None


@dataclass
class EvalReport:
    """Means over the records that each metric applies to, plus every sample's scores."""

    n: int
    dice: float | None
    precision_at_1: float | None
    count_accuracy: float | None
    # Count accuracy per true lesion count ("0", "1", ...): where the errors are.
    count_by_lesions: dict[str, float]
    field_accuracy: dict[str, float]
    report_field_accuracy: float | None
    samples: list[SampleScore]
    not_us_accuracy: float | None = None  # over the non-ultrasound records (None: there were none)
    not_us_false_alarms: float | None = None  # share of ultrasound records answered "not US"

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d

    def save(self, path: Path) -> None:
        """JSON with the summary and per-sample scores, written atomically."""
        data = {"summary": self.summary(), "samples": [asdict(s) for s in self.samples]}
        write_json_atomic(path, data, indent=None)


def union_mask(record: Record, manifest_dir: Path, hw: tuple[int, int]) -> np.ndarray:
    """Ground truth of a segmentation answer: the union of every lesion's mask."""
    gt = np.zeros(hw, dtype=bool)
    for p in record.abs_masks(manifest_dir):
        gt |= np.asarray(Image.open(p)) > 127
    return gt


def score(record: Record, result: GroundingResult, manifest_dir: Path) -> SampleScore:
    """Score one pipeline result against its record."""
    s = SampleScore(record.id, record.task, result.text, token_ids=list(result.token_ids))
    said_not_us = float(result.text.strip() == NOT_US_ANSWER)
    if record.answer == NOT_US_ANSWER:
        s.not_us_correct = said_not_us
        return s
    s.not_us_false_alarm = said_not_us
    if record.task == "segment":
        pred = result.masks[0] if result.masks else np.zeros(result.image_hw, dtype=bool)
        s.dice = dice(pred, union_mask(record, manifest_dir, result.image_hw))
    elif record.task == "detect":
        s.precision_at_1 = precision_at_1(
            [b.as_list() for b in result.boxes], [list(b) for b in record.boxes]
        )
    else:
        parsed = parse_report(result.text)
        truth = list(record.lesions)
        s.count_true, s.count_pred = len(truth), parsed.count if parsed else None
        s.count_correct = float(parsed is not None and parsed.count == len(truth))
        for f in REPORT_FIELDS:
            if not truth:
                continue
            pred = list(parsed.lesions) if parsed else []
            hits = [
                str(pred[i].get(f)) == str(t.get(f)) if i < len(pred) else False
                for i, t in enumerate(truth)
            ]
            s.fields_correct[f] = float(np.mean(hits))
    return s


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(
    pipeline: Pipeline,
    records: list[Record],
    manifest_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Run `pipeline` on every record and aggregate Dice, Precision@1, count and field accuracy."""
    samples = []
    for i, rec in enumerate(records):
        img = load_image(rec.abs_image(manifest_dir), frame=rec.frame)
        samples.append(score(rec, pipeline(img.pixels, rec.prompt), manifest_dir))
        if progress is not None:
            progress(i + 1)
    fields = {
        f: _mean(s.fields_correct.get(f) for s in samples if s.task == "report")
        for f in REPORT_FIELDS
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    by_count = {}
    for n in sorted({s.count_true for s in samples if s.count_true is not None}):
        by_count[str(n)] = _mean(s.count_correct for s in samples if s.count_true == n)
    return EvalReport(
        n=len(samples),
        dice=_mean(s.dice for s in samples),
        precision_at_1=_mean(s.precision_at_1 for s in samples),
        count_accuracy=_mean(s.count_correct for s in samples),
        count_by_lesions=by_count,
        field_accuracy=fields,
        report_field_accuracy=_mean(fields.values()) if fields else None,
        samples=samples,
        not_us_accuracy=_mean(s.not_us_correct for s in samples),
        not_us_false_alarms=_mean(s.not_us_false_alarm for s in samples),
    )
