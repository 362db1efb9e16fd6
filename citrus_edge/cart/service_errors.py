"""Typed errors of the HTTP service and the JSON body every error answer carries.

Each error knows its HTTP status; the body is `{"error": {"type", "message", "status"}}` with a
one-line message that names the input at fault (the form field, the query parameter, the
session). Errors of bad input are `ValueError`s, like the pipeline's own (`ImageLoadError`,
`InputImageError`, `PromptTooLongError`, `ImplausibleSpacingError`), which answer 400 too.
"""

from __future__ import annotations

from typing import Any


class ServeConfigError(ValueError):
    """`citrus-edge serve` was asked for something unsafe or impossible (checked before loading)."""


class RequestInputError(ValueError):
    """A request's fields are missing, contradictory or malformed."""

    status = 400


class NothingToTrackError(ValueError):
    """A session's key frame gave no `[SEG]` state, so there is no mask to follow."""

    status = 422


class UnknownSessionError(LookupError):
    """No open session has this id (never opened, closed, or expired after its idle time)."""

    status = 404


class ServiceBusyError(RuntimeError):
    """The queue in front of the pipeline (or the session table) is full; retry later."""

    status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(ServiceBusyError):
    """The bundle is still loading (or failed to load); `/v1/ready` says which."""


class FeatureUnavailableError(RuntimeError):
    """The request needs a package this installation lacks (e.g. highdicom for dicom=1)."""

    status = 501


class RequestTimeoutError(TimeoutError):
    """The request waited and ran longer than the service's per-request timeout."""

    status = 504


class RequestTooLargeError(ValueError):
    """The request body is larger than the service's limit."""

    status = 413


class UnauthorizedError(PermissionError):
    """The request has no bearer token, or not the service's."""

    status = 401


def status_of(error: BaseException) -> int:
    """The HTTP status of an error: its own, 400 for any other bad-input `ValueError`, else 500."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    return 400 if isinstance(error, ValueError) else 500


def error_body(error: BaseException, message: str | None = None) -> dict[str, Any]:
    """`{"error": {"type", "message", "status"}}`; the message is kept to one line."""
    text = str(error) if message is None else message
    return {
        "error": {
            "type": type(error).__name__,
            "message": " ".join(text.split()),
            "status": status_of(error),
        }
    }
