"""Train the UNIT translator of one body part on its patch sets and register it (paper 3.1).

    python jobs/train_unit.py --body-part humerus [--workers 2] [--profile local] [--data URI]
    ray job submit --working-dir . -- python jobs/train_unit.py --body-part humerus --workers 2

Makes the cohort (synthetic when --data is not given), the image shards and the patch sets first
when they are missing. Registers `boneaug-unit-<body_part>` with alias `challenger`.
"""

from boneaug.runtime import body_part_job, job_parser
from boneaug.workflow import unit_model


def main() -> None:
    parser = job_parser(__doc__, workers=True)
    args = parser.parse_args()
    config, data, run = body_part_job(args, fractures=False)
    print(f"registered: {unit_model(config, data, run, args.body_part)} (alias challenger)")


if __name__ == "__main__":
    main()
