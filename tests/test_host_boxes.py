"""Box parsing by hand, the cases tests/test_boxes.py leaves open: the strict detection-list
check the quality signals use, JSON that the tolerant regex would read differently, items the
parser must skip, and the mapping to original pixels (swapped corners, clipping per axis)."""

from __future__ import annotations

import pytest

from citrus_edge.boxes import detection_list, map_box, parse_boxes, parse_boxes_resized


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "lesion"}]\n```',
            [([1.0, 2.0, 30.0, 40.0], "lesion")],
        ),
        ('{"bbox_2d": [0, 0.5, 7, 8]}', [([0.0, 0.5, 7.0, 8.0], "")]),  # one object, no label
        (
            '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": 9}]',
            [([1.0, 2.0, 3.0, 4.0], "a"), ([5.0, 6.0, 7.0, 8.0], "9")],
        ),
    ],
)
def test_detection_list_accepts_exact_lists(text, expected):
    assert detection_list(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "No focal lesion is seen.",  # not JSON
        "[]",  # empty: not a detection list
        '"bbox_2d"',  # JSON, but a string
        '[{"bbox_2d": [1, 2, 3]}]',  # three numbers
        '[{"bbox_2d": [1, 2, 3, 4, 5]}]',  # five
        '[{"bbox_2d": [1, 2, 3, 4]}, {"box": [1, 2, 3, 4]}]',  # one item without bbox_2d
        '[{"bbox_2d": [1, 2, 3, 4]}, [1, 2, 3, 4]]',  # one item not an object
        '[{"bbox_2d": [1, true, 3, 4]}]',  # a bool is no coordinate
        '[{"bbox_2d": [1, "2", 3, 4]}]',  # nor a string
        '[{"bbox_2d": [1, NaN, 3, 4]}]',  # nor NaN (Python's json reads it)
        '[{"bbox_2d": [1, 2, Infinity, 4]}]',
        '[{"bbox_2d": "1, 2, 3, 4"}]',
        '```json\n[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6\n```',  # cut off
    ],
)
def test_detection_list_refuses_anything_else(text):
    assert detection_list(text) is None


def test_json_is_read_as_json_not_by_the_fallback_regex():
    """The label before the box, as JSON allows: the regex fallback would lose it."""
    text = (
        '[{"label": "cyst", "bbox_2d": [10, 20, 30, 40]}, {"label": "b", "bbox_2d": [1, 2, 3, 4]}]'
    )
    assert parse_boxes_resized(text) == [([10.0, 20.0, 30.0, 40.0], "cyst"), ([1, 2, 3, 4], "b")]


def test_json_items_that_are_not_boxes_are_skipped():
    text = (
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, null, 3, 4]}, '
        '{"bbox_2d": [1, "x", 3, 4]}, {"bbox_2d": [1, 2, 3]}, "text", {"label": "none"}]'
    )
    assert parse_boxes_resized(text) == [([1.0, 2.0, 3.0, 4.0], "a")]
    assert parse_boxes_resized('{"bbox_2d": [5, 6, 7, 8], "label": "one"}') == [
        ([5.0, 6.0, 7.0, 8.0], "one")
    ]
    assert parse_boxes_resized("42") == []  # JSON, but neither a list nor an object


def test_regex_fallback_skips_what_is_not_four_numbers():
    text = (
        '[{"bbox_2d": [1, 2, 3], "label": "three"}, {"bbox_2d": [1, 2, x, 4], "label": "bad"}, '
        '{"bbox_2d": [5, 6, 7, 8], "label": "ok"}, {"bbox_2d": [9, 9, 9, 9]'
    )
    assert parse_boxes_resized(text) == [([5.0, 6.0, 7.0, 8.0], "ok"), ([9.0] * 4, "")]


def test_json_boxes_and_box_tokens_together():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}] and <|box_start|>(5,6),(7,8)<|box_end|>'
    assert parse_boxes_resized(text) == [([1.0, 2.0, 3.0, 4.0], "a"), ([5.0, 6.0, 7.0, 8.0], "")]


def test_map_box_scales_each_axis_and_orders_corners():
    """Resized 100 x 200 (h x w) -> original 300 x 800: y x3, x x4; corners given swapped."""
    box = map_box([150.0, 80.0, 50.0, 20.0], (100, 200), (300, 800), "l")
    assert box.as_list() == [200.0, 60.0, 600.0, 240.0] and box.label == "l"


def test_map_box_clips_each_coordinate_to_its_own_axis():
    """Original 300 x 800 (h x w): x clips to [0, 800], y to [0, 300], independently."""
    box = map_box([-10.0, -5.0, 250.0, 120.0], (100, 200), (300, 800))
    assert box.as_list() == [0.0, 0.0, 800.0, 300.0]
    below = map_box([10.0, 150.0, 20.0, 160.0], (100, 200), (300, 800))  # past the bottom
    assert below.as_list() == [40.0, 300.0, 80.0, 300.0]
    right = map_box([250.0, 10.0, 260.0, 20.0], (100, 200), (300, 800))  # past the right edge
    assert right.as_list() == [800.0, 30.0, 800.0, 60.0]
    inside = map_box([0.5, 0.25, 1.0, 2.0], (100, 200), (300, 800))
    assert inside.as_list() == [2.0, 0.75, 4.0, 6.0]


def test_parse_boxes_maps_every_form():
    text = '[{"bbox_2d": [10, 10, 20, 20], "label": "a"}]<|box_start|>(0,0),(50,25)<|box_end|>'
    boxes = parse_boxes(text, (50, 100), (100, 100))
    assert [b.as_list() for b in boxes] == [[10, 20, 20, 40], [0, 0, 50, 50]]
    assert [b.label for b in boxes] == ["a", ""]
