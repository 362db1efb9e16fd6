"""The bounded queue in front of the one loaded pipeline.

One worker thread runs every pipeline call in turn (the pipeline holds one KV cache and one set
of graph sessions: it is not re-entrant). At most `queue_size` calls wait behind the running
one; a call beyond that is refused at once with `ServiceBusyError` and a Retry-After estimate
(waiting calls x mean service time), before any decoding or graph work, so a flood of requests
costs the cart nothing but the refusals. A call that outlives the per-request timeout answers
`RequestTimeoutError`; if it has not started yet it is skipped, and if it is running it finishes
(a graph run cannot be interrupted) and its slot is freed then, so the bound always counts the
real work.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .service_errors import RequestTimeoutError, ServiceBusyError

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_TIME_WEIGHT = 0.2  # exponential moving average of the service time, for Retry-After


class _Job:
    def __init__(self, fn: Callable[[], Any], done: Callable[[float | None], None]) -> None:
        self.fn, self.done = fn, done
        self.abandoned = False  # set when the caller gave up before the job started

    def run(self) -> Any:
        if self.abandoned:
            self.done(None)
            return None
        t0 = time.perf_counter()
        try:
            return self.fn()
        finally:
            self.done(time.perf_counter() - t0)


class PipelineQueue:
    """Runs callables one at a time on a worker thread, with a bounded wait list."""

    def __init__(self, queue_size: int, timeout_s: float) -> None:
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="citrus-pipeline")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._mean_s = 0.5  # until measured
        self.served = self.refused = self.timed_out = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained one place (at least 1)."""
        return max(1, math.ceil(self._admitted * self._mean_s))

    def _finished(self, seconds: float | None) -> None:
        with self._lock:
            self._admitted -= 1
            if seconds is not None:
                self.served += 1
                w = SERVICE_TIME_WEIGHT
                self._mean_s = (1 - w) * self._mean_s + w * seconds

    async def run(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` on the worker; `what` names the request in the 503/504 messages."""
        with self._lock:
            if self._admitted > self.queue_size:
                self.refused += 1
                retry = self.retry_after_s()
                raise ServiceBusyError(
                    f"{what}: {self._admitted} requests are already queued for the pipeline "
                    f"(queue size {self.queue_size}); retry in {retry} s",
                    retry,
                )
            self._admitted += 1
        job = _Job(fn, self._finished)
        future = asyncio.get_running_loop().run_in_executor(self._executor, job.run)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError from 3.11; a distinct class on 3.10
            job.abandoned = True
            self.timed_out += 1
            future.add_done_callback(_consume)
            raise RequestTimeoutError(
                f"{what}: no answer within the service's {self.timeout_s:g} s timeout "
                "(queue wait + run); retry, or raise --timeout"
            ) from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _consume(future: asyncio.Future) -> None:
    """Retrieve an abandoned job's outcome so that asyncio does not log it as never retrieved."""
    if not future.cancelled() and future.exception() is not None:
        log.info("a timed-out request failed after its answer: %s", type(future.exception()))
