"""POST /v1/lesions latency and throughput vs the same functions in-process (the zero-overhead
anchor).

One local-profile synthetic tibia radiograph (1024x512 DICOM, MONOCHROME1 12-bit, from
boneaug.synth), local-profile UNIT translator and DRN scorer (seed-initialised: weights do not
change the cost) registered in a temporary sqlite MLflow. The service runs on a local Ray with
2 CPUs and `--replicas` replicas (0.5 CPU each; both models run in each) on 127.0.0.1; clients
are threads with one HTTP session each. Two replicas by default: what the shipped autoscaling
(`target_ongoing_requests: 4`) keeps at concurrency 8, fixed so a short run sees no scaling
transient; one replica is GIL-bound at concurrency 8 (22.7 req/s against 28.6 with two), four
on 2 cores thrash (25.4). The anchor runs exactly what a request runs, in this process with no
Ray and no HTTP: decode_radiograph -> synthesise (crop, translate, blend, fit, score) ->
encode_result (derived DICOM) + the two patch PNGs + base64, with the same concurrency (threads)
and the replica's torch thread count (`replica_threads`).

    .venv/bin/python benchmarks/bench_serve.py [--requests 96] [--concurrency 1 8 32] [--replicas 2]

Columns: p50/p99 latency (ms) and requests/s, service and anchor; `x p50` = service p50 / anchor
p50 (the per-request serving overhead as a ratio), `x req/s` = service req/s / anchor req/s.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serve` is a top-level package of the repository, not installed

from _common import print_table, scratch_dir  # noqa: E402

BODY_PART = "tibia"


def radiograph_dicom(config) -> bytes:  # noqa: ANN001
    from boneaug.synth.cohort import plan_body_part, render_job

    jobs = plan_body_part(config.synth, BODY_PART, seed=0, scale=0.02)
    job = next(j for j in jobs if j.label == 0 and not j.confounders)
    data, _ = render_job(job, config.synth, 0)
    return data


def build_models(config, seed: int = 0):  # noqa: ANN001, ANN201
    import torch

    from boneaug.models.unit import UNIT, UnitArch
    from boneaug.train.classifier import build_model

    gen = torch.Generator().manual_seed(seed)
    translator = UNIT(UnitArch.from_config(config.unit), generator=gen).translator("h2l").eval()
    scorer = build_model(config.drn, generator=gen).eval()
    return translator, scorer


def register(config, translator, scorer) -> None:  # noqa: ANN001
    import mlflow

    from boneaug import tracking

    size, (h, w) = config.patches.size, (config.image.height, config.image.width)
    mlflow.set_experiment("boneaug/bench/serve")
    with mlflow.start_run():
        tracking.log_torch_model(translator, name="unit",
                                 input_example=np.zeros((1, 1, size, size), np.float32),
                                 registered_name=f"boneaug-unit-{BODY_PART}", alias="champion")
        tracking.log_torch_model(scorer, name="drn",
                                 input_example=np.zeros((1, 1, h, w), np.float32),
                                 registered_name=f"boneaug-drn-{BODY_PART}", alias="champion")


def replica_threads(num_cpus: float) -> int:
    """The torch threads of a replica holding `num_cpus`: Ray sets OMP_NUM_THREADS to
    max(1, floor(num_cpus)) in its workers. The anchor runs at the same count. Left at the
    machine's 2, it measured 40 ms a request instead of 25 here: torch called from a pool thread
    competes with the main thread's idle OpenMP team (translate 15 ms against 6, score 13 against
    6), which flattered the service's ratio."""
    return max(1, math.floor(num_cpus))


def in_process(config, translator, scorer) -> Callable[[bytes, int], int]:  # noqa: ANN001
    """What one /v1/lesions request computes, as a plain function: (upload, seed) -> response
    bytes."""
    from boneaug import serving

    recipe = serving.Recipe.from_config(config, BODY_PART)
    models = {"translator": {"name": f"boneaug-unit-{BODY_PART}", "version": "1"},
              "scorer": {"name": f"boneaug-drn-{BODY_PART}", "version": "1"}}

    def run(upload: bytes, seed: int) -> int:
        image = serving.decode_radiograph(upload)
        result = serving.synthesise(
            image.pixels, None, recipe, translate=lambda p: serving.run_translator(translator, p),
            score=lambda x: serving.run_scorer(scorer, x), rng=np.random.default_rng(seed))
        data, _ = serving.encode_result(image, result, "dicom", n=config.augment.blend_n,
                                        blend=config.augment.blend, models=models)
        parts = [data, serving.encode_png(result.translated), serving.encode_png(result.patch)]
        return sum(len(base64.b64encode(p)) for p in parts)

    return run


def measure(call: Callable[[int], None], requests: int,
            concurrency: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) of `requests` calls from `concurrency` threads."""
    latencies: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), requests / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96,
                        help="requests per level (at least 3x concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--replicas", type=int, default=2, help="fixed replicas of the service")
    args = parser.parse_args()

    import requests as http
    import torch

    from boneaug import tracking
    from boneaug.config import TrackingConfig, load_config
    from serve.schemas import AppArgs

    config = load_config("local")
    replica_cpus = AppArgs().num_cpus
    torch.set_num_threads(replica_threads(replica_cpus))
    upload = radiograph_dicom(config)
    translator, scorer = build_models(config)
    levels = [(c, max(args.requests, 3 * c)) for c in args.concurrency]

    # the anchor first, while nothing else runs
    anchor = in_process(config, translator, scorer)
    anchor(upload, 0)
    anchor_rows = {c: measure(lambda i: anchor(upload, i), n, c) for c, n in levels}
    print(f"anchor done (torch threads {torch.get_num_threads()})", flush=True)

    workdir = scratch_dir("bench-serve-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"  # replicas inherit it
    tracking.configure(TrackingConfig())
    register(config, translator, scorer)
    token = secrets.token_urlsafe(24)
    os.environ["BONEAUG_API_TOKEN"] = token  # in the environment before Ray starts, as on a node

    import ray
    from ray import serve

    from serve.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the replicas import serve.app
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        serve.run(build_app({"profile": "local", "body_parts": BODY_PART,
                             "num_replicas": args.replicas}),
                  name="boneaug", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        sessions: dict[int, http.Session] = {}

        def post(i: int) -> None:
            import threading

            session = sessions.setdefault(threading.get_ident(), http.Session())
            response = session.post(base + "/v1/lesions",
                                    headers={"Authorization": f"Bearer {token}"},
                                    files={"file": ("x.dcm", upload)},
                                    data={"body_part": BODY_PART, "box": "auto", "seed": str(i)},
                                    timeout=300)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")

        for i in range(3):
            post(i)  # warm-up: first batches, lazy imports
        rows = []
        for c, n in levels:
            p50, p99, rps = measure(post, n, c)
            a50, a99, arps = anchor_rows[c]
            rows.append([c, n, round(p50), round(p99), rps, round(a50), round(a99), arps, p50 / a50,
                         rps / arps])
            print(f"concurrency {c} done", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nPOST /v1/lesions, 1024x512 DICOM in, derived DICOM out, local profile "
          f"(UNIT {config.patches.size}px, DRN {config.image.height}x{config.image.width}), "
          f"{args.replicas} replica(s) at {replica_cpus} CPU, {os.cpu_count()} cores, torch "
          f"threads {torch.get_num_threads()} in a replica and the anchor\n")
    print_table(["concurrency", "requests", "serve p50 ms", "serve p99 ms", "serve req/s",
                 "in-proc p50 ms", "in-proc p99 ms", "in-proc req/s", "x p50", "x req/s"], rows)


if __name__ == "__main__":
    main()
