"""Aggregation of `evaluate` on hand-made report answers: count accuracy overall and per count."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from citrus_edge.calib_data.data_manifest import Record
from citrus_edge.cli.evaluate import evaluate
from citrus_edge.result import GroundingResult
from citrus_edge.tasks import REPORT_PROMPT, report_answer

LESION = dict(
    echogenicity="hypoechoic",
    location="upper left",
    margin="circumscribed",
    size_mm=9,
    posterior="none",
)


def _record(i: int, n: int) -> Record:
    return Record(
        id=f"r{i}",
        image="img.png",
        frame=0,
        task="report",
        prompt=REPORT_PROMPT,
        answer=report_answer([LESION] * n),
        masks=(),
        boxes=(),
        lesions=tuple([LESION] * n),
        split="eval",
        spacing_mm=0.2,
    )


def test_count_accuracy_overall_and_by_true_count(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    truth = [0, 1, 2, 2, 3]
    said = [0, 1, 2, 1, 2]  # one two-lesion image and the three-lesion image under-counted
    records = [_record(i, n) for i, n in enumerate(truth)]
    texts = iter(report_answer([LESION] * n) for n in said)

    def pipeline(rgb, prompt):
        return GroundingResult(text=next(texts), token_ids=[], image_hw=rgb.shape[:2])

    report = evaluate(pipeline, records, tmp_path)
    assert report.count_accuracy == pytest.approx(3 / 5)
    assert report.count_by_lesions == {"0": 1.0, "1": 1.0, "2": 0.5, "3": 0.0}
    assert [s.count_true for s in report.samples] == truth
    assert [s.count_pred for s in report.samples] == said
    # Every lesion described with the right fields: the under-counted reports miss the rest.
    assert report.field_accuracy["echogenicity"] == pytest.approx((1 + 1 + 0.5 + 2 / 3) / 4)
