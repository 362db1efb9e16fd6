"""citrus_edge.runtime: the torch-free grounding pipeline that runs a bundle on the cart.

- `pipeline.Pipeline.from_bundle(path, backend, providers, max_new_tokens)`, then
  `pipeline(image_or_path, prompt, frame=0) -> GroundingResult`;
- `observe.RunObserver`: passed as `observer=` to `Pipeline`, it is told about every graph run
  with its feeds (how calibration records them; the runners are never replaced from outside);
- `video.run_video(pipeline, source, prompt, key_frame)`: VLM on one frame, SAM2 on the rest;
- `result_files.write_json`, `result_files.write_overlay`, `result_files.encode_rle` / `decode_rle`;
- `measure.measure_masks`: mm² and mm from a DICOM's pixel spacing, never guessed;
- `bench.run_bench`, `bench.run_bench_alternating` (several bundles in turn), `bench.measure_cold_start`;
- `backends.create_backend`: `onnxruntime` (`ort_backend`) and `tensorrt` (`tensorrt_backend`).

Nothing here imports torch or transformers. Importing this package imports nothing heavy;
`Pipeline` and `RunObserver` are loaded on first access. Build-time stages use the runtime only
through the names in `__all__`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "RunObserver"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "RunObserver":
        from .observe import RunObserver

        return RunObserver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
