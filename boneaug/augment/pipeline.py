"""The augmentation pipeline (paper 3.3-3.4) as Ray Data:
source patches -> translate -> blend -> score.

    patches/source/*.parquet
      -> Translate (actor pool; GPU actors when the cluster has GPUs): x_h -> x_h->l
      -> Blend (tasks): re-read the source DICOM, alpha-blend the translation into its crop box at
         stored resolution, fit-and-pad to the classification size
      -> Score (actor pool): the pseudo-labeller's lesion probability of the blended image
      -> augmented/candidates/*.parquet  (every blended image, its score and full provenance)

Selection by t is separate (`select_augmented`), so a t grid or a Tune sweep blends and scores once.
The kept images get derived DICOM files (DERIVED\\SECONDARY, referencing the source image, naming
the UNIT model and version, n, t and the score): `write_derived_dicoms`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from boneaug import storage
from boneaug.augment.arms import TranslatorSpec
from boneaug.config import BlendMode, ImageConfig, TrackingConfig
from boneaug.data.arrays import decode_pixels, encode_pixels
from boneaug.errors import DataError

log = logging.getLogger(__name__)

BLENDED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source_image_id", pa.string()), ("patch_id", pa.string()),
    ("body_part", pa.string()), ("task", pa.string()), ("split", pa.string()), ("label", pa.int8()),
    ("fracture", pa.int8()), ("patient_id", pa.string()), ("confounders", pa.list_(pa.string())),
    ("crop", pa.list_(pa.int32())), ("boxes", pa.list_(pa.list_(pa.int32()))),
    ("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.binary()),
    ("translated", pa.binary()), ("n", pa.float32()), ("blend", pa.string()),
])
CANDIDATE_COLUMNS = [
    "image_id", "source_image_id", "patch_id", "body_part", "task", "split", "label", "fracture",
    "patient_id", "confounders", "crop", "boxes", "height", "width", "pixels", "translated",
    "score", "n", "blend", "unit_model", "unit_version", "scorer_model", "scorer_version",
]


def blend_mode(row: dict[str, Any]) -> BlendMode:
    """How a candidate row was blended (rows written before the column existed: "alpha")."""
    return row.get("blend") or "alpha"


@dataclass(frozen=True)
class ModelRef:
    """A registered model: URI (models:/name@alias) resolved to name and version at start."""

    uri: str
    name: str
    version: str | None

    @classmethod
    def resolve(cls, uri: str) -> ModelRef:
        from boneaug import tracking

        name, version = tracking.resolve(uri)
        return cls(uri=f"models:/{name}/{version}" if version else uri, name=name, version=version)


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 else "cpu"


class Translate:
    """Actor: batches of source patches -> an arm's candidate lesion patches (`translated`)."""

    def __init__(self, spec: TranslatorSpec, tracking: TrackingConfig | None,
                 num_gpus: float) -> None:
        from boneaug import tracking as tr
        from boneaug.augment.arms import build_translator

        tr.configure(tracking)
        self.translate = build_translator(spec, device=_device(num_gpus))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from boneaug.augment.arms import SourceBatch

        rows = batch.select(["patch_id", "image_id", "crop", "box"]).to_pydict()
        out = self.translate(SourceBatch(
            patches=_images(batch), patch_ids=[str(p) for p in rows["patch_id"]],
            image_ids=[str(i) for i in rows["image_id"]],
            crops=[tuple(int(v) for v in c) for c in rows["crop"]],
            boxes=[tuple(int(v) for v in b) for b in rows["box"]]))  # (B, 1, S, S)
        return batch.append_column("translated", pa.array([encode_pixels(x[0]) for x in out],
                                                          pa.binary()))


class Blend:
    """Task: paste each translation into its full-resolution source image; fit to the classifier."""

    def __init__(self, data_uri: str, sources: dict[str, dict[str, Any]], image: ImageConfig,
                 n: float, mode: BlendMode) -> None:
        self.data_uri = data_uri
        self.sources = sources
        self.target = (image.height, image.width)
        self.n = n
        self.mode = mode

    def __call__(self, table: pa.Table) -> pa.Table:
        from boneaug.augment.blend import paste_blended
        from boneaug.io.dicom import decode_xray
        from boneaug.io.resize import fit_pad, map_box

        rows = []
        batch = table.to_pydict()
        for i in range(table.num_rows):
            source = self.sources[str(batch["image_id"][i])]
            uri = storage.join(self.data_uri, source["key"])
            image = decode_xray(storage.read_bytes(uri), path=uri).pixels
            size = int(batch["height"][i])
            translated = decode_pixels(batch["translated"][i], size, size)
            crop = [int(v) for v in batch["crop"][i]]
            blended = paste_blended(image, translated, crop, n=self.n, mode=self.mode)
            fitted, scale, pad_x, pad_y = fit_pad(blended, self.target)
            rows.append({
                "image_id": f"aug-{source['image_id']}", "source_image_id": source["image_id"],
                "patch_id": str(batch["patch_id"][i]), "body_part": str(batch["body_part"][i]),
                "task": "lesion", "split": "train", "label": 1, "fracture": 0,
                "patient_id": source["patient_id"], "confounders": [], "crop": crop,
                "boxes": [list(map_box(crop, scale, pad_x, pad_y, size=self.target))],
                "height": self.target[0], "width": self.target[1],
                "pixels": encode_pixels(fitted), "translated": bytes(batch["translated"][i]),
                "n": self.n, "blend": self.mode,
            })
        return pa.Table.from_pylist(rows, schema=BLENDED_SCHEMA)


class Score:
    """Actor: blended classification images -> the pseudo-labeller's lesion probability."""

    def __init__(self, model_uri: str, tracking: TrackingConfig | None, num_gpus: float) -> None:
        from boneaug import tracking as tr

        tr.configure(tracking)
        self.device = _device(num_gpus)
        self.model = tr.load_torch_model(model_uri).to(self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from boneaug.augment.pseudolabel import score_images

        scores = score_images(self.model, _images(batch))
        return batch.append_column("score", pa.array(scores, pa.float32()))


def _images(batch: pa.Table) -> np.ndarray:
    """The `pixels` column of a batch as (B, 1, H, W) float32."""
    columns = batch.select(["pixels", "height", "width"]).to_pydict()
    return np.stack([decode_pixels(p, h, w)[None] for p, h, w in
                     zip(columns["pixels"], columns["height"], columns["width"], strict=True)])


@dataclass
class AugmentSummary:
    candidates_uri: str
    sources: int
    blended: int
    translator: str
    scorer: str
    score_quantiles: dict[str, float]
    seconds: float

    def __str__(self) -> str:
        q = ", ".join(f"{k}={v:.3f}" for k, v in self.score_quantiles.items())
        return (f"augment {self.candidates_uri}: {self.blended} blended from {self.sources} "
                f"source patches; {self.seconds:.1f} s\n  translator {self.translator}, "
                f"scored by {self.scorer}: {q}")


def _actors(gpus: float) -> Any:
    import ray

    return ray.data.ActorPoolStrategy(
        min_size=1, max_size=2 if gpus == 0 else int(ray.cluster_resources()["GPU"]))


def _gpus() -> float:
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def blend_candidates(
    *,
    data_uri: str,
    run_uri: str,
    out_uri: str,
    translator: TranslatorSpec,
    image: ImageConfig,
    n: float,
    mode: BlendMode = "alpha",
    tracking: TrackingConfig | None = None,
) -> int:
    """Translate every source patch of `run_uri` with one arm and blend it (`mode`, exponent
    `n`) into its source image; write the unscored candidates under ``<out_uri>/blended`` (any
    scorer can score them later, `score_candidates`). Returns how many were blended."""
    import ray

    source_uri = storage.join(run_uri, "patches", "source")
    if storage.read_manifest(storage.join(run_uri, "patches")) is None:
        raise DataError(f"{run_uri}/patches has no manifest: "
                        "make the patch sets first (jobs/make_patches.py)")
    images = storage.read_parquet(storage.join(run_uri, "images"),
                                  columns=["image_id", "key", "patient_id", "sop_uid", "study_uid"])
    sources = {r["image_id"]: r for r in images.to_pylist()}
    blended_uri = storage.join(out_uri, "blended")
    storage.remove(storage.join(blended_uri, storage.MANIFEST))
    storage.remove(blended_uri)

    fs, path = storage.pyarrow_filesystem(source_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    gpus = _gpus()
    ds = ds.map_batches(Translate, fn_constructor_kwargs={"spec": translator,
                                                          "tracking": tracking, "num_gpus": gpus},
                        batch_size=32, batch_format="pyarrow", compute=_actors(gpus),
                        num_gpus=gpus, num_cpus=0.5 if gpus == 0 else 1)
    ds = ds.map_batches(Blend(data_uri, sources, image, n, mode), batch_size=4,
                        batch_format="pyarrow")
    out_fs, out_path = storage.pyarrow_filesystem(blended_uri)
    ds.write_parquet(out_path, filesystem=out_fs)
    count = storage.read_parquet(blended_uri, columns=["image_id"]).num_rows
    if count == 0:
        raise DataError(f"no source patches under {source_uri}: nothing to augment")
    storage.publish_manifest(blended_uri, {"stage": "blend", "translator": translator.label,
                                           "arm": translator.arm, "n": n, "blend": mode,
                                           "blended": count})
    return count


def score_candidates(
    *,
    blended_uri: str,
    out_uri: str,
    scorer_uri: str,
    tracking: TrackingConfig | None = None,
) -> AugmentSummary:
    """Score blended candidates (``<...>/blended``) with a pseudo-labeller; write them with
    their scores and provenance under ``<out_uri>/candidates``."""
    import ray

    start = time.perf_counter()
    made = storage.read_manifest(blended_uri)
    if made is None:
        raise DataError(f"{blended_uri} has no manifest: blend the candidates first")
    scorer = ModelRef.resolve(scorer_uri)
    candidates_uri = storage.join(out_uri, "candidates")
    storage.remove(storage.join(out_uri, storage.MANIFEST))
    storage.remove(candidates_uri)
    fs, path = storage.pyarrow_filesystem(blended_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    gpus = _gpus()
    ds = ds.map_batches(Score, fn_constructor_kwargs={"model_uri": scorer.uri,
                                                      "tracking": tracking, "num_gpus": gpus},
                        batch_size=16, batch_format="pyarrow", compute=_actors(gpus),
                        num_gpus=gpus, num_cpus=0.5 if gpus == 0 else 1)
    ds = ds.map_batches(_with_models(made["translator"], scorer), batch_format="pyarrow")
    out_fs, out_path = storage.pyarrow_filesystem(candidates_uri)
    ds.write_parquet(out_path, filesystem=out_fs)
    scores = storage.read_parquet(candidates_uri, columns=["score"]).column("score").to_numpy()
    summary = AugmentSummary(
        candidates_uri=candidates_uri, sources=len(scores), blended=len(scores),
        translator=made["translator"], scorer=f"{scorer.name} v{scorer.version}",
        score_quantiles={f"q{int(q * 100)}": float(np.quantile(scores, q))
                         for q in (0.1, 0.5, 0.9)},
        seconds=time.perf_counter() - start,
    )
    storage.publish_manifest(out_uri, {"stage": "augment", "scorer": asdict(scorer),
                                       "n": made["n"], **asdict(summary)})
    return summary


def _with_models(translator: str, scorer: ModelRef):  # noqa: ANN202 - a Ray Data batch function
    name, _, version = translator.removeprefix("models:/").partition("/")
    def add(table: pa.Table) -> pa.Table:
        size = table.num_rows
        for column, value in (("unit_model", name), ("unit_version", version or None),
                              ("scorer_model", scorer.name), ("scorer_version", scorer.version)):
            table = table.append_column(column, pa.array([value] * size, pa.string()))
        return table.select(CANDIDATE_COLUMNS)
    return add


def select_augmented(candidates_uri: str, t: float) -> pa.Table:
    """The augmented training rows at threshold t (score >= t), sorted by image id."""
    from boneaug.augment.pseudolabel import select

    table = storage.read_parquet(candidates_uri)
    mask = select(table.column("score").to_numpy(), t)
    return table.filter(pa.array(mask)).sort_by("image_id")


def write_derived_dicoms(
    *, data_uri: str, run_uri: str, selected: pa.Table, out_uri: str, t: float
) -> list[str]:
    """One derived DICOM per kept image (full resolution, blended), with provenance; returns
    URIs."""
    from boneaug.augment.blend import paste_blended
    from boneaug.io.dicom import Derivation, decode_xray, encode_derived

    images = storage.read_parquet(storage.join(run_uri, "images"), columns=["image_id", "key"])
    keys = dict(zip(images.column("image_id").to_pylist(), images.column("key").to_pylist(),
                    strict=True))
    written = []
    for row in selected.to_pylist():
        uri = storage.join(data_uri, keys[row["source_image_id"]])
        source = decode_xray(storage.read_bytes(uri), path=uri)
        size = int(np.sqrt(len(row["translated"]) // 2))
        mode = blend_mode(row)
        blended = paste_blended(source.pixels, decode_pixels(row["translated"], size, size),
                                row["crop"], n=row["n"], mode=mode)
        data = encode_derived(blended, Derivation(
            model_name=row["unit_model"], model_version=row["unit_version"],
            provenance={"n": row["n"], "blend": mode, "t": t,
                        "score": round(float(row["score"]), 6),
                        "scorer": f"{row['scorer_model']}/{row['scorer_version']}",
                        "crop": ",".join(map(str, row["crop"]))}), source=source)
        target = storage.join(out_uri, f"{row['image_id']}.dcm")
        storage.write_bytes(target, data)
        written.append(target)
    return written

