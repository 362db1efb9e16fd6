"""Tiny models and tokenizers built from configs, shared by the tests (no network, seconds)."""

from __future__ import annotations

import functools

import numpy as np

CORPUS = [
    "Please help segment the lesion in this scan.",
    "Sure, it is [SEG].",
    "No focal lesion is seen.",
    "Locate the lesion, output its bbox coordinates using JSON format.",
    '```json\n[{"bbox_2d": [12, 40, 80, 96], "label": "lesion"}]\n```',
    "Describe the findings in this scan.",
    "1 lesion. Lesion 1: hypoechoic, upper left, circumscribed, 12 mm, posterior shadowing.",
    "You are a helpful assistant.",
    "system user assistant",
] * 4


@functools.cache
def tiny_tokenizer():
    from citrus_edge.modelling.tokenizer_training import build_demo_tokenizer

    return build_demo_tokenizer(CORPUS, vocab_size=400)


def tiny_model(seed: int = 0, **replace):
    """A random TINY Citrus-V (optionally with fields of the config replaced)."""
    import dataclasses

    from citrus_edge.config import TINY
    from citrus_edge.modelling.model import build_model

    cfg = dataclasses.replace(TINY, **replace) if replace else TINY
    return build_model(cfg, seed=seed)


def random_rgb(h: int = 200, w: int = 260, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def tiny_export_with_phantoms(root, n_phantoms: int = 20):
    """The TINY export at `root/fp32` and a phantom set of `n_phantoms` at `root/phantoms`:
    (root, export dir, phantom manifest) — what the quantization tests start from."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set
    from citrus_edge.export import export_all

    tokenizer = root / "tokenizer-src.json"
    tiny_tokenizer().save(str(tokenizer))
    export_all(
        tiny_model(), root / "fp32", source_hash="random:citrus-v-tiny", tokenizer_json=tokenizer
    )
    return root, root / "fp32", write_phantom_set(root / "phantoms", n=n_phantoms)


def small_ds(rows: int = 4, cols: int = 4, modality: str = "OT"):
    """A minimal valid Secondary Capture DICOM dataset, MONOCHROME2 8-bit, pixels 0, 1, 2, ..."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(i % 256 for i in range(rows * cols))
    return ds
