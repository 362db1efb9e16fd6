"""Metrics on hand-made cases."""

import numpy as np
import pytest

from citrus_edge.metrics import (
    box_iou,
    dice,
    field_accuracy,
    mask_iou,
    precision_at_1,
    token_agreement,
)


def test_dice_hand_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[0, :2] = True  # 2 px
    assert dice(a, b) == 0.0
    b[0, 1:4] = True  # 3 px, overlap 1
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert mask_iou(a, b) == pytest.approx(1 / 4)


def test_box_iou_and_precision():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert precision_at_1([[21, 21, 30, 30], [0, 0, 10, 10]], gt) == 1.0
    assert precision_at_1([[5, 0, 15, 10]], gt) == 0.0
    assert precision_at_1([], gt) == 0.0
    assert precision_at_1([], []) == 1.0
    assert precision_at_1([[0, 0, 1, 1]], []) == 0.0


def test_field_accuracy():
    fields = ("echogenicity", "size_mm")
    truth = [
        {"echogenicity": "hypoechoic", "size_mm": 12},
        {"echogenicity": "anechoic", "size_mm": 7},
    ]
    pred = [{"echogenicity": "hypoechoic", "size_mm": 11}]
    assert field_accuracy(pred, truth, fields) == pytest.approx(1 / 4)
    assert field_accuracy(None, truth, fields) == 0.0
    assert field_accuracy([], [], fields) == 1.0
    assert field_accuracy(None, [], fields) == 0.0


def test_token_agreement():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3], [1, 5, 3, 4]) == pytest.approx(2 / 4)
