"""boneaug.eval."""
