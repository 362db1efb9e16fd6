"""Property-based fuzzing of the DICOM loader and the runtime's entry point on real ultrasound
files (pydicom's examples) with damaged bytes: truncations, bit flips in the header, rewritten
element lengths, PixelData shorter than declared.

Property: the loader returns a correct image (RGB uint8 [Rows, Columns, 3]) or raises one of
the project's typed errors, never another exception and never a hang; the runtime returns a
result for the image it loaded or raises a typed error. Examples are derandomized and bounded
(count and seconds) so `make test` stays within its budget.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from pydicom import examples

from citrus_edge.calib_data.load import load_image

# Real ultrasound: palette colour with region calibration (uncompressed), RGB, and a 30-frame
# YBR JPEG cine with regions.
SOURCES = ("palette_color", "rgb_color", "ybr_color")
SECONDS_PER_EXAMPLE = 20


@functools.cache
def source_bytes(name: str) -> bytes:
    return Path(examples.get_path(name)).read_bytes()


@functools.cache
def pixel_data_offset(name: str) -> int:
    """Byte offset of the PixelData element's tag in the file (the header ends there)."""
    data = source_bytes(name)
    offset = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010), little endian
    assert offset > 0, name
    return offset


def is_typed(e: BaseException) -> bool:
    """One of the project's typed errors: defined in citrus_edge, a ValueError or RuntimeError."""
    return type(e).__module__.startswith("citrus_edge.") and isinstance(
        e, ValueError | RuntimeError
    )


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (rather than hang) when the body runs longer than `seconds`."""

    def _timeout(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def damaged_dicom(draw) -> tuple[str, bytes, str]:
    """(source name, damaged bytes, what was done)."""
    name = draw(st.sampled_from(SOURCES))
    data = bytearray(source_bytes(name))
    header_end = pixel_data_offset(name)
    kind = draw(st.sampled_from(("truncate", "flip_header", "length", "short_pixels")))
    if kind == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        return name, bytes(data[:cut]), f"truncated at {cut}"
    if kind == "flip_header":
        flips = draw(
            st.lists(
                st.tuples(st.integers(128, header_end - 1), st.integers(0, 7)),
                min_size=1,
                max_size=4,
            )
        )
        for pos, bit in flips:
            data[pos] ^= 1 << bit
        return name, bytes(data), f"bits flipped {flips}"
    if kind == "length":
        # Rewrite a 16- or 32-bit little-endian value at an element boundary in the header:
        # for explicit VR that is where lengths (and VRs) live.
        pos = draw(st.integers(132, header_end - 4))
        value = draw(st.sampled_from((0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)))
        width = draw(st.sampled_from((2, 4)))
        data[pos : pos + width] = struct.pack("<H" if width == 2 else "<I", value & 0xFFFF if width == 2 else value)  # fmt: skip
        return name, bytes(data), f"{width}-byte value {value:#x} at {pos}"
    keep = draw(st.integers(header_end + 8, len(data) - 1))
    return name, bytes(data[:keep]), f"PixelData cut to {keep - header_end - 12} bytes"


def _write(data: bytes, folder: Path) -> Path:
    path = folder / "damaged.dcm"
    path.write_bytes(data)
    return path


def note(outcome: str) -> None:
    """Count outcomes in hypothesis' statistics (`--hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(outcome)


def check_loaded(path: Path) -> np.ndarray | None:
    """Load `path`: the pixels of a correct image, or None after a typed error."""
    try:
        with time_limit(SECONDS_PER_EXAMPLE):
            image = load_image(path)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions escape
        assert is_typed(e), f"{type(e).__module__}.{type(e).__name__}: {e}"
        note(f"typed error {type(e).__name__}")
        return None
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    assert image.pixels.dtype == np.uint8
    assert image.pixels.shape == (int(ds.Rows), int(ds.Columns), 3)
    note("image")
    return image.pixels


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(damaged_dicom())
def test_loader_gives_an_image_or_a_typed_error(case):
    name, data, what = case
    with tempfile.TemporaryDirectory() as folder:
        check_loaded(_write(data, Path(folder)))


def test_the_fuzzer_reaches_both_outcomes(tmp_path):
    """The mutations are not all fatal nor all harmless: the property is exercised both ways."""
    header_end = pixel_data_offset("palette_color")
    data = source_bytes("palette_color")
    assert check_loaded(_write(data, tmp_path)) is not None
    assert check_loaded(_write(data[: header_end + 200], tmp_path)) is None  # short PixelData
    assert check_loaded(_write(data[:300], tmp_path)) is None  # cut in the header


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_fp32_bundle):
    from citrus_edge.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_fp32_bundle, max_new_tokens=4)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(damaged_dicom())
def test_runtime_entry_point_gives_a_result_or_a_typed_error(tiny_pipeline, case):
    name, data, what = case
    with tempfile.TemporaryDirectory() as folder:
        path = _write(data, Path(folder))
        pixels = check_loaded(path)
        try:
            with time_limit(SECONDS_PER_EXAMPLE):
                result = tiny_pipeline(path, "Please help segment the lesion in this scan.")
        except Exception as e:  # noqa: BLE001
            assert is_typed(e), f"{what}: {type(e).__module__}.{type(e).__name__}: {e}"
            return
    assert pixels is not None, f"{what}: the runtime answered an image the loader refused"
    assert result.image_hw == pixels.shape[:2]
    assert all(m.shape == pixels.shape[:2] for m in result.masks)
