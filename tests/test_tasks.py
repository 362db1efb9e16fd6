"""Task texts: exact strings, box resizing, answer -> parse round trips."""

from __future__ import annotations

import json

import pytest

from citrus_edge.tasks import (
    DETECT_PROMPT,
    NO_LESION,
    REPORT_FIELDS,
    REPORT_PROMPT,
    SEGMENT_PROMPT,
    TASKS,
    ParsedReport,
    detect_answer,
    parse_boxes,
    parse_count,
    parse_report,
    report_answer,
    resize_box,
    segment_answer,
)

LESION_A = {
    "echogenicity": "hypoechoic",
    "location": "upper left",
    "margin": "circumscribed",
    "size_mm": 12,
    "posterior": "shadowing",
}
LESION_B = {
    "echogenicity": "hyperechoic",
    "location": "lower right",
    "margin": "irregular",
    "size_mm": 7,
    "posterior": "none",
}


def test_constants_are_exact():
    assert SEGMENT_PROMPT == "Please help segment the lesion in this scan."
    assert DETECT_PROMPT == "Locate the lesion, output its bbox coordinates using JSON format."
    assert REPORT_PROMPT == "Describe the findings in this scan."
    assert NO_LESION == "No focal lesion is seen."
    assert TASKS == ("segment", "detect", "report")
    assert REPORT_FIELDS == ("echogenicity", "location", "margin", "size_mm", "posterior")


def test_segment_answer():
    assert segment_answer(0) == NO_LESION
    assert segment_answer(1) == segment_answer(3) == "Sure, it is [SEG]."


def test_detect_answer_format_and_parse():
    assert detect_answer([]) == NO_LESION
    text = detect_answer([(8, 12, 40, 64), (100, 4, 148, 52)])
    assert text == (
        '```json\n[{"bbox_2d": [8, 12, 40, 64], "label": "lesion"}, '
        '{"bbox_2d": [100, 4, 148, 52], "label": "lesion"}]\n```'
    )
    assert json.loads(text.split("\n")[1])[1]["bbox_2d"] == [100, 4, 148, 52]
    assert parse_boxes(text) == [(8, 12, 40, 64), (100, 4, 148, 52)]
    assert parse_boxes(NO_LESION) == []
    assert parse_boxes("I cannot tell") is None


@pytest.mark.parametrize(
    "box, orig_hw, resized_hw, expected",
    [
        # x scale 392/500 = 0.784, y scale 224/300 = 0.7467, each rounded to a multiple of 4
        ((100, 50, 260, 170), (300, 500), (224, 392), (80, 36, 204, 128)),
        ((0, 0, 500, 300), (300, 500), (224, 392), (0, 0, 392, 224)),  # whole image
        ((10, 20, 30, 40), (480, 256), (448, 252), (8, 20, 28, 36)),  # tall image
        (
            (255, 255, 256, 256),
            (256, 256),
            (224, 224),
            (220, 220, 224, 224),
        ),  # collapses: kept 1 bin
        ((0, 0, 1, 1), (256, 256), (224, 224), (0, 0, 4, 4)),
    ],
)
def test_resize_box_non_square(box, orig_hw, resized_hw, expected):
    out = resize_box(box, orig_hw, resized_hw)
    assert out == expected
    assert all(v % 4 == 0 for v in out[:2]) and out[2] <= resized_hw[1] and out[3] <= resized_hw[0]


def test_resize_box_rounds_half_up_and_other_bins():
    # 2 * 224 / 256 = 1.75 -> 2 (bin 2); 6 * 0.875 = 5.25 -> 6 with bin 2, 4 with bin 4
    assert resize_box((2, 6, 200, 200), (256, 256), (224, 224), bin=2) == (2, 6, 176, 176)
    assert resize_box((2, 6, 200, 200), (256, 256), (224, 224)) == (0, 4, 176, 176)
    # 16 -> 14 exactly halfway between 12 and 16 rounds up to 16
    assert resize_box((16, 16, 32, 32), (256, 256), (224, 224))[:2] == (16, 16)


def test_report_answer_exact_text():
    assert report_answer([]) == NO_LESION
    assert report_answer([LESION_A]) == (
        "1 lesion. Lesion 1: hypoechoic, upper left, circumscribed, 12 mm, posterior shadowing."
    )
    assert report_answer([LESION_A, {**LESION_B, "posterior": "enhancement"}]) == (
        "2 lesions. Lesion 1: hypoechoic, upper left, circumscribed, 12 mm, posterior shadowing. "
        "Lesion 2: hyperechoic, lower right, irregular, 7 mm, posterior enhancement."
    )
    assert report_answer([LESION_B]).endswith("7 mm, no posterior feature.")


@pytest.mark.parametrize("lesions", [[], [LESION_A], [LESION_A, LESION_B], [LESION_B] * 3])
def test_report_round_trip(lesions):
    text = report_answer(lesions)
    parsed = parse_report(text)
    assert parsed == ParsedReport(len(lesions), tuple(lesions))
    assert parse_count(text) == len(lesions)


def test_parse_count_variants():
    assert parse_count(NO_LESION) == 0
    assert parse_count("no lesions seen") == 0
    assert parse_count("There are two lesions.") == 2
    assert parse_count("3 lesions. Lesion 1: ...") == 3
    assert parse_count("Sure, it is [SEG].") is None
    assert parse_count("") is None


def test_parse_report_garbage_and_partial():
    assert parse_report("the weather is nice") is None
    assert parse_report("") is None
    partial = parse_report("2 lesions. Lesion 1: hypoechoic, 9 mm. Lesion 2: banana")
    assert partial.count == 2 and len(partial.lesions) == 2
    assert partial.lesions[0] == {
        "echogenicity": "hypoechoic",
        "location": None,
        "margin": None,
        "size_mm": 9,
        "posterior": None,
    }
    assert set(partial.lesions[1].values()) == {None}
    no_count = parse_report(
        "Lesion 1: anechoic, lower left, circumscribed, 5 mm, posterior enhancement."
    )
    assert no_count.count is None and no_count.lesions[0]["posterior"] == "enhancement"
