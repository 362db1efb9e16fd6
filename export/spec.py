"""What each exported graph looks like, and the registry of components (torch-free).

A `GraphSpec` holds, in one place, a graph's input and output names with symbolic shapes (the
named dynamic axes), its dtypes, a sample generator for a config and the tolerance it is
validated to. A `Component` ties a spec factory to the export-only wrapper and to the stock
PyTorch path the graph is validated against; components register themselves in `REGISTRY`
when their module is imported (`export/vision.py`, `llm.py`, `sam_encoder.py`,
`mask_decoder.py`), so the pipeline loops over the registry instead of branching on names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch stays out of this module at run time
    from torch import nn

    from citrus_edge.config import CitrusVConfig
    from citrus_edge.modelling.model import CitrusV

    from .export_config import ExportConfig

Dim = int | str  # a fixed size, or the name of a dynamic axis


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


@dataclass(frozen=True)
class Component:
    """One exportable part of Citrus-V.

    - `spec(model_config, export_config)` builds the `GraphSpec` for a model config;
    - `wrapper(model)` returns the export-only `nn.Module` (stock weights, graph-friendly forward);
    - `reference(model, sample)` runs the stock PyTorch modules on a sample and returns numpy
      outputs by name: the oracle the ONNX graph is validated against.
    """

    name: str
    spec: Callable[[CitrusVConfig, ExportConfig], GraphSpec]
    wrapper: Callable[[CitrusV], nn.Module]
    reference: Callable[[CitrusV, Sample], dict[str, np.ndarray]]


REGISTRY: dict[str, Component] = {}


def register(component: Component) -> Component:
    """Add a component to `REGISTRY`; a second registration under the same name is an error."""
    if component.name in REGISTRY and REGISTRY[component.name] is not component:
        raise ValueError(f"component {component.name!r} is already registered")
    REGISTRY[component.name] = component
    return component
