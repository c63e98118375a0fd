"""boneaug."""
