"""Reading a small file someone else wrote (a config, a registry JSON, a label list) without trusting its size or kind.

One rule for every such file: it must be a regular file (a FIFO would block,
``/dev/zero`` never ends), and at most ``cap + 1`` bytes are ever read, so a
file that grew past its cap, or lies about its size, is refused with its name
and the cap instead of filling memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class FileTooLarge(ValueError):
    """A file over the size its reader allows: the message names the file and the cap."""


class NotARegularFile(ValueError):
    """A path that is a FIFO, device, socket or directory where a file was expected."""


def read_bounded(path: str | os.PathLike[str], cap: int, what: str) -> bytes:
    """The bytes of the regular file ``path`` (``what`` says what it is, for errors), at most ``cap`` of them.

    Raises :class:`FileTooLarge` past ``cap``, :class:`NotARegularFile` for
    anything but a regular file (checked on the opened descriptor, so a link
    swapped after a check cannot point it at a device), OSError when it cannot
    be opened.
    """
    path = Path(path)
    # O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging; it is refused just below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{path}: {what} is not a regular file; refusing to read it")
        if st.st_size > cap:
            raise FileTooLarge(f"{path}: larger than {cap:,} bytes, the most {what} may have ({st.st_size:,} bytes); refusing to read it")
        os.set_blocking(fd, True)
        chunks, left = [], cap + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > cap:  # it grew after the stat, or its size was not what fstat said
        raise FileTooLarge(f"{path}: larger than {cap:,} bytes, the most {what} may have; refusing to read it")
    return data
