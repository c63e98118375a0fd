"""Ray Tune over patch-making (paper 3.2, SPEC 2): s in {1, 2} x n in a range, with ASHA.

    python jobs/tune_patches.py --body-part tibia [--profile local] [--data URI] [--out URI] \
        [--s 1,2] [--n-range 4:10] [--samples 3] [--grace 250]

Each trial re-makes the lesion / normal / source patch sets with its s and n under its own
prefix and trains UNIT on them; the objective is the translator quality signal (gain penalised
by fd_ratio > 1; see boneaug/tune/__init__.py), measured by a critic trained on the run's base
patch sets in every trial. ASHA stops weak trials at the quality reports (every
unit.sample_every iterations). Writes <run>/tune/patches-<id>/best.yaml. Re-running the same
command resumes an interrupted sweep.
"""

from boneaug import tracking
from boneaug.runtime import init_ray, job_parser, setup
from boneaug.tune import (
    SweepSettings,
    add_sweep_arguments,
    patches_space,
    prepare_patches,
    run_and_print,
)


def main(argv: list[str] | None = None) -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--s", default="1,2", help="comma-separated s values (default 1,2)")
    parser.add_argument("--n-range", default=None,
                        help="low:high for n, inclusive (default: profile n -3..+3)")
    parser.add_argument("--samples", type=int, default=3, help="n draws per s value (default 3)")
    parser.add_argument("--grace", type=int, default=None,
                        help="UNIT iterations before ASHA may stop a trial")
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    config, data, run = setup(args)
    tracking.configure(config.tracking)
    init_ray()
    n0 = config.patches.body_parts[args.body_part].n
    low, high = ((int(v) for v in args.n_range.split(":")) if args.n_range
                 else (max(1, n0 - 3), n0 + 3))
    inputs = prepare_patches(config, args.body_part, data_uri=data, run_uri=run,
                             synthesize=args.data is None or args.synthetic)
    settings = SweepSettings(kind="patches", body_part=args.body_part,
                             space=patches_space([float(s) for s in args.s.split(",")],
                                                 (low, high)),
                             num_samples=args.samples, search="random", scheduler="asha",
                             asha_grace=args.grace, max_concurrent=args.max_concurrent,
                             max_failures=args.max_failures, seed=args.seed)
    run_and_print(config, settings, data_uri=data, run_uri=run, inputs=inputs)


if __name__ == "__main__":
    main()
