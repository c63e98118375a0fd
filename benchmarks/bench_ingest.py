"""Ingestion + patch-making throughput: the Ray Data pipeline at 1 and 2 CPUs vs a plain loop.

Same synthetic cohort (local-profile radiographs, tibia, 1064 at the default --scale 0.5) on a
loopback S3 server for all; the single-process loop does the same work with no Ray and writes
the same outputs to the same S3 (read, decode, fit-pad, descriptor, encode -> image shards of
32 rows; then the same crops -> one patch table per set). Each Ray configuration ingests the
cohort twice: the first run pays the start-up (worker processes importing boneaug, pydicom and
torch), the second is the steady rate. Start-up costs (ray.init, the listing and annotation
table every run reads) are printed apart from the per-image rates. Prints images/s, patches/s
and the ratios to the loop measured in the same run.

    .venv/bin/python benchmarks/bench_ingest.py [--scale 0.5]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
from _common import moto_server, print_table

from boneaug import storage
from boneaug.config import load_config
from boneaug.data.arrays import encode_pixels
from boneaug.data.ingest import (
    IMAGE_SCHEMA,
    MAX_OBJECTS_PER_TASK,
    DecodeBatch,
    ingest,
    load_annotations,
)
from boneaug.data.patch_sets import make_patch_sets, read_image_meta
from boneaug.data.patches import crop_resize, plan_patches


def loop_baseline(root: str, run: str, config) -> tuple[float, float, int, int]:  # noqa: ANN001
    """The same work in one process: (ingest s, patches s, images, patches)."""
    from boneaug.io.dicom import decode_xray

    t0 = time.perf_counter()  # like ingest(): listing and the annotation table count too
    annotations = {r["key"]: r for r in load_annotations(root).to_pylist()}
    fs, root_path = storage.pyarrow_filesystem(root)
    decode = DecodeBatch(annotations, root_path, config.image, config.patches.descriptor_size)
    files = storage.list_files(storage.join(root, "dicom", "tibia"))
    rows = [decode.one(storage.read_bytes(uri), storage.filesystem(uri)[1]) for uri in files]
    good = [r for r in rows if r["ok"]]
    step = MAX_OBJECTS_PER_TASK
    for i in range(0, len(good), step):
        storage.write_parquet(storage.join(run, "loop", "images", f"{i:05d}.parquet"),
                              pa.Table.from_pylist(good[i:i + step], schema=IMAGE_SCHEMA))
    t_ingest = time.perf_counter() - t0

    t0 = time.perf_counter()  # like make_patch_sets(): reading the image table and planning count
    settings = config.patches.body_parts["tibia"]
    plan = plan_patches(read_image_meta(run), s=settings.s, n=settings.n,
                        target_per_class=settings.translation_patches, rng=np.random.default_rng(0))
    by_key = defaultdict(list)
    for task in (*plan.lesion, *plan.normal, *plan.source):
        by_key[task.key].append(task)
    cut: dict[str, list[dict]] = defaultdict(list)
    for key, tasks in by_key.items():
        image = decode_xray(storage.read_bytes(storage.join(root, key))).pixels
        for task in tasks:
            cut[task.kind].append({"key": key, "pixels": encode_pixels(
                crop_resize(image, task.crop, config.patches.size))})
    for kind, items in cut.items():
        storage.write_parquet(storage.join(run, "loop", "patches", f"{kind}.parquet"),
                              pa.Table.from_pylist(items))
    return t_ingest, time.perf_counter() - t0, len(files), sum(len(t) for t in by_key.values())


def main() -> None:
    import boto3
    import ray

    from boneaug.synth.cohort import generate_cohort

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=0.5, help="of the local tibia cohort")
    args = parser.parse_args()
    config = load_config("local")
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-ingest")
        root = "s3://bench-ingest/cohort"
        generate_cohort(config.synth, ["tibia"], root, seed=0, scale=args.scale, progress=False)
        t0 = time.perf_counter()
        load_annotations(root)
        storage.list_files(storage.join(root, "dicom", "tibia"))
        t_list = time.perf_counter() - t0
        results, startup = {}, {}
        for cpus in (1, 2):
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            t_init = time.perf_counter() - t0
            seconds = []
            for _attempt in ("cold", "warm"):
                run = storage.join(root, "runs", f"bench-{cpus}")
                ing = ingest(data_uri=root, run_uri=run, image=config.image,
                             descriptor_rows=config.patches.descriptor_size, body_part="tibia")
                assert ing.listed == ing.written + ing.rejected, ing  # counts are conserved
                seconds.append(ing.seconds)
            pat = make_patch_sets(data_uri=root, run_uri=run, body_part="tibia",
                                  settings=config.patches.body_parts["tibia"],
                                  size=config.patches.size,
                                  min_mean_intensity=config.patches.min_mean_intensity, seed=0)
            ray.shutdown()
            startup[cpus] = (t_init, seconds[0] - seconds[1])
            results[cpus] = (ing.listed / seconds[1], sum(pat.candidates.values()) / pat.seconds)
        t_ing, t_pat, n_img, n_pat = loop_baseline(root, storage.join(root, "runs", "bench-1"),
                                                   config)
        base = (n_img / t_ing, n_pat / t_pat)
        rows = [["single-process loop", "1", base[0], 1.0, base[1], 1.0]]
        for cpus, (img_s, pat_s) in results.items():
            rows.append(["Ray Data (warm)", str(cpus), img_s, img_s / base[0], pat_s,
                         pat_s / base[1]])
        print(f"\ncohort: {n_img} local-profile tibia DICOMs on S3 (moto, loopback); "
              f"{n_pat} patches cut")
        print_table(["pipeline", "CPUs", "images/s", "x loop", "patches/s", "x loop"], rows)
        print(f"scaling 1 -> 2 CPUs: ingest x{results[2][0] / results[1][0]:.2f}, "
              f"patches x{results[2][1] / results[1][1]:.2f}")
        print(f"start-up, apart from the rates: listing + annotation table {t_list:.2f} s (every "
              "run, loop included); " + "; ".join(
                  f"{c} CPU(s): ray.init {i:.1f} s, first ingest's extra {e:.1f} s"
                  for c, (i, e) in startup.items()))


if __name__ == "__main__":
    main()
