"""serve/config.yaml as code: narrow it to one body part and hand it to the Serve controller,
as `serve deploy serve/config.yaml` does. Used by the service tests and the load benchmark."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_YAML = Path(__file__).with_name("config.yaml")


def one_part_config(body_part: str, *, token: str, tracking_uri: str, revision: int = 0,
                    api: dict[str, Any] | None = None, env_vars: dict[str, str] | None = None,
                    replicas: int = 1) -> dict[str, Any]:
    """config.yaml's application serving `body_part` from the registry at `tracking_uri` (alias
    champion), `replicas` fixed replicas, the bearer `token` in its environment; `revision` for
    both models, `api` merged into the user_config."""
    app = copy.deepcopy(yaml.safe_load(CONFIG_YAML.read_text())["applications"][0])
    app["runtime_env"] = {"env_vars": {"BONEAUG_API_TOKEN": token, **(env_vars or {})}}
    (deployment,) = app["deployments"]
    deployment["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": replicas}
    user = deployment["user_config"]
    for key, kind in (("translator", "unit"), ("scorer", "drn")):
        user[key].update(models={body_part: {"name": f"boneaug-{kind}-{body_part}",
                                             "alias": "champion"}},
                         tracking_uri=tracking_uri, revision=revision)
    user.update(api or {})
    return {"applications": [app]}


def deploy(config: dict[str, Any]) -> None:
    """What `serve deploy` does through the dashboard: hand the config to the controller and wait
    until the application runs."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
