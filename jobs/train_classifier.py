"""Train the DRN lesion classifier of one body part (paper 4.2) and register it.

    python jobs/train_classifier.py --body-part tibia [--augmented URI --t 0.9] [--workers N]
        [--profile local]
    ray job submit --working-dir . -- python jobs/train_classifier.py --body-part tibia

Starts from the auxiliary fracture model (pre-trained first when missing). Without --augmented
it trains the baseline `boneaug-drn-<body_part>`; with the candidates URI of an augmentation run
(<run>/augmented/<variant>/candidates) it adds those scoring >= t to the training set and
registers `boneaug-drn-<body_part>-aug`. Prints the report table (AUC, bootstrap CI, OP, Sens.,
Spec.).
"""

from boneaug import storage
from boneaug.augment.pipeline import select_augmented
from boneaug.eval.report import ModelMeta, import_predictions, render_report_from_predictions
from boneaug.runtime import body_part_job, job_parser
from boneaug.workflow import (
    baseline_stage,
    drn_publish,
    fracture_model,
    stage,
    train_drn,
    training_history,
)


def main() -> None:
    parser = job_parser(__doc__, workers=True)
    parser.add_argument("--augmented", default=None, help="candidates URI of an augmentation run")
    parser.add_argument("--t", type=float, default=None,
                        help="pseudo-label threshold (default: profile's)")
    args = parser.parse_args()
    config, data, run = body_part_job(args, fractures=True)
    fracture = fracture_model(config, data, args.out or data)
    part = args.body_part
    if args.augmented:
        t = args.t if args.t is not None else config.augment.t[part]
        selected = select_augmented(args.augmented, t)
        name, key, meta = f"drn-aug-t{t:.2f}", f"aug-t{t:.2f}", dict(
            type="Augmented", t=t, augmented_samples=selected.num_rows)
        registered = f"boneaug-drn-{part}-aug"
    else:
        selected, name, key, meta = None, "drn-baseline", "baseline", dict(type="Baseline", t=None,
                                                                           augmented_samples=0)
        registered = f"boneaug-drn-{part}"
    if selected is None:  # the very stage the augment jobs use, so they reuse this model
        result = baseline_stage(config, run, part, fracture)
    else:
        result = stage(run, name, [config.drn, config.image, fracture, args.augmented, t],
                       lambda: train_drn(config, run, drn_publish(
                           run, name, f"boneaug/{part}/train_classifier", registered),
                           augmented=selected, init_from=fracture))
    report_run = storage.join(run, "classifier", name)
    import_predictions(report_run, key, ModelMeta(**meta, model_name=registered,
                                                  model_version=result["version"],
                                                  body_part=part, baseline=True,
                                                  **training_history(result)),
                       result["predictions"])
    print(render_report_from_predictions(report_run, config.eval))
    print(f"registered: {result['model']} (val AUC {result['val_auc']:.3f}); "
          f"report: {report_run}/report")


if __name__ == "__main__":
    main()
