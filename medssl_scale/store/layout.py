"""The dataset directory: one place that knows where everything lives."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

# 2: every Zarr array carries checksums (crc32c per chunk, sha256 per stored file); 3: and the sha256 of its metadata
FORMAT_VERSION = 3

# What ingest names a volume: "v" + 19 hex digits of its content hash. Ids read back from a
# dataset (manifest, shard index, Zarr group) must match before they become paths.
VOLUME_ID = re.compile(r"v[0-9a-f]{19}")


def check_volume_id(value: object, where: str) -> str:
    """``value`` if it is a volume id ingest could have written; ValueError naming ``where`` otherwise."""
    if not isinstance(value, str) or not VOLUME_ID.fullmatch(value):
        raise ValueError(f"{where}: {value!r} is not a volume id (v + 19 hex digits)")
    return value


# A sha256 digest as the store records it (chunk files, shards, registry weights): 64 lowercase hex digits.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class UnsafeFileError(OSError):
    """A dataset file that is a link or not a regular file (a FIFO would block a reader forever)."""


def open_dataset_file(path: Path, below: Path | None = None) -> int:
    """A read-only descriptor of the regular file ``path``, never through a link, never blocking on a FIFO.

    ``below``: a folder above ``path``; every component between them is opened without following
    links too (the store writes no links inside a dataset, so any there was planted).
    FileNotFoundError passes through; a link or a special file is :class:`UnsafeFileError` naming ``path``.
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    parts = path.relative_to(below).parts if below is not None else (str(path),)
    dir_fd = os.open(below, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if below is not None else None
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeFileError(f"{path}: {part!r} on its way is a link or not a folder (refused)") from None
                raise
            os.close(dir_fd)  # type: ignore[arg-type]
            dir_fd = nxt
        try:
            fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFileError(f"{path}: a symlink (a dataset holds none; refused)") from None
            raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFileError(f"{path}: not a regular file ({'a FIFO' if stat.S_ISFIFO(mode) else 'a folder or device'}; refused)")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def read_dataset_file(path: Path, limit: int, below: Path | None = None) -> bytes:
    """The bytes of a dataset file opened by :func:`open_dataset_file`; ValueError if it holds more than ``limit``."""
    fd = open_dataset_file(path, below)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    return data


# What ShardWriter names a shard. Names read from shards/index.json end up in paths and in
# `pipe:` shell commands, so nothing else is accepted.
SHARD_NAME = re.compile(r"shard-[0-9]{6,12}\.tar")


def check_shard_name(value: object, where: str) -> str:
    """``value`` if it is a shard name the store could have written; ValueError naming ``where`` otherwise."""
    if not isinstance(value, str) or not SHARD_NAME.fullmatch(value):
        raise ValueError(f"{where}: {value!r} is not a shard name (shard-NNNNNN.tar)")
    return value


@dataclasses.dataclass(frozen=True)
class DatasetDir:
    """Paths of a dataset directory (the contract in docs/dataset.md)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes.zarr"

    @property
    def labels(self) -> Path:
        return self.root / "labels.zarr"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def shard_index(self) -> Path:
        return self.shards / "index.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tmp(self) -> Path:
        """Scratch space on the same filesystem, so finished work is renamed, not copied."""
        return self.root / ".tmp"

    @property
    def pending(self) -> Path:
        """Finished shard samples waiting for their shard (survive a crash)."""
        return self.root / ".pending"

    @property
    def lock(self) -> Path:
        """Present while an ingest runs; left behind by a killed one."""
        return self.root / ".ingest-running"

    @property
    def settings(self) -> Path:
        """How the dataset was ingested (secret fingerprint, spacing, layout): later runs must agree."""
        return self.root / "ingest.json"

    @property
    def parts(self) -> Path:
        """The parts of a partitioned ingest, each a dataset directory, until finalize merges them."""
        return self.root / "parts"

    @property
    def finalize_plan(self) -> Path:
        """Present while a finalize merges parts into this dataset (a killed one is finished by running it again)."""
        return self.root / ".finalize-plan.json"

    @property
    def part_order(self) -> Path:
        """In a part: the order a single ingest would meet its inputs in, and each image's label map (finalize reads it)."""
        return self.root / "part-order.json"

    def is_dataset(self) -> bool:
        return any(p.exists() for p in (self.manifest, self.settings, self.lock))


class LockedError(RuntimeError):
    pass


# What link(2) answers on filesystems without hard links (vfat/exFAT, FUSE mounts, some SMB shares).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK})


class WriterLock:
    """One writer per dataset: an flock held for the run, on a file that outlives a killed run.

    ``interrupted`` tells whether the previous writer died without finishing:
    the file was there before this writer, unlocked, whatever its content. A
    new lock file appears only already locked and holding its owner's note
    (made under a temporary name, locked, then hard-linked into place), so a
    writer killed at any moment leaves a file a later run reads as
    interrupted, and a live writer's file is never seen unlocked.

    ``hard_links=False`` makes the lock file in place with ``O_CREAT|O_EXCL``
    instead; that is also what happens, by itself, on a filesystem that
    refuses link(2) (vfat/exFAT, FUSE object-store mounts, some SMB shares).
    There a rival may open the new file in the instant before it is locked and
    noted: it finds it empty and unlocked, so reads it as interrupted and takes
    it, and we step back as for any live writer. No run is ever let in twice.
    """

    def __init__(self, path: Path, hard_links: bool = True):
        self.path = Path(path)
        self.hard_links = hard_links
        self._fd = -1
        self.interrupted = False

    def acquire(self) -> WriterLock:
        while True:
            fd, fresh = self._create_locked()
            if fd < 0:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # its writer finished just now: try to create it again
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise LockedError(f"another ingest is writing {self.path.parent}") from None
            try:  # the file we locked may have been unlinked by a writer finishing just now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.interrupted = not fresh
        if not fresh:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._note(), 0)
        self._fd = fd
        self._remove_stale_drafts()
        return self

    def _note(self) -> bytes:
        return json.dumps({"pid": os.getpid()}).encode()

    def _drafts(self) -> list[Path]:
        return list(self.path.parent.glob(f".{self.path.name}.*.tmp"))

    def _create_locked(self) -> tuple[int, bool]:
        """(fd, True): the lock file was made by us, locked and with our note, before its name existed; (-1, False): it exists."""
        if not self.hard_links:
            return self._create_in_place()
        fd, draft = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # our own new file: nobody else can hold it
            os.pwrite(fd, self._note(), 0)
            os.link(draft, self.path)
        except FileExistsError:
            os.close(fd)
            return -1, False
        except FileNotFoundError:  # another writer took our draft for a stale one: start again
            os.close(fd)
            return -1, False
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_HARD_LINKS:
                raise
            self.hard_links = False  # this filesystem has none: every later try makes the file in place
        except BaseException:
            os.close(fd)
            raise
        finally:
            Path(draft).unlink(missing_ok=True)
        if not self.hard_links:
            return self._create_in_place()
        return fd, True

    def _create_in_place(self) -> tuple[int, bool]:
        """As _create_locked, without link(2): the name exists, empty and unlocked, for the instant before flock."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return -1, False
        try:
            os.fchmod(fd, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, self._note(), 0)
        except BlockingIOError:  # a rival opened it in that instant and holds it now
            os.close(fd)
            return -1, False
        except BaseException:
            os.close(fd)
            raise
        return fd, True

    def _remove_stale_drafts(self) -> None:
        """Drafts a killed writer left between making and linking its lock file (a live one holds its draft locked)."""
        for draft in self._drafts():
            try:  # for writing: Linux NFS emulates flock with fcntl locks, and an exclusive one needs a writable fd
                fd = os.open(draft, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # gone, or not a file we could have made (a folder, a link): not ours to remove
                continue
            try:
                if os.fstat(fd).st_ino != os.fstat(self._fd).st_ino:  # else: a second name of the file we hold
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                draft.unlink(missing_ok=True)
            except OSError:  # held by a live writer, or this filesystem will not say: leave it, it costs nothing
                pass
            finally:
                os.close(fd)

    def release(self, finished: bool) -> None:
        """``finished``: the run completed, so the marker goes; otherwise it stays for --resume."""
        if self._fd < 0:
            return
        if finished:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a sibling temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the dataset unreadable to a team
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(tmp_dir: Path, final: Path) -> bool:
    """Move a finished directory into place; False if ``final`` already exists.

    rename(2) of a directory onto an existing non-empty one fails, so two
    writers of the same content-addressed volume cannot corrupt each other:
    the loser discards its copy.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp_dir, final)
        return True
    except OSError:
        if final.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
            return False
        raise
