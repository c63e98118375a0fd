"""Shared by the benchmarks: a loopback S3 server, a scratch directory, the machine's GEMM peak,
table printing."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A real S3-protocol server on 127.0.0.1 (free port); env points boneaug at it; stopped
    after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", BONEAUG_S3_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary directory, removed when the benchmark's process exits (its sqlite MLflow
    and uploads would otherwise stay behind on every run)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def best_seconds(fn: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Best of `repeats` timed calls of `fn`, synchronising a CUDA device around each (the caller
    has already run `fn` once as a warm-up)."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu",
                     dtype: str = "float32") -> float:
    """n x n matmul GFLOP/s on this machine now (best of `repeats`): fp32 on the CPU is the
    roofline anchor here; bf16 on a GPU is the MFU anchor of device_check."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b  # warm-up
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats, device) / 1e9


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table (pastes into notes and the README as it is)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
