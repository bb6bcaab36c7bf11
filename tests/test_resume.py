"""kill -9 at any moment, then --resume: the result equals an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import pytest
from sample_data import assert_same_dataset, dicom_series, phantom_collection, run_cli

from medssl_scale.inspect import check_dataset
from medssl_scale.store.layout import DatasetDir

pytestmark = pytest.mark.slow

ARGS = ["--no-progress", "--shard-size", "120000", "--chunk", "16", "--shard-shape", "32"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "coll"
    phantom_collection(root / "nifti", n_ct=8, n_mr=4, shape=(40, 36, 24))
    dicom_series(root / "dicom", n=2)
    return root


@pytest.fixture(scope="module")
def reference(collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    run_cli("ingest", str(collection), "--out", str(out), "--workers", "2", *ARGS)
    return out


def _start(collection, out, *extra):
    cmd = [sys.executable, "-m", "medssl_scale.cli", "ingest", str(collection), "--out", str(out), "--workers", "2", *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc, ready, timeout=60.0):
    """SIGKILL the whole ingest (workers too) as soon as ``ready()`` holds; fails if it never did while the ingest ran."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, "the ingest ended before the kill point: this test resumed nothing"
        assert time.monotonic() - t0 < timeout, "the kill point never came"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest ended by itself before the kill landed"


def _lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _leftovers(ds: DatasetDir):
    left = [p for p in (ds.tmp, ds.pending, ds.lock) if p.exists()]
    left += list(ds.root.rglob("*.partial")) + list(ds.root.rglob("*.tmp"))
    return left


@pytest.mark.parametrize(
    "moment",
    ["discovery", "first-records", "mid-run", "after-first-shard"],
)
def test_kill_then_resume_equals_uninterrupted(collection, reference, tmp_path, moment):
    out = tmp_path / "ds"
    ds = DatasetDir(out)
    ready = {
        "discovery": lambda: ds.lock.exists(),
        "first-records": lambda: _lines(ds.manifest) >= 2,
        "mid-run": lambda: _lines(ds.manifest) >= 12,
        "after-first-shard": lambda: (ds.shards / "shard-000000.tar").exists(),
    }[moment]
    proc = _start(collection, out)
    _kill_when(proc, ready)  # fails unless the kill landed while the ingest ran
    # without --resume the interrupted dataset is refused with a clear message (so it had not finished)
    res = run_cli("ingest", str(collection), "--out", str(out), *ARGS, check=False)
    assert res.returncode == 2 and "--resume" in res.stderr
    run_cli("ingest", str(collection), "--out", str(out), "--workers", "2", "--resume", *ARGS)
    assert _leftovers(ds) == []
    assert check_dataset(ds) == []
    assert_same_dataset(reference, out)


def test_killed_twice_including_during_resume(collection, reference, tmp_path):
    out = tmp_path / "ds"
    ds = DatasetDir(out)
    total = _lines(DatasetDir(reference).manifest)
    _kill_when(_start(collection, out), lambda: _lines(ds.manifest) >= 6)
    n = _lines(ds.manifest)
    assert n < total
    _kill_when(_start(collection, out, "--resume"), lambda: _lines(ds.manifest) >= n + 4)
    assert _lines(ds.manifest) < total  # the second kill landed during the resume, not after it
    run_cli("ingest", str(collection), "--out", str(out), "--resume", *ARGS)
    assert _leftovers(ds) == [] and check_dataset(ds) == []
    assert_same_dataset(reference, out)


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def _pool_processes(ingest_pid):
    """(forkserver pid, worker pids): workers are forked by the forkserver, a child of the ingest."""
    for child in _children(ingest_pid):
        if b"forkserver" in _cmdline(child):
            return child, _children(child)
    return None, []


@pytest.mark.parametrize("victim", ["worker", "forkserver"])
def test_a_killed_pool_process_does_not_lose_items(collection, reference, tmp_path, victim):
    """The OOM killer takes a worker, or the forkserver: in-flight items are retried and the run completes."""
    out = tmp_path / "ds"
    ds = DatasetDir(out)
    proc = _start(collection, out)
    t0 = time.monotonic()
    target = None
    while target is None and time.monotonic() - t0 < 60 and proc.poll() is None:
        if _lines(ds.manifest) >= 3:
            server, workers = _pool_processes(proc.pid)
            target = server if victim == "forkserver" else (workers[0] if workers else None)
        time.sleep(0.002)
    assert target is not None, f"no {victim} process found"
    done = _lines(ds.manifest)
    os.kill(target, signal.SIGKILL)
    assert done < _lines(DatasetDir(reference).manifest)  # the ingest still had items to do when its process went
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert check_dataset(ds) == []
    assert_same_dataset(reference, out)


def test_workers_do_not_outlive_a_killed_ingest(collection, tmp_path):
    """kill -9 of the ingest alone (not its process group): its workers must stop, not write on."""
    out = tmp_path / "ds"
    ds = DatasetDir(out)
    proc = _start(collection, out)
    t0 = time.monotonic()
    workers = []
    while not workers and time.monotonic() - t0 < 60 and proc.poll() is None:
        if _lines(ds.manifest) >= 2:
            _, workers = _pool_processes(proc.pid)
        time.sleep(0.002)
    assert workers, "no worker processes found"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed while it ran, not reaped after it finished
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{w}") and b"" != _cmdline(w) for w in workers):
        time.sleep(0.05)
    alive = [w for w in workers if _cmdline(w)]
    for w in alive:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert alive == []


@pytest.mark.parametrize("left", ["empty", "empty-and-its-draft"])
def test_a_lock_file_left_empty_means_interrupted(tmp_path, left):
    """A writer killed right after its lock file appeared (before any note): a plain rerun still asks for --resume."""
    src = phantom_collection(tmp_path / "src", n_ct=1, n_mr=0, shape=(16, 16, 8))
    ds = DatasetDir(tmp_path / "ds")
    ds.root.mkdir()
    ds.lock.write_bytes(b"")
    if left == "empty-and-its-draft":  # killed between linking the lock file and removing its draft name
        os.link(ds.lock, ds.root / f".{ds.lock.name}.abc123.tmp")
    res = run_cli("ingest", str(src), "--out", str(ds.root), "--no-progress", check=False)
    assert res.returncode == 2 and "--resume" in res.stderr
    run_cli("ingest", str(src), "--out", str(ds.root), "--no-progress", "--resume")
    assert _leftovers(ds) == [] and check_dataset(ds) == []


def test_a_live_writer_lock_is_never_taken_over(tmp_path):
    from medssl_scale.store.layout import LockedError, WriterLock

    path = tmp_path / ".ingest-running"
    first = WriterLock(path).acquire()
    assert not first.interrupted and path.read_bytes().strip()
    with pytest.raises(LockedError, match="another ingest"):
        WriterLock(path).acquire()
    first.release(finished=True)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    again = WriterLock(path).acquire()
    assert not again.interrupted
    again.release(finished=False)
    assert WriterLock(path).acquire().interrupted


def test_the_lock_works_the_same_where_the_filesystem_has_no_hard_links(tmp_path):
    # No filesystem without link(2) can be mounted here, so the in-place path is asked for by its parameter;
    # on vfat, FUSE or SMB mounts link(2)'s EPERM/ENOSYS/EOPNOTSUPP switch to it by themselves.
    from medssl_scale.store.layout import LockedError, WriterLock

    path = tmp_path / ".ingest-running"
    first = WriterLock(path, hard_links=False).acquire()
    assert not first.interrupted and b"pid" in path.read_bytes()
    for other in (WriterLock(path, hard_links=False), WriterLock(path)):
        with pytest.raises(LockedError, match="another ingest"):
            other.acquire()
    first.release(finished=True)
    assert list(tmp_path.iterdir()) == []
    held = WriterLock(path, hard_links=False).acquire()
    held.release(finished=False)
    path.write_bytes(b"")  # what a writer killed between creating and noting the file leaves
    again = WriterLock(path, hard_links=False).acquire()
    assert again.interrupted and b"pid" in path.read_bytes()
    again.release(finished=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("errno_name", ["EPERM", "ENOSYS", "EOPNOTSUPP"])
def test_a_filesystem_refusing_hard_links_switches_the_lock_to_in_place(tmp_path, monkeypatch, errno_name):
    """link(2) failing as vfat, FUSE or SMB fail it: the lock is made in place, without a draft left behind."""
    import errno

    from medssl_scale.store.layout import LockedError, WriterLock

    def no_links(src, dst, *a, **kw):
        raise OSError(getattr(errno, errno_name), "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / ".ingest-running"
    lock = WriterLock(path)
    held = lock.acquire()
    assert lock.hard_links is False and b"pid" in path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [".ingest-running"]  # the draft is gone
    with pytest.raises(LockedError, match="another ingest"):
        WriterLock(path).acquire()
    held.release(finished=True)
    assert list(tmp_path.iterdir()) == []


def test_things_named_like_a_lock_draft_do_not_stop_the_writer(tmp_path):
    from medssl_scale.store.layout import WriterLock

    path = tmp_path / ".ingest-running"
    assert path.name.startswith(".")  # so a draft's name begins with two dots
    (tmp_path / "..ingest-running.folder.tmp").mkdir()  # cannot be opened for writing, nor unlinked
    (tmp_path / "..ingest-running.link.tmp").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_bytes(b"keep")
    lock = WriterLock(path).acquire()
    lock.release(finished=True)
    assert (tmp_path / "outside").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["..ingest-running.folder.tmp", "..ingest-running.link.tmp", "outside"]
