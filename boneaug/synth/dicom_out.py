"""Encode a rendered synthetic radiograph as a DICOM file (CR or DX, uncompressed, 12 bits).

Only for the original synthetic images; derived images with provenance are boneaug.io.dicom's.

Conventions (for readers of these files):
- BodyPartExamined: HUMERUS, TIBIA, FEMUR (DICOM PS3.16 Annex L defined terms).
- ViewPosition: "AP", or "LL" / "RL" (left / right lateral) for lateral views, matching
  ImageLaterality (L / R). Readers map LL, RL, LAT, LATERAL -> lateral.
- MONOCHROME1 files store `2**BitsStored - 1 - value` and a window moved accordingly, so that
  rescale -> window -> invert gives the same display as the MONOCHROME2 files.
- RescaleSlope/Intercept vary on some files; the window is always in rescaled (modality) units.
- UIDs come from `pydicom.uid.generate_uid(entropy_srcs=...)` over the seed and ids, dates are
  fixed: the same seed gives the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from boneaug.synth.render import RenderedImage

SOP_CLASS = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
BODY_PART_EXAMINED = {"humerus": "HUMERUS", "tibia": "TIBIA", "femur": "FEMUR"}


@dataclass(frozen=True)
class DicomIdentity:
    """Who and when: synthetic ids and a fixed acquisition date."""

    image_id: str
    patient_id: str
    seed: int
    study_date: str  # YYYYMMDD
    instance_number: int = 1


def _uid(ident: DicomIdentity, what: str) -> str:
    return str(generate_uid(entropy_srcs=["boneaug-synth", str(ident.seed), ident.patient_id,
                                          ident.image_id, what]))


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4e}"


def view_position(view: str, laterality: str) -> str:
    return "AP" if view == "AP" else ("LL" if laterality == "L" else "RL")


def encode_dicom(image: RenderedImage, ident: DicomIdentity) -> bytes:
    """The DICOM file bytes (Part 10, explicit VR little endian) of `image`."""
    spec = image.spec
    patient = spec.patient
    bits = spec.bits_stored
    top = (1 << bits) - 1
    stored = image.stored
    center, width = image.window_center, image.window_width
    if spec.photometric == "MONOCHROME1":
        stored = top - stored
        center = top - center
    slope, intercept = spec.rescale
    sop_class = SOP_CLASS[spec.modality]
    sop_uid = _uid(ident, "sop")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ident.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = ""
    ds.Modality = spec.modality
    ds.Manufacturer = "boneaug"
    ds.ManufacturerModelName = "synthetic radiograph"
    ds.InstitutionName = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    body = BODY_PART_EXAMINED[patient.body_part]
    ds.StudyDescription = f"XR {body} {spec.view}"
    ds.SeriesDescription = f"{body} {spec.view}"
    ds.PatientName = f"SYNTHETIC^{ident.patient_id}"
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{min(patient.age, 999):03d}Y"
    ds.BodyPartExamined = body
    ds.ViewPosition = view_position(spec.view, patient.laterality)
    ds.ImageLaterality = patient.laterality
    ds.PatientOrientation = ""
    ds.StudyInstanceUID = _uid(ident, "study")
    ds.SeriesInstanceUID = _uid(ident, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = ident.instance_number
    ds.BurnedInAnnotation = "NO"
    if spec.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher stored values mean less beam intensity (MONOCHROME2 here)
        ds.PixelIntensityRelationshipSign = -1 if spec.photometric == "MONOCHROME2" else 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = stored.shape
    spacing = _ds(image.pixel_spacing_mm)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(round(center * slope + intercept, 2))
    ds.WindowWidth = _ds(round(width * abs(slope), 2))
    ds.WindowCenterWidthExplanation = "BONE"
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
