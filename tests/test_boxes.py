"""Box parsing for both Qwen2.5-VL forms, mapped back to original pixels."""

from __future__ import annotations

import pytest

from citrus_edge.boxes import parse_boxes, parse_boxes_resized


def test_json_form_maps_to_original():
    text = '```json\n[{"bbox_2d": [28, 56, 112, 168], "label": "lesion"}]\n```'
    (box,) = parse_boxes(text, resized_hw=(224, 336), orig_hw=(480, 720))
    assert box.as_list() == pytest.approx([60.0, 120.0, 240.0, 360.0])
    assert box.label == "lesion"


def test_json_two_boxes_without_fence():
    text = '[{"bbox_2d": [0, 0, 10, 20], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]'
    got = parse_boxes_resized(text)
    assert [g[0] for g in got] == [[0, 0, 10, 20], [5, 6, 7, 8]]
    assert [g[1] for g in got] == ["a", "b"]


def test_box_token_form():
    text = "the lesion<|box_start|>(10,20),(30,40)<|box_end|> and <|box_start|>(1, 2), (3, 4)<|box_end|>"
    boxes = parse_boxes(text, resized_hw=(100, 100), orig_hw=(200, 300))
    assert [b.as_list() for b in boxes] == [[30, 40, 90, 80], [3, 4, 9, 8]]


def test_truncated_json_falls_back_to_regex_and_clips():
    text = '```json\n[{"bbox_2d": [10, 10, 500, 60], "label": "lesion"}, {"bbox_2d": [1, 2'
    (box,) = parse_boxes(text, resized_hw=(224, 224), orig_hw=(256, 256))
    assert box.x2 == 256.0 and box.y1 == pytest.approx(10 * 256 / 224)


def test_garbage_gives_no_boxes():
    assert parse_boxes("No focal lesion is seen.", (224, 224), (256, 256)) == []
