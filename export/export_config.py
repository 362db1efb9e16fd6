"""Typed, versioned settings of an export run (torch-free).

`ExportConfig` lives in the core (`citrus_edge.graph_specs`), where the ModelOpt LLM path in
compress/ reads it too; this module keeps the export stage's name for it.
"""

from __future__ import annotations

from citrus_edge.graph_specs import EXPORT_CONFIG_VERSION, GIB, MIN_OPSET, ExportConfig

__all__ = ["EXPORT_CONFIG_VERSION", "GIB", "MIN_OPSET", "ExportConfig"]
