"""TensorRT backend: serialized TensorRT 10 engines run with device buffers from cuda-python.

Engines come from `citrus-edge engines build` (an engines folder, `engine_folder.py`), built for
this GPU and TensorRT version; `check_engine` refuses others via `citrus_edge.engines.compat`. I/O goes through TensorRT 10's name-based API
(`num_io_tensors`, `get_tensor_name/mode/dtype`, `set_input_shape` per call,
`set_tensor_address`, `execute_async_v3`); memory and copies through cuda-python's runtime
bindings, not torch. The LLM step keeps its KV cache in two sets of device buffers that swap
roles each step (`present_*` written into one set becomes the next step's `past_*`), so a
decode step copies one token's inputs in and one row of logits and hidden state out.

Optimisation profiles: the LLM engine has two (`engines/profiles.py`: `prefill`, past = 0, and
`decode`, seq = 1, past >= 1). A new execution context runs profile 0, and `set_input_shape`
refuses a shape outside the active profile, so every run first picks the profile whose
min..max range (`get_tensor_profile_shape`) holds all its input shapes (`select_profile`) and
switches to it with `set_optimization_profile_async` when it is not the active one (as
polygraphy's TensorRT runner does); the input shapes are set after the switch.

`tensorrt` and `cuda-python` are imported when the backend is created, never at module import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from citrus_edge.host_inputs import past_names, present_names

from .backends import (
    HIDDEN,
    LOGITS,
    STEP_INPUTS,
    check_batch_one,
    register_backend,
)
from .runtime_errors import BackendRunError, RuntimeSetupError, TensorRTSetupError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with pip install 'citrus-edge[tensorrt]' (TensorRT 10.x + cuda-python 12.x; on "
    "Jetson use JetPack's TensorRT from a venv made with --system-site-packages and pip install "
    "'cuda-python>=12.6,<13'); engines come from `citrus-edge engines build`"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module (10.x), or TensorRTSetupError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTSetupError(
            f"the tensorrt backend needs the tensorrt package: {INSTALL_HINT}"
        ) from e
    major = int(trt.__version__.split(".")[0])
    if major != 10:
        raise TensorRTSetupError(
            f"TensorRT {trt.__version__} is not TensorRT 10, which this runtime is written "
            f"for (10.3 or later 10.x): {INSTALL_HINT}"
        )
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime bindings (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise TensorRTSetupError(
                f"the tensorrt backend needs cuda-python: {INSTALL_HINT}"
            ) from e
    return cudart


class Cuda:
    """The few CUDA runtime calls the backend needs, on one stream, errors raised."""

    def __init__(self, cudart: Any):
        self.rt = cudart
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count < 1:
            raise TensorRTSetupError(
                f"no CUDA GPU is visible ({err}); the tensorrt backend needs an NVIDIA GPU and "
                "driver (use backend='onnxruntime' on this machine)"
            )
        self.stream = self.check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def check(self, result: tuple, what: str) -> Any:
        err, *value = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BackendRunError(f"CUDA {what} failed: {err}")
        return value[0] if value else None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if host.nbytes:
            args = (ptr, host.ctypes.data, host.nbytes, kind, self.stream)
            self.check(self.rt.cudaMemcpyAsync(*args), "cudaMemcpyAsync (to device)")

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if host.nbytes:
            args = (host.ctypes.data, ptr, host.nbytes, kind, self.stream)
            self.check(self.rt.cudaMemcpyAsync(*args), "cudaMemcpyAsync (to host)")

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    @property
    def stream_handle(self) -> int:
        return int(self.stream)


class DeviceBuffer:
    """Device memory that grows (contents dropped) when a tensor needs more than it holds."""

    def __init__(self, cuda: Cuda, nbytes: int = 256):
        self.cuda, self.nbytes = cuda, max(int(nbytes), 256)
        self.ptr = cuda.malloc(self.nbytes)

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.cuda.free(self.ptr)
            self.nbytes = max(int(nbytes), 2 * self.nbytes)
            self.ptr = self.cuda.malloc(self.nbytes)
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
            self.ptr = 0


Bounds = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # input -> (min shape, max shape)


def select_profile(
    profiles: Sequence[Bounds], shapes: Mapping[str, Sequence[int]], active: int = 0
) -> int | None:
    """The profile whose (min, max) range holds every shape in `shapes`: `active` if it does
    (no switch), else the first that does; None when none does."""

    def holds(bounds: Bounds) -> bool:
        for name, shape in shapes.items():
            lo, hi = bounds[name]
            if len(shape) != len(lo):
                return False
            if any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False
        return True

    order = [active, *(i for i in range(len(profiles)) if i != active)]
    return next((i for i in order if i < len(profiles) and holds(profiles[i])), None)


class Engine:
    """A deserialized engine, its execution context and one device buffer per I/O tensor."""

    def __init__(self, trt: Any, cuda: Cuda, path: Path, component: str):
        self.trt, self.cuda, self.component = trt, cuda, component
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise TensorRTSetupError(
                f"{path}: TensorRT {trt.__version__} cannot deserialize this {component} engine; "
                "engines are tied to the TensorRT version and GPU that built them: rebuild with "
                "`citrus-edge engines build` on this machine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inp = trt.TensorIOMode.INPUT
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == inp)
        self.output_names = tuple(n for n in names if n not in self.input_names)
        self.dtypes = {n: self._dtype(n) for n in names}
        self.buffers = {n: DeviceBuffer(cuda) for n in names}
        self.profiles = self._profile_bounds()
        self.profile = 0  # a new execution context runs optimisation profile 0

    def _profile_bounds(self) -> list[Bounds]:
        """Each optimisation profile's (min, max) shape per input, as the engine reports it."""
        bounds = []
        for index in range(self.engine.num_optimization_profiles):
            per_input = {}
            for name in self.input_names:
                lo, _, hi = self.engine.get_tensor_profile_shape(name, index)
                per_input[name] = (tuple(int(d) for d in lo), tuple(int(d) for d in hi))
            bounds.append(per_input)
        return bounds

    def use_profile_for(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """Make the profile that holds `shapes` the active one (before any `set_input_shape`)."""
        index = select_profile(self.profiles, shapes, self.profile)
        if index is None:
            ranges = [
                {n: f"{list(lo)}..{list(hi)}" for n, (lo, hi) in p.items() if n in shapes}
                for p in self.profiles
            ]
            raise BackendRunError(
                f"{self.component}: input shapes {dict(shapes)} fit none of the engine's "
                f"{len(self.profiles)} optimisation profiles {ranges}; rebuild the engine with "
                "larger shape ranges (citrus-edge engines build)"
            )
        if index != self.profile:
            if not self.context.set_optimization_profile_async(index, self.cuda.stream_handle):
                raise BackendRunError(
                    f"{self.component}: TensorRT refused to switch to optimisation profile {index}"
                )
            self.profile = index
        return index

    def _dtype(self, name: str) -> np.dtype:
        trt_type = self.engine.get_tensor_dtype(name)
        try:
            return np.dtype(self.trt.nptype(trt_type))
        except TypeError as e:
            raise TensorRTSetupError(
                f"{self.component}: engine tensor {name} is {trt_type}, which has no numpy type"
            ) from e

    def static_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_shape(name))

    def host_input(self, name: str, value: np.ndarray) -> np.ndarray:
        """`value` as a contiguous array of the engine tensor's dtype."""
        return np.ascontiguousarray(value, dtype=self.dtypes[name])

    def set_input(self, name: str, host: np.ndarray, buffer: DeviceBuffer | None = None):
        """Shape, copy and bind one host input (`host_input`'s array; keep it until synchronize).

        The active profile must hold the shape: call `use_profile_for` first."""
        self.set_shape(name, host.shape)
        buffer = buffer or self.buffers[name]
        ptr = buffer.reserve(host.nbytes)
        self.cuda.to_device(ptr, host)
        self.context.set_tensor_address(name, ptr)
        return host

    def set_shape(self, name: str, shape: Sequence[int]) -> None:
        if not self.context.set_input_shape(name, tuple(shape)):
            raise BackendRunError(
                f"{self.component}: input {name} shape {tuple(shape)} is outside the engine's "
                "optimisation profile; rebuild the engine with larger shape ranges"
            )

    def output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendRunError(f"{self.component}: output {name} shape {shape} is unresolved")
        return shape

    def bind_output(self, name: str, buffer: DeviceBuffer | None = None) -> tuple[int, ...]:
        shape = self.output_shape(name)
        nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
        self.context.set_tensor_address(name, (buffer or self.buffers[name]).reserve(nbytes))
        return shape

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise BackendRunError(f"{self.component}: TensorRT execute_async_v3 failed")

    def release(self) -> None:
        for buffer in self.buffers.values():
            buffer.release()


def _as_float32(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if value.dtype.kind == "f" else value


class TrtGraph:
    """One engine run with numpy feeds and numpy outputs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def max_leading_dim(self, name: str) -> int | None:
        """The first dimension's maximum over the engine's optimisation profiles."""
        return max(p[name][1][0] for p in self.engine.profiles)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        e = self.engine
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise BackendRunError(f"{e.component}: feeds lack {sorted(missing)}")
        hosts = {n: e.host_input(n, feeds[n]) for n in self.input_names}
        e.use_profile_for({n: h.shape for n, h in hosts.items()})
        held = [e.set_input(n, h) for n, h in hosts.items()]
        outputs = {n: np.empty(e.bind_output(n), e.dtypes[n]) for n in self.output_names}
        e.execute()
        for name, host in outputs.items():
            e.cuda.to_host(host, e.buffers[name].ptr)
        e.cuda.synchronize()
        del held
        return {n: _as_float32(v) for n, v in outputs.items()}


class TrtKvStep:
    """The LLM step engine with the KV cache in two swapping sets of device buffers."""

    def __init__(self, engine: Engine):
        self.engine = engine
        n_layers = sum(n.startswith("past_key_") for n in engine.input_names)
        self.past, self.present = past_names(n_layers), present_names(n_layers)
        expected = {*STEP_INPUTS, *self.past}
        if n_layers == 0 or set(engine.input_names) != expected:
            raise TensorRTSetupError(
                f"{engine.component}: engine inputs {sorted(engine.input_names)} are not an LLM "
                f"step's {sorted(expected)}; rebuild the engines from this bundle"
            )
        _, self.kv_heads, _, self.head_dim = engine.static_shape(self.past[0])
        self.cache = {n: DeviceBuffer(engine.cuda) for n in self.past}  # holds past_*
        self.spare = {n: DeviceBuffer(engine.cuda) for n in self.present}  # receives present_*
        self.cache_len = 0

    def reset(self) -> None:
        self.cache_len = 0

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        e = self.engine
        check_batch_one(feeds, e.component)
        hosts = {n: e.host_input(n, feeds[n]) for n in STEP_INPUTS}
        past_shape = (1, self.kv_heads, self.cache_len, self.head_dim)
        # prefill (empty cache) and decode steps fall in different profiles (engines/profiles)
        e.use_profile_for(
            {**{n: h.shape for n, h in hosts.items()}, **dict.fromkeys(self.past, past_shape)}
        )
        held = [e.set_input(n, h) for n, h in hosts.items()]
        for name in self.past:
            e.set_shape(name, past_shape)
            e.context.set_tensor_address(name, self.cache[name].ptr)
        for name in self.present:
            e.bind_output(name, self.spare[name])
        logits_shape, hidden_shape = e.bind_output(LOGITS), e.bind_output(HIDDEN)
        e.execute()
        logits = self._last_row(LOGITS, logits_shape)  # [V]
        hidden = self._last_row(HIDDEN, hidden_shape)  # [H]
        e.cuda.synchronize()
        del held
        for past, present in zip(self.past, self.present, strict=True):
            self.cache[past], self.spare[present] = self.spare[present], self.cache[past]
        self.cache_len += int(logits_shape[1])
        return _as_float32(logits), _as_float32(hidden)

    def _last_row(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Copy only the last position of a [1, S, D] output to the host."""
        e = self.engine
        row = np.empty(shape[-1], e.dtypes[name])
        offset = (shape[1] - 1) * shape[-1] * row.itemsize
        e.cuda.to_host(row, e.buffers[name].ptr + offset)
        return row


@register_backend("tensorrt")
class TensorRTBackend:
    """Runs an engines folder's TensorRT 10 engines (needs an NVIDIA GPU)."""

    name = "tensorrt"
    engine_backend = "tensorrt"
    requires_engines = True

    def __init__(self, providers: Sequence[str] | None = None):
        if providers:
            raise RuntimeSetupError(
                "providers choose ONNX Runtime execution providers; the tensorrt backend takes "
                "none (for ONNX Runtime's TensorRT provider use backend='onnxruntime', "
                "providers=['TensorrtExecutionProvider'])"
            )
        self.trt = import_tensorrt()
        self.cuda = Cuda(import_cudart())
        self.engines: list[Engine] = []

    @property
    def label(self) -> str:
        return f"{self.name}/{self.trt.__version__}"

    def check_engine(self, sidecar: Mapping[str, Any], path: Path) -> None:
        """Refuse an engine built for another TensorRT version, GPU or Jetson module
        (EngineMismatchError with the command that rebuilds it here)."""
        from citrus_edge.engines.compat import check_engine_compat
        from citrus_edge.engines.device import cuda_device, jetson_target

        device = cuda_device()
        check_engine_compat(
            sidecar,
            self.trt.__version__,
            device.sm,
            device_name=device.name,
            module=device.module,
            module_target=jetson_target() if device.module else None,
        )

    def _engine(self, path: Path, component: str) -> Engine:
        engine = Engine(self.trt, self.cuda, path, component)
        self.engines.append(engine)
        return engine

    def open_graph(self, path: Path, component: str) -> TrtGraph:
        return TrtGraph(self._engine(path, component))

    def open_kv_step(self, path: Path, component: str) -> TrtKvStep:
        return TrtKvStep(self._engine(path, component))
