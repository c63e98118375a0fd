"""The smoke chain on a Ray cluster of three nodes on this machine, storage on S3 only.

Run by tests/test_multinode.py in its own process (a driver joins one Ray cluster at a time):

    python tests/multinode_chain.py DATA_URI TRACKING_URI OUT_JSON

A head with no CPUs (so no work can land on it by default) and two worker nodes of 2 CPUs each
(`ray.cluster_utils.Cluster`, each node its own raylet and object store). The driver runs the
tibia chain of the smoke profile with its cohort, runs and reports on S3 (the moto server of the
test): synthesis, ingest and patches (Ray Data), UNIT on 2 Ray Train workers of 1.5 CPUs (one fits
a node), fracture pre-training and the baseline and augmented DRNs, blends, pseudo-labels and
the report. Then the Serve app with 2 replicas (each runs both models) loads the registered
models and answers. OUT_JSON gets the nodes and, from Ray's own state API, the node of every
Train worker, Data task and Serve replica, plus the report's URI.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serve` is a top-level package of the repository


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def placement(address: str) -> dict[str, Any]:
    """Node ids of the Train workers, Data tasks and Serve replicas, from the state API of the
    cluster at `address` (named: another Ray may run on this machine, e.g. the test session's)."""
    from ray.util.state import list_actors, list_tasks

    actors = list_actors(address=address, limit=10_000, detail=True,
                         raise_on_missing_output=False)
    tasks = list_tasks(address=address, limit=10_000, detail=True, raise_on_missing_output=False)
    by_class: dict[str, set[str]] = defaultdict(set)
    for actor in actors:
        by_class[actor.class_name].add(actor.node_id)
    data_tasks: dict[str, set[str]] = defaultdict(set)
    for task in tasks:
        # Ray Data names its tasks by operator: ReadParquet->..., Map(...), MapBatches(...)
        if task.node_id and any(op in task.name for op in ("Map", "Read", "Write")):
            data_tasks[task.name].add(task.node_id)
    return {
        "train_workers": sorted(set().union(*(n for c, n in by_class.items()
                                              if "TrainWorker" in c))),
        "serve_replicas": {c: sorted(n) for c, n in by_class.items()
                           if c.startswith("ServeReplica:boneaug:")},
        "data_tasks": {name: sorted(n) for name, n in data_tasks.items()},
    }


def main(data_uri: str, tracking_uri: str, out_json: str) -> None:
    import ray
    import requests
    from ray import serve
    from ray.cluster_utils import Cluster

    from boneaug.config import load_config
    from boneaug.workflow import Plan, ensure_cohort, run_body_part

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": _free_port()})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    token = secrets.token_urlsafe(24)  # the service's bearer token, as a node's environment has it
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "BONEAUG_API_TOKEN": token}})
    try:
        base = load_config("smoke")
        config = base.model_copy(update={
            "compute": base.compute.model_copy(update={"num_workers": 2, "cpus_per_worker": 1.5}),
            "tracking": base.tracking.model_copy(update={"tracking_uri": tracking_uri}),
        })
        ensure_cohort(config, data_uri, ["tibia"], synthesize=True)
        result = run_body_part(config, "tibia", data_uri=data_uri, out_uri=data_uri,
                               synthesize=False, plan=Plan(thresholds=(0.5,)))

        port = _free_port()
        # one proxy, on the head: every node of this one-machine cluster shares 127.0.0.1
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        from serve.app import build_app

        serve.run(build_app({"profile": "smoke", "body_parts": "tibia", "num_replicas": 2,
                             "num_cpus": 0.5, "tracking_uri": tracking_uri}),
                  name="boneaug", route_prefix="/")
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=60).status_code
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=60,
                              headers={"Authorization": f"Bearer {token}"}).json()
        out = {"head": cluster.head_node.node_id,
               "workers": [node.node_id for node in workers],
               "report_uri": result.report_uri, "healthz": health, "models": models,
               **placement(cluster.address)}
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(out_json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
