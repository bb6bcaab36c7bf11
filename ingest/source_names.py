"""How file and folder names are recorded: valid text, one line, lossless.

Names on disk are bytes. Latin-1 exports hold bytes that are not UTF-8
(Python hands them over as surrogate escapes, which JSON, logs and hashes
cannot carry), and a name may hold a newline that would forge a log line.
Recorded names use one defined escape, so a name always round-trips to its
exact bytes (:func:`name_bytes`):

- ``\\\\`` for a backslash;
- ``\\xHH`` for a byte that is not part of valid UTF-8, and for the ASCII
  control characters (U+0000-U+001F, U+007F: newline is ``\\x0a``);
- ``\\uHHHH`` for the other characters that break or reorder a line: C1
  controls (U+0080-U+009F), line and paragraph separators, bidirectional
  controls.

Every other character is recorded as it is, so ordinary names are unchanged.
"""

from __future__ import annotations

import os
import re

_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _escape_char(c: str) -> str:
    o = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogate escape of a raw byte
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02x}"
    if 0x80 <= o <= 0x9F or o in (0x2028, 0x2029) or o in _BIDI or 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return c


_NEEDS_ESCAPE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def record_name(name: str | bytes) -> str:
    """A file or folder name (as ``os`` gives it, or as bytes) in the recorded form."""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    return _NEEDS_ESCAPE.sub(lambda m: _escape_char(m.group()), name)


_ESCAPE = re.compile(r"\\(?:\\|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4}))")


def name_bytes(recorded: str) -> bytes:
    """The exact bytes of a recorded name (the inverse of :func:`record_name`)."""
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(recorded):
        out += recorded[pos:m.start()].encode("utf-8")
        if m.group(1):
            out.append(int(m.group(1), 16))
        elif m.group(2):
            out += chr(int(m.group(2), 16)).encode("utf-8", "surrogatepass")
        else:
            out += b"\\"
        pos = m.end()
    out += recorded[pos:].encode("utf-8")
    return bytes(out)


def one_line(text: str) -> str:
    """Any text bound for a log line or a terminal: control characters and
    undecodable bytes escaped, so one message is always one line."""
    # Backslashes stay: names in a line are already in the recorded form, and the log need not round-trip.
    return _NEEDS_ESCAPE.sub(lambda m: m.group() if m.group() == "\\" else _escape_char(m.group()), text)
