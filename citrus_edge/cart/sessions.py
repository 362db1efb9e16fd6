"""Video sessions of the service: one key frame through the whole model, then SAM2 per frame.

A session keeps its key frame's `Grounding` (the `[SEG]` states); every frame posted to it runs
only the SAM2 encoder and mask decoder (`Pipeline.track`).

Drop-to-keep-up: a probe sends frames faster than SAM2 runs, and a live view wants the newest
frame, not a growing backlog. Each session has one slot for a waiting frame. A frame posted while
another of the same session is running takes the slot; a frame already waiting there is
superseded: its request is answered at once with `"status": "dropped"` (200, no result) and
counted. When the running frame finishes, the frame in the slot (always the newest) runs next.
Every answer carries the session's counts (`received`, `processed`, `dropped`), and a processed
frame says how many frames were dropped since the previous processed one (`dropped_before`).
A client that waits for each answer before sending the next frame never sees a drop.

Sessions are closed by DELETE, or after `idle_s` seconds with no frame (checked on every
session request and by the service's sweeper); the table holds at most `max_sessions`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .service_errors import ServiceBusyError, UnknownSessionError

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    index: int
    upload: Any  # uploads.ImageUpload
    answer: asyncio.Future


@dataclass
class Session:
    """One open video session. `key` is the key frame's `Grounding`; frame 0 is the key frame."""

    id: str
    key: Any
    prompt: str
    received: int = 0  # frames posted after the key frame
    processed: int = 0
    dropped: int = 0
    last_ms: float | None = None
    total_ms: float = 0.0
    running: bool = False
    closed: bool = False
    waiting: _Waiting | None = None
    dropped_since_processed: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def stats(self, idle_s: float) -> dict[str, Any]:
        mean = None if not self.processed else round(self.total_ms / self.processed, 3)
        left = idle_s - (time.monotonic() - self.last_used)
        return {
            "received": self.received,
            "processed": self.processed,
            "dropped": self.dropped,
            "waiting": self.waiting is not None,
            "last_ms": None if self.last_ms is None else round(self.last_ms, 3),
            "mean_ms": mean,
            "expires_in_s": round(max(0.0, left), 3),
        }


Tracker = Callable[[Session, Any], Awaitable[tuple[dict[str, Any], float]]]


class SessionTable:
    """Open sessions by id, with idle expiry and the per-session newest-frame slot."""

    def __init__(self, idle_s: float, max_sessions: int) -> None:
        self.idle_s, self.max_sessions = idle_s, max_sessions
        self._sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, key: Any, prompt: str) -> Session:
        """A new session for the key frame's grounding `key`."""
        self.expire()
        if len(self._sessions) >= self.max_sessions:
            oldest = min(s.last_used for s in self._sessions.values())
            retry = max(1, math.ceil(self.idle_s - (time.monotonic() - oldest)))
            raise ServiceBusyError(
                f"{len(self._sessions)} video sessions are open (the most the service keeps); "
                "close one with DELETE /v1/sessions/{id} or retry when one expires",
                retry,
            )
        session = Session(secrets.token_urlsafe(12), key, prompt)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        self.expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(
                f"session {session_id!r} is not open (never opened, closed, or idle for more "
                f"than {self.idle_s:g} s); open a new one with POST /v1/sessions"
            )
        return session

    def close(self, session_id: str) -> Session:
        session = self.get(session_id)
        self._close(session)
        return session

    def _close(self, session: Session) -> None:
        session.closed = True
        self._sessions.pop(session.id, None)
        if session.waiting is not None and not session.waiting.answer.done():
            session.waiting.answer.set_exception(
                UnknownSessionError(f"session {session.id!r} was closed before this frame ran")
            )
        session.waiting = None

    def expire(self) -> int:
        """Close every session idle for longer than `idle_s` (a running one is not idle)."""
        now = time.monotonic()
        idle = [
            s
            for s in self._sessions.values()
            if not s.running and s.waiting is None and now - s.last_used > self.idle_s
        ]
        for session in idle:
            self._close(session)
            log.info("video session expired after %.0f s idle", self.idle_s)
        self.expired += len(idle)
        return len(idle)

    async def submit(self, session: Session, upload: Any, track: Tracker) -> dict[str, Any]:
        """Answer for one posted frame: its result, or `dropped` when a newer frame took its
        place before it ran."""
        if session.closed:
            raise UnknownSessionError(f"session {session.id!r} was closed")
        session.last_used = time.monotonic()
        session.received += 1
        index = session.received
        answer = asyncio.get_running_loop().create_future()
        superseded, session.waiting = session.waiting, _Waiting(index, upload, answer)
        if superseded is not None:
            session.dropped += 1
            session.dropped_since_processed += 1
            if not superseded.answer.done():
                superseded.answer.set_result(self._dropped(session, superseded.index, index))
        if not session.running:
            session.running = True  # now, not when the task starts: one drain per session
            task = asyncio.get_running_loop().create_task(self._drain(session, track))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await answer

    def _dropped(self, session: Session, index: int, newer: int) -> dict[str, Any]:
        return {
            "session": session.id,
            "frame": index,
            "status": "dropped",
            "superseded_by": newer,
            "stats": session.stats(self.idle_s),
        }

    async def _drain(self, session: Session, track: Tracker) -> None:
        """Run the waiting frame, then whichever frame waits after it, until none waits."""
        try:
            while session.waiting is not None and not session.closed:
                job, session.waiting = session.waiting, None
                dropped_before, session.dropped_since_processed = (
                    session.dropped_since_processed,
                    0,
                )
                try:
                    result, ms = await track(session, job.upload)
                except Exception as e:  # the request's own answer carries it
                    if not job.answer.done():
                        job.answer.set_exception(e)
                    continue
                session.processed += 1
                session.last_ms, session.total_ms = ms, session.total_ms + ms
                session.last_used = time.monotonic()
                if not job.answer.done():
                    job.answer.set_result(
                        {
                            "session": session.id,
                            "frame": job.index,
                            "status": "processed",
                            "dropped_before": dropped_before,
                            "stats": session.stats(self.idle_s),
                            "result": result,
                        }
                    )
        finally:
            session.running = False
