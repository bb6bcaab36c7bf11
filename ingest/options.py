"""Ingest settings checked as a whole before the dataset directory is touched.

Some of them are pinned into ``ingest.json`` and decide what every later run
on the dataset must use, so a bad value (a chunk of 0, a NaN spacing, a regex
that does not compile) must be refused up front, not discovered halfway
through a run or, worse, written down for good.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingest.runner import IngestConfig

MAX_WORKERS = 1024
MAX_CHUNK = 1024  # voxels per chunk edge: 1024^3 int16 is already 2 GiB decoded
MAX_PATTERN = 1000  # characters of --subject-pattern
MAX_PARTS = 99_999  # part folders are named with five digits
CODECS = ("lz4", "zstd")
SHARD_CODECS = ("npy", "npy.gz")


class OptionError(ValueError):
    """An ingest setting that cannot be used; the message names the option and the rule."""


def check(cfg: IngestConfig) -> None:
    """Raise :class:`OptionError` naming the first bad setting of ``cfg``."""
    _int("--workers", cfg.workers, 1, MAX_WORKERS)
    _int("--max-voxels", cfg.max_voxels, 1)
    if cfg.max_memory is not None:
        _int("--max-worker-memory", cfg.max_memory, 1)
    _int("--chunk", cfg.chunk, 1, MAX_CHUNK)
    _int("--shard-shape", cfg.shard, 0)
    if cfg.shard and cfg.shard % cfg.chunk:
        raise OptionError(f"--shard-shape {cfg.shard} must be 0 (no sharding) or a multiple of --chunk {cfg.chunk}")
    _int("--shard-size", cfg.shard_size, 1)
    if cfg.codec not in CODECS:
        raise OptionError(f"--codec {cfg.codec!r}: choose one of {', '.join(CODECS)}")
    if cfg.shard_codec not in SHARD_CODECS:
        raise OptionError(f"--shard-codec {cfg.shard_codec!r}: choose one of {', '.join(SHARD_CODECS)}")
    if cfg.spacing is not None:
        spacing(cfg.spacing)
    if cfg.subject_pattern is not None:
        subject_pattern(cfg.subject_pattern)
    if cfg.partition is not None:
        partition(*cfg.partition)


def spacing(values: tuple[float, ...]) -> tuple[float, float, float]:
    """Three finite spacings in mm, each > 0."""
    if len(values) != 3 or not all(_number(v) and math.isfinite(v) and v > 0 for v in values):
        raise OptionError(f"--spacing {','.join(str(v) for v in values)}: give X,Y,Z in mm (or one value), "
                          "each a finite number > 0")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def subject_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled ``--subject-pattern``: it must compile and must not match an empty id."""
    if len(pattern) > MAX_PATTERN:
        raise OptionError(f"--subject-pattern: {len(pattern)} characters; at most {MAX_PATTERN}")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise OptionError(f"--subject-pattern {pattern!r} is not a regular expression: {e}") from None
    # The patient id is the first group, or the whole match when there is none; an id that can be
    # empty would give every unmatched-looking source the same (missing) patient.
    m = rx.search("")
    if m is not None and not (m.group(1) if rx.groups else m.group(0)):
        raise OptionError(f"--subject-pattern {pattern!r} matches an empty string: the patient id "
                          f"({'its first group' if rx.groups else 'the match'}) must be at least one character")
    return rx


def partition(i: int, n: int) -> tuple[int, int]:
    if not (1 <= n <= MAX_PARTS and 0 <= i < n):
        raise OptionError(f"--partition {i}/{n}: N must be in [1, {MAX_PARTS}] and I in [0, N)")
    return i, n


def _int(option: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise OptionError(f"{option} {value!r}: must be a whole number {bounds}")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
