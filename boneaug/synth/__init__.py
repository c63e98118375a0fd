"""boneaug.synth."""
