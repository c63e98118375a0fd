"""The smoke chain on three Ray nodes (tests/multinode_chain.py): the work spreads over the
worker nodes, and nothing it needs lives on the driver's disk but the MLflow store (a server's
URI on a real cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boneaug import storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[1]


def test_the_chain_runs_on_two_worker_nodes_with_storage_on_s3_only(
        s3_bucket: str, tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    data = f"{s3_bucket}/cohort"
    cmd = [sys.executable, str(ROOT / "tests" / "multinode_chain.py"), data,
           f"sqlite:///{tmp_path / 'mlflow.db'}", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    seen = json.loads(out.read_text())
    print("\n" + json.dumps(seen, indent=1))
    workers, head = set(seen["workers"]), seen["head"]

    # UNIT's two Train workers (1.5 CPUs each) took one worker node each
    assert set(seen["train_workers"]) == workers
    # Ray Data's tasks ran on both worker nodes, none on the CPU-less head
    data_nodes = set().union(*map(set, seen["data_tasks"].values()))
    assert data_nodes == workers, seen["data_tasks"]
    # the service's two replicas (each with both models) on two nodes; the request went through
    replicas = seen["serve_replicas"]
    assert {name.rsplit(":", 1)[-1] for name in replicas} == {"Api"}
    assert all(len(nodes) == 2 and head not in nodes for nodes in replicas.values()), replicas
    assert seen["healthz"] == 200
    assert seen["models"]["translator"]["tibia"]["name"] == "boneaug-unit-tibia"
    assert seen["models"]["scorer"]["tibia"]["name"] == "boneaug-drn-tibia"
    # the cohort, the runs and the report are on S3: no data on the driver's disk (MLflow's
    # store is there, as configured; a cluster names a tracking server instead)
    assert seen["report_uri"].startswith(s3_bucket)
    assert storage.exists(seen["report_uri"])
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".parquet", ".dcm")]
