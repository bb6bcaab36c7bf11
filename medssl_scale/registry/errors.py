"""The registry's error types (their own module, so every registry module can raise them without import cycles)."""

from __future__ import annotations


class EncoderLoadError(ValueError):
    """An encoder that cannot be loaded as published: the message names the artifact and what is wrong."""


class RegistryFormatError(EncoderLoadError):
    """A registry file (``encoder.json``, ``sha256.json``, the weights' header) that is malformed: the message names the file."""
