"""Which files an input item may make a reader open.

A source tree is hostile input: a header may name a data file that is a
symlink to the site secret, an SSH key or ``/dev/zero``, and a FIFO blocks
the process that opens it. Every file a reader opens for an item (the main
file, its companions, the data files its header names) must therefore
*resolve* inside the source root the item came from and be a regular file.
The name alone proves nothing: ``scan.img`` may be a link to ``/etc/shadow``.

Checks use ``stat`` only, so a FIFO or device is refused before anything
opens it.
"""

from __future__ import annotations

import dataclasses
import os
import stat

from medssl_scale.io.types import FailedInput

# Pseudo-file systems: "regular" files there can be endless, block, or leak the host's state.
SYSTEM_DIRS = ("/dev", "/proc", "/sys")
FOLLOW_HINT = "--follow-symlinks allows links that leave the source"


def is_system_path(real: str) -> bool:
    """True for a resolved path in /dev, /proc or /sys."""
    return any(real == d or real.startswith(d + "/") for d in SYSTEM_DIRS)


def special_file_reason(st: os.stat_result) -> str | None:
    """Why a file with this (followed) stat is refused, or None for a regular file."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISFIFO(st.st_mode):
        return "a named pipe (FIFO), not a regular file: refusing to open it"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device, not a regular file: refusing to open it"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket, not a regular file: refusing to open it"
    return "not a regular file: refusing to open it"


def openable_refusal(path: str | os.PathLike[str], what: str = "the file") -> str | None:
    """Why ``path`` may not be opened by any reader, wherever it lies (a special or
    system pseudo-file, or none at all), or None for a regular file."""
    real = os.path.realpath(path)
    if is_system_path(real):
        return f"{what} resolves into /{real.split('/')[1]}: a system pseudo-file, refusing to open it"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"data file missing: {what} does not exist (or is a broken symlink)"
    except OSError as e:
        return f"{what} cannot be examined: {e.strerror or type(e).__name__}"
    reason = special_file_reason(st)
    return f"{what} is {reason}" if reason else None


def check_openable(path: str | os.PathLike[str], what: str = "the file") -> None:
    """Raise :class:`FailedInput` unless ``path`` is a regular file outside /dev, /proc and /sys."""
    reason = openable_refusal(path, what)
    if reason is not None:
        raise FailedInput(reason)


@dataclasses.dataclass(frozen=True)
class SourceRoot:
    """The folder (resolved) that an item's files must resolve into.

    ``follow_symlinks``: the user trusts links that leave it; special files
    and system pseudo-files are refused all the same.
    """

    real: str
    follow_symlinks: bool = False

    @classmethod
    def of(cls, root: str | os.PathLike[str], follow_symlinks: bool = False) -> "SourceRoot":
        """The root for a source given on the command line: the folder itself, or a file's folder.

        Links named on the command line are the user's choice: resolved first."""
        real = os.path.realpath(root)
        return cls(real if os.path.isdir(real) else os.path.dirname(real), follow_symlinks)

    def contains(self, real: str) -> bool:
        return real == self.real or real.startswith(self.real.rstrip("/") + "/")

    def refusal(self, path: str | os.PathLike[str], what: str = "the file") -> str | None:
        """Why ``path`` may not be opened for an item of this root, or None when it may."""
        reason = openable_refusal(path, what)
        if reason:
            return reason
        if not self.follow_symlinks and not self.contains(os.path.realpath(path)):
            return f"{what} resolves outside the source folder (a symlink leaving it): not followed; {FOLLOW_HINT}"
        return None

    def check(self, path: str | os.PathLike[str], what: str = "the file") -> None:
        """Raise :class:`FailedInput` unless ``path`` may be opened."""
        reason = self.refusal(path, what)
        if reason is not None:
            raise FailedInput(reason)

    def hard_link_warning(self, paths: list[str] | list[os.PathLike[str]]) -> str | None:
        """A note for the record when one of ``paths`` is a hard link owned by someone else than the root.

        A hard link to a file elsewhere on the host looks like any file inside
        the folder (containment cannot see it); one owned by another user than
        the source folder's owner is worth a look."""
        try:
            owner = os.stat(self.real).st_uid
        except OSError:
            return None
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and st.st_uid != owner:
                return (f"a file of this item has {st.st_nlink} hard links and another owner (uid {st.st_uid}) than "
                        f"the source folder (uid {owner}): it may be a file from elsewhere on this host")
        return None


def header_root(path: str | os.PathLike[str]) -> SourceRoot:
    """The strictest root for a reader called without one: the (resolved) header's own folder."""
    return SourceRoot(os.path.dirname(os.path.realpath(path)))
