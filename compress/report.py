"""What a `quantize` run did and measured: `QuantizeReport`, saved as `quantize_report.json`.

Torch-free and JSON-ready. `rows()` gives one row per component for a rich table:
component, precision, scheme, bytes before -> after, worst output SQNR, nodes left float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

REPORT_SCHEMA = 1
REPORT_FILE = "quantize_report.json"


@dataclass
class ComponentReport:
    """One graph: requested precision, what was done to it and what it measures.

    status: "quantized", "float" (fp32 kept), or "engine-build" (fp16/bf16: the FP32 graph is
    kept and TensorRT builds the engine in that precision). sqnr_db: per float output against
    FP32 on the recorded validation inputs, None where ONNX Runtime cannot run the graph
    faithfully (then `check` holds the structural validation). sqnr_mode: "deploy" (ORT default
    optimizations, the CPU target's own numbers) or "reference" (optimizations off).
    """

    component: str
    precision: str
    status: str
    scheme: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    sqnr_db: dict[str, float] | None = None
    sqnr_mode: str | None = None
    check: dict[str, Any] = field(default_factory=dict)
    n_quantizable: int = 0
    float_nodes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def worst_sqnr_db(self) -> float | None:
        return min(self.sqnr_db.values()) if self.sqnr_db else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "precision": self.precision,
            "status": self.status,
            "scheme": self.scheme,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "sqnr_db": json_db(self.sqnr_db),
            "sqnr_mode": self.sqnr_mode,
            "check": self.check,
            "n_quantizable": self.n_quantizable,
            "float_nodes": list(self.float_nodes),
            "details": self.details,
        }


def json_db(values: dict[str, float] | None) -> dict[str, float | str] | None:
    """dB values with infinities as strings (JSON has no inf)."""
    if values is None:
        return None
    return {k: (round(v, 3) if math.isfinite(v) else str(v)) for k, v in values.items()}


@dataclass
class QuantizeReport:
    """Everything one `quantize` run decided and measured (see `to_dict` for the JSON)."""

    recipe: dict[str, Any]
    target: str
    backend: str
    method: str
    export_dir: str
    out_dir: str
    components: dict[str, ComponentReport]
    budget: dict[str, Any] | None
    measured: dict[str, Any] | None  # final `budget.Measured.to_dict()`
    measured_initial: dict[str, Any] | None  # before the sensitivity search
    search: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    # Everything the output carries besides manifests (graphs, embedding table, tokenizer,
    # config), before and after: the bundle's payload (`output.payload_bytes`).
    payload_bytes_before: int = 0
    payload_bytes_after: int = 0

    @property
    def bytes_before(self) -> int:
        return sum(c.bytes_before for c in self.components.values())

    @property
    def bytes_after(self) -> int:
        return sum(c.bytes_after for c in self.components.values())

    @property
    def size_ratio(self) -> float:
        """Graph bytes after / before (all four graphs)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def payload_ratio(self) -> float:
        """Payload bytes after / before: graphs + embedding table + tokenizer + config."""
        return (
            self.payload_bytes_after / self.payload_bytes_before
            if self.payload_bytes_before
            else 1.0
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "kind": "quantize_report",
            "recipe": self.recipe,
            "target": self.target,
            "backend": self.backend,
            "method": self.method,
            "export_dir": self.export_dir,
            "out_dir": self.out_dir,
            "components": {k: c.to_dict() for k, c in self.components.items()},
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "size_ratio": round(self.size_ratio, 4),
            "payload_bytes_before": self.payload_bytes_before,
            "payload_bytes_after": self.payload_bytes_after,
            "payload_ratio": round(self.payload_ratio, 4),
            "budget": self.budget,
            "measured": self.measured,
            "measured_initial": self.measured_initial,
            "search": self.search,
            "calibration": self.calibration,
            "config": self.config,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 2),
            "versions": self.versions,
        }

    def rows(self) -> list[tuple[str, ...]]:
        """Header + one row per component, as strings, for a rich table."""
        header = ("component", "precision", "scheme", "size", "SQNR dB", "float nodes")
        out = [header]
        for c in self.components.values():
            worst = c.worst_sqnr_db
            sqnr = "-" if worst is None else ("exact" if math.isinf(worst) else f"{worst:.1f}")
            if c.sqnr_db is None and c.check:
                sqnr = "structural " + ("ok" if c.check.get("ok") else "FAILED")
            size = f"{_mb(c.bytes_before)} -> {_mb(c.bytes_after)}"
            floats = f"{len(c.float_nodes)}/{c.n_quantizable}" if c.n_quantizable else "-"
            out.append((c.component, c.precision, c.scheme or c.status, size, sqnr, floats))
        return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
