"""boneaug.synth: the synthetic long-bone radiograph cohort (SPEC 1.2).

    spec.py        what an image shows (patient, lesion, confounders, fracture, view, exposure)
                   and how it is sampled: sample_spec / sample_patient / sample_image
    anatomy.py     3D humerus, tibia + fibula, femur (+ neighbours, soft tissue) as primitives
    raster.py      analytic chord lengths of projected primitives on a pixel grid
    lesions.py     lesions as changes of the bone's path lengths; confounders.py: metal
    render.py      Beer-Lambert, scatter, quantum noise, blur, log, 12 bits: render_image
    dicom_out.py   the DICOM encoder for these images
    cohort.py      patients, splits, parallel generation, annotations: generate_cohort
    preview.py     contact sheet PNG: contact_sheet
"""

from boneaug.synth.cohort import CohortSummary, generate_cohort
from boneaug.synth.preview import contact_sheet
from boneaug.synth.render import RenderedImage, render_image
from boneaug.synth.spec import ImageSpec, PatientSpec, sample_image, sample_patient, sample_spec

__all__ = [
    "CohortSummary",
    "ImageSpec",
    "PatientSpec",
    "RenderedImage",
    "contact_sheet",
    "generate_cohort",
    "render_image",
    "sample_image",
    "sample_patient",
    "sample_spec",
]
