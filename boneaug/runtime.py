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
from boneaug.progress import LOG_FORMAT, quiet_ray, set_verbose


def job_parser(description: str, *, body_part: bool = True,
               workers: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if workers:
        parser.add_argument("--workers", type=int, default=None,
                            help="Ray Train workers, each using the CPUs it holds "
                                 "(default: profile)")
    if body_part:
        parser.add_argument("--body-part", choices=BODY_PARTS, required=True)
    parser.add_argument("--profile", choices=PROFILES, default="local",
                        help="sizes (default local)")
    parser.add_argument("--config", default=None,
                        help="YAML overriding the profile (e.g. a Tune best.yaml)")
    parser.add_argument("--data", default=None,
                        help="cohort root URI (DICOM + annotations.parquet); "
                             "default: the config's storage root, "
                             "where the synthetic cohort is generated when missing")
    parser.add_argument("--synthetic", action="store_true",
                        help="generate the synthetic cohort at --data when it is not there yet")
    parser.add_argument("--out", default=None, help="where runs/<run-id>/ goes; default: --data")
    parser.add_argument("--run-id", default=None,
                        help="default <body-part>-<profile>; re-running replaces it")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own logs on the terminal too, and lines instead of bars "
                             "(default: they go to the Ray session's log files)")
    return parser


def parse_seeds(text: str | None) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); None or "" -> () (the config's seed)."""
    if not text:
        return ()
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SystemExit(
            f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {text!r}")
    return seeds


THRESHOLDS_HELP = ("comma-separated pseudo-label t grid, e.g. 0.70,0.85,0.90,0.95 (the paper's "
                   "Table 2); default: the profile's augment.thresholds")


def parse_thresholds(text: str | None) -> tuple[float, ...] | None:
    """"0.7,0.9" -> (0.7, 0.9); None or "" -> None (the profile's augment.thresholds)."""
    if not text:
        return None
    try:
        grid = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise SystemExit(f"--thresholds must be comma-separated numbers in [0, 1], e.g. "
                         f"0.70,0.85,0.90,0.95; got {text!r}") from None
    if any(not 0.0 <= t <= 1.0 for t in grid) or len(set(grid)) != len(grid):
        raise SystemExit(f"--thresholds must be distinct numbers in [0, 1]; got {text!r}")
    return grid


def absolute(uri: str) -> str:
    """Plain relative paths become absolute so Ray workers in other directories find them."""
    if "://" in uri:
        return uri
    return str(Path(uri).absolute())


def setup(args: argparse.Namespace) -> tuple[BoneaugConfig, str, str]:
    """(config, data URI, run URI) from the common arguments; logging configured."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    set_verbose(getattr(args, "verbose", False))
    config = load_config(args.profile, args.config)
    if config.storage.s3_endpoint_url:  # storage.s3_endpoint reads it, here and in workers
        os.environ[storage.ENDPOINT_VARS[0]] = config.storage.s3_endpoint_url
    if getattr(args, "workers", None) is not None:
        # each of N workers then uses the CPUs it holds, not the profile's threads for one worker
        compute = config.compute.model_copy(update={"num_workers": args.workers,
                                                    "torch_threads": None})
        config = config.model_copy(update={"compute": compute})
    data = absolute(args.data or config.storage.root)
    out = absolute(args.out or data)
    run_id = args.run_id or f"{getattr(args, 'body_part', 'all')}-{config.profile}"
    return config, data, storage.join(out, "runs", run_id)


def body_part_job(args: argparse.Namespace, *, fractures: bool) -> tuple[BoneaugConfig, str, str]:
    """What a one-body-part job does first: setup, MLflow, Ray, the cohort (with the fracture
    corpus only when `fractures`: DRN pre-training) and its ingested images. Returns `setup`'s
    (config, data URI, run URI)."""
    from boneaug import tracking
    from boneaug.workflow import ensure_cohort, ingest_stage

    config, data, run = setup(args)
    tracking.configure(config.tracking)
    init_ray()
    ensure_cohort(config, data, [args.body_part], synthesize=args.data is None or args.synthetic,
                  fractures=fractures)
    ingest_stage(config, data, run, args.body_part)
    return config, data, run


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster (`ray job submit` sets RAY_ADDRESS) or start a local Ray.

    A local Ray's workers inherit this process's environment (S3 endpoint, credentials, MLflow
    URI: set them before calling); on a cluster they come from the job's runtime environment
    (``--runtime-env-json``) or the nodes' own environment, never from code.
    """
    import ray

    if not ray.is_initialized():
        # never a cluster found on this machine otherwise (a `ray start` head, or a stale
        # /tmp/ray/ray_current_cluster that one left): without RAY_ADDRESS the job runs locally
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(address="local", num_cpus=num_cpus)
    quiet_ray()


# report sections (caption paragraph + its table) that stay in report.md, off the console
REPORT_ONLY = ("Test AUC by conspicuity band", "Side by side with the paper", "Paper note",
               "Learning curve", "Validation-chosen t", "![")
REPORT_HEAD = ("# boneaug report", "Run: ")  # the job prints the report's path itself


def console_summary(markdown: str) -> str:
    """The report's result tables for the console, without blank lines between them:
    `REPORT_ONLY` sections are left out."""
    kept, skipping = [], False
    for block in markdown.strip().split("\n\n"):
        if block.startswith(REPORT_ONLY):
            skipping = True
        elif block.startswith(REPORT_HEAD):
            continue
        elif not (skipping and block.startswith("|")):
            skipping = False
            kept.append(block)
    return "\n".join(kept)


def augment_job(body_part: str, argv: list[str] | None = None) -> None:
    """`jobs/augment_<body_part>.py`: the whole chain for one body part, then the report table."""
    import time

    from boneaug.workflow import ARMS, Plan, run_body_part

    parser = job_parser(f"The augmentation chain for {body_part} (Gupta et al. 2019).",
                        body_part=False)
    parser.add_argument("--thresholds", default=None, help=THRESHOLDS_HELP)
    parser.add_argument("--arms", default="unit",
                        help="comma-separated augmentation arms beside the baseline: unit (the "
                             "method), copy_paste (real lesion patches), oracle (the phantom's "
                             "own lesions; synthetic cohorts only). Default: unit")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated training seeds, e.g. 0,1,2 (default: the config's)")
    args = parser.parse_args(argv)
    args.body_part = body_part
    config, data, _ = setup(args)
    synthesize = args.data is None or args.synthetic
    start = time.perf_counter()
    from boneaug import tracking

    tracking.configure(config.tracking)
    init_ray()
    thresholds = parse_thresholds(args.thresholds)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    result = run_body_part(config, body_part,  # type: ignore[arg-type]
                           data_uri=data, out_uri=absolute(args.out or data), run_id=args.run_id,
                           synthesize=synthesize,
                           plan=Plan(variants=tuple(ARMS[a] for a in args.arms.split(",")),
                                     thresholds=thresholds, seeds=parse_seeds(args.seeds) or None))
    print("\n" + console_summary(result.markdown))
    print(f"report:  {result.report_uri}/report.md (ROC figure, conspicuity bands, the paper's "
          "numbers beside ours)")
    for key, png in result.figures.items():
        print(f"figure:  {png} (original, translated, blended: {key})")
    for role, uri in result.models.items():
        print(f"model:   {role:10s} {uri}")
    print(f"mlflow:  {tracking.tracking_uri(config.tracking)}")
    print(f"done in {time.perf_counter() - start:.0f} s")
