"""The one small interface every inference backend implements, and the registry of backends.

A backend opens the artifacts of a bundle and returns two kinds of runners:

- `GraphRunner`: numpy feeds in, numpy outputs out (vision encoder, SAM2 encoder, mask decoder);
- `KvStepRunner`: the LLM step graph with the KV cache kept inside the runner between calls, on
  the backend's device, so a decode step moves only one token's inputs and outputs.

Backends register themselves by name (`register_backend`); `create_backend` imports the module
of a built-in backend on first use, so `tensorrt` (and its CUDA imports) load only when asked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .runtime_errors import RuntimeSetupError, UnknownBackendError

# Non-cache inputs of the LLM step graph (citrus_edge.component_specs.llm_spec); the cache is
# past_*/present_*.
STEP_INPUTS = ("inputs_embeds", "position_ids", "attention_mask")
LOGITS, HIDDEN = "logits", "last_hidden_state"


class GraphRunner(Protocol):
    """One exported graph (or engine) that maps named arrays to named arrays."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; float outputs come back as float32 whatever the graph's precision."""
        ...

    def max_leading_dim(self, name: str) -> int | None:
        """Largest first dimension input `name` accepts (an engine's profile), None if any."""
        ...


class KvStepRunner(Protocol):
    """The LLM step graph with its KV cache kept on the device between calls."""

    cache_len: int  # tokens in the cache after the last call

    def reset(self) -> None:
        """Drop the cache; the next call is a prefill."""
        ...

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Feed `STEP_INPUTS` (batch 1) after the cache; return the last position's logits [V]
        and final-norm hidden state [H] (float32), and keep the grown cache."""
        ...


class Backend(Protocol):
    """Opens graphs or engines. `engine_backend` is the `backend` of the engines folders
    (`citrus-edge engines build`) it runs; `requires_engines` is False when it can also run the
    bundle's own ONNX graphs."""

    name: str
    engine_backend: str
    requires_engines: bool

    @property
    def label(self) -> str:
        """What ran, for results and logs, e.g. `onnxruntime/CPUExecutionProvider`."""
        ...

    def check_engine(self, sidecar: Mapping[str, Any], path: Path) -> None:
        """Refuse an engine this backend cannot run as built (other GPU, TensorRT, provider)."""
        ...

    def open_graph(self, path: Path, component: str) -> GraphRunner: ...

    def open_kv_step(self, path: Path, component: str) -> KvStepRunner: ...


BackendFactory = Callable[..., Backend]
BACKENDS: dict[str, BackendFactory] = {}
# Built-in backends: the module that registers each, imported on first use.
BUILTIN_MODULES = {
    "onnxruntime": "citrus_edge.runtime.ort_backend",
    "tensorrt": "citrus_edge.runtime.tensorrt_backend",
}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class decorator: make `name` create this backend; a second registration is an error."""

    def add(factory: BackendFactory) -> BackendFactory:
        if name in BACKENDS and BACKENDS[name] is not factory:
            raise ValueError(f"backend {name!r} is already registered")
        BACKENDS[name] = factory
        return factory

    return add


def available_backends() -> list[str]:
    """Names a caller may pass to `create_backend` (whether their packages import or not)."""
    return sorted(set(BACKENDS) | set(BUILTIN_MODULES))


def create_backend(name: str, providers: Sequence[str] | None = None) -> Backend:
    """The backend registered as `name`; `providers` are ONNX Runtime execution providers.

    Raises `UnknownBackendError` for a name nobody registered, and the backend's own setup
    error (`OnnxRuntimeSetupError`, `TensorRTSetupError`) when it cannot run here.
    """
    if name not in BACKENDS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; choose one of {available_backends()}")
    return BACKENDS[name](providers=providers)


def check_batch_one(feeds: Mapping[str, np.ndarray], what: str) -> None:
    """The runtime decodes one image and prompt at a time: refuse other batch sizes."""
    batch = np.asarray(feeds["inputs_embeds"]).shape[0]
    if batch != 1:
        raise RuntimeSetupError(f"{what}: the runtime decodes batch 1, got batch {batch}")
