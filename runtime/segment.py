"""SAM2 on the runtime: the image encoder once per image, the mask decoder once for all `[SEG]`s.

The decoder graph takes every `[SEG]` state of an answer in one batch (`seg_hidden` [N, H]; an
engine whose profile allows fewer runs in several batches) and returns all three multimask outputs; the best one per state is picked on the host
(`postprocess.select_masks`), exactly as the reference does.
"""

from __future__ import annotations

import numpy as np

from citrus_edge.config import CitrusVConfig
from citrus_edge.postprocess import select_masks
from citrus_edge.preprocess import sam_pixels
from citrus_edge.timing import StageTimer

from .backends import GraphRunner

FEATURES = ("image_embeddings", "feat_s0", "feat_s1")


class Segmenter:
    """The SAM2 encoder and mask decoder runners of one bundle."""

    def __init__(self, encoder: GraphRunner, decoder: GraphRunner, config: CitrusVConfig):
        self.encoder, self.decoder, self.config = encoder, decoder, config

    def encode(self, rgb: np.ndarray, timer: StageTimer) -> dict[str, np.ndarray]:
        """Image features of one RGB uint8 image (`FEATURES`, batch 1)."""
        with timer.stage("sam_preprocess"):
            pixels = sam_pixels(rgb, self.config.preprocess)  # [1, 3, S, S]
        with timer.stage("sam_encoder"):
            out = self.encoder.run({"pixels": pixels})
        return {k: out[k] for k in FEATURES}

    def decode(
        self,
        features: dict[str, np.ndarray],
        seg_hidden: np.ndarray,
        orig_hw: tuple[int, int],
        timer: StageTimer,
    ) -> tuple[list[np.ndarray], list[float]]:
        """Masks [H, W] bool at the original size and their IoU scores, one per `[SEG]` state.

        All states go in one decoder run, unless an engine's profile caps the batch below N:
        then in runs of at most that many.
        """
        seg_hidden = seg_hidden.astype(np.float32)  # [N, H]
        step = self.decoder.max_leading_dim("seg_hidden") or len(seg_hidden)
        logits, iou = [], []
        with timer.stage("mask_decoder"):
            for start in range(0, len(seg_hidden), step):
                chunk = seg_hidden[start : start + step]
                out = self.decoder.run({"seg_hidden": chunk, **features})
                logits.append(out["mask_logits"])  # [n, 3, h, w]
                iou.append(out["iou_predictions"])  # [n, 3]
        with timer.stage("postprocess"):
            return select_masks(
                np.concatenate(logits), np.concatenate(iou), self.config.sam2.image_size, orig_hw
            )

    def segment(
        self, rgb: np.ndarray, seg_hidden: np.ndarray, timer: StageTimer
    ) -> tuple[list[np.ndarray], list[float]]:
        """Encode `rgb` and decode every state; nothing runs when there is no `[SEG]`."""
        if len(seg_hidden) == 0:
            return [], []
        features = self.encode(rgb, timer)
        return self.decode(features, seg_hidden, rgb.shape[:2], timer)
