"""Quantizer libraries' prints into the log: ONNX Runtime's calibrator and ModelOpt print
progress to stdout (Python and native), which would mix into a command's own output. Inside
`quantizer_output_to_log()` it becomes log lines of `citrus_edge.compress.quantize` (INFO,
shown with `-v`)."""

from __future__ import annotations

import ctypes
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

log = logging.getLogger("citrus_edge.compress.quantize")  # where quantize's readers look

# Packages whose prints and root-logger records are quantizer chatter (path parts).
CHATTY_PACKAGES = ("onnxruntime", "modelopt")


class _LogLines(io.TextIOBase):
    """A text stream whose complete lines become log records (what `print` writes to it)."""

    encoding = "utf-8"

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level, self._part = level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            _log_line(self.level, line)
        return len(text)

    def close_lines(self) -> None:
        _log_line(self.level, self._part)
        self._part = ""


def _log_line(level: int, line: str) -> None:
    if line.strip():
        log.log(level, "quantizer: %s", line.rstrip())


class _RootChatter(logging.Filter):
    """Takes the root logger's records made by the quantizer libraries into this log at INFO
    (ONNX Runtime's quantizer warns through `logging.warning`, e.g. about non-constant biases)."""

    def filter(self, record: logging.LogRecord) -> bool:
        parts = Path(record.pathname).parts
        if record.name != "root" or not any(p in parts for p in CHATTY_PACKAGES):
            return True
        log.info("quantizer: %s", record.getMessage())
        return False


def _stdout_fd_is_a_log_handler() -> bool:
    """A logging handler writes to file descriptor 1 (its lines would loop through the sink)."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            if stream is not None and stream.fileno() == 1:
                return True
        except (OSError, ValueError, io.UnsupportedOperation):
            continue
    return False


@contextmanager
def _fd1_to_log(level: int) -> Iterator[None]:
    """Point file descriptor 1 at a temporary file (native code prints there, past
    `sys.stdout`) and log its lines afterwards; a no-op where fd 1 cannot be redirected."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            try:
                if sys.stdout is not None:
                    sys.stdout.flush()  # what went to the real sys.stdout during the block
                ctypes.CDLL(None).fflush(None)  # C stdio buffers still bound for fd 1
            except (OSError, ValueError, AttributeError):
                pass
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                _log_line(level, line)


@contextmanager
def quantizer_output_to_log(level: int = logging.INFO) -> Iterator[None]:
    """Route what the quantizer libraries print to this module's log (INFO: shown with `-v`).

    ONNX Runtime's calibrator and ModelOpt `print` progress to stdout, which would mix into a
    command's own output. During the block, `sys.stdout` writes become log lines; file
    descriptor 1 also points at a temporary file whose lines are logged when the block ends
    (what native code prints; skipped when a logging handler itself writes to fd 1); records
    that those libraries send to the root logger are logged here at INFO.
    """
    lines, chatter, root = _LogLines(level), _RootChatter(), logging.getLogger()
    fd_level = not _stdout_fd_is_a_log_handler()
    root.addFilter(chatter)
    try:
        with _fd1_to_log(level) if fd_level else nullcontext(), redirect_stdout(lines):
            yield
    finally:
        lines.close_lines()
        root.removeFilter(chatter)
