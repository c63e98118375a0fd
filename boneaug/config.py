"""Validated configuration for every step, and the three profiles (smoke, local, paper).

A profile is one switch that sizes everything: the synthetic cohort, the classifier input, the
UNIT patch, the networks. Jobs build a `BoneaugConfig` with `load_config(profile, path)` and hand
the relevant section to each step; nothing reads raw dicts deep inside.

Numbers come from ../shared/SPEC.md (paper Table 1, Liu et al. 2017, Yu et al. 2017).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from boneaug.errors import ConfigError, StorageError

BodyPart = Literal["humerus", "tibia", "femur"]
BODY_PARTS: tuple[BodyPart, ...] = get_args(BodyPart)
ProfileName = Literal["smoke", "local", "paper"]
PROFILES: tuple[ProfileName, ...] = get_args(ProfileName)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitCounts(_Section):
    """Images per split and class (lesion:non-lesion), paper Table 1 (left)."""

    train_pos: int = Field(ge=0)
    train_neg: int = Field(ge=0)
    val_pos: int = Field(ge=0)
    val_neg: int = Field(ge=0)
    test_pos: int = Field(ge=0)
    test_neg: int = Field(ge=0)

    @property
    def total(self) -> int:
        return (
            self.train_pos + self.train_neg + self.val_pos + self.val_neg
            + self.test_pos + self.test_neg
        )

    def scaled(self, factor: float) -> SplitCounts:
        """Every count times `factor`, keeping at least one image where there was one."""
        return SplitCounts(
            **{k: (max(1, round(v * factor)) if v else 0) for k, v in self.model_dump().items()}
        )


class SynthConfig(_Section):
    """The synthetic radiograph cohort (SPEC 1.2, 1.3)."""

    height: int = Field(gt=0, description="stored radiograph rows (long bones stand upright)")
    width: int = Field(gt=0, description="stored radiograph columns")
    bits_stored: int = Field(12, ge=8, le=16)
    monochrome1_fraction: float = Field(0.3, ge=0, le=1, description="share stored inverted")
    confounder_fraction: dict[BodyPart, float] = Field(
        default_factory=lambda: {"humerus": 0.04, "tibia": 0.10, "femur": 0.10},
        description="share of images with hardware, external objects or deformity",
    )
    images_per_patient: int = Field(2, ge=1, description="mean studies per synthetic patient")
    counts: dict[BodyPart, SplitCounts]
    fracture_images: int = Field(
        ge=0, description="auxiliary fracture corpus size (all body parts together)"
    )
    min_conspicuity: float = Field(
        0.0, ge=0, lt=1,
        description="lesion conspicuity is drawn uniformly in [min, 1] (0 subtle .. 1 obvious); "
                    "raising it makes the baseline's task easier",
    )
    seed: int = 0


class ImageConfig(_Section):
    """Classification input size (paper: 1024x512, aspect kept by padding)."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)


class BodyPartPatches(_Section):
    """Per-body-part patch-making settings, paper Table 1 (right)."""

    s: float = Field(ge=1, description="patch side / larger side of the lesion box")
    n: int = Field(ge=1, description="similar non-lesion images chosen per lesion image")
    translation_patches: int = Field(gt=0, description="target patches per class")


class PatchConfig(_Section):
    """Patch-making (SPEC 2)."""

    size: int = Field(gt=0, description="UNIT input side in pixels")
    min_mean_intensity: float = Field(0.15, ge=0, le=1, description="drop non-bone patches")
    descriptor_size: int = Field(32, gt=0, description="side of the downsampled descriptor")
    body_parts: dict[BodyPart, BodyPartPatches]
    seed: int = 0


class UnitConfig(_Section):
    """UNIT networks, losses and optimisation (SPEC 3, Liu et al. 2017 reference)."""

    in_channels: int = Field(1, ge=1)
    width: int = Field(64, gt=0, description="generator base channels")
    n_downsample: int = Field(2, ge=0)
    n_res: int = Field(4, ge=0, description="residual blocks in encoder and in decoder")
    n_shared: int = Field(1, ge=0, description="shared encoder-tail / decoder-head res blocks")
    disc_width: int = Field(64, gt=0)
    disc_layers: int = Field(4, ge=1)
    disc_scales: int = Field(3, ge=1)
    lambda_gan: float = Field(10.0, ge=0, description="lambda0")
    lambda_kl: float = Field(0.1, ge=0, description="lambda1")
    lambda_recon: float = Field(100.0, ge=0, description="lambda2")
    lambda_kl_cyc: float = Field(0.1, ge=0, description="lambda3")
    lambda_cyc: float = Field(100.0, ge=0, description="lambda4")
    lr: float = Field(1e-4, gt=0)
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4
    lr_step: int = Field(100_000, gt=0, description="iterations between lr x0.5")
    batch_size: int = Field(1, ge=1)
    iterations: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    log_every: int = Field(gt=0)
    sample_every: int = Field(gt=0)
    critic_steps: int = Field(1000, gt=0, description="training steps of the quality critic "
                              "(boneaug.eval.quality); 1000 reach held-out AUC 0.85-0.89 on the "
                              "local humerus sets")
    seed: int = 0

    @model_validator(mode="after")
    def _shared_fits(self) -> UnitConfig:
        if self.n_shared > self.n_res:
            raise ValueError(
                f"n_shared={self.n_shared} exceeds n_res={self.n_res}: only residual blocks "
                "next to the latent can be shared; lower n_shared or raise n_res"
            )
        return self


class DrnConfig(_Section):
    """DRN classifier and its training (SPEC 6)."""

    arch: Literal["drn_c_26", "drn_d_22", "drn_d_38", "drn_d_54"] = "drn_d_22"
    width_mult: float = Field(1.0, gt=0)
    downsample: Literal["stride", "maxpool"] = Field(
        "stride", description="how stages 2-4 halve the resolution: the reference's strided convs, "
                              "or 2x2 max-pools (keeps thin findings; see boneaug.models.drn)")
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(gt=0)
    pretrain_epochs: int = Field(gt=0, description="auxiliary fracture pre-training")
    pretrain_lr: float = Field(
        1e-3, gt=0,
        description="Adam lr of the fracture pre-training (from scratch; the paper's 1e-4 is for "
                    "fine-tuning)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_decay: float = Field(0.9, gt=0, le=1, description="x this when val AUC plateaus")
    plateau_patience: int = Field(2, ge=1)
    early_stop_patience: int = Field(5, ge=1)
    finetune_blocks: int = Field(2, ge=0, description="last conv stages left trainable")
    aug_degrees: float = Field(10.0, ge=0, le=180, description="train: random rotation +- degrees")
    aug_scale: tuple[float, float] = Field((0.9, 1.1), description="train: isotropic scale range")
    aug_translate: float = Field(0.05, ge=0, lt=0.5, description="train: shift, fraction of a side")
    aug_hflip: float = Field(0.5, ge=0, le=1, description="train: horizontal flip probability")
    max_train_negatives: int | None = Field(
        None, ge=1, description="cap on training negatives (seeded subset, same for every model)"
    )
    seed: int = 0


PAPER_THRESHOLDS = (0.70, 0.85, 0.90, 0.95)  # the t grid of the paper's Table 2


class AugmentConfig(_Section):
    """Blending and pseudo-labelling (SPEC 4, 5)."""

    blend_n: float = Field(2.0, gt=0, description="alpha-mask exponent")
    thresholds: tuple[float, ...] = Field(PAPER_THRESHOLDS,
                                          description="the t grid, chosen on validation")
    t: dict[BodyPart, float] = Field(
        default_factory=lambda: {"humerus": 0.90, "tibia": 0.90, "femur": 0.95}
    )
    max_source_images: int | None = Field(None, ge=1)
    seed: int = 0


class EvalConfig(_Section):
    """Statistics (SPEC 7)."""

    n_bootstrap: int = Field(2000, ge=10)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class StorageConfig(_Section):
    """Where data and runs live. S3 credentials come from the standard AWS variables."""

    root: str = Field("work", description="s3://bucket/prefix, file:///path or a path")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible server; else AWS_ENDPOINT_URL(_S3) or AWS itself"
    )


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow URI; default MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db"
    )


class ComputeConfig(_Section):
    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 = local mode)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="Ray Train retries from the last checkpoint")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per train worker (None: Ray's, = its CPUs)"
    )


class BoneaugConfig(_Section):
    profile: ProfileName
    synth: SynthConfig
    image: ImageConfig
    patches: PatchConfig
    unit: UnitConfig
    drn: DrnConfig
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()


def _counts(tp: int, tn: int, vp: int, vn: int, sp: int, sn: int) -> dict[str, int]:
    return dict(train_pos=tp, train_neg=tn, val_pos=vp, val_neg=vn, test_pos=sp, test_neg=sn)


_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "synth": {
            "height": 256, "width": 128, "fracture_images": 48,
            "counts": {
                "humerus": _counts(8, 24, 4, 8, 4, 8),
                "tibia": _counts(6, 24, 4, 8, 4, 8),
                "femur": _counts(4, 24, 4, 8, 4, 8),
            },
        },
        "image": {"height": 128, "width": 64},
        "patches": {
            "size": 32, "descriptor_size": 16,
            "body_parts": {
                "humerus": {"s": 2, "n": 3, "translation_patches": 16},
                "tibia": {"s": 1, "n": 3, "translation_patches": 16},
                "femur": {"s": 2, "n": 3, "translation_patches": 16},
            },
        },
        "unit": {
            "width": 8, "n_res": 2, "n_shared": 1, "disc_width": 8, "disc_layers": 3,
            "disc_scales": 2, "batch_size": 4, "iterations": 4, "checkpoint_every": 2,
            "log_every": 1, "sample_every": 2, "critic_steps": 100,
        },
        "drn": {"width_mult": 0.125, "downsample": "maxpool", "batch_size": 8, "epochs": 2,
                "pretrain_epochs": 1},
        "compute": {"num_workers": 1, "cpus_per_worker": 0.5},
        "eval": {"n_bootstrap": 200},
    },
    "local": {
        "synth": {
            "height": 1024, "width": 512, "fracture_images": 800,
            "counts": {
                "humerus": _counts(64, 600, 20, 200, 50, 500),
                "tibia": _counts(40, 1000, 20, 250, 50, 500),
                "femur": _counts(16, 800, 20, 200, 50, 500),
            },
        },
        "image": {"height": 256, "width": 128},
        "patches": {
            "size": 64,
            "body_parts": {
                "humerus": {"s": 2, "n": 10, "translation_patches": 128},
                "tibia": {"s": 1, "n": 7, "translation_patches": 120},
                "femur": {"s": 2, "n": 10, "translation_patches": 112},
            },
        },
        # width 32 / 4 res blocks took 1.9 s an iteration on 2 cores (1500 iterations: 47 min,
        # beyond the 15-minute budget of a local UNIT run); this one takes ~0.45 s. On the local
        # tibia patches the quality gain peaked early and fell with more iterations (+0.16 at 250,
        # +0.10 at 500, +0.03 at 1000), so 500 iterations lose nothing and save 4-5 minutes
        "unit": {
            "width": 16, "n_res": 2, "n_shared": 1, "disc_width": 16, "disc_layers": 3,
            "disc_scales": 2, "batch_size": 8, "iterations": 500, "checkpoint_every": 125,
            "log_every": 25, "sample_every": 125,
        },
        # fine-tuning val AUC moves < 0.01 after epoch 3 on the local cohorts; 6 epochs
        "drn": {"width_mult": 0.25, "downsample": "maxpool", "batch_size": 16, "epochs": 6,
                "pretrain_epochs": 8, "max_train_negatives": 400},
        # two points of the paper's t grid keep the tibia chain near 20 minutes on 2 cores (each t
        # trains a DRN, ~2 min); --thresholds 0.70,0.85,0.90,0.95 runs the paper's grid
        "augment": {"thresholds": (0.70, 0.90)},
        "compute": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 2},
    },
    "paper": {
        "synth": {
            "height": 2500, "width": 2000, "fracture_images": 20000,
            "counts": {
                "humerus": _counts(268, 2295, 41, 305, 50, 500),
                "tibia": _counts(214, 14482, 22, 1628, 50, 500),
                "femur": _counts(32, 4558, 14, 573, 50, 500),
            },
        },
        "image": {"height": 1024, "width": 512},
        "patches": {
            "size": 256,
            "body_parts": {
                "humerus": {"s": 2, "n": 10, "translation_patches": 536},
                "tibia": {"s": 1, "n": 7, "translation_patches": 515},
                "femur": {"s": 2, "n": 10, "translation_patches": 285},
            },
        },
        "unit": {
            "batch_size": 1, "iterations": 200_000, "checkpoint_every": 5_000,
            "log_every": 100, "sample_every": 2_000,
        },
        "drn": {"width_mult": 1.0, "batch_size": 16, "epochs": 40, "pretrain_epochs": 20},
        "compute": {"num_workers": 4, "use_gpu": True},
    },
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_config_text(path: str) -> str:
    """A config file's text from a local path or any storage URI (s3://, file://)."""
    if "://" not in path:
        return Path(path).read_text()
    from boneaug import storage

    return storage.read_bytes(path).decode("utf-8")


def load_config(
    profile: ProfileName = "local",
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> BoneaugConfig:
    """The profile's defaults, then a YAML file's values, then `overrides` (each wins).

    A YAML file may name its own `profile:`; an explicit `profile` argument is the fallback.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(_read_config_text(str(path)))
        except (OSError, StorageError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, "
                              f"got {type(loaded).__name__}")
        data = loaded
    data = _merge(data, overrides or {})
    name = data.pop("profile", profile)
    if name not in _PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    try:
        return BoneaugConfig(profile=name, **_merge(_PROFILES[name], data))
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where} (profile {name}):\n{exc}") from exc


def dump_config(config: BoneaugConfig) -> str:
    """YAML that `load_config(path=...)` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
