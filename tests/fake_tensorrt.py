"""Fakes of the TensorRT 10.3 Python API and cuda-python's runtime that ENFORCE their contracts.

TensorRT cannot be installed here; these stand-ins let the runtime's and the builder's own logic
run on the CPU. They do only what the real API documents, and refuse what it refuses:

- `IExecutionContext.set_input_shape` returns False for a shape outside the ACTIVE profile's
  min..max (or of the wrong rank, or against a fixed dim); a new context runs profile 0;
  `set_optimization_profile_async(index, stream)` switches and forgets the input shapes set so
  far (they must be set again); `execute_async_v3` refuses unset shapes or addresses.
- `ICudaEngine.get_tensor_profile_shape(name, index)` answers inputs only, for a valid index.
- device memory is host memory from `cudaMalloc`; every copy and every kernel read or write is
  bounds-checked against the allocation it falls in (a too-small buffer is an error, not a
  silent overwrite).
- `IBuilder.build_serialized_network` returns an `IHostMemory`-like buffer (buffer protocol)
  that counts `tobytes()` copies; the parser records what file it read and its types.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

SUCCESS = 0
ERROR = 1


class FakeCudart:
    """cuda-python's `cuda.bindings.runtime`: the calls `Cuda` makes, on host memory."""

    cudaError_t = SimpleNamespace(cudaSuccess=SUCCESS, cudaErrorInvalidValue=ERROR)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.blocks: dict[int, Any] = {}  # base address -> ctypes buffer

    def cudaGetDeviceCount(self):
        return SUCCESS, 1

    def cudaStreamCreate(self):
        return SUCCESS, 7

    def cudaStreamSynchronize(self, stream):
        return (SUCCESS,)

    def cudaMalloc(self, nbytes: int):
        buf = (ctypes.c_char * int(nbytes))()
        ptr = ctypes.addressof(buf)
        self.blocks[ptr] = buf
        return SUCCESS, ptr

    def cudaFree(self, ptr: int):
        if ptr not in self.blocks:
            return (ERROR,)
        del self.blocks[ptr]
        return (SUCCESS,)

    def check(self, ptr: int, nbytes: int) -> None:
        """`ptr .. ptr + nbytes` must lie in one live allocation."""
        for base, buf in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf):
                return
        raise AssertionError(f"device access of {nbytes} bytes at {ptr:#x} is out of bounds")

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        self.check(device, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (SUCCESS,)

    def view(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy view of device memory (what a kernel reads and writes)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.check(ptr, nbytes)
        if nbytes == 0:
            return np.empty(shape, dtype)
        raw = (ctypes.c_char * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


Compute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
ShapeFn = Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]


class FakeEngine:
    """`ICudaEngine`: tensors (name -> (mode, dtype, shape with -1)), profiles
    (list of input name -> (min, opt, max)), and the toy kernel that computes the outputs."""

    def __init__(
        self,
        trt: FakeTrt,
        tensors: Mapping[str, tuple[str, Any, tuple[int, ...]]],
        profiles: list[dict[str, tuple[tuple[int, ...], ...]]],
        output_shapes: ShapeFn,
        compute: Compute,
    ):
        self.trt, self.tensors, self.profiles = trt, dict(tensors), profiles
        self.output_shapes, self.compute = output_shapes, compute
        self.inputs = [n for n, (mode, _, _) in self.tensors.items() if mode == "in"]
        for p in profiles:
            assert set(p) == set(self.inputs), "a profile sets every input (TensorRT requires)"
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str):
        mode = self.tensors[name][0]
        return self.trt.TensorIOMode.INPUT if mode == "in" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return np.dtype(self.tensors[name][1])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name][2])

    def get_tensor_profile_shape(self, name: str, index: int):
        if name not in self.inputs:
            raise RuntimeError(f"get_tensor_profile_shape: {name} is not an input tensor")
        if not 0 <= index < len(self.profiles):
            raise RuntimeError(f"get_tensor_profile_shape: no profile {index}")
        return [list(s) for s in self.profiles[index][name]]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    """`IExecutionContext` with TensorRT's profile rules (see the module docstring)."""

    def __init__(self, engine: FakeEngine):
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.switches: list[int] = []  # profiles switched to, in order
        self.runs: list[int] = []  # the active profile of each execute_async_v3
        self.refused: list[tuple[str, tuple[int, ...]]] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        self.shapes.clear()  # input shapes must be specified again after a switch
        self.switches.append(index)
        return True

    def _fits(self, name: str, shape: tuple[int, ...]) -> bool:
        static = self.engine.get_tensor_shape(name)
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(static):
            return False
        if any(s >= 0 and d != s for d, s in zip(shape, static, strict=True)):
            return False
        return all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True))

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        if name not in self.engine.inputs or not self._fits(name, shape):
            self.refused.append((name, shape))
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.tensors:
            return False
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        if set(self.shapes) != set(self.engine.inputs):
            return self.engine.get_tensor_shape(name)  # unresolved: -1 dims
        return tuple(self.engine.output_shapes(dict(self.shapes))[name])

    def execute_async_v3(self, stream: int) -> bool:
        e = self.engine
        if set(self.shapes) != set(e.inputs) or set(self.addresses) != set(e.tensors):
            return False
        if not all(self._fits(n, s) for n, s in self.shapes.items()):
            return False
        cuda = e.trt.cudart
        inputs = {
            n: cuda.view(self.addresses[n], self.shapes[n], e.get_tensor_dtype(n)).copy()
            for n in e.inputs
        }
        outputs = e.compute(inputs)
        for name, value in outputs.items():
            shape = self.get_tensor_shape(name)
            assert value.shape == shape, (name, value.shape, shape)
            cuda.view(self.addresses[name], shape, e.get_tensor_dtype(name))[...] = value
        self.runs.append(self.profile)
        return True


class FakeHostMemory(bytearray):
    """`IHostMemory`: a buffer the builder owns (buffer protocol; Python 3.11 has no
    `__buffer__` for plain classes, so a bytearray subclass stands in). `copies` counts
    `tobytes()` calls."""

    copies = 0

    @property
    def nbytes(self) -> int:
        return len(self)

    def tobytes(self) -> bytes:
        self.copies += 1
        return bytes(self)


class FakeTrt:
    """The `tensorrt` module: version, enums, Logger, Runtime (deserializes registered engines)."""

    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    def __init__(self, version: str = "10.3.0.30", cudart: FakeCudart | None = None):
        self.__version__ = version
        self.cudart = cudart or FakeCudart()
        self.serialized: dict[bytes, FakeEngine] = {}
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, severity=2):
                self.severity = severity

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes):
                return trt.serialized.get(bytes(data))

        self.Logger, self.Runtime = Logger, Runtime

    @staticmethod
    def nptype(dtype) -> type:
        return np.dtype(dtype).type

    def register(self, key: bytes, engine: FakeEngine) -> bytes:
        """What a serialized engine file holds so that `Runtime` returns `engine` for it."""
        self.serialized[key] = engine
        return key


class FakeLayer:
    """`ILayer` with float outputs (what `_force_fp32` pins)."""

    def __init__(self, trt: FakeBuilderTrt, name: str):
        self.name, self.num_outputs, self.precision = name, 1, None
        self._out = SimpleNamespace(dtype=trt.float32)
        self.output_types: dict[int, Any] = {}

    def get_output(self, j: int):
        return self._out

    def set_output_type(self, j: int, dtype) -> None:
        self.output_types[j] = dtype


class FakeNetwork:
    """`INetworkDefinition` filled by `FakeParser` from the ONNX file's inputs and node names."""

    def __init__(self, trt: FakeBuilderTrt, flags: int):
        self.trt, self.flags, self.inputs, self.layers, self.source = trt, flags, [], [], None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int):
        return self.inputs[i]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]


class FakeBuilderTrt(FakeTrt):
    """`FakeTrt` plus the builder API `engines.tensorrt_builder` calls (TensorRT 10.3 names)."""

    float32, float16, bfloat16 = np.dtype(np.float32), np.dtype(np.float16), "bfloat16"
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    DeviceType = SimpleNamespace(DLA="DLA", GPU="GPU")
    BuilderFlag = SimpleNamespace(
        **{n: n for n in ("FP16", "BF16", "INT8", "FP8", "TF32", "OBEY_PRECISION_CONSTRAINTS")},
        GPU_FALLBACK="GPU_FALLBACK",
    )

    def __init__(self, version: str = "10.3.0.30"):
        super().__init__(version)
        trt = self
        self.plans: list[FakeHostMemory] = []
        self.parsed: dict[str, dict] = {}  # file name -> what the parser read

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: FakeNetwork, logger):
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                import onnx

                model = onnx.load(path, load_external_data=False)
                inits = {i.name for i in model.graph.initializer}
                for i in model.graph.input:
                    if i.name in inits:
                        continue
                    dims = i.type.tensor_type.shape.dim
                    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
                    self.network.inputs.append(SimpleNamespace(name=i.name, shape=shape))
                self.network.layers = [FakeLayer(trt, n.name) for n in model.graph.node]
                self.network.source = Path(path).name
                trt.parsed[Path(path).name] = {
                    "folder": str(Path(path).parent),
                    "initializer_types": {i.data_type for i in model.graph.initializer},
                    "strongly_typed": bool(self.network.flags & 2),
                }
                return True

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def add_optimization_profile(self, profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, data: bytes):
                return SimpleNamespace(serialize=lambda: FakeHostMemory(b"timing-cache"))

            def set_timing_cache(self, cache, ignore_mismatch=False) -> bool:
                self.cache = cache
                return True

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags: int) -> FakeNetwork:
                return FakeNetwork(trt, flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self):
                shapes = {}
                return SimpleNamespace(
                    shapes=shapes, set_shape=lambda n, lo, mid, hi: shapes.update({n: (lo, hi)})
                )

            def build_serialized_network(self, network: FakeNetwork, config: Config):
                plan = FakeHostMemory(f"plan of {network.source}".encode() * 100)
                trt.plans.append(plan)
                return plan

        self.OnnxParser, self.Builder = OnnxParser, Builder
