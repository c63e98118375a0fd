"""boneaug.data."""
