"""Typed errors of the engines stage; each message says what to do next.

Torch-, TensorRT- and ONNX-Runtime-free: the runtime imports these to recognise a stale engine.
"""

from __future__ import annotations

INSTALL_HINT = (
    "run `citrus-edge engines build BUNDLE` on the target device, in an environment made with "
    "`pip install 'citrus-edge[tensorrt]'` (TensorRT 10.x, cuda-python 12.x); on Jetson, "
    "JetPack 6.1/6.2 ships TensorRT 10.3: use its Python package from a venv made with "
    "--system-site-packages and add `pip install 'cuda-python>=12.6,<13'`"
)


class EnginePlanError(ValueError):
    """An engine plan that is malformed, or that does not match the graphs it names."""


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (or cuda-python, or a GPU) is missing where an engine must be built."""


class OnnxParseError(RuntimeError):
    """TensorRT's ONNX parser rejected a graph; `errors` lists what the parser reported."""

    def __init__(self, message: str, errors: tuple[str, ...] = ()):
        super().__init__(message)
        self.errors = errors


class EngineBuildError(RuntimeError):
    """TensorRT could not build an engine from a parsed network."""


class TimingCacheError(RuntimeError):
    """A TensorRT timing cache file that cannot be used for this build."""


class EngineMismatchError(RuntimeError):
    """An engine built for another TensorRT version or GPU; `command` rebuilds it."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


class DeviceMismatchError(EngineMismatchError):
    """The GPU building the engines is not the one the plan's target names."""


class OptimizedGraphMismatchError(RuntimeError):
    """An ONNX Runtime-optimized graph whose outputs differ from its source graph's."""
