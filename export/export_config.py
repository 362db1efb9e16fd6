"""Typed, versioned settings of an export run (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
