"""What `citrus-edge serve` is allowed to do: bind address, token, limits, queue, session idle time.

One frozen, versioned config, validated before the bundle is loaded so that an unsafe setting
(a non-loopback address without a token) is refused in one line and nothing listens.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .service_errors import ServeConfigError

SERVE_CONFIG_VERSION = 1

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
# A DICOM cine of a few hundred frames fits; a bigger body is refused (413) before it is read.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Queue wait + run of one request; the tiny/demo models answer in well under a second on a CPU.
DEFAULT_TIMEOUT_S = 60.0
# Requests waiting behind the one the pipeline is running; more answer 503 with Retry-After.
DEFAULT_QUEUE_SIZE = 8
# A video session nobody has sent a frame to for this long is closed (its [SEG] states dropped).
DEFAULT_SESSION_IDLE_S = 120.0
DEFAULT_MAX_SESSIONS = 16
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: Path) -> str:
    """The bearer token in `path` (surrounding whitespace stripped), at least MIN_TOKEN_CHARS."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeConfigError(f"--token-file {path}: cannot be read ({e})") from e
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ServeConfigError(
            f"--token-file {path}: the token must be one word of at least {MIN_TOKEN_CHARS} "
            "characters; write one with e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return token


@dataclass(frozen=True)
class ServeConfig:
    """How the service listens and how much it accepts. `token` None: no bearer token asked
    (allowed on a loopback address only)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    queue_size: int = DEFAULT_QUEUE_SIZE
    session_idle_s: float = DEFAULT_SESSION_IDLE_S
    max_sessions: int = DEFAULT_MAX_SESSIONS
    version: int = SERVE_CONFIG_VERSION

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and self.token is None:
            raise ServeConfigError(
                f"--host {self.host} is reachable from other machines: pass --token-file with a "
                "bearer token (every request must then carry it), or bind 127.0.0.1"
            )
        if not 0 <= self.port <= 65535:
            raise ServeConfigError(f"--port {self.port} is not a TCP port (0-65535)")
        positive = {
            "max_request_bytes": self.max_request_bytes,
            "timeout_s": self.timeout_s,
            "session_idle_s": self.session_idle_s,
            "max_sessions": self.max_sessions,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.queue_size < 0:
            raise ServeConfigError(f"--queue-size must be >= 0, got {self.queue_size}")
        if self.version != SERVE_CONFIG_VERSION:
            raise ServeConfigError(f"serve config version {self.version} is not 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; the token itself never leaves the process."""
        d = asdict(self)
        d["token"] = self.token is not None
        return d
