"""Shared by tests/test_serve.py and tests/test_serve_page.py: a synthetic radiograph, smoke-trained
models registered in a sqlite MLflow, and the Serve app deployed from serve/config.yaml.

The app is deployed the way `serve run serve/config.yaml` / `serve deploy` do it: the YAML's
applications (with test overrides: smoke profile, one body part, the test registry, a random
token in the runtime env) go to the Serve controller as a declarative config, so a later config
with a changed `user_config` is the lightweight in-place update that production uses.
"""

from __future__ import annotations

import io
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from serve.deploy import CONFIG_YAML, deploy, one_part_config  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]
BODY_PART = "tibia"


# ---------------------------------------------------------------------------------------------
# images


def radiograph(height: int, width: int, *, seed: int = 0,
               lesion: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) float32 [0, 1]: an upright long bone (bright cortex, greyer medulla) in soft tissue.

    `lesion` = (row fraction, radius fraction of the bone width) punches a round lytic (dark) area.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    centre = width * (0.5 + 0.03 * np.sin(y / height * 3.0))
    half = width * (0.17 + 0.04 * np.cos(y / height * 5.0))  # bone half-width, wider at the ends
    d = np.abs(x - centre) / half
    image = np.full((height, width), 0.06, np.float32)
    image += 0.16 * np.exp(-((x - width / 2) / (0.42 * width)) ** 4)  # soft tissue
    bone = d < 1.0
    image[bone] = np.where(d[bone] > 0.65, 0.88, 0.62)  # cortex / medulla
    if lesion is not None:
        row, radius = lesion
        cy, r = row * height, radius * 2 * float(np.mean(half))
        blob = ((x - centre) ** 2 + (y - cy) ** 2) < r**2
        image[blob & bone] -= 0.3
    image += rng.normal(0.0, 0.015, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def png_bytes(pixels: np.ndarray, *, bits: int = 16) -> bytes:
    from PIL import Image

    clipped = np.clip(pixels, 0.0, 1.0)
    if bits == 16:
        image = Image.fromarray(np.round(clipped * 65535).astype(np.uint16))
    else:
        image = Image.fromarray(np.round(clipped * 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """A valid radiograph DICOM (Secondary Capture via boneaug.io.dicom.encode_derived)."""
    from boneaug.io.dicom import Derivation, DerivedIds, encode_derived

    return encode_derived(pixels, Derivation(creator="tests"), ids=DerivedIds(
        study_uid="1.2.826.0.1.3680043.8.498.1", patient_id="P-TEST",
        source_sop_uid="1.2.826.0.1.3680043.8.498.2",
        source_sop_class_uid="1.2.840.10008.5.1.4.1.1.1"))


# ---------------------------------------------------------------------------------------------
# models


def _patches(count: int, size: int, *, lesion: bool, seed: int) -> np.ndarray:
    """(count, 1, size, size) crops of synthetic radiographs centred on the bone."""
    out = []
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = radiograph(4 * size, 2 * size, seed=seed * 1000 + i,
                           lesion=(0.5, 0.25) if lesion else None)
        top = 2 * size - size // 2 + int(rng.integers(-2, 3))
        out.append(image[top:top + size, size // 2:size // 2 + size])
    return np.stack(out)[:, None].astype(np.float32)


def train_translator(config: Any, *, iterations: int, seed: int) -> torch.nn.Module:
    """The smoke UNIT, trained `iterations` steps on synthetic healthy/lesion patches; h -> l."""
    from boneaug.models.unit import UNIT, Discriminators, UnitArch
    from boneaug.train.unit import LossWeights, make_optimizers, train_iteration

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    arch = UnitArch.from_config(config.unit)
    unit, dis = UNIT(arch, generator=gen), Discriminators(arch, generator=gen)
    optimizers = make_optimizers(unit, dis, config.unit)
    weights = LossWeights.from_config(config.unit)
    size, batch = config.patches.size, config.unit.batch_size
    x_h = torch.from_numpy(_patches(batch * 2, size, lesion=False, seed=seed)) * 2 - 1
    x_l = torch.from_numpy(_patches(batch * 2, size, lesion=True, seed=seed + 1)) * 2 - 1
    for step in range(iterations):
        k = (step % 2) * batch
        train_iteration(unit, dis, x_h[k:k + batch], x_l[k:k + batch], weights=weights,
                        optimizers=optimizers, generator=gen)
    return unit.translator("h2l").eval()


def train_scorer(config: Any, *, steps: int, seed: int) -> torch.nn.Module:
    """The smoke DRN, trained `steps` Adam steps on synthetic lesion / normal images."""
    from boneaug.io.resize import fit_pad
    from boneaug.train.classifier import build_model, make_loss, make_optimizer, train_step

    torch.manual_seed(seed)
    model = build_model(config.drn, generator=torch.Generator().manual_seed(seed))
    hw = (config.image.height, config.image.width)
    images = np.stack([fit_pad(radiograph(256, 128, seed=seed + i,
                                          lesion=(0.5, 0.3) if i % 2 else None), hw)[0]
                       for i in range(8)])[:, None]
    labels = torch.tensor([i % 2 for i in range(8)], dtype=torch.float32)
    optimizer, loss_fn = make_optimizer(model, config.drn), make_loss(1.0)
    x = torch.from_numpy(images)
    for _ in range(steps):
        train_step(model, x, labels, optimizer=optimizer, loss_fn=loss_fn)
    return model.eval()


def register(model: torch.nn.Module, name: str, example: np.ndarray, *, alias: str | None) -> str:
    """Log and register `model` in a run of its own, as the training jobs do."""
    import mlflow

    from boneaug import tracking

    # not whatever experiment an earlier test left active
    mlflow.set_experiment("boneaug/tests/serve")
    with mlflow.start_run():
        version = tracking.log_torch_model(model, name="model", input_example=example,
                                           registered_name=name, alias=alias)
    assert version is not None
    return version


@dataclass
class Registry:
    uri: str
    config: Any
    versions: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, model: torch.nn.Module, *, alias: str | None = "champion") -> str:
        from boneaug import tracking
        from boneaug.config import TrackingConfig

        tracking.configure(TrackingConfig(tracking_uri=self.uri))
        size = self.config.patches.size
        example = (np.zeros((1, 1, size, size), np.float32) if kind == "unit"
                   else np.zeros((1, 1, self.config.image.height, self.config.image.width),
                                 np.float32))
        name = f"boneaug-{kind}-{BODY_PART}"
        version = register(model, name, example, alias=alias)
        self.versions.setdefault(kind, []).append(version)
        return version


def make_registry(tmp: Path, *, unit_iterations: int = 3, drn_steps: int = 4,
                  pseudo_label_t: float | None = None) -> Registry:
    """Smoke UNIT + DRN for BODY_PART, both @champion; `pseudo_label_t` tags the DRN version as
    a training chain does with the t it chose."""
    import mlflow

    from boneaug import tracking
    from boneaug.config import load_config

    registry = Registry(uri=f"sqlite:///{tmp / 'mlflow.db'}", config=load_config("smoke"))
    registry.add("unit", train_translator(registry.config, iterations=unit_iterations, seed=0))
    version = registry.add("drn", train_scorer(registry.config, steps=drn_steps, seed=0))
    if pseudo_label_t is not None:
        tracking.set_version_tag(f"boneaug-drn-{BODY_PART}", version, tracking.PSEUDO_LABEL_T_TAG,
                                 str(pseudo_label_t))
    mlflow.end_run()
    return registry


# ---------------------------------------------------------------------------------------------
# the service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    base: str
    token: str
    registry: Registry
    config: dict[str, Any]  # the ServeDeploySchema dict in force
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, data: bytes, fields: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None, timeout: float = 60) -> requests.Response:
        return self.session.post(self.base + path,
                                 headers=self.auth if headers is None else headers,
                                 files={"file": ("upload", data)}, data=fields or {},
                                 timeout=timeout)

    def deployment(self, name: str) -> dict[str, Any]:
        return next(d for d in self.config["applications"][0]["deployments"] if d["name"] == name)

    def apply(self, config: dict[str, Any]) -> None:
        """What `serve deploy` does through the dashboard: hand the config to the controller."""
        deploy(config)
        self.config = config


def deploy_config(registry: Registry, token: str, *,
                  max_upload_bytes: int = 2 * 2**20) -> dict[str, Any]:
    """serve/config.yaml's applications, pointed at the test registry and sized for 2 cores."""
    return one_part_config(BODY_PART, token=token, tracking_uri=registry.uri,
                           api={"profile": "smoke", "max_upload_bytes": max_upload_bytes})


def start_service(registry: Registry, **kwargs: Any) -> Iterator[Service]:
    """Serve on 127.0.0.1:<free port> with the app from config.yaml; shut down afterwards."""
    from ray import serve

    port = free_port()
    token = secrets.token_urlsafe(24)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    service = Service(base=f"http://127.0.0.1:{port}", token=token, registry=registry, config={})
    try:
        service.apply(deploy_config(registry, token, **kwargs))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if service.session.get(service.base + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        yield service
    finally:
        service.session.close()
        serve.shutdown()
