"""De-identification: keyed pseudonyms and a last-line scrubber.

Direct identifiers never leave the readers: DICOM readers hand raw patient,
study and series ids to :class:`Pseudonymizer` only, and keep a whitelist of
technical fields as metadata. Pseudonyms are HMAC-SHA256 under a site secret,
so one patient's scans stay linkable across runs and across sites that share
the secret, while the raw id cannot be recovered or confirmed by anyone who
lacks it (a plain hash of a PatientID can be brute-forced; a keyed one not).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

SECRET_ENV = "MEDSSL_SITE_SECRET"
SECRET_FILE_ENV = "MEDSSL_SITE_SECRET_FILE"
DEFAULT_SECRET_FILE = Path("~/.config/medssl/site-secret")
MIN_SECRET_BYTES = 16


class SecretError(RuntimeError):
    pass


def load_secret(path: str | os.PathLike[str] | None = None, *, create_default: bool = True) -> tuple[bytes, str]:
    """The site secret and where it came from (for the log; never the value).

    Order: ``path`` (--secret-file), $MEDSSL_SITE_SECRET, $MEDSSL_SITE_SECRET_FILE,
    then ~/.config/medssl/site-secret, created with 32 random bytes (mode 0600)
    on first use so that a laptop run needs no set-up.
    """
    if path is not None:
        return _read_secret_file(Path(path)), f"file {path}"
    if os.environ.get(SECRET_ENV):
        return _check(os.environ[SECRET_ENV].encode(), f"${SECRET_ENV}"), f"${SECRET_ENV}"
    if os.environ.get(SECRET_FILE_ENV):
        p = Path(os.environ[SECRET_FILE_ENV])
        return _read_secret_file(p), f"file {p}"
    p = DEFAULT_SECRET_FILE.expanduser()
    if not p.exists():
        if not create_default:
            raise SecretError(f"no site secret: pass --secret-file, set ${SECRET_ENV} or create {p}")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        print(
            f"medssl: created a new site secret at {p}; pseudonyms are linkable only "
            f"across datasets ingested with the same secret: share it between sites as you would a key",
            file=sys.stderr,
        )
    return _read_secret_file(p), f"file {p}"


def _read_secret_file(p: Path) -> bytes:
    try:
        data = p.read_bytes().strip()
    except OSError as e:
        raise SecretError(f"cannot read the site secret file {p}: {e.strerror}") from e
    return _check(data, f"secret file {p}")


def _check(data: bytes, where: str) -> bytes:
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(f"the site secret in {where} is shorter than {MIN_SECRET_BYTES} bytes")
    return data


PREFIXES = {"patient": "pat", "study": "stu", "series": "ser", "path": "src"}


class Pseudonymizer:
    """Deterministic keyed pseudonyms, separated by kind (patient, study, series, path)."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def __call__(self, kind: str, value: str | None) -> str | None:
        if value is None or not str(value).strip():
            return None
        digest = hmac.new(self._secret, f"{kind}\0{str(value).strip()}".encode(), hashlib.sha256)
        return f"{PREFIXES[kind]}-{digest.hexdigest()[:20]}"

    @property
    def fingerprint(self) -> str:
        """Tells whether two datasets share a secret, without revealing it."""
        return hmac.new(self._secret, b"medssl-fingerprint", hashlib.sha256).hexdigest()[:16]

    def namer(self, hashed: bool) -> Callable[[str], str]:
        """How source names are recorded: keyed hashes under --hash-paths, else as they are."""
        return self.path if hashed else str

    def path(self, relpath: str) -> str:
        """A source path as a keyed hash, keeping a known image suffix so the format stays visible.

        Only suffixes from a fixed list survive: 'Doe.Jane' or 'MRN.123456' must not.
        """
        name = relpath.split("#", 1)[0].rsplit("/", 1)[-1].lower()
        suffix = next((ext for ext in KNOWN_SUFFIXES if name.endswith(ext)), "")
        return f"{self('path', relpath)}{suffix}"


KNOWN_SUFFIXES = (
    ".nii.gz", ".nii", ".hdr", ".img", ".img.gz", ".mgz", ".mgh", ".mnc", ".par", ".rec", ".head", ".brik", ".brik.gz",
    ".nrrd", ".nhdr", ".mha", ".mhd", ".raw", ".raw.gz", ".zraw", ".dcm", ".dicom", ".ima", ".json", ".txt",
)


def scrub(text: str, values: Iterable[str]) -> str:
    """Remove any identifying value from a text (an error message) before it is written.

    Readers build their reasons without header values; this catches what a
    library's own message might echo.
    """
    for v in sorted({str(v).strip() for v in values}, key=len, reverse=True):
        if len(v) >= 3 and v in text:
            text = text.replace(v, "[redacted]")
    return text
