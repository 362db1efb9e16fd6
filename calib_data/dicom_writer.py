"""Write a synthetic image as a real DICOM Ultrasound Image Storage file.

The file carries only synthetic placeholders (patient "PHANTOM^SYNTHETIC", fixed dates) and
UIDs derived from the seed, so the same inputs always give the same bytes. Its physical spacing
is stated the way scanners state it: one SequenceOfUltrasoundRegions item covering the image,
2D tissue data, PhysicalDeltaX/Y in cm per pixel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from citrus_edge.atomic import atomic_path

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
PATIENT_NAME = "PHANTOM^SYNTHETIC"
FIXED_DATE, FIXED_TIME = "20000101", "000000"
_UNITS_CM, _SPATIAL_2D, _DATA_TISSUE = 3, 1, 1


def phantom_uid(seed: int, role: str) -> str:
    """A UID that depends only on the seed and its role ('study', 'series', 'instance')."""
    return generate_uid(entropy_srcs=["citrus-edge phantom", role, str(seed)])


def write_us_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    spacing_mm: float,
    *,
    seed: int,
    description: str = "Synthetic B-mode phantom",
) -> Path:
    """Write `pixels` ([H, W] grey or [H, W, 3] RGB, uint8) as a US DICOM file at `path`.

    Written to a temporary file in the same directory and moved into place, so `path` is
    either absent or complete. Returns `path`.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(
            f"pixels must be uint8 [H, W] or [H, W, 3], got {pixels.dtype} {pixels.shape}"
        )
    if pixels.ndim == 3 and pixels.shape[2] != 3:
        raise ValueError(f"colour pixels must have 3 channels, got shape {pixels.shape}")
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    ds = _dataset(pixels, spacing_mm, seed, description)
    return _atomic_save(ds, Path(path))


def _dataset(pixels: np.ndarray, spacing_mm: float, seed: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = _file_meta(phantom_uid(seed, "instance"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = FIXED_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = FIXED_TIME
    ds.AccessionNumber = ""
    ds.Modality = "US"
    ds.Manufacturer = "citrus-edge (synthetic)"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description
    ds.PatientName = PATIENT_NAME
    ds.PatientID = f"PHANTOM-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = phantom_uid(seed, "study")
    ds.SeriesInstanceUID = phantom_uid(seed, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SequenceOfUltrasoundRegions = Sequence([_region(pixels.shape[:2], spacing_mm)])
    _set_pixels(ds, pixels)
    return ds


def _file_meta(instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Fixed writer identity, so the bytes do not change with the pydicom version.
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["citrus-edge dicom_writer"])
    meta.ImplementationVersionName = "CITRUS_EDGE_1"
    return meta


def _region(shape_hw: tuple[int, int], spacing_mm: float) -> Dataset:
    """One region covering the whole image: 2D tissue, cm units."""
    region = Dataset()
    region.RegionSpatialFormat = _SPATIAL_2D
    region.RegionDataType = _DATA_TISSUE
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = shape_hw[1] - 1
    region.RegionLocationMaxY1 = shape_hw[0] - 1
    region.PhysicalUnitsXDirection = _UNITS_CM
    region.PhysicalUnitsYDirection = _UNITS_CM
    region.PhysicalDeltaX = spacing_mm / 10.0
    region.PhysicalDeltaY = spacing_mm / 10.0
    return region


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0  # R1 G1 B1 R2 ...
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()  # [H, W(, 3)] row-major, odd lengths padded on write


def _atomic_save(ds: Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
