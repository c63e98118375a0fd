"""Ray Tune grid over the pseudo-label threshold t (paper 3.4, SPEC 5), chosen on validation AUC.

    python jobs/tune_threshold.py --body-part humerus [--profile local] [--data URI] [--out URI] \
        [--grid 0.7,0.85,0.9,0.95]
    ray job submit --working-dir . -- python jobs/tune_threshold.py --body-part humerus
        --profile paper --data s3://...

Reuses (or first runs, as the augment jobs do) the workflow stages of the body part's run: cohort,
ingestion, fracture pre-training, baseline DRN, UNIT, and the blended, scored candidates (made
once). Each trial selects the candidates at its t and trains an augmented DRN. Prints the table
(t, augmented samples, val AUC, test AUC for the record) and the chosen t; writes
<run>/tune/threshold-<id>/best.yaml. Re-running the same command resumes an interrupted sweep.
"""

from boneaug import tracking
from boneaug.config import PAPER_THRESHOLDS
from boneaug.runtime import absolute, init_ray, job_parser, setup
from boneaug.tune import (
    SweepSettings,
    add_sweep_arguments,
    prepare_threshold,
    run_and_print,
    threshold_space,
)


def main(argv: list[str] | None = None) -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--grid", default=None,
                        help="comma-separated t values (default: the paper's, 0.70,0.85,0.90,0.95)")
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    config, data, run = setup(args)
    tracking.configure(config.tracking)
    init_ray()
    grid = [float(t) for t in args.grid.split(",")] if args.grid else list(PAPER_THRESHOLDS)
    inputs = prepare_threshold(config, args.body_part, data_uri=data,
                               out_uri=absolute(args.out or data),
                               run_uri=run, synthesize=args.data is None or args.synthetic)
    settings = SweepSettings(kind="threshold", body_part=args.body_part,
                             space=threshold_space(grid),
                             search="grid", max_concurrent=args.max_concurrent,
                             max_failures=args.max_failures, seed=args.seed)
    run_and_print(config, settings, data_uri=data, run_uri=run, inputs=inputs,
                  **{"baseline val AUC": f"{inputs['baseline_val_auc']:.3f}",
                     "candidates": inputs["candidates"]})


if __name__ == "__main__":
    main()
