"""calib_data.load on the real DICOM files shipped in the pydicom wheel, and on broken inputs."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures import small_ds
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.uid import JPEGLSLossless

from citrus_edge.calib_data import dicom_pixels
from citrus_edge.calib_data.data_errors import (
    FrameOutOfRangeError,
    ImageLoadError,
    ImageTooLargeError,
    InvalidPixelValuesError,
    NoPixelDataError,
    NotDicomError,
    TruncatedPixelDataError,
    UnreadableImageError,
    UnsupportedTransferSyntaxError,
)
from citrus_edge.calib_data.load import is_dicom, iter_frames, load_image


def shipped(name: str) -> str:
    """Path of a test file inside the installed pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return str(path)


def us_region(path: str) -> Dataset:
    """The tissue region (RegionDataType 1) of an ultrasound file."""
    ds = pydicom.dcmread(path)
    return next(r for r in ds.SequenceOfUltrasoundRegions if r.RegionDataType == 1)


def window_linear(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window to 0..255, written out by hand."""
    c, w = centre - 0.5, width - 1
    out = ((values - c) / w + 0.5) * 255
    out = np.where(values <= c - w / 2, 0, np.where(values > c + w / 2, 255, out))
    return np.rint(out).astype(np.uint8)


# --- ultrasound examples ---------------------------------------------------------------------


def test_palette_color_us_matches_pydicom_lut_and_region_spacing():
    path = shipped("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    image = load_image(path)
    expected = apply_color_lut(ds.pixel_array, ds)  # [H, W, 3] uint16 (16-bit LUT entries)
    assert expected.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, (expected >> 8).astype(np.uint8))
    assert image.pixels.shape == (ds.Rows, ds.Columns, 3) and image.pixels.dtype == np.uint8
    assert (image.modality, image.n_frames, image.frame) == ("US", 1, 0)
    region = us_region(path)
    assert image.spacing.source == "SequenceOfUltrasoundRegions"
    assert image.spacing.col_mm == pytest.approx(region.PhysicalDeltaX * 10, rel=1e-12)
    assert image.spacing.row_mm == pytest.approx(region.PhysicalDeltaY * 10, rel=1e-12)
    assert image.spacing.row_mm == pytest.approx(0.2622878766196998, rel=1e-12)


def test_rgb_color_us_is_unchanged_and_missing_spacing_is_logged(caplog):
    path = shipped("examples_rgb_color.dcm")
    with caplog.at_level(logging.INFO, logger="citrus_edge.calib_data"):
        image = load_image(path)
    np.testing.assert_array_equal(image.pixels, pydicom.dcmread(path).pixel_array)
    assert image.spacing is None
    assert any("no pixel spacing" in r.message and path in r.message for r in caplog.records)


def test_ybr_jpeg_multiframe_is_converted_once():
    path = shipped("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.NumberOfFrames == 30
    frames = list(iter_frames(path))
    assert [f.frame for f in frames] == list(range(30))
    assert all(f.n_frames == 30 and f.modality == "US" for f in frames)
    jpegs = list(generate_frames(ds.PixelData, number_of_frames=30))
    for index in (0, 17, 29):
        np.testing.assert_array_equal(frames[index].pixels, pixel_array(ds, index=index))
        # Pillow decodes the JPEG codestream to RGB by itself: equal means no second conversion.
        direct = np.asarray(Image.open(io.BytesIO(jpegs[index])).convert("RGB"))
        assert np.abs(frames[index].pixels.astype(int) - direct).max() <= 1
    np.testing.assert_array_equal(load_image(path, frame=17).pixels, frames[17].pixels)
    # A grey-scale scan stays grey: a double YCbCr->RGB conversion would tint it strongly.
    rgb = frames[0].pixels.astype(int)
    assert np.median(np.abs(rgb[..., 0] - rgb[..., 1])) <= 2
    region = us_region(path)
    assert frames[0].spacing.col_mm == pytest.approx(region.PhysicalDeltaX * 10, rel=1e-12)
    assert frames[0].spacing.row_mm == pytest.approx(0.5104970559477806, rel=1e-12)


def test_us_region_with_non_cm_units_gives_no_spacing(tmp_path):
    ds = pydicom.dcmread(shipped("examples_palette.dcm"))
    for region in ds.SequenceOfUltrasoundRegions:
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 4  # seconds
    path = tmp_path / "seconds.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert load_image(path).spacing is None


# --- grey-scale, big-endian and compressed -------------------------------------------------


def test_monochrome2_window_matches_hand_computation():
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    expected = window_linear(ds.pixel_array.astype(np.float64), ds.WindowCenter, ds.WindowWidth)
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels, np.repeat(expected[..., None], 3, axis=-1))
    assert image.spacing.source == "PixelSpacing"
    assert (image.spacing.row_mm, image.spacing.col_mm) == tuple(float(v) for v in ds.PixelSpacing)


def test_monochrome2_rescale_without_window_stretches_min_max():
    path = shipped("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(load_image(path).pixels[..., 0], expected)


def test_monochrome1_is_inverted_after_rescale_and_window():
    path = shipped("6154")  # CR, MONOCHROME1, rescale + window, ImagerPixelSpacing
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo = 0 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # output range of the window
    hi = (2**ds.BitsStored - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1
    y = np.where(
        values <= c - w / 2,
        lo,
        np.where(values > c + w / 2, hi, ((values - c) / w + 0.5) * (hi - lo) + lo),
    )
    expected = 255 - np.rint((y - lo) / (hi - lo) * 255).astype(np.uint8)
    image = load_image(path)
    np.testing.assert_array_equal(image.pixels[..., 0], expected)
    assert image.spacing.source == "ImagerPixelSpacing"
    assert image.spacing.row_mm == pytest.approx(float(ds.ImagerPixelSpacing[0]))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_lossless_variants_equal_the_uncompressed_original(name):
    reference = load_image(shipped("MR_small.dcm")).pixels
    np.testing.assert_array_equal(load_image(shipped(name)).pixels, reference)


def test_jpeg_ls_lossless_via_gdcm_equals_original():
    if "gdcm" not in get_decoder(JPEGLSLossless).available_plugins:
        pytest.skip("python-gdcm cannot decode JPEG-LS here")
    image = load_image(shipped("MR_small_jpeg_ls_lossless.dcm"))
    np.testing.assert_array_equal(image.pixels, load_image(shipped("MR_small.dcm")).pixels)


def test_big_endian_rgb_matches_pydicom():
    path = shipped("ExplVR_BigEnd.dcm")
    np.testing.assert_array_equal(load_image(path).pixels, pydicom.dcmread(path).pixel_array)


@pytest.mark.parametrize(
    "name, tolerance",
    [
        ("SC_rgb_gdcm_KY.dcm", 0),  # JPEG 2000 lossless RGB
        ("SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG lossless RGB
        ("SC_ybr_full_422_uncompressed.dcm", 6),  # YBR_FULL_422, native
        ("SC_rgb_jpeg_dcmtk.dcm", 6),  # JPEG baseline, YBR_FULL
    ],
)
def test_colour_encodings_agree_with_lossless_rgb(name, tolerance):
    reference = load_image(shipped("SC_rgb_rle.dcm")).pixels.astype(int)
    diff = np.abs(load_image(shipped(name)).pixels.astype(int) - reference)
    assert diff.max() <= tolerance and diff.mean() < 1.0


def test_jpeg2000_us_and_16bit_rgb():
    image = load_image(shipped("examples_jpeg2k.dcm"))
    assert image.pixels.shape == (480, 640, 3) and image.modality == "US"
    rgb16 = load_image(shipped("SC_rgb_rle_16bit.dcm")).pixels
    np.testing.assert_array_equal(rgb16, load_image(shipped("SC_rgb_rle.dcm")).pixels)


def test_palette_16bit_pixels(tmp_path):
    ds = pydicom.dcmread(shipped("examples_palette.dcm"))
    arr = ds.pixel_array.astype(np.uint16) + 1000  # 16-bit indices into a shifted LUT
    for colour in ("Red", "Green", "Blue"):
        desc = list(ds[f"{colour}PaletteColorLookupTableDescriptor"].value)
        ds[f"{colour}PaletteColorLookupTableDescriptor"].value = [desc[0], 1000, 16]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = arr.tobytes()
    path = tmp_path / "palette16.dcm"
    ds.save_as(path, enforce_file_format=True)
    expected = load_image(shipped("examples_palette.dcm")).pixels
    np.testing.assert_array_equal(load_image(path).pixels, expected)


# --- ordinary images and content detection --------------------------------------------------


def test_plain_images_by_content_not_extension(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    shutil.copy(tmp_path / "rgb.png", tmp_path / "really_png.dcm")
    image = load_image(tmp_path / "really_png.dcm")
    np.testing.assert_array_equal(image.pixels, rgb)
    assert (image.modality, image.spacing, image.n_frames) == ("", None, 1)
    shutil.copy(shipped("examples_rgb_color.dcm"), tmp_path / "really_dicom.png")
    assert (
        is_dicom(tmp_path / "really_dicom.png")
        and load_image(tmp_path / "really_dicom.png").modality == "US"
    )
    grey16 = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey16.png").pixels[..., 1], grey16 >> 8)
    smooth = np.stack(
        [*np.meshgrid(np.arange(30) * 8, np.arange(20) * 12), np.full((20, 30), 90)], -1
    )
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "smooth.jpg", quality=95)
    jpeg = load_image(tmp_path / "smooth.jpg").pixels
    np.testing.assert_array_equal(
        jpeg, np.asarray(Image.open(tmp_path / "smooth.jpg").convert("RGB"))
    )
    assert np.abs(jpeg.astype(int) - smooth).mean() < 3


def test_multipage_tiff_frames(tmp_path):
    pages = [Image.fromarray(np.full((8, 9), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    frames = list(iter_frames(tmp_path / "stack.tif"))
    assert [f.pixels[0, 0, 0] for f in frames] == [10, 20, 30]
    assert load_image(tmp_path / "stack.tif", frame=2).n_frames == 3


def test_dicom_without_meta_header_is_read_by_content(tmp_path):
    ds = pydicom.dcmread(shipped("examples_rgb_color.dcm"))
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "no_meta"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not is_dicom(path)
    np.testing.assert_array_equal(
        load_image(path).pixels, pydicom.dcmread(shipped("examples_rgb_color.dcm")).pixel_array
    )


# --- broken inputs: type and message --------------------------------------------------------


def expect(error: type[ImageLoadError], path: Path | str, *words: str, **kwargs) -> str:
    with pytest.raises(error) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ImageLoadError) and isinstance(info.value, ValueError)
    assert Path(path).name in message
    for word in words:
        assert word in message
    return message


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n" * 20)
    expect(NotDicomError, path, "neither DICOM")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    expect(NotDicomError, empty)
    expect(UnreadableImageError, tmp_path / "missing.dcm", "no such file")


def test_dicom_cut_inside_its_header(tmp_path):
    path = tmp_path / "cut_header.dcm"
    path.write_bytes(Path(shipped("examples_palette.dcm")).read_bytes()[:1500])
    expect(UnreadableImageError, path, "cannot be parsed")


def test_no_pixel_data(tmp_path):
    ds = small_ds()
    del ds.PixelData
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    expect(NoPixelDataError, path, "without Pixel Data")


def test_truncated_pixel_data(tmp_path):
    ds = small_ds(8, 8)
    ds.PixelData = bytes(40)  # 64 needed
    path = tmp_path / "cut.dcm"
    ds.save_as(path, enforce_file_format=True)
    expect(TruncatedPixelDataError, path, "40 bytes", "64")
    expect(TruncatedPixelDataError, shipped("MR_truncated.dcm"), "8130")


def test_unsupported_transfer_syntax(tmp_path):
    ds = pydicom.dcmread(shipped("examples_palette.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    path = tmp_path / "unknown_syntax.dcm"
    ds.save_as(path, enforce_file_format=True)
    expect(UnsupportedTransferSyntaxError, path, "1.2.3.4.5.6.7", "Explicit VR Little Endian")
    ds = small_ds()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: only pylibjpeg
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(20)])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "htj2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    expect(UnsupportedTransferSyntaxError, path, "High-Throughput JPEG 2000", "pylibjpeg")


def test_12bit_jpeg_needs_a_decoder_we_do_not_use():
    expect(UnsupportedTransferSyntaxError, shipped("JPEG-lossy.dcm"), "JPEG Extended", "pylibjpeg")


def test_frame_out_of_range():
    path = shipped("examples_ybr_color.dcm")
    expect(FrameOutOfRangeError, path, "frame 30", "30 frame(s)", frame=30)
    expect(FrameOutOfRangeError, path, "frame -1", frame=-1)


def test_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although too large")

    monkeypatch.setattr(dicom_pixels, "pixel_array", no_decoding)
    expect(
        ImageTooLargeError,
        shipped("examples_palette.dcm"),
        "280000",
        "max_pixels=1000",
        max_pixels=1000,
    )
    Image.new("RGB", (50, 40)).save(tmp_path / "big.png")
    expect(ImageTooLargeError, tmp_path / "big.png", "2000", max_pixels=1999)


def test_nan_float_pixels(tmp_path):
    ds = small_ds()
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    values = np.linspace(0, 1, 16, dtype=np.float32)
    values[5], values[9] = np.nan, np.inf
    ds.FloatPixelData = values.tobytes()
    path = tmp_path / "float_nan.dcm"
    ds.save_as(path, enforce_file_format=True)
    expect(InvalidPixelValuesError, path, "2 pixels", "NaN")
