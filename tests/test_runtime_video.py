"""Video mode on pydicom's multi-frame ultrasound cine: the VLM runs once on the key frame, then
SAM2 alone per frame with the cached `[SEG]` states; masks match the PyTorch modules fed the
reference's own `[SEG]` states."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import random_rgb
from test_runtime_support import CASES, mask_iou, pipeline, reference

torch = pytest.importorskip("torch")

from citrus_edge.calib_data.load import load_image  # noqa: E402
from citrus_edge.calib_data.spacing import US_REGIONS, PixelSpacing  # noqa: E402
from citrus_edge.postprocess import select_masks  # noqa: E402
from citrus_edge.preprocess import sam_pixels  # noqa: E402
from citrus_edge.runtime.video import run_video  # noqa: E402

pydicom_data = pytest.importorskip("pydicom.data")
CINE = pydicom_data.get_testdata_file("examples_ybr_color.dcm", download=False)
KEY = 2
PROMPT = CASES[0][3]
MASK_IOU_MIN = 0.99


class Counter:
    """Counts calls of a runner's `run` (or of any method) without changing it."""

    def __init__(self, obj, method: str = "run"):
        self.obj, self.method, self.calls = obj, method, []
        self.original = getattr(obj, method)

        def counted(*args):
            self.calls.append(args)
            return self.original(*args)

        setattr(obj, method, counted)

    def restore(self) -> None:
        setattr(self.obj, self.method, self.original)


def _reference_seg_states(rgb: np.ndarray) -> torch.Tensor:
    ref = reference("video", 12)
    captured = {}
    original = ref.model.decode_masks

    def spy(feats, seg_hidden):
        captured["seg"] = seg_hidden.clone()
        return original(feats, seg_hidden)

    ref.model.decode_masks = spy
    try:
        ref(rgb, PROMPT)
    finally:
        del ref.model.decode_masks
    return captured["seg"]


@torch.no_grad()
def _reference_masks(rgb: np.ndarray, seg: torch.Tensor) -> list[np.ndarray]:
    model = reference("video", 12).model
    feats = model.encode_image_sam(torch.from_numpy(sam_pixels(rgb, model.config.preprocess)))
    low, iou = model.decode_masks(feats, seg)
    return select_masks(low.numpy(), iou.numpy(), model.config.sam2.image_size, rgb.shape[:2])[0]


@pytest.mark.skipif(CINE is None, reason="pydicom's examples_ybr_color.dcm is not installed")
def test_dicom_cine_runs_vlm_once_then_sam_per_frame():
    pipe = pipeline("video", 12)
    counters = [
        Counter(pipe.vision),
        Counter(pipe.llm, "reset"),
        Counter(pipe.segmenter.encoder),
        Counter(pipe.segmenter.decoder),
    ]
    try:
        frames = list(run_video(pipe, CINE, PROMPT, key_frame=KEY))
    finally:
        for c in counters:
            c.restore()
    vision, prefill, encoder, decoder = (len(c.calls) for c in counters)
    key = frames[0].result
    assert [f.frame for f in frames] == list(range(KEY, 30))
    assert frames[0].key_frame and not any(f.key_frame for f in frames[1:])
    assert vision == prefill == 1
    assert encoder == decoder == len(frames)
    assert key.n_seg >= 2
    assert all(c[0]["seg_hidden"].shape[0] == key.n_seg for c in counters[3].calls)
    for f in frames[1:]:
        r = f.result
        assert r.text == key.text and r.token_ids == key.token_ids and r.boxes == []
        assert r.n_seg == key.n_seg and r.image_hw == (240, 320)
        # Its ultrasound region lies beyond the 320 x 240 image (calibrated before a resize):
        # refused as calibration, so no mm and a warning.
        assert r.measurements == []
        assert any("ultrasound region 0 refused" in w for w in r.warnings)
        assert f.latency_ms > 0 and "vision_encoder" not in r.timings_ms

    # Tracked masks equal the PyTorch SAM2 fed the reference's key-frame [SEG] states.
    seg = _reference_seg_states(load_image(CINE, KEY).pixels)
    assert seg.shape[0] == key.n_seg
    for f in (frames[1], frames[-1]):
        expected = _reference_masks(load_image(CINE, f.frame).pixels, seg)
        ious = [mask_iou(a, b) for a, b in zip(f.result.masks, expected, strict=True)]
        assert min(ious) >= MASK_IOU_MIN, ious


def test_in_memory_frames_with_spacing_and_key_frame():
    pipe = pipeline("seg")
    base = random_rgb(240, 180, seed=1)  # CASES[1]: two [SEG]s
    stream = (np.roll(base, shift, axis=1) for shift in (5, 0, 3, 6))
    spacing = PixelSpacing(0.3, 0.3, US_REGIONS)
    frames = list(run_video(pipe, stream, CASES[1][3], key_frame=1, spacing=spacing))
    assert [f.frame for f in frames] == [1, 2, 3]
    assert frames[0].result.token_ids == pipe(base, CASES[1][3]).token_ids
    assert all(len(f.result.measurements) == frames[0].result.n_seg == 2 for f in frames)


def test_key_frame_past_the_end_is_an_error():
    with pytest.raises(ValueError, match="no frame 5"):
        list(run_video(pipeline("seg"), [random_rgb(64, 64)], CASES[0][3], key_frame=5))
