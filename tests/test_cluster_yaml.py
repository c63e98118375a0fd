"""cluster.yaml against the cluster-launcher schema that ships inside the installed ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema() -> None:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_config(), schema)


def test_cluster_yaml_matches_the_pinned_ray_and_the_design() -> None:
    config = _config()
    assert f":{ray.__version__}-" in config["docker"]["image"], "image must match the pinned ray"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("tune_driver", 0) > 0, (
        "Tune drivers get a custom resource on the head")
    assert (nodes["gpu_worker"]["min_workers"] == 0
            and nodes["gpu_worker"]["node_config"]["InstanceType"].startswith("g"))
    for node in nodes.values():
        assert "IamInstanceProfile" in node["node_config"], (
            "S3 access comes from an instance profile")
    assert "AWS_SECRET_ACCESS_KEY" not in (ROOT / "cluster.yaml").read_text()
