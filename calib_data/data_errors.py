"""Typed errors of the calib_data stage.

Every loader error subclasses `ImageLoadError` (a `ValueError`), and every message names the
file, says what is wrong with it and what to do, so a caller can log it and move on to the next
image, or a person can fix the data.
"""

from __future__ import annotations


class ImageLoadError(ValueError):
    """An image or DICOM file could not be turned into RGB pixels."""


class UnreadableImageError(ImageLoadError):
    """The file is damaged: its format is recognised but it cannot be parsed or decoded."""


class NotDicomError(UnreadableImageError):
    """The file is neither DICOM with pixel data nor an image format Pillow reads."""


class NoPixelDataError(ImageLoadError):
    """A DICOM file holds no (Float/Double Float) Pixel Data element (e.g. a report or SR)."""


class TruncatedPixelDataError(ImageLoadError):
    """The pixel data is shorter than Rows x Columns x Samples x Bits Allocated x Frames."""


class UnsupportedTransferSyntaxError(ImageLoadError):
    """No permitted decoder for the file's transfer syntax is installed or exists."""


class FrameOutOfRangeError(ImageLoadError, IndexError):
    """The requested frame index is outside 0..n_frames-1."""


class ImageTooLargeError(ImageLoadError):
    """Rows x Columns exceeds the caller's `max_pixels` budget (checked before decoding)."""


class InvalidPixelValuesError(ImageLoadError):
    """NaN or infinite values after the modality rescale (float pixel data)."""


class ManifestError(ValueError):
    """A manifest line is not valid JSON or lacks a field; the message names file and line."""
