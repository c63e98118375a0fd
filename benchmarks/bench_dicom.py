"""DICOM ingestion hot path: bytes -> float32 [0, 1] -> fitted 1024 x 512, ours vs a naive loop.

Writes N deterministic synthetic 12-bit radiographs (~2500 x 2000, half MONOCHROME1, with rescale
and a VOI window) to a temp dir and to a loopback S3 server (moto_server, started and stopped
here), then times, in the same run and on the same bytes:

- naive:  pydicom.dcmread(BytesIO(b)).pixel_array -> float32 -> min-max -> PIL bilinear resize
          (it does less than ours: no window, no MONOCHROME1 inversion, no padding)
- boneaug read_xray(b, target=(1024, 512)) with the torch resampler (default) and with PIL

from local disk (read + decode) and from S3 (GET + decode). Prints images/s and the ratio to the
naive loop on the same path, plus where our time goes per image.

    .venv/bin/python benchmarks/bench_dicom.py [--n 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import moto_server, print_table

TARGET = (1024, 512)


def synthetic_radiograph(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint16 12-bit stored values: smooth low-frequency anatomy-like field plus noise."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, 1, 24, 20)).astype(np.float32))
    field = F.interpolate(coarse, size=shape, mode="bicubic", align_corners=False)[0, 0].numpy()
    field += 0.05 * rng.standard_normal(shape).astype(np.float32)
    field = (field - field.min()) / (field.max() - field.min())
    return np.rint(field * 4095).astype(np.uint16)


def make_dicom(stored: np.ndarray, index: int) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{index + 1}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.2.{index + 1}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.3.{index + 1}"
    ds.Modality, ds.PatientID, ds.BodyPartExamined = "CR", f"BENCH-{index:03d}", "TIBIA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if index % 2 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 1000, 3500  # on the rescaled values -1024..3071
    ds.ImagerPixelSpacing = [0.14, 0.14]
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def naive(data: bytes) -> np.ndarray:
    import pydicom
    from PIL import Image

    pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    h, w = pixels.shape
    scale = min(TARGET[0] / h, TARGET[1] / w)
    size = (int(w * scale), int(h * scale))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def ours(method: str) -> Callable[[bytes], np.ndarray]:
    from boneaug.io.dicom import XrayImage, read_xray

    def run(data: bytes) -> np.ndarray:
        image = read_xray(data, target=TARGET, resize_method=method)  # type: ignore[arg-type]
        assert isinstance(image, XrayImage), image
        return image.pixels

    return run


def time_interleaved(keys: list[str], read: Callable[[str], bytes],
                     methods: dict[str, Callable[[bytes], object]],
                     repeats: int) -> dict[str, float]:
    """images/s (read + decode) per method, best of `repeats` passes, after a 2-image warm-up.

    Methods take turns image by image, so a burst of load from other processes on this shared
    machine hits all of them alike instead of whichever happened to run then.
    """
    for key in keys[:2]:
        for fn in methods.values():
            fn(read(key))
    best = {name: float("inf") for name in methods}
    for _ in range(repeats):
        spent = dict.fromkeys(methods, 0.0)
        for key in keys:
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn(read(key))
                spent[name] += time.perf_counter() - t0
        best = {name: min(best[name], spent[name]) for name in methods}
    return {name: len(keys) / seconds for name, seconds in best.items()}


def stage_breakdown(blobs: list[bytes]) -> list[tuple[str, float]]:
    """ms per image of each stage of our reader (header parse, view + normalise, fit_pad)."""
    import pydicom

    from boneaug.io.dicom import normalise, read_xray
    from boneaug.io.resize import fit_pad

    def ms(fn: Callable[[bytes], object]) -> float:
        fn(blobs[0])
        t0 = time.perf_counter()
        for blob in blobs:
            fn(blob)
        return (time.perf_counter() - t0) / len(blobs) * 1e3

    decoded = [read_xray(b).pixels for b in blobs]  # type: ignore[union-attr]
    headers = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True) for b in blobs]
    stored = [np.frombuffer(b, "<u2", count=h.Rows * h.Columns,
                            offset=len(b) - h.Rows * h.Columns * 2)
              .reshape(h.Rows, h.Columns) for b, h in zip(blobs, headers, strict=True)]
    it = iter(range(10**9))

    def one_normalise(_: bytes) -> object:
        i = next(it) % len(blobs)
        return normalise(stored[i], headers[i])

    def one_fit(method: str) -> Callable[[bytes], object]:
        counter = iter(range(10**9))
        return lambda _: fit_pad(decoded[next(counter) % len(blobs)], TARGET,
                                 method=method)  # type: ignore[arg-type]

    return [
        ("header parse (stop_before_pixels)",
         ms(lambda b: pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True))),
        ("full read_xray, no resize", ms(lambda b: read_xray(b))),
        ("normalise (rescale+window+invert)", ms(one_normalise)),
        ("fit_pad torch", ms(one_fit("torch"))),
        ("fit_pad PIL 'F'", ms(one_fit("pil"))),
        ("naive total", ms(naive)),
    ]


def main() -> None:
    import boto3
    import torch

    from boneaug import storage

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20, help="synthetic radiographs")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best is kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 = what a Ray Data decode task gets)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    shapes = [(2500 - 16 * (i % 5), 2000 + 8 * (i % 4)) for i in range(args.n)]
    t0 = time.perf_counter()
    blobs = [make_dicom(synthetic_radiograph(rng, shape), i) for i, shape in enumerate(shapes)]
    print(f"made {len(blobs)} DICOMs of ~{shapes[0][0]}x{shapes[0][1]} 12-bit "
          f"({sum(map(len, blobs)) / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")

    methods = {"naive pydicom+PIL": naive, "boneaug read_xray (torch)": ours("torch"),
               "boneaug read_xray (PIL)": ours("pil")}
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        local = [str(Path(tmp) / f"img-{i:03d}.dcm") for i in range(len(blobs))]
        for key, blob in zip(local, blobs, strict=True):
            Path(key).write_bytes(blob)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-dicom")
        remote = [f"s3://bench-dicom/dicom/img-{i:03d}.dcm" for i in range(len(blobs))]
        for key, blob in zip(remote, blobs, strict=True):
            storage.write_bytes(key, blob)

        for where, keys, read in (("local", local, lambda k: Path(k).read_bytes()),
                                  ("S3 (moto, loopback)", remote, storage.read_bytes)):
            rates = time_interleaved(keys, read, methods, args.repeats)
            base = rates["naive pydicom+PIL"]
            rows += [[where, name, rate, rate / base] for name, rate in rates.items()]
        fetch = time_interleaved(remote, storage.read_bytes, {"get": lambda b: b}, 1)["get"]
        rows.append(["S3 (moto, loopback)", "GET only (no decode)", fetch, fetch / base])

    print()
    print_table(["path", "method", "images/s", "ratio to naive"], rows)
    print()
    print_table(["stage (in memory)", "ms / image"], stage_breakdown(blobs[: min(8, len(blobs))]))


if __name__ == "__main__":
    main()
