"""A bounded locust load on POST /v1/lesions, with a model switch under it: 0 failed requests.

The service is deployed as `serve deploy serve/config.yaml` deploys it (the declarative config
handed to the Serve controller; `--replicas` fixed replicas, 2 as in bench_serve.py, on 2
cores), on 127.0.0.1, with the
local-profile UNIT and DRN of bench_serve.py registered in a temporary sqlite MLflow under alias
`champion`. Locust (headless, its own process: it patches the standard library with gevent)
runs `--users` clients for `--seconds`. At `--switch-at` seconds, new versions of both models
are registered, the alias moves to them, and the same config is deployed again with `revision`
bumped: every replica reloads in place, as an operator switches models.

    make load-serve                     # installs locust (the `load` extra), then this
    .venv/bin/python benchmarks/load_serve.py [--users 8] [--seconds 60] [--switch-at 20] \
        [--replicas 2]

Prints locust's figures (requests, failures, req/s, latency percentiles), the same for the
in-process anchor of bench_serve.py at the same concurrency (threads, no Ray, no HTTP), and the
model versions the responses carried before and after the switch. Exits 1 when any request
failed or the new models never answered.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serve` is a top-level package of the repository, not installed

from _common import print_table, scratch_dir  # noqa: E402
from bench_serve import (  # noqa: E402
    BODY_PART,
    build_models,
    in_process,
    measure,
    radiograph_dicom,
    register,
    replica_threads,
)

from serve.deploy import deploy, one_part_config  # noqa: E402


def wait_healthy(base: str, timeout_s: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service at {base} did not become healthy in {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--switch-at", type=float, default=20.0)
    parser.add_argument("--replicas", type=int, default=2, help="fixed replicas of the service")
    args = parser.parse_args()
    if not 0 < args.switch_at < args.seconds:
        raise SystemExit(f"--switch-at must lie inside the run (0 < {args.switch_at} < "
                         f"{args.seconds})")

    import torch

    from boneaug import tracking
    from boneaug.config import TrackingConfig, load_config
    from serve.schemas import AppArgs

    config = load_config("local")
    torch.set_num_threads(replica_threads(AppArgs().num_cpus))  # as in config.yaml's replica
    upload = radiograph_dicom(config)
    workdir = scratch_dir("load-serve-")
    (workdir / "radiograph.dcm").write_bytes(upload)

    anchor = in_process(config, *build_models(config))
    anchor(upload, 0)
    a50, a99, arps = measure(lambda i: anchor(upload, i), 4 * args.users, args.users)
    print(f"anchor done: p50 {a50:.0f} ms, {arps:.2f} req/s", flush=True)

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    tracking.configure(TrackingConfig())
    register(config, *build_models(config))  # version 1, alias champion
    token = secrets.token_urlsafe(24)

    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        replica_env = {"PYTHONPATH": str(REPO)}  # the replicas import serve.app
        deploy(one_part_config(BODY_PART, token=token, tracking_uri=tracking_uri,
                               env_vars=replica_env, replicas=args.replicas))
        wait_healthy(base)
        summary_file, versions_file = workdir / "summary.json", workdir / "versions.jsonl"
        env = os.environ | {"BONEAUG_LOAD_UPLOAD": str(workdir / "radiograph.dcm"),
                            "BONEAUG_LOAD_BODY_PART": BODY_PART, "BONEAUG_API_TOKEN": token,
                            "BONEAUG_LOAD_SUMMARY": str(summary_file),
                            "BONEAUG_LOAD_VERSIONS": str(versions_file)}
        cmd = [str(Path(sys.executable).parent / "locust"), "-f",
               str(REPO / "benchmarks" / "locustfile.py"), "--headless", "--host", base,
               "--users", str(args.users), "--spawn-rate", str(args.users),
               "--run-time", f"{args.seconds}s", "--stop-timeout", "120", "--only-summary",
               "--loglevel", "WARNING"]
        load = subprocess.Popen(cmd, env=env)
        switch: dict[str, float] = {}

        def switch_models() -> None:
            time.sleep(args.switch_at)
            t0 = time.monotonic()
            register(config, *build_models(config, seed=1))  # version 2, alias moves
            deploy(one_part_config(BODY_PART, token=token, tracking_uri=tracking_uri,
                                   revision=1, env_vars=replica_env, replicas=args.replicas))
            switch["deployed_s"] = time.monotonic() - t0

        switcher = threading.Thread(target=switch_models)
        started = time.monotonic()
        switcher.start()
        load.wait(timeout=args.seconds + 300)
        switcher.join()
        wall = time.monotonic() - started
    finally:
        serve.shutdown()
        ray.shutdown()

    stats = json.loads(summary_file.read_text())
    seen = [json.loads(line) for line in versions_file.read_text().splitlines()]
    first_new = next((t for t, tr, sc in seen if (tr, sc) == ("2", "2")), None)
    # requests sent after one that the new models answered, answered by an old model
    back = [row for row in seen if first_new is not None and row[0] > first_new
            and "1" in row[1:]]
    by_version: dict[str, int] = {}
    for _, tr, sc in seen:
        key = f"translator {tr} / scorer {sc}"
        by_version[key] = by_version.get(key, 0) + 1

    print(f"\nPOST /v1/lesions under locust: {args.users} users for {args.seconds} s "
          f"({wall:.0f} s wall), 1024x512 DICOM in, PNG out, local profile, "
          f"{args.replicas} replica(s), {os.cpu_count()} cores\n")
    failures = int(stats["failures"])
    print_table(["", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"], [
        ["service (locust)", stats["requests"], failures, stats["rps"], round(stats["p50"]),
         round(stats["p95"]), round(stats["p99"])],
        [f"in-process anchor ({args.users} threads)", 4 * args.users, 0, arps, round(a50), "-",
         round(a99)],
    ])
    print(f"\nmodel switch at {args.switch_at:.0f} s: register + deploy took "
          f"{switch.get('deployed_s', float('nan')):.1f} s; first response from the new models "
          f"at {first_new if first_new is not None else 'never'} s; responses by models: "
          f"{by_version}; requests sent after the first one the new models answered, answered "
          f"by an old one: {len(back)}")
    print(f"failed requests: {failures}")
    if failures or first_new is None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
