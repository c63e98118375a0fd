"""One base error for the library, and one subclass per kind of failure.

Messages say what was wrong, where (file, URI, field) and how to fix it.
"""

from __future__ import annotations


class BoneaugError(Exception):
    """Base class of every error boneaug raises on purpose."""


class ConfigError(BoneaugError):
    """A configuration file or value is invalid."""


class StorageError(BoneaugError):
    """A storage URI cannot be opened, read or written."""


class DicomError(BoneaugError):
    """A DICOM object cannot be decoded into an X-ray image.

    `reason` is a short machine-readable code (e.g. ``"not_dicom"``, ``"colour"``);
    the message is for people.
    """

    def __init__(self, reason: str, message: str, *, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{message}")


class DataError(BoneaugError):
    """Input data (annotations, image shards, patch sets) breaks an expected invariant."""


class ModelError(BoneaugError):
    """A model cannot be built, loaded or found in the registry."""


class SweepIncomplete(BoneaugError):
    """Some trials of a Tune sweep did not finish; running the same command again resumes them."""
