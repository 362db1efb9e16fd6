"""Live video from a multi-frame DICOM played at its own frame rate, with drop-to-keep-up.

A probe does not wait for the model: frames come at the acquisition rate whether or not SAM2 has
finished the last one. `run_live` plays a cine as a live source would (a player thread puts
each frame into a one-frame slot at its time, from the file's Frame Time or Cine Rate, or at
`fps`) and tracks the key frame's `[SEG]` states on whatever frame is newest whenever SAM2 is
free. A frame replaced in the slot before it ran is dropped and counted; every processed frame
reports how many were dropped since the previous one and in all (`LiveFrame`). So latency stays
one frame's SAM2 time instead of growing with a backlog, and the count says how far behind real
time the cart is. `runtime.video.run_video` is the offline counterpart (every frame, in order).

The service's sessions apply the same rule to frames pushed over HTTP (see `sessions`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from citrus_edge.calib_data.load import iter_frames, load_image

log = logging.getLogger(__name__)


class NoFrameRateError(ValueError):
    """The file states no frame rate (Frame Time, Cine Rate, Recommended Display Frame Rate)."""


class LatestFrame:
    """A one-item slot between a frame source and the tracker, safe across threads.

    `put` replaces a waiting item (counted in `dropped`); `take` blocks until an item waits and
    returns it with the drop count at that moment, or returns None once the source has
    `close`d and nothing waits.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.put_count += 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def take(self) -> tuple[Any, int] | None:
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            if self._item is None:
                return None
            item, self._item = self._item, None
            return item, self.dropped


def frame_interval_s(path: str | os.PathLike) -> float:
    """Seconds between frames as the DICOM states: Frame Time (ms), else Cine Rate or
    Recommended Display Frame Rate (frames/s). Raises `NoFrameRateError` when none is stated."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    frame_time = ds.get("FrameTime")
    if frame_time is not None and float(frame_time) > 0:
        return float(frame_time) / 1e3
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = ds.get(keyword)
        if rate is not None and float(rate) > 0:
            return 1.0 / float(rate)
    raise NoFrameRateError(
        f"{os.fspath(path)}: no Frame Time, Cine Rate or Recommended Display Frame Rate; "
        "give the rate to play it at (fps)"
    )


@dataclass(frozen=True)
class LiveFrame:
    """One processed frame. `latency_ms` runs from the frame's arrival to its result."""

    frame: int
    result: Any  # GroundingResult
    latency_ms: float
    key_frame: bool
    dropped_before: int  # frames dropped since the previous processed frame
    dropped_total: int


def _play(path: str, slot: LatestFrame, start: int, interval_s: float) -> None:
    """Put frames `start`.. of `path` into `slot`, each at its time after the first."""
    t0 = time.perf_counter()
    try:
        for index, frame in enumerate(iter_frames(path)):
            if index < start:
                continue
            due = t0 + (index - start) * interval_s
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            slot.put((index, frame, time.perf_counter()))
    except Exception:  # a damaged frame ends the stream; the tracker still answers what it had
        log.exception("the video source stopped")
    finally:
        slot.close()


def run_live(
    pipeline: Any,
    path: str | os.PathLike,
    prompt: str,
    key_frame: int = 0,
    fps: float | None = None,
) -> Iterator[LiveFrame]:
    """The key frame through the whole model, then the cine's later frames played live (at
    `fps`, else the file's own rate) with SAM2 on the newest frame whenever it is free.

    Stops after the key frame when its answer has no `[SEG]` (nothing to track). The last frame
    of the file is always processed (nothing newer replaces it).
    """
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    interval = 1.0 / fps if fps is not None else frame_interval_s(path)
    t0 = time.perf_counter()
    key = pipeline.ground(load_image(path, key_frame), prompt)
    yield LiveFrame(key_frame, key.result, (time.perf_counter() - t0) * 1e3, True, 0, 0)
    if len(key.seg_hidden) == 0:
        return
    slot = LatestFrame()
    player = threading.Thread(
        target=_play, args=(os.fspath(path), slot, key_frame + 1, interval), daemon=True
    )
    player.start()
    reported = 0
    try:
        while (taken := slot.take()) is not None:
            (index, frame, arrived), dropped = taken
            result = pipeline.track(frame, key)
            latency = (time.perf_counter() - arrived) * 1e3
            yield LiveFrame(index, result, latency, False, dropped - reported, dropped)
            reported = dropped
    finally:
        slot.close()
        player.join(timeout=5)
