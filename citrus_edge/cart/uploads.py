"""What a request carries, read into an image and a prompt before any pipeline work.

Two ways to send an image, the same fields either way:
- multipart/form-data: a file part `image` plus text fields (`prompt` or `task`, `frame`,
  `shape`, `spacing`, `dicom`); query parameters fill in any field the form leaves out;
- the raw request body (DICOM, PNG, JPEG, or raw pixels) with the fields as query parameters.

Raw pixels are uint8, row-major, `shape=H,W` (grey) or `H,W,3` (RGB), optionally with
`spacing=ROW_MM,COL_MM` (the cart's own calibration; otherwise nothing is measured in mm). A
file's format is told from its content (`calib_data.load`), never from a name or content type.
An uploaded file is written to a private temporary folder only while it is decoded; messages
name the input as "multipart field 'image'" or "request body", never a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from citrus_edge.calib_data.load import LoadedImage, load_image
from citrus_edge.calib_data.spacing import PixelSpacing
from citrus_edge.tasks import PROMPTS

from .service_errors import RequestInputError, RequestTooLargeError

FIELDS = ("image", "prompt", "task", "frame", "shape", "spacing", "dicom")
MULTIPART_FIELD = "multipart field 'image'"
RAW_BODY = "request body"


@dataclass(frozen=True)
class ImageUpload:
    """An image as sent: encoded file bytes, or raw pixels when `shape` is given."""

    data: bytes
    name: str  # how messages name it: MULTIPART_FIELD or RAW_BODY
    shape: tuple[int, ...] | None = None
    spacing: PixelSpacing | None = None
    frame: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def load(self) -> tuple[np.ndarray | LoadedImage, PixelSpacing | None]:
        """The pipeline's input: an RGB array with its spacing, or a decoded file's frame."""
        if self.shape is not None:
            return _raw_pixels(self.data, self.shape, self.name), self.spacing
        return _decode_file(self.data, self.name, self.frame), None

    def dicom_dataset(self) -> Any | None:
        """The sent DICOM's header as a pydicom Dataset (for SEG/SR references), else None."""
        if self.shape is not None or self.data[128:132] != b"DICM":
            return None
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(self.data), stop_before_pixels=True)


@dataclass(frozen=True)
class ParsedRequest:
    upload: ImageUpload
    fields: dict[str, str]  # every text field, from the form or the query


async def read_request(request: Any) -> ParsedRequest:
    """The image and text fields of a Starlette request (multipart or raw body)."""
    fields = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        data, name = b"", MULTIPART_FIELD
        form = await _form(request)
        try:
            for key, value in form.multi_items():
                if key not in FIELDS:
                    raise RequestInputError(f"multipart field {key!r} is not one of {FIELDS}")
                if key == "image":
                    if isinstance(value, str):
                        raise RequestInputError(f"{MULTIPART_FIELD} must be a file part, not text")
                    data = await value.read()
                else:
                    fields[key] = str(value)
        finally:
            await form.close()  # a large part was spooled to a temporary file: remove it now
    else:
        data, name = await request.body(), RAW_BODY
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestInputError(f"query parameter(s) {unknown} not one of {FIELDS[1:]}")
    if not data:
        raise RequestInputError(
            f"no image: send it as {MULTIPART_FIELD} or as the {RAW_BODY} (DICOM, PNG, JPEG, "
            "or raw uint8 pixels with shape=H,W[,3])"
        )
    return ParsedRequest(_upload(data, name, fields), fields)


async def _form(request: Any) -> Any:
    """The parsed multipart form; a malformed one is a `RequestInputError` (Starlette says
    why in an HTTPException), a body past the size limit stays `RequestTooLargeError`."""
    try:
        return await request.form(max_files=1, max_fields=len(FIELDS))
    except RequestTooLargeError:
        raise
    except Exception as e:
        reason = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise RequestInputError(
            f"the multipart/form-data body cannot be parsed: {reason}"
        ) from None


def _upload(data: bytes, name: str, fields: dict[str, str]) -> ImageUpload:
    shape = None if "shape" not in fields else parse_shape(fields["shape"])
    spacing = None if "spacing" not in fields else parse_spacing(fields["spacing"])
    frame = parse_int(fields.get("frame", "0"), "frame")
    if spacing is not None and shape is None:
        raise RequestInputError(
            "spacing applies to raw pixels (sent with shape=H,W[,3]); a DICOM carries its own "
            "calibration and a PNG/JPEG has none"
        )
    if shape is not None and frame != 0:
        raise RequestInputError(f"frame={frame} asked of raw pixels, which are one frame")
    return ImageUpload(data, name, shape, spacing, frame)


def prompt_of(fields: dict[str, str]) -> str:
    """The prompt: `prompt` as given, or the task's own prompt (`tasks.PROMPTS`)."""
    prompt, task = fields.get("prompt"), fields.get("task")
    if prompt is not None and task is not None:
        raise RequestInputError("give prompt or task, not both")
    if task is not None:
        if task not in PROMPTS:
            raise RequestInputError(f"task={task!r} is not one of {sorted(PROMPTS)}")
        return PROMPTS[task]
    if prompt is None or not prompt.strip():
        raise RequestInputError(f"no prompt: give prompt=TEXT or task={'|'.join(PROMPTS)}")
    return prompt


def parse_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise RequestInputError(f"{name}={text!r} is not a whole number") from None
    if value < 0:
        raise RequestInputError(f"{name}={value} must be >= 0")
    return value


def parse_flag(fields: dict[str, str], name: str) -> bool:
    value = fields.get(name, "0").lower()
    if value not in ("0", "1", "true", "false"):
        raise RequestInputError(f"{name}={value!r} must be 0, 1, true or false")
    return value in ("1", "true")


def parse_shape(text: str) -> tuple[int, ...]:
    """`H,W` or `H,W,1` (grey) or `H,W,3` (RGB), each dimension > 0."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1 or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise RequestInputError(f"shape={text!r} is not H,W or H,W,3 (positive whole numbers)")
    return shape


def parse_spacing(text: str) -> PixelSpacing:
    """`ROW_MM,COL_MM`: the size of one pixel, in mm, down and across."""
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise RequestInputError(f"spacing={text!r} is not ROW_MM,COL_MM") from None
    try:
        return PixelSpacing(row, col)
    except ValueError as e:
        raise RequestInputError(f"spacing={text!r}: {e}") from None


def _raw_pixels(data: bytes, shape: tuple[int, ...], name: str) -> np.ndarray:
    """[H, W, 3] uint8 from raw bytes; grey frames are repeated over the three channels."""
    need = int(np.prod(shape))
    if len(data) != need:
        raise RequestInputError(
            f"{name}: {len(data)} bytes, but shape={','.join(map(str, shape))} of uint8 needs {need}"
        )
    pixels = np.frombuffer(data, np.uint8).reshape(shape)
    if pixels.ndim == 2 or pixels.shape[2] == 1:
        pixels = np.repeat(pixels.reshape(shape[:2])[..., None], 3, axis=-1)
    return np.ascontiguousarray(pixels)


def _decode_file(data: bytes, name: str, frame: int) -> LoadedImage:
    """Frame `frame` of a DICOM/PNG/JPEG sent as bytes; the temporary file is gone on return."""
    with tempfile.TemporaryDirectory(prefix="citrus-serve-") as folder:
        path = os.path.join(folder, "upload")
        with open(path, "wb") as f:
            f.write(data)
        try:
            loaded = load_image(path, frame)
        except ValueError as e:
            raise _renamed(e, path, f"{name} ({len(data)} bytes)") from None
    return dataclasses.replace(loaded, path="")  # no temporary path in results or messages


def _renamed(error: ValueError, path: str, name: str) -> ValueError:
    """The loader's typed error, with the temporary path replaced by the input's name."""
    message = str(error).replace(path, name)
    try:
        return type(error)(message)
    except TypeError:
        return RequestInputError(message)
