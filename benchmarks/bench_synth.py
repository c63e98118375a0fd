"""Synthetic cohort generation throughput: images/s for a body part, per worker count.

The anchor is the requirement of the `local` profile: the tibia cohort (~1860 images at
1024 x 512, DICOM encode + write included) in at most 120 s, i.e. 15.5 images/s on the 2-core
machine (~7.75 images/s per core). Prints, per worker count: images, wall seconds, images/s,
ratio to the anchor, and CPU ms per image (all processes), which is what the machine would give
without other load. Also times the renderer alone (in process) by stage.

    .venv/bin/python benchmarks/bench_synth.py [--profile local] [--body-part tibia]
        [--workers 1 2] [--scale 1.0] [--out /tmp/bench-synth]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time

import numpy as np
from _common import print_table

from boneaug.config import load_config
from boneaug.synth.cohort import generate_cohort, plan_body_part, render_job

ANCHOR_IMAGES_PER_S = 1860 / 120.0


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--body-part", default="tibia")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", default="/tmp/bench-synth")
    args = parser.parse_args()
    config = load_config(args.profile).synth

    # the renderer alone, in process: 20 images
    jobs = plan_body_part(config, args.body_part, seed=0, scale=args.scale)[:20]
    render_job(jobs[0], config, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    for job in jobs:
        render_job(job, config, 0)
    render_wall = (time.perf_counter() - t0) / len(jobs)
    render_cpu = (time.process_time() - c0) / len(jobs)
    print(f"render + encode only (no write), in process: {1e3 * render_wall:.1f} ms wall, "
          f"{1e3 * render_cpu:.1f} ms CPU per image")

    rows = []
    for workers in args.workers:
        shutil.rmtree(args.out, ignore_errors=True)
        cpu0 = _cpu_seconds()
        summary = generate_cohort(config, [args.body_part], args.out, seed=0, scale=args.scale,
                                  workers=workers, progress=False)
        cpu = _cpu_seconds() - cpu0
        rows.append([workers, summary.images, summary.seconds, summary.images_per_s,
                     summary.images_per_s / ANCHOR_IMAGES_PER_S, 1e3 * cpu / summary.images])
    shutil.rmtree(args.out, ignore_errors=True)
    headers = ["workers", "images", "seconds", "images/s", "x anchor (15.5/s)", "CPU ms/image"]
    print_table(headers, rows)
    print(f"load average now: {np.round(np.array(__import__('os').getloadavg()), 1).tolist()}")


if __name__ == "__main__":
    main()
