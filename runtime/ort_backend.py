"""ONNX Runtime backend: CPU by default; CUDA / TensorRT execution providers only when asked.

Sessions are checked after creation (`get_providers()`): ONNX Runtime drops a provider it cannot
load without an error, and a silent move to the CPU is refused here. The LLM step runs through
IOBinding: `present_*` outputs stay in ONNX Runtime buffers on the provider's device and are
bound as the next step's `past_*`, so the cache is never copied to numpy between tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from citrus_edge.export.host_inputs import past_names, present_names

from .backends import (
    HIDDEN,
    LOGITS,
    STEP_INPUTS,
    check_batch_one,
    register_backend,
)
from .errors import BackendRunError
from .onnxruntime_flavour import (
    OnnxRuntimeSetupError,
    check_onnxruntime,
    check_providers,
    check_session_providers,
)

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# Where IOBinding keeps the KV cache for the first requested provider. Providers not listed
# here keep it in CPU memory (ONNX Runtime copies it in and out as it needs).
CACHE_DEVICE = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
}
NUMPY_DTYPE = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}

Provider = str | tuple[str, dict]


def _provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def _dtype_of(arg, component: str) -> np.dtype:
    try:
        return np.dtype(NUMPY_DTYPE[arg.type])
    except KeyError as e:
        raise OnnxRuntimeSetupError(
            f"{component}: graph tensor {arg.name} has type {arg.type}, which the runtime does "
            f"not feed ({sorted(NUMPY_DTYPE)})"
        ) from e


def _coerce(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Feed in the graph's dtype (e.g. float32 host values into a float16 graph)."""
    return np.ascontiguousarray(value, dtype=dtype)


def _as_float32(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if value.dtype.kind == "f" else value


@register_backend("onnxruntime")
class OnnxRuntimeBackend:
    """Opens the bundle's `.onnx` graphs, or an engines folder's ORT-optimized ones, in ONNX
    Runtime sessions on exactly the requested providers."""

    name = "onnxruntime"
    engine_backend = "onnxruntime"  # the `cpu` target's ORT-optimized graphs
    requires_engines = False

    def __init__(self, providers: Sequence[Provider] | None = None, threads: int = 0):
        self.flavour = check_onnxruntime()
        self.providers: list[Provider] = list(providers or DEFAULT_PROVIDERS)
        self.provider_names = [_provider_name(p) for p in self.providers]
        check_providers(self.provider_names)
        self.threads = threads
        first = self.providers[0]
        self.cache_device = CACHE_DEVICE.get(self.provider_names[0], "cpu")
        options = first[1] if isinstance(first, tuple) else {}
        self.device_id = int(options.get("device_id", 0))

    @property
    def label(self) -> str:
        return f"{self.name}/{self.provider_names[0]}"

    def check_engine(self, sidecar: Mapping[str, Any], path: Path) -> None:
        """An optimized graph runs only on the providers it was optimized for (fused operators
        of one provider would otherwise be placed on another without a word)."""
        built_for = list(sidecar.get("providers", []))
        if self.provider_names[0] not in built_for:
            raise OnnxRuntimeSetupError(
                f"{path}: optimized for {built_for}, not {self.provider_names[0]}; run the "
                "bundle's own ONNX graphs (no engines folder) on this provider"
            )
        built, here = sidecar.get("onnxruntime_version"), self._version()
        if built != here:
            log.info("%s: optimized with onnxruntime %s, running %s", path.name, built, here)

    @staticmethod
    def _version() -> str:
        import onnxruntime as ort

        return ort.__version__

    def session(self, path: Path, component: str):
        """An InferenceSession on exactly the requested providers (else OnnxRuntimeSetupError)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; provider drops are checked below
        options.intra_op_num_threads = self.threads
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=self.providers
            )
        except Exception as e:  # ORT raises its own pybind exception types
            raise OnnxRuntimeSetupError(
                f"{path}: ONNX Runtime cannot load the {component} graph ({e}); re-export the "
                "bundle or check that it matches this onnxruntime version"
            ) from e
        check_session_providers(session, self.provider_names, f"{component} ({path.name})")
        log.debug("%s: %s on %s", component, path.name, session.get_providers())
        return session

    def open_graph(self, path: Path, component: str) -> OrtGraph:
        return OrtGraph(self.session(path, component), component)

    def open_kv_step(self, path: Path, component: str) -> OrtKvStep:
        return OrtKvStep(
            self.session(path, component), component, self.cache_device, self.device_id
        )


class OrtGraph:
    """A session run with numpy feeds; feeds are cast to the graph's input dtypes."""

    def __init__(self, session, component: str):
        self.session, self.component = session, component
        self.input_dtypes = {a.name: _dtype_of(a, component) for a in session.get_inputs()}
        self.input_names = tuple(self.input_dtypes)
        self.output_names = tuple(o.name for o in session.get_outputs())

    def max_leading_dim(self, name: str) -> int | None:
        return None  # ONNX Runtime takes any size of a dynamic axis

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise BackendRunError(f"{self.component}: feeds lack {sorted(missing)}")
        cast = {n: _coerce(feeds[n], self.input_dtypes[n]) for n in self.input_names}
        try:
            outputs = self.session.run(None, cast)
        except Exception as e:
            raise BackendRunError(f"{self.component}: ONNX Runtime run failed: {e}") from e
        return {n: _as_float32(v) for n, v in zip(self.output_names, outputs, strict=True)}


class OrtKvStep:
    """The LLM step graph through IOBinding, the KV cache kept as OrtValues on the device."""

    def __init__(self, session, component: str, device: str, device_id: int):
        self.session, self.component = session, component
        self.device, self.device_id = device, device_id
        inputs = {a.name: a for a in session.get_inputs()}
        self.input_dtypes = {n: _dtype_of(a, component) for n, a in inputs.items()}
        n_layers = sum(n.startswith("past_key_") for n in inputs)
        self.past, self.present = past_names(n_layers), present_names(n_layers)
        self.output_names = [o.name for o in session.get_outputs()]
        expected = {*STEP_INPUTS, *self.past}
        if n_layers == 0 or set(inputs) != expected:
            raise OnnxRuntimeSetupError(
                f"{component}: inputs {sorted(inputs)} are not an LLM step graph's "
                f"{sorted(expected)}; the bundle does not match this runtime"
            )
        shape = inputs[self.past[0]].shape  # ["batch", kvH, "past", d]
        self.empty_past = np.zeros((1, shape[1], 0, shape[3]), self.input_dtypes[self.past[0]])
        self.cache: dict[str, object] | None = None
        self.cache_len = 0

    def reset(self) -> None:
        self.cache, self.cache_len = None, 0

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        check_batch_one(feeds, self.component)
        binding = self.session.io_binding()
        held = []  # bind_cpu_input does not copy: keep the arrays alive until the run ends
        for name in STEP_INPUTS:
            held.append(_coerce(feeds[name], self.input_dtypes[name]))
            binding.bind_cpu_input(name, held[-1])
        for past, present in zip(self.past, self.present, strict=True):
            if self.cache is None:
                binding.bind_cpu_input(past, self.empty_past)
            else:
                binding.bind_ortvalue_input(past, self.cache[present])
        for name in self.output_names:
            on_device = name in self.present
            device = self.device if on_device else "cpu"
            binding.bind_output(name, device, self.device_id if on_device else 0)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise BackendRunError(f"{self.component}: ONNX Runtime step failed: {e}") from e
        outputs = dict(zip(self.output_names, binding.get_outputs(), strict=True))
        self.cache = {n: outputs[n] for n in self.present}
        self.cache_len = int(outputs[self.present[0]].shape()[2])
        logits = outputs[LOGITS].numpy()[0, -1]  # [V]
        hidden = outputs[HIDDEN].numpy()[0, -1]  # [H]
        return logits.astype(np.float32), hidden.astype(np.float32)
