"""Session fixtures: a real S3-protocol server on loopback, a local Ray instance, tiny configs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boneaug.config import BoneaugConfig, load_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A `moto_server` (real S3 HTTP protocol) on 127.0.0.1, stopped at session end.

    The standard AWS variables point at it, so code under test reaches it exactly as it would
    reach AWS: by configuration alone.
    """
    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        BONEAUG_S3_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
           "BONEAUG_S3_ENDPOINT_URL")


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the loopback S3 server; returns its s3:// URI."""
    import boto3

    name = f"boneaug-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str) -> Iterator[None]:
    """One local Ray instance for the whole test session (starting one takes ~5 s).

    It starts after the S3 server so its workers inherit the AWS variables that point at it, as
    workers on a cluster inherit their nodes' environment.

    The dashboard runs (on 127.0.0.1, a free port) as on a real head: Ray Train's placement-group
    cleaner asks its state API whether a run's controller is still alive, and without it the
    worker reservations of Train runs that a Tune scheduler stopped are never released.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=_free_port(), log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster, and stays fast on a shared 2-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def smoke_config() -> BoneaugConfig:
    return load_config("smoke")
