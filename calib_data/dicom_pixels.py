"""DICOM pixel data to RGB uint8: checks before decoding, decoding one frame, display mapping.

Display mapping by Photometric Interpretation:
- MONOCHROME1/2: Modality LUT / Rescale, then the VOI LUT or window (first view) mapped from its
  output range to 0..255. Without a VOI, integer data of at most 8 stored bits is shown over its
  full stored range (8-bit unsigned stays as stored); anything else has the frame's own
  min..max stretched to 0..255.
  MONOCHROME1 is inverted so that higher always means brighter.
- PALETTE COLOR: pydicom's `apply_color_lut`; 16-bit LUT entries keep their high byte.
- RGB, YBR_FULL, YBR_FULL_422 and the JPEG / JPEG 2000 colour spaces: pydicom's `pixel_array`
  already returns RGB (it converts YBR_FULL[_422] itself, and the JPEG decoders convert inside
  the codestream), so nothing here converts colour again. More than 8 bits are scaled down.

Decoders: pydicom's own (native, RLE), Pillow (JPEG baseline/extended, JPEG 2000), python-gdcm
(JPEG-LS, JPEG lossless) and pyjpegls. pylibjpeg is never used (GPL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_voi_lut,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.pixels.utils import get_expected_length, get_nr_frames
from pydicom.uid import UID

from .data_errors import (
    ImageTooLargeError,
    InvalidPixelValuesError,
    NoPixelDataError,
    TruncatedPixelDataError,
    UnreadableImageError,
    UnsupportedTransferSyntaxError,
)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# What pixel_array returns as RGB once decoded (see module docstring).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
# Decoder plugins in order of preference, and the package each needs. pylibjpeg is GPL.
PLUGIN_PACKAGES = {"pillow": "Pillow", "gdcm": "python-gdcm", "pyjpegls": "pyjpegls", "pydicom": ""}


def check_dicom(ds: Dataset, path: str, max_pixels: int) -> int:
    """Check pixel data presence and size before any decoding; return the number of frames."""
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise NoPixelDataError(
            f"{path}: DICOM file without Pixel Data (SOP class "
            f"{ds.get('SOPClassUID', UID('')).name or 'unknown'}); it is not an image object, "
            "or the file was cut short; pick an image object or copy the file again"
        )
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows <= 0 or cols <= 0:
        raise UnreadableImageError(
            f"{path}: Rows x Columns is {rows} x {cols}; the file is damaged"
        )
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            f"{path}: {rows} x {cols} = {rows * cols} pixels per frame exceeds max_pixels="
            f"{max_pixels}; raise max_pixels if the memory allows, or downsample the image"
        )
    return get_nr_frames(ds, warn=False)


def check_native_length(ds: Dataset, path: str) -> None:
    """Fail when uncompressed pixel data is shorter than its image attributes require."""
    keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
    expected = get_expected_length(ds, "bytes")
    actual = len(ds[keyword].value)
    if actual < expected:
        raise TruncatedPixelDataError(
            f"{path}: {keyword} holds {actual} bytes but Rows x Columns x Samples x Bits x "
            f"Frames = {ds.Rows} x {ds.Columns} x {ds.get('SamplesPerPixel', 1)} x "
            f"{ds.get('BitsAllocated')} bits x {get_nr_frames(ds, warn=False)} needs {expected} "
            "bytes; the file was cut short, copy it again from the source"
        )


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax (the meta header's, else the one it was read with)."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        return UID(tsyntax)
    implicit, little = ds.original_encoding
    if implicit:
        return UID("1.2.840.10008.1.2")
    return UID("1.2.840.10008.1.2.1" if little is not False else "1.2.840.10008.1.2.2")


def _name(tsyntax: UID) -> str:
    return f"{tsyntax} ({tsyntax.name})" if tsyntax.name != str(tsyntax) else f"{tsyntax}"


def choose_plugins(ds: Dataset, path: str) -> tuple[str, ...]:
    """Decoder plugins to try for `ds`, best first (('',) for native data).

    Raises `UnsupportedTransferSyntaxError` naming the package to install when none is usable.
    """
    tsyntax = transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise UnsupportedTransferSyntaxError(
            f"{path}: transfer syntax {_name(tsyntax)} has no pixel data decoder in pydicom "
            "(unknown, or a video syntax); convert the file to Explicit VR Little Endian "
            "(e.g. dcmtk's dcmdjpeg or gdcmconv --raw)"
        ) from e
    if not tsyntax.is_compressed:
        return ("",)
    plugins = tuple(p for p in PLUGIN_PACKAGES if p in decoder.available_plugins)
    if plugins:
        return plugins
    known = [m.split(" - ")[0] for m in decoder.missing_dependencies]
    packages = [PLUGIN_PACKAGES[p] for p in known if p in PLUGIN_PACKAGES]
    fix = (
        f"install {' or '.join(packages)}"
        if packages
        else "only pylibjpeg (GPL, not used by citrus-edge) decodes it; convert the file to an "
        "uncompressed transfer syntax (e.g. gdcmconv --raw)"
    )
    raise UnsupportedTransferSyntaxError(
        f"{path}: transfer syntax {_name(tsyntax)} cannot be decoded here; {fix}"
    )


def decode_frame(ds: Dataset, index: int, plugins: tuple[str, ...], path: str) -> np.ndarray:
    """Decode frame `index` of `ds` and map it for display. Returns [H, W, 3] uint8 RGB."""
    arr = _decode(ds, index, plugins, path)  # [H, W] or [H, W, S]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in MONOCHROME:
        return np.repeat(mono_to_uint8(arr, ds, path)[..., None], 3, axis=-1)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)[..., :3]  # [H, W, 3] uint8 or uint16, alpha dropped
        return rgb if rgb.dtype == np.uint8 else (rgb >> 8).astype(np.uint8)
    if photometric in COLOUR and arr.ndim == 3 and arr.shape[-1] == 3:
        return _colour_to_uint8(arr, int(ds.get("BitsStored", 8)))
    raise UnreadableImageError(
        f"{path}: Photometric Interpretation {photometric!r} with array shape {arr.shape} is not "
        "supported (MONOCHROME1/2, PALETTE COLOR, RGB and YBR are); convert the image to RGB"
    )


def _decode(ds: Dataset, index: int, plugins: tuple[str, ...], path: str) -> np.ndarray:
    """pydicom's `pixel_array` for one frame, trying each permitted plugin in turn."""
    if "TransferSyntaxUID" not in ds.file_meta:  # read without meta header
        ds.file_meta.TransferSyntaxUID = transfer_syntax(ds)
    failures = []
    for plugin in plugins:
        try:
            with _quiet_pydicom():
                return pixel_array(ds, index=index, decoding_plugin=plugin)
        except Exception as e:  # codecs raise many types; each means "this plugin cannot"
            failures.append(f"{plugin or 'pydicom'}: {type(e).__name__}: {e}")
    tsyntax = transfer_syntax(ds)
    if all("does not support" in f for f in failures):
        raise UnsupportedTransferSyntaxError(
            f"{path}: transfer syntax {_name(tsyntax)} uses a variant that no permitted "
            f"decoder supports ({'; '.join(failures)}); only pylibjpeg (GPL, not used by "
            "citrus-edge) might; convert the file to an uncompressed transfer syntax"
        )
    raise UnreadableImageError(
        f"{path}: frame {index} could not be decoded from {tsyntax.name} "
        f"({'; '.join(failures)}); the pixel data is damaged or mislabelled, re-export the image"
    )


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom logs a traceback for each failing plugin; the typed error says it once."""
    logger = logging.getLogger("pydicom")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _colour_to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    scale = 255.0 / (2**bits_stored - 1)
    return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def mono_to_uint8(arr: np.ndarray, ds: Dataset, path: str) -> np.ndarray:
    """Modality LUT, VOI (LUT or window), scale to 0..255, invert MONOCHROME1. [H, W] uint8."""
    values = apply_modality_lut(arr, ds)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int(np.size(values) - np.isfinite(values).sum())
        raise InvalidPixelValuesError(
            f"{path}: {bad} pixels are NaN or infinite after the modality rescale; the float "
            "pixel data is corrupt, re-export the image"
        )
    try:
        shown, lo, hi = _apply_voi(values, ds)
    except (ValueError, NotImplementedError) as e:
        raise UnreadableImageError(
            f"{path}: invalid VOI LUT / window ({e}); fix WindowCenter/WindowWidth or remove them"
        ) from e
    span = float(hi) - float(lo)
    if span == 0:
        scaled = np.zeros(shown.shape, dtype=np.float64)
    else:
        scaled = (shown.astype(np.float64) - float(lo)) * (255.0 / span)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """The VOI output and its full output range (lo maps to black, hi to white)."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        n_entries, first = int(item.LUTDescriptor[0] or 2**16), int(item.LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds)
        shown = apply_voi(np.rint(values).astype(np.int64), ds)
        return shown, float(table.min()), float(table.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        probe = np.array([centre - 100 * abs(width) - 1, centre + 100 * abs(width) + 1])
        lo, hi = apply_windowing(probe, ds)
        return apply_voi_lut(values, ds, prefer_lut=False), float(lo), float(hi)
    bits = int(ds.get("BitsStored", 16))
    if values.dtype.kind in "iu" and bits <= 8:  # shown over the stored range, not stretched
        signed = values.dtype.kind == "i"
        lo = -(2 ** (bits - 1)) if signed else 0
        return values, float(lo), float(lo + 2**bits - 1)
    return values, float(values.min()), float(values.max())


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS element."""
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]
