"""boneaug.io.dicom against pydicom's bundled corpus, hand-built datasets and deliberately broken
files."""

from __future__ import annotations

import io
import math
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from boneaug import storage
from boneaug.errors import DicomError
from boneaug.io.dicom import (
    REASONS,
    Derivation,
    DerivedIds,
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

# pydicom warns about every oddity of the broken files these tests feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped in the wheel: no downloads
CORPUS_FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file())
CR_MONO1 = sorted((CORPUS / "dicomdirtests" / "77654033").glob("CR*/*"))


def _rel(path: Path) -> str:
    return path.relative_to(CORPUS).as_posix()


def _read(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# hand-built files


def _dataset(stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
             signed: bool = False, **attrs: object) -> Dataset:
    """A valid single-frame CR dataset around `stored` (H, W) integer values."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.BodyPartExamined, ds.ViewPosition = "CR", "P-001", "TIBIA", "AP"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _encode(ds: Dataset, *, transfer_syntax: str = ExplicitVRLittleEndian,
            preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no DICM, no file meta (implicit VR little endian)
        pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def _smooth_12bit(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint16 in [0, 4095]: smooth structure plus noise, like a radiograph's stored
    values."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    field = np.sin(x / 9.0) + np.cos(y / 13.0) + 0.3 * rng.standard_normal(shape)
    field = (field - field.min()) / (field.max() - field.min())
    return np.rint(field * 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def valid_12bit() -> tuple[bytes, np.ndarray]:
    """A 256 x 200 12-bit CR file (window 2048/4096 -> x / 4095) and its stored values."""
    stored = _smooth_12bit(np.random.default_rng(7), (256, 200))
    ds = _dataset(stored, WindowCenter=2048, WindowWidth=4096)
    return _encode(ds), stored


# ---------------------------------------------------------------------------------------------
# pydicom's corpus


@pytest.mark.parametrize("path", CORPUS_FILES, ids=_rel)
def test_every_corpus_file_decodes_or_is_rejected_with_a_reason(path: Path) -> None:
    result = read_xray(path.read_bytes(), path=_rel(path))
    if isinstance(result, Rejection):
        assert result.reason in REASONS, result
        assert result.path == _rel(path) and _rel(path) in result.message
    else:
        assert result.pixels.ndim == 2 and result.pixels.dtype == np.float32
        assert result.pixels.shape == (result.rows, result.columns)
        assert 0.0 <= float(result.pixels.min()) and float(result.pixels.max()) <= 1.0
        assert np.isfinite(result.pixels).all()


def test_corpus_result_counts() -> None:
    """The whole corpus at once: what is decoded, what is rejected and why (reported by the
    lead)."""
    counts = Counter()
    for path in CORPUS_FILES:
        result = read_xray(path.read_bytes(), path=_rel(path))
        counts["ok" if isinstance(result, XrayImage) else result.reason] += 1
    assert sum(counts.values()) == len(CORPUS_FILES) > 100
    assert counts["ok"] >= 45 and counts["colour"] >= 30 and counts["no_pixel_data"] >= 60
    assert counts["multi_frame"] == 3 and counts["truncated"] >= 2 and counts["not_dicom"] >= 8


EXPECTED = {
    "CT_small.dcm": "ok",
    "MR_small.dcm": "ok",
    "MR_small_RLE.dcm": "ok",
    "MR_small_jp2klossless.dcm": "ok",
    "MR_small_jpeg_ls_lossless.dcm": "ok",
    "MR_small_bigendian.dcm": "ok",
    "MR_small_implicit.dcm": "ok",
    "JPGExtended.dcm": "ok",  # 12-bit JPEG extended via pylibjpeg-libjpeg
    "JPEG2000.dcm": "ok",
    "693_J2KI.dcm": "ok",
    "image_dfl.dcm": "ok",  # deflated explicit VR little endian
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "SC_rgb_rle.dcm": "colour",
    "SC_rgb_jpeg_dcmtk.dcm": "colour",
    "SC_rgb_small_odd.dcm": "colour",
    "SC_rgb_rle_2frame.dcm": "colour",  # colour is reported before multi-frame
    "examples_palette.dcm": "colour",
    "examples_ybr_color.dcm": "colour",
    "rtdose.dcm": "multi_frame",
    "rtdose_expb.dcm": "multi_frame",
    "rtdose_rle.dcm": "multi_frame",
    "rtdose_1frame.dcm": "not_image",
    "liver_1frame.dcm": "not_image",  # a 1-bit segmentation
    "rtplan.dcm": "no_pixel_data",
    "reportsi.dcm": "no_pixel_data",
    "waveform_ecg.dcm": "no_pixel_data",
    "dicomdirtests/DICOMDIR": "no_pixel_data",
    "ExplVR_LitEndNoMeta.dcm": "no_pixel_data",  # no preamble, still read as DICOM
    "badVR.dcm": "bad_header",  # NumberOfFrames '1A'
    "nested_priv_SQ.dcm": "bad_header",  # Pixel Data without Rows/Columns
    "JPEG-lossy.dcm": "decode_error",  # a known-broken JPEG; pylibjpeg refuses it
    "README.txt": "not_dicom",
    "crayons.icc": "not_dicom",
    "zipMR.gz": "not_dicom",
    "test1.json": "not_dicom",
    "no_meta.dcm": "not_dicom",  # starts one byte off: no tag can be read
}


@pytest.mark.parametrize("name,expected", list(EXPECTED.items()), ids=str)
def test_known_corpus_files(name: str, expected: str) -> None:
    result = read_xray(_read(name), path=name)
    got = "ok" if isinstance(result, XrayImage) else result.reason
    assert got == expected, result


def test_decode_error_names_the_transfer_syntax() -> None:
    result = read_xray(_read("JPEG-lossy.dcm"), path="JPEG-lossy.dcm")
    assert isinstance(result, Rejection) and "JPEG Extended" in result.message
    assert "1.2.840.10008.1.2.4.51" in result.message
    truncated = read_xray(_read("MR_truncated.dcm"))
    assert (isinstance(truncated, Rejection) and "8130" in truncated.message
            and "8192" in truncated.message)


@pytest.mark.parametrize("path", CR_MONO1, ids=_rel)
def test_12bit_cr_monochrome1_is_inverted(path: Path) -> None:
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
    raw = ds.pixel_array.astype(np.float64)  # stored values, as pydicom gives them (not inverted)
    image = decode_xray(path.read_bytes(), path=_rel(path))
    out = image.pixels.astype(np.float64)
    # higher stored value -> darker, wherever neither pixel is clipped by the window
    inside = (out > 0) & (out < 1)
    a, b = raw[inside], out[inside]
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    higher = a[1:] > a[:-1]
    assert higher.sum() > 20 and np.all(b[1:][higher] < b[:-1][higher])
    # and the values are pydicom's own modality LUT + window, normalised to [0, 1], inverted
    modality = apply_modality_lut(ds.pixel_array, ds)
    y_min, y_max = ds.RescaleIntercept, (2**12 - 1) * ds.RescaleSlope + ds.RescaleIntercept
    expected = 1.0 - (apply_windowing(modality, ds) - y_min) / (y_max - y_min)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert image.photometric == "MONOCHROME1" and image.pixel_spacing_mm == (0.1, 0.1)
    assert image.modality == "CR" and image.patient_id == "77654033"


@pytest.mark.parametrize("compressed", [
    "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm",
])
def test_compressed_and_other_encodings_match_the_uncompressed_original(compressed: str) -> None:
    reference = decode_xray(_read("MR_small.dcm")).pixels
    image = decode_xray(_read(compressed), path=compressed)
    assert image.pixels.shape == (64, 64)
    np.testing.assert_allclose(image.pixels, reference, atol=1e-6)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "JPEG2000.dcm", "JPGExtended.dcm",
                                  "JPEGLSNearLossless_16.dcm", "CT_small.dcm", "image_dfl.dcm",
                                  "examples_overlay.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_pipeline_matches_pydicom_modality_lut_and_windowing(name: str) -> None:
    """Our normalisation against pydicom's own LUT functions on pydicom's own decode."""
    ds = pydicom.dcmread(CORPUS / name)
    image = decode_xray(_read(name), path=name).pixels.astype(np.float64)
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        bits = ds.BitsStored
        signed = ds.PixelRepresentation == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        y_min, y_max = lo * slope + intercept, hi * slope + intercept
        expected = (apply_windowing(modality, ds) - y_min) / (y_max - y_min)
    else:
        expected = (modality - modality.min()) / (modality.max() - modality.min())
    np.testing.assert_allclose(image, expected, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# broken copies of a valid 12-bit file


def test_valid_12bit_file_reads_exactly(valid_12bit: tuple[bytes, np.ndarray]) -> None:
    data, stored = valid_12bit
    image = decode_xray(data, path="valid.dcm")
    np.testing.assert_allclose(image.pixels, stored / 4095.0, atol=1e-6)
    assert (image.rows, image.columns, image.bits_stored) == (256, 200, 12)
    assert image.body_part == "TIBIA" and image.view == "AP" and image.patient_id == "P-001"
    assert (image.pixel_spacing_mm == (0.15, 0.15)
            and image.transfer_syntax == ExplicitVRLittleEndian)
    assert image.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1" and image.scale == 1.0


def _value_offset(data: bytes, keyword: str) -> tuple[int, int]:
    """(offset of the value, its length) of a top-level element in `data`."""
    ds = pydicom.dcmread(io.BytesIO(data))
    element = ds.get_item(keyword)
    return element.value_tell, element.length


def test_truncated_copies_are_rejected_as_truncated(valid_12bit: tuple[bytes, np.ndarray]) -> None:
    data, _ = valid_12bit
    patient_at, patient_len = _value_offset(data, "PatientID")
    pixels_at, pixels_len = _value_offset(data, "PixelData")
    cuts = {
        "inside the file meta group": 150,
        "inside PatientID's value": patient_at + patient_len // 2,
        "inside the Pixel Data element header": pixels_at - 5,
        "right after the Pixel Data header": pixels_at,
        "half-way through the pixels": pixels_at + pixels_len // 2,
        "one byte short": len(data) - 1,
    }
    for where, cut in cuts.items():
        result = read_xray(data[:cut], path=f"cut-{cut}.dcm")
        assert isinstance(result, Rejection) and result.reason == "truncated", (where, result)
    # before the DICM prefix is complete there is nothing that says DICOM
    assert read_xray(data[:100]).reason == "not_dicom"


def test_every_truncation_offset_is_rejected_never_raised(
    valid_12bit: tuple[bytes, np.ndarray]
) -> None:
    data, _ = valid_12bit
    pixels_at, _ = _value_offset(data, "PixelData")
    reasons = Counter()
    for cut in list(range(0, pixels_at + 16)) + list(range(pixels_at + 16, len(data), 997)):
        result = read_xray(data[:cut])
        assert isinstance(result, Rejection), cut
        reasons[result.reason] += 1
    # a cut exactly between two header elements looks like an object without pixel data
    assert set(reasons) == {"not_dicom", "truncated", "no_pixel_data"}
    assert reasons["truncated"] > 10 * reasons["no_pixel_data"]


def test_garbage_bytes_are_rejected(valid_12bit: tuple[bytes, np.ndarray]) -> None:
    data, _ = valid_12bit
    rng = np.random.default_rng(11)
    for seed in range(20):  # random bytes of random sizes: never DICOM
        size = int(np.random.default_rng(seed).integers(0, 5000))
        assert read_xray(np.random.default_rng(seed).bytes(size)).reason == "not_dicom"
    assert read_xray(b"").reason == "not_dicom"
    assert read_xray(b"DICM" + b"\x00" * 200).reason == "not_dicom"
    broken = bytearray(data)
    broken[:132] = rng.bytes(132)  # preamble and prefix destroyed
    assert read_xray(bytes(broken)).reason == "not_dicom"

    ds = pydicom.dcmread(io.BytesIO(data))
    rows_at = ds.get_item("Rows").value_tell
    broken = bytearray(data)
    broken[rows_at - 2:rows_at] = b"\xff\xff"  # Rows's 2-byte length now runs past the end
    result = read_xray(bytes(broken))
    assert result.reason == "truncated" and "length is corrupt" in result.message
    broken = bytearray(data)
    broken[rows_at - 8:rows_at - 4] = b"\x00\x00\x00\x00"  # Rows's tag zeroed: Rows is gone
    assert read_xray(bytes(broken)).reason == "bad_header"
    ts_at = data.index(ExplicitVRLittleEndian.encode(), 132)
    broken = bytearray(data)
    broken[ts_at:ts_at + 4] = b"9.9."  # an unknown transfer syntax
    result = read_xray(bytes(broken))
    assert result.reason == "unsupported_compression" and "9.9." in result.message


def test_random_header_damage_never_raises(valid_12bit: tuple[bytes, np.ndarray]) -> None:
    data, stored = valid_12bit
    pixels_at, _ = _value_offset(data, "PixelData")
    rng = np.random.default_rng(12)
    outcomes = Counter()
    for start in range(132, pixels_at, 5):
        broken = bytearray(data)
        broken[start:start + 8] = rng.bytes(8)
        result = read_xray(bytes(broken))
        if isinstance(result, XrayImage):  # the damage hit a value that does not matter
            outcomes["ok"] += 1
            assert result.pixels.shape == stored.shape
        else:
            outcomes[result.reason] += 1
            assert result.reason in REASONS and result.message
    assert outcomes["ok"] < sum(outcomes.values()) and len(outcomes) >= 3


@pytest.mark.parametrize("rows,columns", [(60000, 200), (256, 60000), (60000, 60000), (9000, 9000)])
def test_absurd_dimensions_are_refused_before_allocating(rows: int, columns: int) -> None:
    stored = _smooth_12bit(np.random.default_rng(3), (256, 200))
    ds = _dataset(stored, WindowCenter=2048, WindowWidth=4096)
    ds.Rows, ds.Columns = rows, columns  # Pixel Data stays 256 x 200
    data = _encode(ds)
    tracemalloc.start()
    try:
        result = read_xray(data, path="huge.dcm", max_pixels=64_000_000, max_side=16384)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, Rejection) and result.reason == "absurd_dimensions", result
    assert (result.rows, result.columns) == (rows, columns)
    # a float32 image of that size would be >= 60000 * 200 * 4 = 48 MB; parsing needs a few
    # hundred kB
    assert peak < 3_000_000, f"peak {peak} bytes"


def test_colour_multiframe_and_missing_pixels(valid_12bit: tuple[bytes, np.ndarray]) -> None:
    stored = _smooth_12bit(np.random.default_rng(5), (64, 48))
    colour = _dataset(np.repeat(stored[..., None], 3, axis=2).reshape(64, 144),
                      photometric="RGB", BitsAllocated=8, BitsStored=8, HighBit=7)
    colour.Columns, colour.SamplesPerPixel, colour.PlanarConfiguration = 48, 3, 0
    colour.PixelData = np.repeat(stored[..., None] // 16, 3, axis=2).astype(np.uint8).tobytes()
    result = read_xray(_encode(colour))
    assert result.reason == "colour" and result.photometric == "RGB"

    frames = _dataset(np.concatenate([stored, stored]), WindowCenter=2048, WindowWidth=4096)
    frames.Rows, frames.NumberOfFrames = 64, 2
    assert read_xray(_encode(frames)).reason == "multi_frame"

    missing = _dataset(stored)
    del missing.PixelData
    result = read_xray(_encode(missing))
    assert result.reason == "no_pixel_data" and "Rows/Columns" in result.message

    no_rows = _dataset(stored)
    del no_rows.Rows
    assert read_xray(_encode(no_rows)).reason == "bad_header"

    bits = _dataset(stored)
    bits.BitsStored = 17
    assert read_xray(_encode(bits)).reason == "bad_header"

    short = _dataset(stored)
    short.PixelData = short.PixelData[:-100]  # element shorter than the header promises
    result = read_xray(_encode(short))
    assert result.reason == "truncated" and "holds" in result.message


def test_file_without_preamble_reads_and_random_bytes_do_not() -> None:
    stored = _smooth_12bit(np.random.default_rng(9), (40, 30))
    bare = _encode(_dataset(stored, WindowCenter=2048, WindowWidth=4096), preamble=False)
    assert bare[128:132] != b"DICM"
    image = decode_xray(bare)
    np.testing.assert_allclose(image.pixels, stored / 4095.0, atol=1e-6)
    assert image.transfer_syntax == ImplicitVRLittleEndian


def test_file_like_inputs_and_argument_errors(
    valid_12bit: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    data, stored = valid_12bit
    assert isinstance(read_xray(io.BytesIO(data)), XrayImage)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    with path.open("rb") as handle:
        np.testing.assert_allclose(read_xray(handle).pixels, stored / 4095.0, atol=1e-6)
    assert isinstance(read_xray(bytearray(data)), XrayImage)
    with pytest.raises(TypeError):
        read_xray("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        read_xray(data, target=(0, 10))
    with pytest.raises(DicomError) as info:
        decode_xray(b"hello", path="s3://bucket/hello.dcm")
    assert info.value.reason == "not_dicom" and info.value.path == "s3://bucket/hello.dcm"
    assert "s3://bucket/hello.dcm" in str(info.value)


# ---------------------------------------------------------------------------------------------
# the pixel pipeline on hand-built values


STORED = np.array([[0, 100, 500], [900, 1000, 4095]], dtype=np.uint16)


def _pipeline(**attrs: object) -> np.ndarray:
    photometric = str(attrs.pop("photometric", "MONOCHROME2"))
    return decode_xray(_encode(_dataset(STORED, photometric=photometric, **attrs))).pixels


def test_rescale_then_linear_window_then_monochrome1() -> None:
    # modality: v = 2 * x - 100 -> [-100, 100, 900, 1700, 1900, 8090]
    # LINEAR window c=1000, w=1601: y = clip((v - 999.5) / 1600 + 0.5, 0, 1)
    v = STORED * 2.0 - 100.0
    linear = np.clip((v - 999.5) / 1600.0 + 0.5, 0, 1)
    out = _pipeline(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1000, WindowWidth=1601)
    np.testing.assert_allclose(out, linear, atol=1e-6)
    mono1 = _pipeline(photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100,
                      WindowCenter=1000, WindowWidth=1601)
    np.testing.assert_allclose(mono1, 1.0 - linear, atol=1e-6)
    # the hand-computed numbers, for a reader of this test
    np.testing.assert_allclose(linear, [[0, 0, 0.4378125], [0.9378125, 1, 1]], atol=1e-9)


def test_linear_exact_and_sigmoid_and_multiple_windows() -> None:
    exact = _pipeline(WindowCenter=1000, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT")
    np.testing.assert_allclose(exact, np.clip((STORED - 1000.0) / 1000.0 + 0.5, 0, 1), atol=1e-6)
    sigmoid = _pipeline(WindowCenter=1000, WindowWidth=1000, VOILUTFunction="SIGMOID")
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (STORED - 1000.0) / 1000.0)),
                               atol=1e-6)
    first = _pipeline(WindowCenter=[1000, 50], WindowWidth=[1601, 10])  # the first window is used
    np.testing.assert_allclose(first, np.clip((STORED - 999.5) / 1600.0 + 0.5, 0, 1), atol=1e-6)


def test_no_window_means_min_max_and_padding_is_ignored() -> None:
    out = _pipeline(RescaleSlope=-1, RescaleIntercept=5000)  # v = 5000 - x: higher x darker
    np.testing.assert_allclose(out, (4095.0 - STORED) / 4095.0, atol=1e-6)
    padded = _pipeline(PixelPaddingValue=4095)  # the 4095 pixel is padding: range is 0..1000
    np.testing.assert_allclose(padded.ravel()[:5], STORED.ravel()[:5] / 1000.0, atol=1e-6)
    assert padded[1, 2] == 1.0  # padding above the range clips to 1
    flat = decode_xray(_encode(_dataset(np.full((4, 4), 77, np.uint16)))).pixels
    assert flat.shape == (4, 4) and not flat.any()


def test_voi_lut_sequence_and_modality_lut_sequence() -> None:
    voi = Dataset()
    voi.LUTDescriptor = [4096, 0, 12]
    voi.add_new(0x00283006, "US",
                [int(v) for v in np.rint(np.sqrt(np.arange(4096) / 4095.0) * 4095)])
    out = _pipeline(VOILUTSequence=[voi])
    np.testing.assert_allclose(out, np.rint(np.sqrt(STORED / 4095.0) * 4095) / 4095.0, atol=1e-6)

    modality = Dataset()
    modality.LUTDescriptor = [4096, 0, 16]
    # inverts, stretches
    modality.add_new(0x00283006, "US", [int(v) for v in (4095 - np.arange(4096)) * 10])
    modality.ModalityLUTType = "US"
    out = _pipeline(ModalityLUTSequence=[modality], WindowCenter=20480, WindowWidth=40951)
    expected = np.clip(((4095.0 - STORED) * 10 - 20479.5) / 40950.0 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_unused_high_bits_are_cleared_and_signed_values_sign_extended() -> None:
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 4096, size=(20, 20), dtype=np.uint16)
    dirty = stored | (rng.integers(0, 16, size=stored.shape, dtype=np.uint16) << 12)  # overlay bits
    ds = _dataset(stored, WindowCenter=2048, WindowWidth=4096)
    ds.PixelData = dirty.astype("<u2").tobytes()
    np.testing.assert_allclose(decode_xray(_encode(ds)).pixels, stored / 4095.0, atol=1e-6)

    signed = rng.integers(-2048, 2048, size=(20, 20)).astype(np.int16)
    as_12bit = (signed.view(np.uint16) & 0x0FFF) | 0x5000  # 12-bit two's complement, junk above
    ds = _dataset(signed, signed=True, WindowCenter=0, WindowWidth=4096,
                  VOILUTFunction="LINEAR_EXACT")
    ds.PixelData = as_12bit.astype("<u2").tobytes()
    np.testing.assert_allclose(decode_xray(_encode(ds)).pixels, signed / 4096.0 + 0.5, atol=1e-6)


def test_normalise_is_usable_on_an_array_and_a_header() -> None:
    ds = _dataset(STORED, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    np.testing.assert_allclose(normalise(STORED, ds), 1 - STORED / 4095.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# fit_pad / map_box and the target path


def test_fit_pad_keeps_aspect_and_maps_boxes() -> None:
    image = np.zeros((2500, 2000), dtype=np.float32)
    box = (400, 1000, 1200, 1600)  # x0, y0, x1, y1 in stored pixels
    image[box[1]:box[3], box[0]:box[2]] = 1.0
    out, scale, pad_x, pad_y = fit_pad(image, (1024, 512))
    assert out.shape == (1024, 512) and out.dtype == np.float32
    assert scale == pytest.approx(512 / 2000) and pad_x == 0 and pad_y == (1024 - 640) // 2
    assert not out[:pad_y].any() and not out[pad_y + 640:].any()  # padding stays black
    mapped = map_box(box, scale, pad_x, pad_y, size=out.shape)
    assert mapped == (102, 448, 308, 602)  # 400*0.256=102.4 -> floor, 1200*0.256=307.2 -> ceil
    x0, y0, x1, y1 = mapped
    inside = out[y0 + 2:y1 - 2, x0 + 2:x1 - 2]  # the kernel blends 1 px either side of an edge
    assert inside.min() > 0.999
    # the antialiasing kernel blurs at most 1 output px beyond the box's edges; nothing further out
    assert out.sum() == pytest.approx(out[y0 - 1:y1 + 1, x0 - 1:x1 + 1].sum(), rel=1e-6)
    # and the mapping is exact: the blob's centre of mass lands where x * scale + pad says
    ys, xs = np.mgrid[0:1024, 0:512] + 0.5  # pixel centres
    com_x, com_y = (out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()
    assert com_x == pytest.approx(800 * scale + pad_x, abs=0.02)
    assert com_y == pytest.approx(1300 * scale + pad_y, abs=0.02)
    # encloses the original
    assert unmap_box(mapped, scale, pad_x, pad_y) == (398, 1000, 1204, 1602)
    # aspect: the content of an all-ones image occupies 640 x 512 = (2500 x 2000) * 0.256
    ones, *_ = fit_pad(np.ones((2500, 2000), np.float32), (1024, 512))
    assert (np.flatnonzero(ones.any(axis=1)).size == 640
            and np.flatnonzero(ones.any(axis=0)).size == 512)


@pytest.mark.parametrize("shape,target", [((2500, 2000), (1024, 512)), ((300, 901), (512, 512)),
                                          ((128, 128), (1024, 512)), ((1000, 40), (64, 64))])
def test_fit_pad_shapes_and_resamplers_agree(shape: tuple[int, int],
                                             target: tuple[int, int]) -> None:
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    a, scale, pad_x, pad_y = fit_pad(image, target, method="torch")
    b, scale_b, pad_xb, pad_yb = fit_pad(image, target, method="pil")
    assert a.shape == b.shape == target and (scale, pad_x, pad_y) == (scale_b, pad_xb, pad_yb)
    np.testing.assert_allclose(a, b, atol=1e-4)
    _, fh, fw = fit_scale(shape, target)
    assert fh == target[0] or fw == target[1]  # one side fills its target
    # one scale: aspect kept
    assert abs(fh - shape[0] * scale) < 1 and abs(fw - shape[1] * scale) < 1
    assert pad_x == (target[1] - fw) // 2 and pad_y == (target[0] - fh) // 2


def test_fit_pad_degenerate_side_still_gives_the_target_shape() -> None:
    out, scale, pad_x, pad_y = fit_pad(np.ones((1000, 10), np.float32), (64, 64))  # 0.64 px wide
    assert out.shape == (64, 64) and scale == pytest.approx(0.064) and out[:, pad_x].min() > 0


def test_map_box_rejects_inverted_boxes_and_clips() -> None:
    with pytest.raises(ValueError):
        map_box((10, 10, 5, 20), 1.0, 0, 0)
    assert map_box((-5, -5, 2000, 2000), 0.5, 3, 4) == (0, 1, 1003, 1004)
    assert map_box((-5, -5, 2000, 2000), 0.5, 3, 4, size=(100, 200)) == (0, 1, 200, 100)


def test_read_with_target_matches_decode_then_fit_pad(
    valid_12bit: tuple[bytes, np.ndarray]
) -> None:
    data, _ = valid_12bit
    full = decode_xray(data)
    fitted = decode_xray(data, target=(128, 64))
    out, scale, pad_x, pad_y = fit_pad(full.pixels, (128, 64))
    assert fitted.pixels.shape == (128, 64) and (fitted.rows, fitted.columns) == (256, 200)
    np.testing.assert_array_equal(fitted.pixels, out)
    assert (fitted.scale, fitted.pad_x, fitted.pad_y) == (scale, pad_x, pad_y)
    assert math.isclose(scale, 64 / 200) and pad_y == (128 - 81) // 2


# ---------------------------------------------------------------------------------------------
# the derived-image writer


def test_encode_derived_round_trip(valid_12bit: tuple[bytes, np.ndarray]) -> None:
    data, _ = valid_12bit
    source = decode_xray(data, path="source.dcm")
    pixels = np.clip(source.pixels + np.float32(0.05), 0, 1)  # "a lesion was added"
    provenance = {"n": 10, "t": 0.5, "score": 0.93125, "body_part": "tibia"}
    written = encode_derived(pixels, Derivation(creator="boneaug.augment", model_name="unit-tibia",
                                                model_version="3", provenance=provenance),
                             source=source)
    image = decode_xray(written, path="derived.dcm")
    assert np.abs(image.pixels - pixels).max() <= 0.5 / 4095 + 1e-6  # 12-bit quantisation
    assert image.bits_stored == 12 and image.photometric == "MONOCHROME2"
    assert image.study_uid == source.study_uid and image.patient_id == source.patient_id
    assert image.series_uid != source.series_uid and image.sop_uid != source.sop_uid
    assert image.pixel_spacing_mm == source.pixel_spacing_mm and image.body_part == "TIBIA"
    assert read_provenance(written) == provenance

    ds = pydicom.dcmread(io.BytesIO(written))
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    ref = ds.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.sop_uid
    assert ref.ReferencedSOPClassUID == source.sop_class_uid
    assert "unit-tibia" in ds.DerivationDescription and "3" in ds.DerivationDescription
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "boneaug" and equipment.ManufacturerModelName == "unit-tibia"
    assert "score=0.93125" in ds.ImageComments and "n=10" in ds.ImageComments
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.BitsStored == 12 and int(ds.pixel_array.max()) <= 4095

    again = decode_xray(encode_derived(pixels, Derivation(model_name="m", model_version="1"),
                                       source=source))
    assert again.sop_uid not in (image.sop_uid, source.sop_uid)
    assert again.series_uid != image.series_uid and again.study_uid == source.study_uid


def test_encode_derived_adjusts_spacing_and_takes_explicit_uids(
        valid_12bit: tuple[bytes, np.ndarray]) -> None:
    data, _ = valid_12bit
    fitted = decode_xray(data, target=(128, 64))  # scale 0.32: spacing 0.15 / 0.32
    written = encode_derived(fitted.pixels, Derivation(provenance={"t": 0.5}), source=fitted)
    spacing = decode_xray(written).pixel_spacing_mm
    assert spacing is not None and spacing[0] == pytest.approx(0.15 / fitted.scale, rel=1e-5)

    series = generate_uid()
    bare = encode_derived(np.zeros((8, 6), np.float32), Derivation(creator="c"), ids=DerivedIds(
        study_uid="1.2.3.4", patient_id="X", source_sop_uid="1.2.3.4.5",
        source_sop_class_uid="1.2.840.10008.5.1.4.1.1.1", series_uid=series))
    ds = pydicom.dcmread(io.BytesIO(bare))
    assert (ds.StudyInstanceUID == "1.2.3.4" and ds.SeriesInstanceUID == series
            and ds.PatientID == "X")
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"
    assert "PixelSpacing" not in ds


def test_encode_derived_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_derived(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        encode_derived(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="finite"):
        encode_derived(np.zeros((2, 2)), Derivation(provenance={"t": float("inf")}))


# ---------------------------------------------------------------------------------------------
# check_uris


def _write_check_tree(root: str, good: bytes) -> None:
    storage.write_bytes(storage.join(root, "a", "good.dcm"), good)
    storage.write_bytes(storage.join(root, "a", "IM000001"), good)  # no extension: checked
    storage.write_bytes(storage.join(root, "a", "notes.txt"), b"ignored")
    storage.write_bytes(storage.join(root, "a", "colour.dcm"), _read("SC_rgb_rle.dcm"))
    storage.write_bytes(storage.join(root, "b", "broken.DCM"), good[:1000])


def _check(records: list[dict]) -> None:
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    assert set(by_name) == {"good.dcm", "IM000001", "colour.dcm", "broken.DCM", "missing"}
    assert by_name["good.dcm"]["ok"] and by_name["good.dcm"]["rows"] == 256
    assert by_name["IM000001"]["ok"] and by_name["IM000001"]["photometric"] == "MONOCHROME2"
    assert (by_name["colour.dcm"]["reason"] == "colour"
            and by_name["colour.dcm"]["photometric"] == "RGB")
    assert by_name["broken.DCM"]["reason"] == "truncated"
    assert by_name["missing"]["reason"] == "not_found"
    for record in records:
        assert set(record) >= {"path", "ok", "reason", "rows", "columns", "photometric"}


def test_check_uris_local(tmp_path: Path, valid_12bit: tuple[bytes, np.ndarray]) -> None:
    root = str(tmp_path / "dicoms")
    _write_check_tree(root, valid_12bit[0])
    records = list(check_uris([storage.join(root, "a"), storage.join(root, "b", "broken.DCM"),
                               str(tmp_path / "missing")]))
    _check(records)


def test_check_uris_s3(s3_bucket: str, valid_12bit: tuple[bytes, np.ndarray]) -> None:
    root = storage.join(s3_bucket, "dicoms")
    _write_check_tree(root, valid_12bit[0])
    records = list(check_uris([storage.join(root, "a"), storage.join(root, "b"),
                               storage.join(root, "missing")]))
    _check(records)
    assert all(r["path"].startswith("s3://") for r in records)
