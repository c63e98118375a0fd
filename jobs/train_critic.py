"""Train the phantom lesion critic of one body part (an instrument, SPEC 9) and register it.

    python jobs/train_critic.py --body-part humerus [--profile local] [--translator URI ...]

Synthetic cohorts only: the critic learns from patches the phantom renders twice, with and
without a lesion, on patients the cohort does not hold. It is validated on the cohort's real
lesion and normal patch sets, under blur, noise, brightness and contrast changes, and on the
translations of each --translator given (e.g. models:/boneaug-unit-humerus@champion), then
registered as `boneaug-critic-<body_part>` (alias champion). Nothing in the method trains on it
or selects by it. Once it is registered, jobs/train_unit.py (and every chain that trains UNIT)
logs its lesion-call rates on the translations as it trains, beside its own signals.
"""

from boneaug.runtime import body_part_job, job_parser
from boneaug.workflow import critic_stage


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--translator", action="append", default=[],
                        help="a translator URI whose translations of healthy patches the critic "
                             "is checked on (repeatable)")
    args = parser.parse_args()
    config, data, run = body_part_job(args, fractures=False)
    result = critic_stage(config, data, run, args.body_part,
                          {uri: uri for uri in args.translator} or None)
    print(f"registered: {result['model']} (real-patch AUC {result['real_auc']:.3f}, worst "
          f"lesion-call rise of a perturbation of healthy patches {result['worst_rise']:+.3f})")
    for uri, rate in result["translated_rates"].items():
        print(f"translator {uri}: {rate:.3f} of healthy patches called lesion after translation "
              f"(untouched {result['healthy_rate']:.3f})")


if __name__ == "__main__":
    main()
