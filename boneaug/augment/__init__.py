"""boneaug.augment."""
