"""boneaug.models."""
