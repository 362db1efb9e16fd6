"""What an exported graph looks like, and the settings of an export run (numpy only).

A `GraphSpec` holds, in one place, a graph's input and output names with symbolic shapes (the
named dynamic axes), its dtypes, a sample generator for a config and the tolerance it is
validated to. The per-component specs are built in `citrus_edge.component_specs`; the export
stage (`export/`) pairs each with its torch wrapper (`citrus_edge.modelling.export_wrappers`),
and the ModelOpt LLM path (`compress/modelopt_llm.py`) traces to the same LLM spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Dim = int | str  # a fixed size, or the name of a dynamic axis

EXPORT_CONFIG_VERSION = 1
MIN_OPSET = 17
GIB = 1 << 30


@dataclass(frozen=True)
class ExportConfig:
    """How the graphs are exported and validated.

    image_sizes: (height, width) in pixels of the images whose grids the vision graph is
        validated at; each side a multiple of `patch_size * spatial_merge_size` (28).
    opset: ONNX opset (>= 17, so LayerNormalization stays one op).
    atol: default max abs error between ONNX Runtime and PyTorch (a spec may set its own).
    external_data_bytes: weights above this size go to one `<graph>.onnx.data` file beside the
        graph (protobuf cannot hold 2 GiB).
    """

    image_sizes: tuple[tuple[int, int], ...] = ((224, 224), (168, 280), (280, 196))
    opset: int = MIN_OPSET
    atol: float = 1e-4
    external_data_bytes: int = 2 * GIB - 64 * (1 << 20)
    version: int = EXPORT_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "image_sizes", tuple((int(h), int(w)) for h, w in self.image_sizes)
        )
        if not self.image_sizes:
            raise ValueError("image_sizes must name at least one (height, width)")
        if any(min(hw) <= 0 for hw in self.image_sizes):
            raise ValueError(f"image_sizes must be positive, got {self.image_sizes}")
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset must be >= {MIN_OPSET}, got {self.opset}")
        if not self.atol > 0:
            raise ValueError(f"atol must be positive, got {self.atol}")
        if self.external_data_bytes <= 0:
            raise ValueError("external_data_bytes must be positive")
        if self.version != EXPORT_CONFIG_VERSION:
            raise ValueError(f"export config version {self.version} is not {EXPORT_CONFIG_VERSION}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_sizes"] = [list(hw) for hw in self.image_sizes]
        return d


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (ints fixed, strings named dynamic axes), dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"  # numpy dtype name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Sample:
    """Graph feeds plus what the stock PyTorch path needs besides them (e.g. the image grid)."""

    label: str
    feeds: dict[str, np.ndarray]
    context: dict[str, Any] = field(default_factory=dict)


Case = Mapping[str, Any]  # the sizes of one sample, e.g. {"batch": 2, "seq": 3, "past": 5}


@dataclass(frozen=True)
class GraphSpec:
    """Everything about one exported graph except the weights.

    `make_sample(case, seed)` builds random feeds of the sizes in `case`; the graph is traced on
    `export_case` and validated on each of `validation_cases`, which differ from it in every
    dynamic axis so a size frozen by tracing shows up as an error.
    """

    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    make_sample: Callable[[Case, int], Sample]
    export_case: Case
    validation_cases: tuple[Case, ...]
    atol: float = 1e-4

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`torch.onnx.export`'s `dynamic_axes`: every string dim of every input and output."""
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes and shapes of `feeds`; returns the size bound to each named axis."""
        missing = set(self.input_names) - set(feeds)
        extra = set(feeds) - set(self.input_names)
        if missing or extra:
            raise ValueError(
                f"{self.component}: feeds missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        sizes: dict[str, int] = {}
        for t in self.inputs:
            _bind(t, np.asarray(feeds[t.name]), sizes, self.component)
        return sizes

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "atol": self.atol,
        }


def _bind(t: TensorSpec, value: np.ndarray, sizes: dict[str, int], component: str) -> None:
    if value.dtype != np.dtype(t.dtype):
        raise ValueError(f"{component}: input {t.name} is {value.dtype}, expected {t.dtype}")
    if value.ndim != len(t.shape):
        raise ValueError(f"{component}: input {t.name} has shape {value.shape}, expected {t.shape}")
    for dim, size in zip(t.shape, value.shape, strict=True):
        expected = sizes.setdefault(dim, size) if isinstance(dim, str) else dim
        if size != expected:
            raise ValueError(
                f"{component}: input {t.name} has shape {value.shape}, expected {t.shape} "
                f"with {dim} = {expected}"
            )
