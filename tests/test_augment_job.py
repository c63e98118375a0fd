"""`jobs/augment_tibia.py --profile smoke` on a `ray start` head, end to end.

A real `ray start --head` (token auth as Ray 2.60 ships it), joined by the job driver, runs the
whole chain: synthetic cohort -> ingest -> patches -> UNIT -> fracture pre-training -> blends of
the UNIT, copy-paste and oracle arms -> per training seed (two): baseline DRN, scores,
augmented DRNs over a t grid -> report (mean +- sd over seeds), MLflow registry, derived
DICOMs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boneaug import storage

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import ray

    if ray.is_initialized():  # one Ray instance at a time on this machine
        ray.shutdown()
    temp = tmp_path_factory.mktemp("ray")
    # the head's PATH decides which `python` runs the job's entrypoint: this venv's. `ray start`
    # with token auth needs a token to exist (only ray.init() makes one): on a fresh machine
    # ~/.ray/auth_token is absent and the head refuses to start, so this head gets its own
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "MLFLOW_TRACKING_URI": f"sqlite:///{temp / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, dash = _free_port(), _free_port()
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
         f"--temp-dir={temp}", "--include-dashboard=true"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert started.returncode == 0, f"ray start --head failed:\n{started.stderr[-3000:]}"
    # the driver joins the head's cluster directly (as `ray job submit` runs it on the head); the
    # job agent of a fresh head on a loaded 2-core machine can refuse submissions for minutes
    from ray.util import get_node_ip_address

    env = {**env, "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}
    try:
        yield env
    finally:
        _stop_head(temp, port)


def _stop_head(temp: Path, port: int) -> None:
    """Stop this head only: its daemons (their command lines name its temp dir or GCS port) and
    their workers. `ray stop` would kill every Ray instance of this user on the machine."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
        procs[int(entry.name)] = (ppid, cmd)
    head = {pid for pid, (_, cmd) in procs.items() if pid != os.getpid()
            and (str(temp) in cmd or ("ray" in cmd and f":{port} " in f"{cmd} "))}
    while kids := {pid for pid, (ppid, _) in procs.items() if ppid in head} - head:
        head |= kids
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in head:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in head):
            time.sleep(0.2)


def test_augment_tibia_smoke_on_a_ray_head(ray_head: dict[str, str], tmp_path: Path) -> None:
    data, db = tmp_path / "cohort", ray_head["MLFLOW_TRACKING_URI"][len("sqlite:///"):]
    # the classifiers train in Ray Train's local mode, two at a time in Ray tasks (as the local
    # profile's do): a worker group per DRN would start 10 of them; the UNIT trains on a worker
    # of the head, started from a Ray task beside the first baseline
    config = tmp_path / "local_mode.yaml"
    config.write_text("compute:\n  num_workers: 0\n  concurrent_trainings: 2\n")
    cmd = [str(BIN / "python"), str(ROOT / "jobs" / "augment_tibia.py"), "--profile", "smoke",
           "--data", str(data), "--synthetic", "--thresholds", "0.3,0.9", "--config", str(config),
           "--arms", "unit,copy_paste,oracle", "--seeds", "0,1"]
    proc = subprocess.run(cmd, env=ray_head, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| Type | t | Augmented samples | ROC AUC (CI 95 %) |" in out
    assert "[ingest] done" in out and "[unit] done" in out and "t chosen on validation" in out
    # each seed's arms (3 arms x 2 t, less those t keeping no blend) train two at a time, and
    # every one of them shows its epochs (Ray's log deduplication would fold lines that differ
    # in digits only, as their run names do)
    side_by_side = re.findall(r"\[(drn-[\w.-]+)\] running \(2 trainings side by side, 1 thread",
                              out)
    assert side_by_side
    # the UNIT trains beside the first seed's baseline, in a Ray task of its own
    assert "[unit] running (2 trainings side by side, 1 thread(s) each)" in out
    assert "[baseline-s0] running (2 trainings side by side" in out
    for name in side_by_side:
        assert f"{name} epoch 2/2" in out, name
    # every arm beside the baseline, and the seeds' mean +- sd and paired differences
    for row in ("| Baseline |", "| Augmented | 0.30 |", "| Copy-paste | 0.90 |", "| Oracle |"):
        assert row in out
    assert "AUC mean ± sd (n seeds)" in out and "(n = 2)" in out
    assert "Validation-chosen t" not in out  # the per-seed t table stays in report.md

    run = data / "runs" / "tibia-smoke"
    assert "Validation-chosen t" in (run / "report" / "report.md").read_text()
    assert ((run / "report" / "report.md").exists()
            and (run / "report" / "roc_tibia.png").stat().st_size > 10_000)
    assert (run / "report" / "figure3_aug.png").stat().st_size > 10_000 and "figure:  " in out
    # the registry holds every model the job announced, with aliases
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    names = {m.name for m in client.search_registered_models()}
    assert {"boneaug-unit-tibia", "boneaug-drn-tibia", "boneaug-drn-tibia-aug",
            "boneaug-drn-fracture"} <= names
    assert client.get_model_version_by_alias("boneaug-drn-tibia", "champion")
    # serve/config.yaml loads both models of a body part by @champion
    assert client.get_model_version_by_alias("boneaug-unit-tibia", "champion").version == \
        client.get_model_version_by_alias("boneaug-unit-tibia", "challenger").version
    # derived DICOMs pass the reader's check and carry their provenance
    from boneaug.io.dicom import check_uris, read_provenance

    dicoms = storage.list_files(str(run / "augmented" / "aug" / "dicom"), suffix=".dcm")
    candidates = storage.read_parquet(str(run / "augmented" / "aug" / "s0" / "candidates"))
    chosen = [float(line.split("validation: ")[1].split(" ")[0]) for line in out.splitlines()
              if "t chosen on validation" in line][0]
    assert len(dicoms) == sum(s >= chosen for s in candidates.column("score").to_pylist())
    # the service judges passes_threshold by the chosen t, a tag on the pseudo-labeller's version
    baseline = client.get_model_version_by_alias("boneaug-drn-tibia", "champion")
    assert float(baseline.tags["pseudo_label_t"]) == chosen
    assert all(r["ok"] for r in check_uris(dicoms))
    if dicoms:
        provenance = read_provenance(storage.read_bytes(dicoms[0]))
        assert float(provenance["t"]) == chosen and "score" in provenance
    # the seeds repeat the classifier trainings only: one UNIT, one blend per arm; the first
    # seed searches the t grid, the second trains each arm at the t the first one chose
    # (an arm at a t that keeps no candidate is its seed's baseline and trains nothing)
    stages = {p.stem for p in (run / "stages").glob("*.json")}
    as_baseline = {line.split("]")[0].lstrip("[") for line in out.splitlines()
                   if "no candidate scores >=" in line}
    assert {"unit", "blend-aug", "blend-copy_paste", "blend-oracle", "baseline-s0",
            "baseline-s1", "score-oracle-s1"} <= stages
    assert {"drn-oracle-t0.30-s0", "drn-oracle-t0.90-s0"} <= stages | as_baseline
    assert not stages & as_baseline
    chosen_t = {line.split("] ")[0].split("[")[-1]: line.split("validation: ")[1][:4]
                for line in out.splitlines() if "t chosen on validation" in line}
    assert set(chosen_t) == {"aug", "copy_paste", "oracle"}
    assert {s for s in stages | as_baseline if s.startswith("drn-") and s.endswith("-s1")} == \
        {f"drn-{key}-t{t}-s1" for key, t in chosen_t.items()}
    blended = storage.read_parquet(str(run / "augmented" / "oracle" / "blended"))
    for seed in (0, 1):  # each seed's baseline pseudo-labels the same blends
        scored = storage.read_parquet(str(run / "augmented" / "oracle" / f"s{seed}" /
                                          "candidates"))
        assert sorted(scored.column("image_id").to_pylist()) == \
            sorted(blended.column("image_id").to_pylist())
    shutil.rmtree(tmp_path / "cohort" / "dicom", ignore_errors=True)


def test_train_unit_needs_only_its_body_part_and_registers_without_pickle(
    ray_head: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own humerus cohort, no fracture corpus: the translator trains and registers, and
    so does the phantom critic that judges it; a DRN job on the same cohort says what it lacks
    and how to provide it."""
    data, db = tmp_path / "humerus-only", ray_head["MLFLOW_TRACKING_URI"][len("sqlite:///"):]
    subprocess.run([str(BIN / "boneaug"), "synth", "--body-part", "humerus", "--out", str(data),
                    "--profile", "smoke", "--quiet"], check=True, env=ray_head, timeout=600)
    tasks = set(storage.read_parquet(str(data / "annotations.parquet"),
                                     columns=["task"]).column("task").to_pylist())
    assert "fracture" not in tasks
    cmd = [str(BIN / "python"), str(ROOT / "jobs" / "train_unit.py"), "--body-part", "humerus",
           "--data", str(data), "--profile", "smoke"]
    proc = subprocess.run(cmd, env=ray_head, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "registered: models:/boneaug-unit-humerus/" in out
    assert "Pickle" not in out and "fracture corpus" not in out
    from boneaug import tracking
    from boneaug.config import TrackingConfig

    translator = tracking.load_torch_model("models:/boneaug-unit-humerus@challenger",
                                           tracking=TrackingConfig(tracking_uri=f"sqlite:///{db}"))
    assert translator.spec["kind"] == "unit_translator"

    # the instrument (synthetic cohorts only): trained on phantom pairs, checked on the cohort's
    # patch sets and on that translator, registered as weights + spec like every model
    cmd = [str(BIN / "python"), str(ROOT / "jobs" / "train_critic.py"), "--body-part", "humerus",
           "--data", str(data), "--profile", "smoke", "--translator",
           "models:/boneaug-unit-humerus@challenger"]
    proc = subprocess.run(cmd, env=ray_head, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"registered: models:/boneaug-critic-humerus/1 \(real-patch AUC [01]\.\d{3}",
                     out), out[-3000:]
    assert re.search(r"translator models:/boneaug-unit-humerus@challenger: [01]\.\d{3} of healthy "
                     r"patches called lesion after translation \(untouched [01]\.\d{3}\)", out)
    report = (data / "runs" / "humerus-smoke" / "report" / "critic.md").read_text()
    assert "| blur 1 px |" in report and "| models:/boneaug-unit-humerus@challenger |" in report
    from boneaug.eval.phantom_critic import MEMBERS, registered_critic
    from boneaug.eval.quality import CriticEnsemble

    monkeypatch.setenv("MLFLOW_TRACKING_URI", ray_head["MLFLOW_TRACKING_URI"])
    tracking.configure(TrackingConfig(tracking_uri=ray_head["MLFLOW_TRACKING_URI"]))
    critic = registered_critic("humerus")
    assert critic is not None and 0 < critic.threshold < 1
    assert isinstance(critic.model, CriticEnsemble) and len(critic.model.members) == MEMBERS

    cmd = [str(BIN / "python"), str(ROOT / "jobs" / "train_classifier.py"), "--body-part",
           "humerus", "--data", str(data), "--profile", "smoke"]
    proc = subprocess.run(cmd, env=ray_head, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    assert "no rows for the fracture corpus" in proc.stderr and "boneaug synth --fractures" in \
        proc.stderr, proc.stderr[-3000:]
