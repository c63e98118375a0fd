"""The whole augmentation chain for the femur (paper 3-4): data, patches, UNIT, DRNs, t, report.

    python jobs/augment_femur.py [--profile local|paper] [--data URI] [--out URI]
    ray job submit --working-dir . -- python jobs/augment_femur.py --profile paper --data s3://...

Without --data it runs on the synthetic cohort (written once under the config's storage root).
Stages already done for the same inputs and config are reused.
"""

from boneaug.runtime import augment_job

if __name__ == "__main__":
    augment_job("femur")
