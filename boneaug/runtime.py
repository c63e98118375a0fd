"""What every job shares: common arguments, config loading, Ray start-up, run locations.

Jobs stay thin: they parse arguments here, call one or two library functions and print the
summary. `ray.init()` joins the cluster of `ray job submit` (RAY_ADDRESS is set there) and starts a
local instance otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from boneaug import storage
from boneaug.config import BODY_PARTS, PROFILES, BoneaugConfig, load_config


def job_parser(description: str, *, body_part: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if body_part:
        parser.add_argument("--body-part", choices=BODY_PARTS, required=True)
    parser.add_argument("--profile", choices=PROFILES, default="local", help="sizes (default local)")
    parser.add_argument("--config", default=None, help="YAML overriding the profile (e.g. a Tune best.yaml)")
    parser.add_argument("--data", default=None,
                        help="cohort root URI (DICOM + annotations.parquet); default: the config's storage root")
    parser.add_argument("--out", default=None, help="where runs/<run-id>/ goes; default: --data")
    parser.add_argument("--run-id", default=None, help="default <body-part>-<profile>; re-running replaces it")
    return parser


def absolute(uri: str) -> str:
    """Plain relative paths become absolute so Ray workers in other directories find them."""
    if "://" in uri:
        return uri
    return str(Path(uri).absolute())


def setup(args: argparse.Namespace) -> tuple[BoneaugConfig, str, str]:
    """(config, data URI, run URI) from the common arguments; logging configured."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.profile, args.config)
    data = absolute(args.data or config.storage.root)
    out = absolute(args.out or data)
    run_id = args.run_id or f"{getattr(args, 'body_part', 'all')}-{config.profile}"
    return config, data, storage.join(out, "runs", run_id)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster (`ray job submit`, RAY_ADDRESS) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in (*storage.ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI") if k in os.environ}
    ray.init(num_cpus=num_cpus if not os.environ.get("RAY_ADDRESS") else None,
             runtime_env={"env_vars": env} if env else None, log_to_driver=True)
