"""Ingest a body part's DICOMs into classification-size image shards (+ rejects table).

    python jobs/ingest.py --body-part tibia --data s3://bucket/cohort [--profile local]
    ray job submit --working-dir . -- python jobs/ingest.py --body-part tibia --data s3://...
"""

from boneaug.data.ingest import ingest
from boneaug.runtime import init_ray, job_parser, setup


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--dicom-prefix", default=None, help="default <data>/dicom/<body-part>")
    args = parser.parse_args()
    config, data, run = setup(args)
    init_ray()
    summary = ingest(data_uri=data, run_uri=run, image=config.image,
                     descriptor_rows=config.patches.descriptor_size,
                     dicom_prefix=args.dicom_prefix, body_part=args.body_part)
    print(summary)


if __name__ == "__main__":
    main()
