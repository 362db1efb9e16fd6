"""Typed errors of the runtime; every message says what is wrong and what to do."""

from __future__ import annotations


class RuntimeSetupError(RuntimeError):
    """A backend cannot be used as asked (missing package, device, engine or option)."""


class UnknownBackendError(RuntimeSetupError, ValueError):
    """The requested backend name is not registered."""


class TensorRTSetupError(RuntimeSetupError):
    """TensorRT or cuda-python is missing, no GPU is visible, or an engine cannot be loaded."""


class BackendRunError(RuntimeError):
    """A graph or engine failed while running."""


class InputImageError(ValueError):
    """The image given to the pipeline is not an RGB uint8 array, a readable file or a frame."""
