"""Readers of medical image formats, and canonical geometry.

Every reader returns a :class:`RawVolume` or raises :class:`InputError`;
see :mod:`medssl_scale.io.types`.
"""

from medssl_scale.io.types import (
    FailedInput,
    InputError,
    Limits,
    RawVolume,
    SkippedInput,
)

__all__ = ["FailedInput", "InputError", "Limits", "RawVolume", "SkippedInput"]
