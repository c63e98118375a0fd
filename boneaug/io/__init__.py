"""Radiographs in and out: DICOM -> `XrayImage` or `Rejection`, derived DICOM with provenance,
and the fit-inside-and-pad resize with its exact box mapping."""

from boneaug.io.dicom import (
    REASONS,
    Rejection,
    XrayImage,
    check_uris,
    decode_xray,
    encode_derived,
    normalise,
    read_provenance,
    read_xray,
)
from boneaug.io.resize import fit_pad, fit_scale, map_box, unmap_box

__all__ = [
    "REASONS",
    "Rejection",
    "XrayImage",
    "check_uris",
    "decode_xray",
    "encode_derived",
    "fit_pad",
    "fit_scale",
    "map_box",
    "normalise",
    "read_provenance",
    "read_xray",
    "unmap_box",
]
