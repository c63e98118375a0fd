"""boneaug.train."""
