"""Validated configuration of the Serve deployments (their `user_config`) and the HTTP bodies.

A deployment's `user_config` arrives as a dict (from `serve/config.yaml` or `.options()`); every
`reconfigure` turns it into one of these models first, so a bad config update fails loudly at
deploy time with pydantic's message, never halfway through a request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from boneaug.config import BODY_PARTS, BodyPart, ProfileName

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# deployment configuration (user_config)


class ModelRef(_Strict):
    """One registered model: by alias (follows the registry; default champion) or pinned to a
    version."""

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="registered model name")
    alias: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]+$",
                              description="registry alias, "
                                          "e.g. champion (the default) or challenger")
    version: str | None = Field(None, pattern=r"^[0-9]+$",
                                description="pin a version instead of an alias")

    @model_validator(mode="before")
    @classmethod
    def _default_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alias") is None and data.get("version") is None:
            return {**data, "alias": "champion"}
        return data

    @model_validator(mode="after")
    def _one_selector(self) -> ModelRef:
        if self.alias is not None and self.version is not None:
            raise ValueError(f"model {self.name!r}: give one of alias or version, not both "
                             f"(got alias={self.alias!r}, version={self.version!r})")
        return self

    @property
    def uri(self) -> str:
        return (f"models:/{self.name}@{self.alias}" if self.alias
                else f"models:/{self.name}/{self.version}")


class ModelsConfig(_Strict):
    """One kind of model in the ingress's `user_config` (`translator`, `scorer`): which model
    serves which body part, and how its calls are batched.

    A config update with different content makes every replica load the new models, then swap
    them in atomically (no restart, no failed request). Moving an alias in the registry is seen
    at the next update: bump `revision` to re-resolve aliases when nothing else changed.
    """

    models: dict[BodyPart, ModelRef] = Field(min_length=1)
    tracking_uri: str | None = Field(None, description="MLflow URI; "
                                                       "default MLFLOW_TRACKING_URI or ./mlflow.db")
    revision: int = Field(0, ge=0, description="bump to reload (re-resolve aliases)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
                                                   description="auto: cuda when Ray gave a GPU")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, le=1, description="wait this long for a batch to fill. 0: run what has "
                                     "queued; under load the calls queue while a batch runs, "
                                     "so batches still form, and one call alone waits for none")

    @classmethod
    def default(cls, kind: Literal["unit", "drn"]) -> ModelsConfig:
        return cls(models={bp: ModelRef(name=f"boneaug-{kind}-{bp}") for bp in BODY_PARTS})


class ServiceConfig(_Strict):
    """`user_config` of the service's deployment: the profile that sizes patches and classifier
    input, the models, and the limits on what a client may send."""

    profile: ProfileName = Field("local",
                                 description="must match the profile the models were trained in")
    translator: ModelsConfig = Field(default_factory=lambda: ModelsConfig.default("unit"),
                                     description="UNIT h -> l by body part")
    scorer: ModelsConfig = Field(default_factory=lambda: ModelsConfig.default("drn"),
                                 description="DRN lesion probability by body part")
    max_concurrent_images: int = Field(
        8, ge=1, description="requests a replica decodes and processes at once (each may hold a "
                             "max_image_pixels image); the others wait in the replica, holding "
                             "only their upload")
    max_upload_bytes: int = Field(32 * 2**20, ge=1024, description="larger bodies get 413")
    max_image_side: int = Field(6144, ge=16)
    max_image_pixels: int = Field(25_000_000, ge=256)
    min_image_side: int = Field(16, ge=8)
    model_timeout_s: float = Field(30.0, gt=0, description="per model call; then 503")
    public_docs: bool = Field(False, description="serve /docs and /openapi.json without the token")

    @model_validator(mode="after")
    def _sides(self) -> ServiceConfig:
        if self.min_image_side > self.max_image_side:
            raise ValueError(f"min_image_side={self.min_image_side} exceeds "
                             f"max_image_side={self.max_image_side}")
        return self


class AppArgs(_Strict):
    """Arguments of `serve.app:build_app`, e.g. `serve run serve.app:build_app profile=smoke
    body_parts=tibia num_gpus=0.5` (command-line values arrive as strings)."""

    profile: ProfileName = "local"
    body_parts: tuple[BodyPart, ...] = Field(BODY_PARTS, min_length=1,
                                             description="comma-separated on the CLI")
    translator_alias: str = Field("champion", pattern=r"^[A-Za-z0-9_\-]+$")
    scorer_alias: str = Field("champion", pattern=r"^[A-Za-z0-9_\-]+$")
    tracking_uri: str | None = Field(None,
                                     description="else MLFLOW_TRACKING_URI on the replicas' nodes")
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0,
                            description="per replica; 0.5 shares one GPU by two")
    num_replicas: int | None = Field(None, ge=1,
                                     description="fixed replicas instead of autoscaling")

    @model_validator(mode="before")
    @classmethod
    def _split_body_parts(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("body_parts"), str):
            return {**data, "body_parts": tuple(p.strip() for p in data["body_parts"].split(",")
                                                if p.strip())}
        return data


# ---------------------------------------------------------------------------------------------
# HTTP bodies


class ErrorResponse(BaseModel):
    reason: str = Field(
        description="short machine-readable code, e.g. not_dicom, box_outside_image")
    message: str


class ModelVersion(BaseModel):
    name: str
    version: str


class LesionModels(BaseModel):
    translator: ModelVersion
    scorer: ModelVersion


class LesionResponse(BaseModel):
    body_part: BodyPart
    image: str = Field(description="base64 blended radiograph: derived DICOM or 16-bit PNG")
    image_format: Literal["dicom", "png"]
    media_type: str
    patch_png: str = Field(description="base64 8-bit PNG of the translated patch (S x S)")
    source_patch_png: str = Field(
        description="base64 8-bit PNG of the cut patch before translation")
    preview_png: str | None = Field(
        None, description="base64 8-bit PNG of the blended image (preview=true)")
    rows: int
    columns: int
    box: list[int] = Field(description="[x0, y0, x1, y1] lesion box used, uploaded-image pixels")
    crop: list[int] = Field(description="[x0, y0, x1, y1] square crop that was translated")
    n: float
    score: float = Field(description="lesion probability of the blended image")
    threshold: float
    passes_threshold: bool
    models: LesionModels


class ScoreResponse(BaseModel):
    body_part: BodyPart
    probability: float
    model: str
    version: str


class PreviewResponse(BaseModel):
    rows: int
    columns: int
    kind: Literal["png", "dicom"]
    png: str = Field(description="base64 8-bit PNG of the decoded radiograph")


class ModelsResponse(BaseModel):
    translator: dict[str, ModelVersion]
    scorer: dict[str, ModelVersion]
    body_parts: list[str] = Field(description="body parts with a translator and a scorer")


class HealthResponse(BaseModel):
    status: Literal["ok"]
