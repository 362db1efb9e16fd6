"""The registry of exportable components (torch-free).

A `Component` ties a spec factory (`citrus_edge.component_specs`: the `GraphSpec` of its graph,
numpy only) to the export-only wrapper and to the stock PyTorch path the graph is validated
against (`citrus_edge.modelling.export_wrappers`, `export_references`). `export/components.py`
registers the four components in `REGISTRY` when imported, so the pipeline loops over the
registry instead of branching on names. `GraphSpec`, `TensorSpec`, `Sample` and `Case` live in
the core (`citrus_edge.graph_specs`) and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from citrus_edge.graph_specs import Case, Dim, ExportConfig, GraphSpec, Sample, TensorSpec

if TYPE_CHECKING:  # torch stays out of this module at run time
    from torch import nn

    from citrus_edge.config import CitrusVConfig
    from citrus_edge.modelling.model import CitrusV

__all__ = [
    "REGISTRY",
    "Case",
    "Component",
    "Dim",
    "ExportConfig",
    "GraphSpec",
    "Sample",
    "TensorSpec",
    "register",
]


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
