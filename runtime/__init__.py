"""citrus_edge.runtime: the torch-free grounding pipeline that runs a bundle on the cart.

- `pipeline.Pipeline.from_bundle(path, backend, providers, max_new_tokens)`, then
  `pipeline(image_or_path, prompt, frame=0) -> GroundingResult`;
- `video.run_video(pipeline, source, prompt, key_frame)`: VLM on one frame, SAM2 on the rest;
- `output.write_json`, `output.write_overlay`, `output.encode_rle` / `decode_rle`;
- `measure.measure_masks`: mm² and mm from a DICOM's pixel spacing, never guessed;
- `bench.run_bench`, `bench.measure_cold_start`;
- `backends.create_backend`: `onnxruntime` (`ort_backend`) and `tensorrt` (`tensorrt_backend`).

Nothing here imports torch or transformers. Importing this package imports nothing heavy;
`Pipeline` is loaded on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
