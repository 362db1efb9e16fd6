"""ONNX Runtime backend: CPU by default; CUDA / TensorRT execution providers only when asked.

Sessions are checked after creation (`get_providers()`): ONNX Runtime drops a provider it cannot
load without an error, and a silent move to the CPU is refused here. The LLM step runs through
IOBinding: `present_*` outputs stay in ONNX Runtime buffers on the provider's device and are
bound as the next step's `past_*`, so the cache is never copied to numpy between tokens.

A GPU provider named without options gets them here (`provider_options`): without any, ONNX
Runtime's TensorRT provider builds FP32 engines and rebuilds them in every session. It gets the
bundle's precision (`trt_fp16_enable` for fp16 components and for Q/DQ graphs, whose float parts
TensorRT would otherwise run in FP32; `trt_int8_enable` for INT8 Q/DQ; RMSNorm's Pow/Reduce kept
FP32, the Qwen2.5-VL fp16 pitfall), an engine cache and a timing cache in
`<bundle>-engines/onnxruntime-tensorrt/` (never inside the bundle, whose files are hashed), and
explicit profiles: one per input covering every optimisation profile of the bundle's engine plan
(the LLM's prefill and decode ranges of the KV inputs together), tuned for the last (decode).
Options a caller passes with a provider (`("TensorrtExecutionProvider", {...})`) are kept as given.
"""

from __future__ import annotations

import json
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
from .onnxruntime_flavour import (
    OnnxRuntimeSetupError,
    check_onnxruntime,
    check_providers,
    check_session_providers,
)
from .runtime_errors import BackendRunError

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
TRT_EP, CUDA_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider"
EP_CACHE_DIR = "onnxruntime-tensorrt"  # under <bundle>-engines/, beside the TensorRT engines
# Component precisions whose graph TensorRT may run with FP16 kernels (fp16 itself, and the
# float parts of fp32-carrier Q/DQ graphs); fp32 stays fp32, bf16 has no option here.
FP16_PRECISIONS = frozenset({"fp16", "int8", "int4", "fp8"})


def _provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def _bundle_root(graph: Path) -> Path | None:
    """The bundle folder holding `graph` (the nearest `manifest.json` above it), or None."""
    for folder in (graph.parent, graph.parent.parent):
        if (folder / "manifest.json").is_file():
            return folder
    return None


def _plan_profiles(manifest: Mapping[str, Any], component: str) -> list[dict]:
    """The component's optimisation profiles in the bundle's engine plan ([] without a plan)."""
    plan = manifest.get("engine_plan") or {}
    if plan and plan.get("kind") is None and len(plan) == 1:  # plans keyed by target
        plan = next(iter(plan.values()))
    for entry in plan.get("components", []):
        if entry.get("component") == component:
            return list(entry.get("profiles", []))
    return []


def _shape_list(shapes: Mapping[str, Sequence[int]]) -> str:
    return ",".join(f"{n}:{'x'.join(str(int(d)) for d in s)}" for n, s in shapes.items())


def profile_shapes(profiles: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """`trt_profile_min/opt/max_shapes` covering every profile: per input the elementwise
    min and max over the profiles, opt from the last profile that names it."""
    lo: dict[str, list[int]] = {}
    hi: dict[str, list[int]] = {}
    opt: dict[str, list[int]] = {}
    for profile in profiles:
        for name, s in profile["inputs"].items():
            lo[name] = [min(a, b) for a, b in zip(lo.get(name, s["min"]), s["min"], strict=True)]
            hi[name] = [max(a, b) for a, b in zip(hi.get(name, s["max"]), s["max"], strict=True)]
            opt[name] = list(s["opt"])
    if not lo:
        return {}
    return {
        "trt_profile_min_shapes": _shape_list(lo),
        "trt_profile_opt_shapes": _shape_list(opt),
        "trt_profile_max_shapes": _shape_list(hi),
    }


def provider_options(provider: str, graph: Path, component: str, device_id: int = 0) -> dict:
    """Options for `provider` (named without any) running `component`'s `graph` (see the module
    docstring). OnnxRuntimeSetupError for a precision the provider cannot be told to run."""
    if provider == CUDA_EP:
        return {"device_id": device_id}
    if provider != TRT_EP:
        return {}
    root = _bundle_root(graph)
    manifest = json.loads((root / "manifest.json").read_text()) if root else {}
    precision = manifest.get("components", {}).get(component, {}).get("precision", "fp32")
    if precision == "bf16":
        raise OnnxRuntimeSetupError(
            f"{component}: the bundle is bf16, which ONNX Runtime's TensorRT provider is not "
            "told to run here; run it with backend='tensorrt' (citrus-edge engines build)"
        )
    base = root if root is not None else graph.parent
    cache = base.parent / f"{base.name}-engines" / EP_CACHE_DIR
    fp16 = precision in FP16_PRECISIONS
    options: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_int8_enable": precision == "int8",
        "trt_layer_norm_fp32_fallback": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    shapes = profile_shapes(_plan_profiles(manifest, component))
    if not shapes:
        log.warning(
            "%s: the bundle carries no engine plan, so ONNX Runtime's TensorRT provider gets no "
            "explicit profiles and rebuilds its engine whenever an input outgrows the last one; "
            "build the bundle for a TensorRT target to get them",
            component,
        )
    return {**options, **shapes}


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
        providers = self.session_providers(Path(path), component)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types
            raise OnnxRuntimeSetupError(
                f"{path}: ONNX Runtime cannot load the {component} graph ({e}); re-export the "
                "bundle or check that it matches this onnxruntime version"
            ) from e
        check_session_providers(session, self.provider_names, f"{component} ({path.name})")
        log.debug("%s: %s on %s", component, path.name, session.get_providers())
        return session

    def session_providers(self, path: Path, component: str) -> list[Provider]:
        """The providers for one graph: GPU providers named bare get `provider_options`."""
        out: list[Provider] = []
        for p in self.providers:
            if isinstance(p, str) and p in (TRT_EP, CUDA_EP):
                options = provider_options(p, path, component, self.device_id)
                if p == TRT_EP:
                    Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
                out.append((p, options))
            else:
                out.append(p)
        return out

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
