"""DICOM radiographs in and out.

Reading (`read_xray`, `decode_xray`): bytes or a binary file-like -> an `XrayImage` whose pixels are
float32 (H, W) in [0, 1] with bone bright, or a typed `Rejection`. The pixel pipeline is the one
in SPEC 1.1:

    stored values -> modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence)
                  -> VOI (the first Window Center/Width with its VOI LUT Function; else the first
                     VOI LUT Sequence item; else min-max of the image, Pixel Padding Value excluded)
                  -> invert MONOCHROME1 (pydicom does not)
                  -> float32 in [0, 1]

Everything that can be checked from the header is checked before any pixel buffer is allocated:
SamplesPerPixel / PhotometricInterpretation (colour), NumberOfFrames (multi-frame), Rows and
Columns (absurd sizes are refused before anything of that size exists), BitsAllocated /
BitsStored / HighBit, and the length of the Pixel Data element against what the header promises
(truncation). Uncompressed little-endian files - the common case and the hot path of ingestion -
are parsed with ``stop_before_pixels`` and their pixels read as a zero-copy view of the input
bytes; everything else (compressed, big endian, deflated) goes through pydicom's decoders and the
installed pylibjpeg plugins.

Rejection reasons (`REASONS`): not_dicom, no_pixel_data, not_image, colour, multi_frame,
absurd_dimensions, bad_header, truncated, unsupported_compression, decode_error, unreadable.

Writing (`encode_derived`): a DERIVED\\SECONDARY Secondary Capture image, 12-bit MONOCHROME2, in the
source's study with a new series and SOP instance, a Source Image Sequence pointing at the source,
the generating software and model in Derivation Description and Contributing Equipment Sequence,
and the provenance key/values (n, t, score, ...) twice: machine-readable JSON in a private block
(creator ``BONEAUG 1``, element (0011,xx01), VR UT; read back with `read_provenance`) and
human-readable ``key=value`` pairs in Image Comments.

Checking (`check_uris`): one record per file for ``boneaug check-dicom``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import numpy as np

from boneaug.errors import DicomError, StorageError
from boneaug.io.resize import Method, fit_pad

log = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    "not_dicom": "not a DICOM file (no DICM prefix and no recognisable dataset)",
    "no_pixel_data": "a DICOM object without Pixel Data (SR, RT plan, DICOMDIR, ...)",
    "not_image": "pixel data that is not a radiograph (dose grid, segmentation, float data)",
    "colour": "colour or palette pixels (more than one sample per pixel, RGB/YBR/PALETTE)",
    "multi_frame": "more than one frame",
    "absurd_dimensions": "Rows/Columns beyond the configured limits (max_side, max_pixels)",
    "bad_header": "image attributes missing or inconsistent (Rows, BitsAllocated, ...)",
    "truncated": "the file ends, or the Pixel Data element is shorter, than the header promises",
    "unsupported_compression": "a transfer syntax no installed decoder handles",
    "decode_error": "a decoder exists but failed on this pixel data",
    "unreadable": "the bytes could not be read from the file-like object",
}

# Modalities whose pixel data is not a picture of the patient
_NON_IMAGE_MODALITIES = frozenset({"RTDOSE", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO",
                                   "PR", "REG", "DOC", "ECG", "HD", "PLAN", "RWV"})
# Groups a dataset without preamble can plausibly start with
_FIRST_GROUPS = frozenset({0x0002, 0x0004, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "Rows")
_PIXEL_TAG, _FLOAT_PIXEL_TAGS = (0x7FE0, 0x0010), {(0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_PIXEL_VRS = {b"OB", b"OW", b"UN", b"OV", b"OL", b"OD", b"OF"}
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_EXPLICIT_BE, _DEFLATED = "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SOP_CLASS_BY_MODALITY = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
PRIVATE_CREATOR = "BONEAUG 1"
PRIVATE_GROUP = 0x0011


@dataclass(frozen=True, eq=False)
class XrayImage:
    """A decoded radiograph. `pixels` is (H, W) float32 in [0, 1], 1 = most attenuating (bone
    bright).

    `rows`/`columns`/`pixel_spacing_mm` describe the STORED image. When it was read with a
    `target`, `pixels` is the fitted (target-size) image and stored coordinates map onto it as
    x' = x * scale + pad_x, y' = y * scale + pad_y; its pixel spacing is pixel_spacing_mm / scale.
    """

    pixels: np.ndarray  # (H, W) float32 in [0, 1]
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None = None  # (row spacing, column spacing)
    photometric: str = "MONOCHROME2"
    bits_stored: int = 16
    modality: str | None = None
    body_part: str | None = None  # BodyPartExamined
    view: str | None = None  # ViewPosition (AP, PA, LAT, LL, ...)
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    transfer_syntax: str | None = None  # UID
    sop_class_uid: str | None = None
    scale: float = 1.0
    pad_x: int = 0
    pad_y: int = 0


@dataclass(frozen=True)
class Rejection:
    """Why a DICOM object was not turned into an `XrayImage` (`reason` is a key of `REASONS`)."""

    path: str
    reason: str
    message: str
    rows: int | None = None
    columns: int | None = None
    photometric: str | None = None


# ----------------------------------------------------------------------------------------------
# reading


def read_xray(
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    path: str = "<bytes>",
    max_pixels: int = 64_000_000,
    max_side: int = 16384,
    target: tuple[int, int] | None = None,
    resize_method: Method = "torch",
) -> XrayImage | Rejection:
    """Decode one radiograph, or say why not. Never raises for bad data (only for bad arguments)."""
    if target is not None and (len(target) != 2 or min(int(t) for t in target) < 1):
        raise ValueError(f"target must be (height, width) with both >= 1, got {target!r}")
    if resize_method not in ("torch", "pil"):
        raise ValueError(f"resize_method must be 'torch' or 'pil', got {resize_method!r}")
    seen: dict[str, Any] = {}
    try:
        raw = _as_bytes(data, path)  # a wrong argument type raises TypeError here, on purpose
        return _decode(raw, path=path, max_pixels=max_pixels, max_side=max_side, target=target,
                       resize_method=resize_method, seen=seen)
    except DicomError as exc:
        return _rejection(path, exc.reason, str(exc), seen)
    except TypeError as exc:
        if "raw" not in seen:
            raise
        log.debug("unexpected error decoding %s", path, exc_info=True)
        return _rejection(path, "decode_error", f"{path}: TypeError: {exc}", seen)
    except Exception as exc:  # noqa: BLE001 - a library bug on odd data must not sink a batch
        log.debug("unexpected error decoding %s", path, exc_info=True)
        return _rejection(path, "decode_error", f"{path}: {type(exc).__name__}: {exc}", seen)


def _rejection(path: str, reason: str, message: str, seen: dict[str, Any]) -> Rejection:
    return Rejection(path=path, reason=reason, message=message, rows=seen.get("rows"),
                     columns=seen.get("columns"), photometric=seen.get("photometric"))


def decode_xray(
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    path: str = "<bytes>",
    max_pixels: int = 64_000_000,
    max_side: int = 16384,
    target: tuple[int, int] | None = None,
    resize_method: Method = "torch",
) -> XrayImage:
    """Like `read_xray`, but raises `DicomError` (with `.reason`) instead of returning a
    `Rejection`."""
    result = read_xray(data, path=path, max_pixels=max_pixels, max_side=max_side, target=target,
                       resize_method=resize_method)
    if isinstance(result, Rejection):
        # the message already names the path
        raise DicomError(result.reason, result.message.removeprefix(f"{path}: "), path=path)
    return result


def _decode(raw: bytes, *, path: str, max_pixels: int, max_side: int,
            target: tuple[int, int] | None, resize_method: Method,
            seen: dict[str, Any]) -> XrayImage:
    seen["raw"] = True  # from here on, every exception is about the data
    ds, pixel_pos, has_pixels = _parse_header(raw, path)
    header = _check_header(ds, path, has_pixels=has_pixels, max_pixels=max_pixels,
                           max_side=max_side, seen=seen)
    stored = _stored_pixels(raw, ds, pixel_pos, header, path)  # (rows, cols), any int dtype
    pixels = normalise(stored, ds)  # (rows, cols) float32 in [0, 1]
    scale, pad_x, pad_y = 1.0, 0, 0
    if target is not None:
        pixels, scale, pad_x, pad_y = fit_pad(pixels, (int(target[0]), int(target[1])),
                                              method=resize_method)
        np.clip(pixels, 0.0, 1.0, out=pixels)  # resampling weights may overshoot by an ulp
    return XrayImage(
        pixels=pixels, rows=header.rows, columns=header.columns,
        pixel_spacing_mm=_pixel_spacing(ds), photometric=header.photometric,
        bits_stored=header.bits_stored, modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"), view=_text(ds, "ViewPosition"),
        patient_id=_text(ds, "PatientID"), study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"), sop_uid=_text(ds, "SOPInstanceUID"),
        transfer_syntax=header.transfer_syntax, sop_class_uid=_text(ds, "SOPClassUID"),
        scale=float(scale), pad_x=int(pad_x), pad_y=int(pad_y),
    )


def _as_bytes(data: Any, path: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    read = getattr(data, "read", None)
    if read is None:
        raise TypeError(f"read_xray takes bytes or a binary file-like object, "
                        f"got {type(data).__name__}")
    try:
        out = read()
    except OSError as exc:
        raise DicomError("unreadable", f"cannot read the DICOM bytes: {exc}", path=path) from exc
    if not isinstance(out, (bytes, bytearray)):
        raise TypeError(f"{path}: the file-like object returned {type(out).__name__}; "
                        "open it in binary mode")
    return bytes(out)


def _parse_header(raw: bytes, path: str) -> tuple[Any, int | None, bool]:
    """Parse everything before Pixel Data: (dataset, offset of the Pixel Data tag, has pixel data).

    The offset is None when there is no top-level Pixel Data or the transfer syntax is deflated
    (offsets then refer to the inflated stream; that rare case is parsed whole here).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_prefix = len(raw) >= 132 and raw[128:132] == b"DICM"
    if not has_prefix and not _plausible_dataset_start(raw):
        raise DicomError("not_dicom", f"no DICM prefix at byte 128 and the first "
                         f"{min(len(raw), 8)} bytes are not a DICOM element tag: not a DICOM file",
                         path=path)
    fp = io.BytesIO(raw)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_prefix)
    except InvalidDicomError as exc:
        raise DicomError("not_dicom", f"not a DICOM file: {exc}", path=path) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on broken headers
        if not has_prefix:
            raise DicomError("not_dicom", f"not a DICOM file ({type(exc).__name__}: {exc})",
                             path=path) from exc
        if _is_eof_error(exc) or _meta_truncated(raw):
            raise DicomError("truncated", f"the file ends inside the header ({len(raw)} bytes; "
                             f"{type(exc).__name__})", path=path) from exc
        raise DicomError("bad_header", f"the header cannot be parsed: {type(exc).__name__}: {exc}",
                         path=path) from exc
    pos = fp.tell()
    if (not has_prefix and not any(k in ds for k in _IDENTIFYING)
            and not _pixel_tag_at(raw, pos, ds)):
        raise DicomError("not_dicom", "no DICM prefix and no SOP Class/Instance, Study, Modality "
                         "or Rows element: not a DICOM dataset", path=path)
    _check_header_complete(ds, raw, has_prefix, path)
    if _transfer_syntax(ds) == _DEFLATED:
        full = pydicom.dcmread(io.BytesIO(raw), force=not has_prefix)
        if "FloatPixelData" in full or "DoubleFloatPixelData" in full:
            raise DicomError("not_image", "float pixel data (parametric map), not a radiograph",
                             path=path)
        return full, None, "PixelData" in full
    tag = _tag_at(raw, pos, ds)
    if tag in _FLOAT_PIXEL_TAGS:
        raise DicomError("not_image", "float pixel data (parametric map), not a radiograph",
                         path=path)
    if tag != _PIXEL_TAG:
        _check_no_partial_tail(ds, raw, path)
    return ds, (pos if tag == _PIXEL_TAG else None), tag == _PIXEL_TAG


def _plausible_dataset_start(raw: bytes) -> bool:
    if len(raw) < 8:
        return False
    le, be = struct.unpack_from("<H", raw)[0], struct.unpack_from(">H", raw)[0]
    return le in _FIRST_GROUPS or be in _FIRST_GROUPS


def _is_eof_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (EOFError, struct.error)) or any(
        s in text for s in ("no tag to read", "end of file", "unpack requires", "eof"))


def _check_header_complete(ds: Any, raw: bytes, has_prefix: bool, path: str) -> None:
    """Short element values mean the file ended inside the header (pydicom reads them silently)."""
    if has_prefix and _meta_truncated(raw):
        raise DicomError("truncated", f"the file ends inside its File Meta Information "
                         f"({len(raw)} bytes)", path=path)
    if has_prefix and len(ds) == 0:
        meta_end = _meta_end(raw) or 132
        if len(raw) - meta_end < 8:
            raise DicomError("truncated", f"the file ends right after its File Meta Information "
                             f"({len(raw)} bytes, no dataset)", path=path)
        raise DicomError("bad_header", f"no element of the dataset after the File Meta Information "
                         f"can be parsed ({len(raw) - meta_end} bytes of it)", path=path)
    for elem in ds.elements():
        length, value = getattr(elem, "length", None), getattr(elem, "value", None)
        if (isinstance(value, bytes) and isinstance(length, int) and length != 0xFFFFFFFF
                and len(value) < length):
            raise DicomError("truncated", f"the file ends inside element {elem.tag} (declares "
                             f"{length} bytes, {len(value)} present; or that length is corrupt)",
                             path=path)


def _check_no_partial_tail(ds: Any, raw: bytes, path: str) -> None:
    """A few bytes after the last complete element: the file ends inside an element header."""
    ends = [e.value_tell + e.length for e in ds.elements()
            if isinstance(getattr(e, "value_tell", None), int)
            and isinstance(getattr(e, "length", None), int) and e.length != 0xFFFFFFFF]
    if ends and 0 < len(raw) - max(ends) < 12:
        raise DicomError("truncated", f"the file ends {len(raw) - max(ends)} bytes into an element "
                         "header", path=path)


def _meta_end(raw: bytes) -> int | None:
    """Where the File Meta Information ends, from (0002,0000) right after 'DICM' (None if
    absent)."""
    if len(raw) < 144 or raw[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + int(struct.unpack_from("<I", raw, 140)[0])


def _meta_truncated(raw: bytes) -> bool:
    """Does the file end before its File Meta Information group does?"""
    if len(raw) < 144:
        return True
    end = _meta_end(raw)
    return end is not None and len(raw) < end


def _transfer_syntax(ds: Any) -> str:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit:
        return _IMPLICIT_LE
    return _EXPLICIT_LE if little else _EXPLICIT_BE


def _tag_at(raw: bytes, pos: int, ds: Any) -> tuple[int, int] | None:
    if pos + 4 > len(raw):
        return None
    little = ds.original_encoding[1] is not False
    return struct.unpack_from("<HH" if little else ">HH", raw, pos)


def _pixel_tag_at(raw: bytes, pos: int, ds: Any) -> bool:
    tag = _tag_at(raw, pos, ds)
    return tag == _PIXEL_TAG or tag in _FLOAT_PIXEL_TAGS


@dataclass(frozen=True)
class _Header:
    rows: int
    columns: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    high_bit: int
    signed: bool
    transfer_syntax: str

    @property
    def expected_bytes(self) -> int:
        return self.rows * self.columns * self.bits_allocated // 8


def _check_header(ds: Any, path: str, *, has_pixels: bool, max_pixels: int, max_side: int,
                  seen: dict[str, Any]) -> _Header:
    """Everything that can be refused from the header alone, in the order a person would ask."""
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    seen["photometric"] = photometric or None
    rows, columns = _int(ds, "Rows", path), _int(ds, "Columns", path)
    seen["rows"], seen["columns"] = rows, columns
    if not has_pixels:
        modality = _text(ds, "Modality") or "unknown"
        hint = ("; it has Rows/Columns, so the file may have been cut right before Pixel Data"
                if rows and columns else "")
        raise DicomError("no_pixel_data", f"no Pixel Data element (Modality {modality}, SOP Class "
                         f"{_uid_name(_text(ds, 'SOPClassUID'))}): not an image{hint}", path=path)
    samples = _int(ds, "SamplesPerPixel", path)
    if (samples or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise DicomError("colour", f"colour pixels "
                         f"(PhotometricInterpretation {photometric or '?'}, "
                         f"SamplesPerPixel {samples}): boneaug reads single-channel radiographs; "
                         "export the image as MONOCHROME2 or leave it out", path=path)
    frames = _int(ds, "NumberOfFrames", path)
    if frames is not None and frames > 1:
        raise DicomError("multi_frame", f"{frames} frames: boneaug reads single-frame radiographs; "
                         "split the object into one file per frame", path=path)
    modality = (_text(ds, "Modality") or "").upper()
    bits_allocated = _int(ds, "BitsAllocated", path)
    if modality in _NON_IMAGE_MODALITIES or bits_allocated == 1:
        raise DicomError("not_image", f"Modality {modality or '?'} with BitsAllocated "
                         f"{bits_allocated}: pixel data that is not a radiograph", path=path)
    missing = [k for k, v in (("Rows", rows), ("Columns", columns),
                              ("BitsAllocated", bits_allocated),
                              ("PhotometricInterpretation", photometric)) if not v]
    if missing:
        raise DicomError("bad_header", f"missing or zero {', '.join(missing)}: "
                         "the Image Pixel module is incomplete", path=path)
    assert rows is not None and columns is not None and bits_allocated is not None
    if rows > max_side or columns > max_side or rows * columns > max_pixels:
        raise DicomError("absurd_dimensions", f"{rows} x {columns} pixels exceeds the limits "
                         f"(max_side {max_side}, max_pixels {max_pixels}); "
                         "raise them if this is real",
                         path=path)
    bits_stored = _int(ds, "BitsStored", path) or bits_allocated
    high_bit = _int(ds, "HighBit", path)
    high_bit = bits_stored - 1 if high_bit is None else high_bit
    representation = _int(ds, "PixelRepresentation", path) or 0
    if bits_allocated not in (8, 16, 32) or not 1 <= bits_stored <= bits_allocated \
            or not bits_stored - 1 <= high_bit < bits_allocated or representation not in (0, 1):
        raise DicomError("bad_header", f"unsupported bit layout: BitsAllocated {bits_allocated}, "
                         f"BitsStored {bits_stored}, HighBit {high_bit}, PixelRepresentation "
                         f"{representation}", path=path)
    return _Header(rows=rows, columns=columns, photometric=photometric,
                   bits_allocated=bits_allocated, bits_stored=bits_stored, high_bit=high_bit,
                   signed=representation == 1, transfer_syntax=_transfer_syntax(ds))


def _int(ds: Any, keyword: str, path: str) -> int | None:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - a value that does not convert, e.g. IS '1A'
        raise DicomError("bad_header", f"{keyword} cannot be read: {exc}", path=path) from exc
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DicomError("bad_header", f"{keyword} is {value!r}, not an integer",
                         path=path) from exc


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - unreadable optional metadata is just absent
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _uid_name(uid: str | None) -> str:
    if not uid:
        return "unknown"
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
                    return row, col
        except Exception:  # noqa: BLE001, S112 - malformed optional spacing: try the next one
            continue
    return None


# ---- pixels


def _stored_pixels(raw: bytes, ds: Any, pixel_pos: int | None, header: _Header,
                   path: str) -> np.ndarray:
    """(rows, columns) stored values: a zero-copy view for native little endian, else pydicom."""
    ts = header.transfer_syntax
    if (pixel_pos is not None and ts in (_IMPLICIT_LE, _EXPLICIT_LE)
            and header.bits_allocated in (8, 16) and ds.original_encoding[1] is not False):
        return _native_view(raw, pixel_pos, header, path)
    return _decode_with_pydicom(raw, ds, header, path)


def _native_view(raw: bytes, pos: int, header: _Header, path: str) -> np.ndarray:
    # explicit VR: tag, VR, 2 reserved bytes, 4-byte length; implicit VR: tag, 4-byte length.
    # Read which one is there rather than trust the meta (some writers switch).
    size = 12 if raw[pos + 4:pos + 6] in _PIXEL_VRS else 8
    length = struct.unpack_from("<I", raw, pos + size - 4)[0] if pos + size <= len(raw) else None
    value_pos = pos + size
    if length is None:
        raise DicomError("truncated", "the file ends inside the Pixel Data element header",
                         path=path)
    if length == 0xFFFFFFFF:
        raise DicomError("bad_header", f"Pixel Data has undefined length (encapsulated) but the "
                         f"transfer syntax is {_uid_name(header.transfer_syntax)}", path=path)
    expected = header.expected_bytes
    available = max(0, len(raw) - value_pos)
    if min(length, available) < expected:
        where = (f"the file ends {available} bytes into Pixel Data" if available < length
                 else f"Pixel Data holds {length} bytes")
        raise DicomError("truncated", f"{where}, {header.rows} x {header.columns} x "
                         f"{header.bits_allocated} bits needs {expected}", path=path)
    dtype = np.dtype(f"<{'i' if header.signed else 'u'}{header.bits_allocated // 8}")
    arr = np.frombuffer(raw, dtype=dtype, count=header.rows * header.columns, offset=value_pos)
    return _fix_unused_bits(arr.reshape(header.rows, header.columns), header)  # (rows, cols)


def _fix_unused_bits(arr: np.ndarray, header: _Header) -> np.ndarray:
    """Clear bits above BitsStored (overlays, garbage) and sign-extend signed values."""
    if header.bits_stored == header.bits_allocated and header.high_bit == header.bits_allocated - 1:
        return arr
    shift_down = header.high_bit + 1 - header.bits_stored  # stored bits may sit above bit 0
    if shift_down:
        arr = np.right_shift(arr.view(arr.dtype.str.replace("i", "u")), shift_down)
    if header.signed:
        unused = header.bits_allocated - header.bits_stored
        signed = arr.view(arr.dtype.str.replace("u", "i"))
        return np.right_shift(np.left_shift(signed, unused), unused)
    return np.bitwise_and(arr.view(arr.dtype.str.replace("i", "u")),
                          (1 << header.bits_stored) - 1)


def _decode_with_pydicom(raw: bytes, ds_header: Any, header: _Header, path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import get_decoder

    ts = header.transfer_syntax
    name = _uid_name(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise DicomError("unsupported_compression", f"no pixel decoder exists for transfer syntax "
                         f"{name} ({ts})", path=path) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a plugin"
        raise DicomError("unsupported_compression",
                         f"transfer syntax {name} ({ts}) needs {missing}, "
                         "which is not installed (pip install pylibjpeg pylibjpeg-libjpeg "
                         "pylibjpeg-openjpeg pylibjpeg-rle)", path=path)
    has_prefix = len(raw) >= 132 and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(raw), force=not has_prefix)
    _check_header_complete(ds, raw, has_prefix, path)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = ts
    element = ds.get_item("PixelData")
    value = getattr(element, "value", None)
    if value is None:
        raise DicomError("no_pixel_data", "Pixel Data element has no value", path=path)
    if decoder.is_native:
        if len(value) < header.expected_bytes:
            raise DicomError("truncated", f"Pixel Data holds {len(value)} bytes, {header.rows} x "
                             f"{header.columns} x {header.bits_allocated} bits needs "
                             f"{header.expected_bytes}", path=path)
    elif ts != _DEFLATED and getattr(element, "length", None) == 0xFFFFFFFF:
        tell = getattr(element, "value_tell", None)
        if isinstance(tell, int) and tell + len(value) + 8 > len(raw):
            raise DicomError("truncated", f"encapsulated ({name}) Pixel Data has no sequence "
                             "delimiter: the file ends inside the compressed frames", path=path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - each plugin raises its own kinds
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise DicomError("decode_error", f"{name} ({ts}) pixel data could not be decoded by "
                         f"{', '.join(decoder.available_plugins) or 'pydicom'}: {detail}",
                         path=path) from exc
    if arr.shape != (header.rows, header.columns):
        raise DicomError("decode_error", f"decoded {name} pixels have shape {arr.shape}, "
                         f"the header says {(header.rows, header.columns)}", path=path)
    return arr  # (rows, cols)


def normalise(stored: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values (H, W) -> float32 (H, W) in [0, 1], bone bright (SPEC 1.1).

    `ds` needs only the header (Rescale, Modality LUT Sequence, Window, VOI LUT Sequence,
    VOILUTFunction, PhotometricInterpretation, PixelPaddingValue).
    """
    invert = (_text(ds, "PhotometricInterpretation") or "").upper() == "MONOCHROME1"
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        values, slope, intercept = apply_modality_lut(stored, ds), 1.0, 0.0
    else:
        values = stored
        slope = _float(ds.get("RescaleSlope"), 1.0) or 1.0
        intercept = _float(ds.get("RescaleIntercept"), 0.0)
    window = _window(ds)
    if window is not None:
        centre, width, function = window
        if function == "SIGMOID":
            modality = values.astype(np.float32) * np.float32(slope) + np.float32(intercept)
            out = 1.0 / (1.0 + np.exp(-4.0 * (modality - centre) / width, dtype=np.float32))
            out = out.astype(np.float32, copy=False)
            return np.subtract(1.0, out, out=out) if invert else out
        if function == "LINEAR":
            centre, width = centre - 0.5, width - 1.0
        if width <= 0:  # LINEAR with width 1: a threshold at centre - 0.5
            above = (values * slope + intercept) > centre
            return (~above if invert else above).astype(np.float32)
        # y = ((v * slope + intercept) - centre) / width + 0.5
        return _affine_clip(values, slope / width, (intercept - centre) / width + 0.5, invert)
    if ds.get("VOILUTSequence"):
        out = _voi_lut(values, slope, intercept, ds)
        if out is not None:
            return np.subtract(1.0, out, out=out) if invert else out
    lo, hi = _value_range(values, ds)  # stored-value range, padding excluded
    if hi <= lo:
        return np.zeros(stored.shape, dtype=np.float32)
    # min-max of the modality values: (v*slope + b - (lo*slope + b)) / ((hi-lo)*slope)
    if slope >= 0:
        return _affine_clip(values, 1.0 / (hi - lo), -lo / (hi - lo), invert)
    return _affine_clip(values, -1.0 / (hi - lo), hi / (hi - lo), invert)


def _affine_clip(values: np.ndarray, a: float, b: float, invert: bool) -> np.ndarray:
    """clip(a * values + b, 0, 1) as float32 (1 - that for MONOCHROME1), in three passes.

    The clip stays even where no value can fall outside: float32 rounding can step an ulp over.
    """
    if invert:
        a, b = -a, 1.0 - b
    out = np.multiply(values, np.float32(a), dtype=np.float32)  # (H, W)
    out += np.float32(b)
    return np.clip(out, 0.0, 1.0, out=out)


def _float(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _window(ds: Any) -> tuple[float, float, str] | None:
    """The first (centre, width, function) if usable, else None (then VOI LUT or min-max)."""
    try:
        centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    except Exception:  # noqa: BLE001 - an unparseable window is no window
        return None
    if centre is None or width is None or centre == "" or width == "":
        return None
    centre = centre[0] if isinstance(centre, Sequence) and not isinstance(centre, str) else centre
    width = width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width
    c, w = _float(centre, math.nan), _float(width, math.nan)
    function = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if not (math.isfinite(c) and math.isfinite(w)) or w < (1 if function == "LINEAR" else 1e-12):
        return None
    return c, w, function


def _voi_lut(values: np.ndarray, slope: float, intercept: float, ds: Any) -> np.ndarray | None:
    from pydicom.pixels import apply_voi

    try:
        if slope != 1.0 or intercept != 0.0 or not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values.astype(np.float64) * slope + intercept).astype(np.int64)
        mapped = apply_voi(values, ds, index=0)
        entries, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        every_input = np.arange(int(first), int(first) + (int(entries) or 65536))
        lut = np.asarray(apply_voi(every_input, ds, index=0))  # the LUT's own output range
    except Exception:  # noqa: BLE001 - a malformed LUT falls back to min-max
        log.debug("unusable VOI LUT Sequence; using min-max", exc_info=True)
        return None
    lo, hi = float(lut.min()), float(lut.max())
    if hi <= lo:
        return None
    return _affine_clip(mapped, 1.0 / (hi - lo), -lo / (hi - lo), False)


def _value_range(values: np.ndarray, ds: Any) -> tuple[float, float]:
    """(min, max) of the values, Pixel Padding Value excluded."""
    padding = ds.get("PixelPaddingValue")
    if padding is not None and not ds.get("ModalityLUTSequence"):
        try:
            keep = values != int(padding)
            if keep.any() and not keep.all():
                return float(values[keep].min()), float(values[keep].max())
        except (TypeError, ValueError):
            pass
    return float(values.min()), float(values.max())


# ----------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True, kw_only=True)
class Derivation:
    """What made a derived image: written to its series description, derivation description,
    contributing equipment, private block and Image Comments. `provenance` (e.g. {"n": 10,
    "t": 0.5, "score": 0.93}) must hold finite numbers and strings; see the module docstring."""

    creator: str = "boneaug"
    model_name: str | None = None
    model_version: str | None = None
    provenance: Mapping[str, str | float] = field(default_factory=dict)
    description: str = "synthetic lesion translated and blended into a radiograph"


@dataclass(frozen=True, kw_only=True)
class DerivedIds:
    """Where a derived image goes and what it is called. Each value given wins over what the
    source image provides; left None, the source's is used, else a new UID (or none)."""

    study_uid: str | None = None
    patient_id: str | None = None
    source_sop_uid: str | None = None
    source_sop_class_uid: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    series_uid: str | None = None  # group many derived images in one series
    sop_uid: str | None = None
    series_number: int = 9001
    instance_number: int = 1
    created: datetime | None = None


def encode_derived(pixels: np.ndarray, derivation: Derivation = Derivation(), *,
                   source: XrayImage | None = None, ids: DerivedIds = DerivedIds()) -> bytes:
    """A derived radiograph as DICOM bytes (Secondary Capture, DERIVED\\SECONDARY, 12-bit
    MONOCHROME2).

    pixels: (H, W) float in [0, 1], bone bright. `source` (or the explicit `ids`, which win over
    it) places the image in the source's study and references the source SOP instance; the
    series and SOP instance are new. Pixel spacing: the explicit one, else the source's adjusted
    for resizing (divided by `source.scale` when the source was read with a target, else scaled
    by the size ratio).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    image = np.asarray(pixels)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"encode_derived expects a 2-D (H, W) image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("encode_derived: pixels contain NaN or infinity")
    provenance_json = _provenance_json(derivation.provenance)
    rows, columns = image.shape
    stored = np.rint(np.clip(image.astype(np.float32), 0.0, 1.0) * 4095.0).astype("<u2")  # (H, W)

    study = ids.study_uid or (source.study_uid if source else None) or generate_uid()
    patient = ids.patient_id or (source.patient_id if source else None) or ""
    ref_sop = ids.source_sop_uid or (source.sop_uid if source else None)
    ref_class = ids.source_sop_class_uid or (source.sop_class_uid if source else None) or \
        _SOP_CLASS_BY_MODALITY.get((source.modality or "") if source else "", _SECONDARY_CAPTURE)
    spacing = ids.pixel_spacing_mm or _derived_spacing(source, rows, columns)
    when = ids.created or datetime.now(UTC)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    sop = ids.sop_uid or generate_uid()
    version = _boneaug_version()
    creator, description = derivation.creator, derivation.description
    model_name, model_version = derivation.model_name, derivation.model_version
    model = " ".join(v for v in (model_name, model_version) if v) or "no model"

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = _SECONDARY_CAPTURE, sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = (source.modality if source and source.modality else "OT")
    ds.ConversionType = "WSD"
    ds.Manufacturer = "boneaug"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"{creator} derived ({model})"[:64]
    ds.ManufacturerModelName = (model_name or creator)[:64]
    ds.SoftwareVersions = ([f"boneaug {version}"[:64]]
                           + ([model_version[:64]] if model_version else []))
    ds.DerivationDescription = f"{creator}: {description}; model {model}"[:1024]
    if ref_sop:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ref_class, ref_sop
        ref.PurposeOfReferenceCodeSequence = DicomSequence(
            [_code("121322", "DCM", "Source image for image processing operation")])
        ds.SourceImageSequence = DicomSequence([ref])
    equipment = Dataset()
    equipment.Manufacturer = "boneaug"
    equipment.ManufacturerModelName = (model_name or creator)[:64]
    equipment.SoftwareVersions = ds.SoftwareVersions
    equipment.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
    equipment.ContributionDescription = ds.DerivationDescription[:1024]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109103", "DCM", "Modifying Equipment")])
    ds.ContributingEquipmentSequence = DicomSequence([equipment])
    ds.PatientName = ""
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    if source and source.body_part:
        ds.BodyPartExamined = source.body_part
    if source and source.view:
        ds.ViewPosition = source.view
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = ids.series_uid or generate_uid()
    ds.StudyID = ""
    ds.SeriesNumber, ds.InstanceNumber = ids.series_number, ids.instance_number
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = ("boneaug provenance: " + "; ".join(
        f"{k}={v}" for k, v in json.loads(provenance_json).items()))[:10240]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    if spacing is not None:
        ds.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096  # (x - 2047.5) / 4095 + 0.5 = x / 4095: exact
    ds.VOILUTFunction = "LINEAR"
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "UT", provenance_json)
    block.add_new(0x02, "LO", (model_name or "")[:64])
    block.add_new(0x03, "LO", (model_version or "")[:64])
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = _SECONDARY_CAPTURE, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"BONEAUG_{version}"[:16]
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def read_provenance(data: bytes | BinaryIO) -> dict[str, str | float]:
    """The provenance written by `encode_derived` ({} when the object has none)."""
    import pydicom

    raw = _as_bytes(data, "<bytes>")
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        value = block[0x01].value
    except (KeyError, ValueError):
        return {}
    return dict(json.loads(value))


def _provenance_json(provenance: Mapping[str, str | float]) -> str:
    clean: dict[str, str | float] = {}
    for key, value in provenance.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"provenance keys must be non-empty strings, got {key!r}")
        if isinstance(value, (bool, np.bool_)):
            clean[key] = str(bool(value))
        elif isinstance(value, (int, np.integer)):
            clean[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            if not math.isfinite(float(value)):
                raise ValueError(f"provenance {key!r} is {value}: values must be finite")
            clean[key] = float(value)
        elif isinstance(value, str):
            clean[key] = value
        else:
            raise ValueError(f"provenance {key!r} has a {type(value).__name__}; "
                             "use str, int or float")
    return json.dumps(clean, sort_keys=True, allow_nan=False)


def _derived_spacing(source: XrayImage | None, rows: int,
                     columns: int) -> tuple[float, float] | None:
    if source is None or source.pixel_spacing_mm is None:
        return None
    row_mm, col_mm = source.pixel_spacing_mm
    if source.scale != 1.0:  # pixels are in the source's fitted (target) frame
        return row_mm / source.scale, col_mm / source.scale
    return row_mm * source.rows / rows, col_mm * source.columns / columns


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _boneaug_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("boneaug")
    except PackageNotFoundError:
        return "0+unknown"


# ----------------------------------------------------------------------------------------------
# checking


def check_uris(uris: Sequence[str], *, endpoint_url: str | None = None,
               max_pixels: int = 64_000_000, max_side: int = 16384) -> Iterator[dict[str, Any]]:
    """One record per DICOM file under `uris` (files, directories or s3:// prefixes).

    A directory or prefix expands to its ``*.dcm`` files and files without an extension
    (recursively, hidden names skipped); a file named explicitly is checked whatever its name.
    Records: {"path", "ok", "reason", "message", "rows", "columns", "photometric"}; a URI that
    cannot be listed or read gives a record with reason ``not_found`` or ``unreadable``.
    """
    from boneaug import storage

    for uri in uris:
        try:
            paths = _expand(uri, endpoint_url)
        except StorageError as exc:
            yield _record(uri, ok=False, reason="unreadable", message=str(exc))
            continue
        if paths is None:
            yield _record(uri, ok=False, reason="not_found", message=f"{uri} does not exist")
            continue
        for path in paths:
            try:
                data = storage.read_bytes(path, endpoint_url=endpoint_url)
            except StorageError as exc:
                yield _record(path, ok=False, reason="unreadable", message=str(exc))
                continue
            result = read_xray(data, path=path, max_pixels=max_pixels, max_side=max_side)
            if isinstance(result, Rejection):
                yield _record(path, ok=False, reason=result.reason, message=result.message,
                              rows=result.rows, columns=result.columns,
                              photometric=result.photometric)
            else:
                yield _record(path, ok=True, reason=None, message=None, rows=result.rows,
                              columns=result.columns, photometric=result.photometric)


def _expand(uri: str, endpoint_url: str | None) -> list[str] | None:
    from boneaug import storage

    fs, fs_path = storage.filesystem(uri, endpoint_url=endpoint_url)
    try:
        if fs.isfile(fs_path):
            return [uri]
        if not fs.isdir(fs_path):
            return None
    except Exception as exc:  # noqa: BLE001 - botocore errors are many
        raise StorageError(f"cannot stat {uri}: {exc}") from exc
    return [p for p in storage.list_files(uri, endpoint_url=endpoint_url)
            if _looks_like_dicom_name(p)]


def _looks_like_dicom_name(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("."):
        return False
    return name.lower().endswith(".dcm") or "." not in name


def _record(path: str, *, ok: bool, reason: str | None, message: str | None,
            rows: int | None = None, columns: int | None = None,
            photometric: str | None = None) -> dict[str, Any]:
    return {"path": path, "ok": ok, "reason": reason, "message": message, "rows": rows,
            "columns": columns, "photometric": photometric}
