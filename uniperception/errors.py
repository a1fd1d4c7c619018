"""The exception hierarchy of uniperception.

Every error the toolkit raises on purpose derives from :class:`UniperceptionError`, so callers can catch
ours without catching programming errors. The input errors also derive from the builtin they refine
(``ValueError``, ``TypeError``), so code written against plain PyTorch conventions keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "InvalidInputError",
    "ModalityMismatchError",
    "TrainingError",
    "UniperceptionError",
    "UnknownModelError",
    "UnsupportedFormatError",
]


class UniperceptionError(Exception):
    """Base class of every error raised on purpose by uniperception."""


class InvalidInputError(UniperceptionError, ValueError):
    """An input (array, tensor, file, argument) cannot be used as given; the message says how to fix it."""


class UnsupportedFormatError(InvalidInputError):
    """A file or container format that the toolkit cannot read."""


class UnknownModelError(InvalidInputError):
    """A model name (or pretrained tag) that is not in the registry."""


class CheckpointError(UniperceptionError):
    """A checkpoint cannot be read or does not match the model (missing/unexpected keys, shapes)."""


class ModalityMismatchError(UniperceptionError, TypeError):
    """A model was asked to handle a modality it was not built for."""


class TrainingError(UniperceptionError):
    """Training cannot go on (a non-finite loss, an unwritable output directory, a bad resume file)."""
