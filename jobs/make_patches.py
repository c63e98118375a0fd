"""Make the lesion / normal / source patch sets of one body part (paper 3.2) from an ingested run.

    python jobs/make_patches.py --body-part tibia --data URI [--out URI] [--s 1 --n 7]
        [--profile local]

Runs ingestion first when the run has no finished image shards.
"""

from boneaug import storage
from boneaug.data.ingest import ingest
from boneaug.data.patch_sets import make_patch_sets
from boneaug.runtime import init_ray, job_parser, setup


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--s", type=float, default=None,
                        help="patch side / box side (default: profile)")
    parser.add_argument("--n", type=int, default=None,
                        help="similar non-lesion images per lesion image")
    args = parser.parse_args()
    config, data, run = setup(args)
    settings = config.patches.body_parts[args.body_part]
    settings = settings.model_copy(update={k: v for k, v in {"s": args.s, "n": args.n}.items()
                                           if v is not None})
    init_ray()
    if storage.read_manifest(storage.join(run, "images")) is None:
        print(ingest(data_uri=data, run_uri=run, image=config.image,
                     descriptor_rows=config.patches.descriptor_size, body_part=args.body_part))
    summary = make_patch_sets(
        data_uri=data, run_uri=run, body_part=args.body_part, settings=settings,
        size=config.patches.size, min_mean_intensity=config.patches.min_mean_intensity,
        seed=config.patches.seed, max_source_images=config.augment.max_source_images,
    )
    print(summary)


if __name__ == "__main__":
    main()
