"""citrus_edge.export: Citrus-V as one validated ONNX graph per component.

`export_all` writes the vision encoder, the LLM step, the SAM2 image encoder and the mask decoder
(each `<name>.onnx` + `<name>.manifest.json`), the embedding table, `config.json` and
`export_manifest.json`. Importing this package imports no torch: `export_all` and
`export_component` load the exporters on first use.

Layout: the graph specs are numpy code in the core (`citrus_edge.graph_specs`,
`citrus_edge.component_specs`); the torch halves -- the export-only wrappers, the stock
references and the one ONNX tracer -- are in `citrus_edge.modelling` (`export_wrappers`,
`export_references`, `onnx_trace`). This stage pairs them (`components`), validates each traced
graph in ONNX Runtime (`validate`, `graph`), writes the manifests (`export_manifest`) and the
embedding table (`embedding_table`), and exports everything atomically (`export_run`).
"""

from __future__ import annotations

from typing import Any

from .export_config import ExportConfig
from .validate import ExportValidationError

__all__ = ["ExportConfig", "ExportValidationError", "export_all", "export_component"]


def __getattr__(name: str) -> Any:
    # Lazy: the exporters import torch and transformers.
    if name == "export_all":
        from .export_run import export_all

        return export_all
    if name == "export_component":
        from .graph import export_component

        return export_component
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
