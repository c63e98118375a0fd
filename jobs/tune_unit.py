"""Ray Tune over UNIT's loss weights lambda0..lambda4 and learning rate (paper 3.1, SPEC 3), with
ASHA.

    python jobs/tune_unit.py --body-part humerus [--profile local] [--data URI] [--out URI] \
        [--samples 8] [--factor 10] [--lr-factor 10] [--search optuna|random] [--grace 250]

Each weight is drawn log-uniformly in [default / factor, default * factor] (defaults 10, 0.1, 100,
0.1, 100, lr 1e-4); OptunaSearch (TPE) when optuna is installed, seeded random search otherwise.
Every trial trains UNIT on the run's patch sets (made first when missing); the objective is the
translator quality signal (see boneaug/tune/__init__.py), ASHA stops weak trials. Writes
<run>/tune/unit-<id>/best.yaml. Re-running the same command resumes an interrupted sweep.
"""

from boneaug import tracking
from boneaug.runtime import init_ray, job_parser, setup
from boneaug.tune import (
    SweepSettings,
    add_sweep_arguments,
    prepare_patches,
    run_and_print,
    unit_space,
)


def main(argv: list[str] | None = None) -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--samples", type=int, default=8, help="trials (default 8)")
    parser.add_argument("--factor", type=float, default=10.0,
                        help="lambda range: default / f .. default * f")
    parser.add_argument("--lr-factor", type=float, default=10.0, help="lr range: lr / f .. lr * f")
    parser.add_argument("--search", choices=("optuna", "random"), default="optuna")
    parser.add_argument("--grace", type=int, default=None,
                        help="UNIT iterations before ASHA may stop a trial")
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    config, data, run = setup(args)
    tracking.configure(config.tracking)
    init_ray()
    inputs = prepare_patches(config, args.body_part, data_uri=data, run_uri=run,
                             synthesize=args.data is None or args.synthetic)
    settings = SweepSettings(kind="unit", body_part=args.body_part,
                             space=unit_space(config.unit, factor=args.factor,
                                              lr_factor=args.lr_factor),
                             num_samples=args.samples, search=args.search, scheduler="asha",
                             asha_grace=args.grace, max_concurrent=args.max_concurrent,
                             max_failures=args.max_failures, seed=args.seed)
    run_and_print(config, settings, data_uri=data, run_uri=run, inputs=inputs)


if __name__ == "__main__":
    main()
