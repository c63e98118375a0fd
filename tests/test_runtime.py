"""Ray start-up of the jobs: a job run outside `ray job submit` starts its own local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ray
from boneaug.runtime import init_ray
init_ray(num_cpus=1)
print("cpus", ray.cluster_resources()["CPU"])
"""


def test_init_ray_starts_a_local_ray_whatever_cluster_address_the_machine_remembers() -> None:
    # `ray start` and ray.cluster_utils.Cluster write <RAY_TMPDIR>/ray/ray_current_cluster; a
    # plain ray.init(num_cpus=...) then tries to join that cluster, dead or alive, and refuses
    # num_cpus (the failure CI met). Without RAY_ADDRESS the job must run on its own local Ray.
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as ray_tmp:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("192.0.2.1:6379")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                              timeout=300, cwd=ROOT,
                              env={**env, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpus 1.0" in proc.stdout
