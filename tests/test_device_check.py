"""The prepared GPU check runs its whole path on the CPU (--dry-run): ready for a device."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_device_check_dry_run_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a `ray start` head or a Ray test cluster leaves its address in <RAY_TMPDIR>/ray/
    # ray_current_cluster, and a plain ray.init() joins it (or fails on a dead one): the check
    # starts its own Ray whatever it finds (a short dir: Ray's socket paths have a length limit)
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as ray_tmp:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("192.0.2.1:6379")
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run"],
                              env={**os.environ, "OUT": str(out), "RAY_TMPDIR": ray_tmp},
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (out / "device_check.md").read_text()
    for row in ("| GEMM peak", "| UNIT training, smoke (dry run)", "| DRN training, smoke",
                "| UNIT through Ray Train (fit_unit, 1 worker) |"):
        assert row in table
    report = json.loads((out / "device_check.json").read_text())
    assert report["dry_run"] and report["peak_tflops"] > 0
    assert report["unit"]["per_s"] > 0 and report["drn"]["per_s"] > 0
    assert report["ray_unit_smoke"]["status"] == "ok"
    assert report["ray_unit_smoke"]["iterations"] >= 8
