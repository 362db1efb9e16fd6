"""Aggregation of `evaluate` on hand-made report answers: count accuracy overall and per count."""

from __future__ import annotations

import dataclasses

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


def test_non_ultrasound_records_are_scored_apart(tmp_path):
    """A non-US record scores only whether the answer is the fixed sentence; it never enters
    Dice or count. An ultrasound record answered with that sentence is a false alarm."""
    from citrus_edge.tasks import NOT_US_ANSWER, SEGMENT_PROMPT

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img.png")
    not_us = [
        dataclasses.replace(_record(i, 0), id=f"n{i}", answer=NOT_US_ANSWER, lesions=())
        for i in range(3)
    ]
    not_us[2] = dataclasses.replace(not_us[2], task="segment", prompt=SEGMENT_PROMPT)
    us = [_record(3, 1), _record(4, 2)]
    texts = iter(
        [
            NOT_US_ANSWER,
            "Sure, it is [SEG].",
            NOT_US_ANSWER,
            NOT_US_ANSWER,
            report_answer([LESION] * 2),
        ]
    )

    def pipeline(rgb, prompt):
        return GroundingResult(text=next(texts), token_ids=[], image_hw=rgb.shape[:2])

    rep = evaluate(pipeline, [*not_us, *us], tmp_path)
    assert rep.not_us_accuracy == pytest.approx(2 / 3)
    assert rep.not_us_false_alarms == pytest.approx(1 / 2)
    assert rep.dice is None  # the non-US segment record has no mask to score
    assert rep.count_accuracy == pytest.approx(1 / 2)  # the two US reports only
    assert rep.count_by_lesions == {"1": 0.0, "2": 1.0}
