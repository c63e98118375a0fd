"""boneaug.io."""
