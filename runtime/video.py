"""Live video: the full VLM on one key frame, then only SAM2 on the frames that follow.

The key frame runs the whole pipeline and its `[SEG]` states are cached; every later frame runs
the SAM2 image encoder and the mask decoder with those states (no vision encoder, no LLM), which
is what makes per-frame latency low enough for a live probe. Sources are a multi-frame file
(DICOM cine; frames decoded one at a time by `calib_data.load.iter_frames`) or any iterable of
RGB uint8 frames / `LoadedImage`s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from citrus_edge.calib_data.load import LoadedImage, iter_frames
from citrus_edge.calib_data.spacing import PixelSpacing
from citrus_edge.result import GroundingResult

from .inputs import from_array
from .pipeline import Grounding, Pipeline

log = logging.getLogger(__name__)

VideoSource = str | os.PathLike | Iterable[np.ndarray | LoadedImage]


@dataclass(frozen=True)
class FrameResult:
    """One frame's result. `key_frame` marks the frame the VLM ran on; the others carry its
    text but only their own masks (no boxes)."""

    frame: int
    result: GroundingResult
    latency_ms: float  # from the decoded frame to its result
    key_frame: bool


def _frames(source: VideoSource, spacing: PixelSpacing | None) -> Iterator[LoadedImage]:
    if isinstance(source, (str, os.PathLike)):
        if spacing is not None:
            raise ValueError("spacing is read from the file; pass it only for in-memory frames")
        yield from iter_frames(source)
        return
    for index, frame in enumerate(source):
        if isinstance(frame, LoadedImage):
            yield frame
            continue
        # n_frames 0: a stream, its length unknown
        yield dataclasses.replace(from_array(frame, spacing), n_frames=0, frame=index)


def run_video(
    pipeline: Pipeline,
    source: VideoSource,
    prompt: str,
    key_frame: int = 0,
    spacing: PixelSpacing | None = None,
) -> Iterator[FrameResult]:
    """Yield a `FrameResult` for frame `key_frame` and every frame after it.

    Frames before `key_frame` are skipped (decoded, not processed). `spacing` gives in-memory
    frames a physical pixel spacing over the whole frame (files carry their own calibration).
    Raises ValueError when the source ends before `key_frame`.
    """
    key: Grounding | None = None
    for index, frame in enumerate(_frames(source, spacing)):
        if index < key_frame:
            continue
        t0 = time.perf_counter()
        if key is None:
            key = pipeline.ground(frame, prompt)
            result = key.result
        else:
            result = pipeline.track(frame, key)
        latency = (time.perf_counter() - t0) * 1e3
        yield FrameResult(index, result, latency, key_frame=index == key_frame)
    if key is None:
        raise ValueError(f"the video has no frame {key_frame}; choose an earlier key frame")
