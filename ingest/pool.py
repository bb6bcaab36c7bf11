"""Where items are processed: in-process as a two-stage pipeline (one worker),
or in worker processes that a crashing decoder cannot take down with it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import contextlib
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver
from typing import Any, TypeVar

from ingest.discover import Item
from ingest.pipeline import Options, Result, commit, crashed, prepare, process_item
from medssl_scale.io import FailedInput, InputError, dicom

T = TypeVar("T")

# What a dead pool looks like from here: a dead worker breaks the pool; a dead
# forkserver makes the next spawn fail to connect (or read its reply).
POOL_DOWN = (BrokenProcessPool, ConnectionError, EOFError)

_OPTS: Options | None = None


def _init_worker(opts: Options, parent: int) -> None:
    global _OPTS
    _OPTS = opts
    _die_with(parent)
    if opts.limits.max_memory is not None:
        _cap_memory(opts.limits.max_memory)


def _cap_memory(nbytes: int) -> int:
    """Cap this process's heap at ``nbytes``; returns the soft limit it had.

    RLIMIT_DATA (Linux >= 4.7) counts the heap and every private writable
    mapping (numpy's large arrays), but not the mapped libraries that make
    RLIMIT_AS useless next to numpy and SciPy. An allocation past it fails
    with a MemoryError, which the item's record reports as "not enough
    memory"; the process lives on. Only the soft limit is lowered, so it can
    be restored.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    want = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (want, hard))
    return soft


@contextlib.contextmanager
def memory_cap(nbytes: int | None) -> Iterator[None]:
    """:func:`_cap_memory` for the duration of a block (the in-process worker of ``--workers 1``)."""
    if nbytes is None:
        yield
        return
    soft = _cap_memory(nbytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def _die_with(parent: int) -> None:
    """Workers end within a fraction of a second of the ingest process, even a SIGKILLed one.

    Without this, workers of a killed ingest (children of the forkserver, not
    of the ingest) would go on writing while a resumed run cleans up.
    """

    def watch() -> None:
        while True:
            time.sleep(0.2)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="medssl-parent-watch").start()


def _work(item: Item) -> Result:
    assert _OPTS is not None
    return process_item(item, _OPTS)


def scan_header(path: str) -> Any:
    """A DICOM header, or the InputError that says why not: nothing raised for a bad file."""
    try:
        return dicom.scan_header(path)
    except InputError as e:
        return e
    except Exception as e:  # pydicom converts some values lazily; a damaged one raises late
        return FailedInput(f"not readable as DICOM: malformed header ({type(e).__name__})")


def _scan_crashed(path: str) -> Any:
    return FailedInput("not readable as DICOM: the header reader process died on this file")


class Pool:
    """``workers`` == 1: in-process, pipelined. More: a forkserver process pool.

    A decoder that segfaults or a volume that exhausts memory kills its worker
    and breaks the pool. The items that were in flight are then retried one
    at a time in a fresh pool; the one that breaks it again is recorded as
    failed, and the run goes on. (In-process, a segfault ends the run: use
    ``--workers 2`` or more where decoders are suspect.)
    """

    def __init__(self, workers: int, opts: Options):
        self.workers = max(1, int(workers))
        self.opts = opts
        self._ex: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)

    def _executor(self, workers: int) -> cf.ProcessPoolExecutor:
        # forkserver: workers fork from a clean server that imported the readers once
        # (spawn re-imports everything per worker; plain fork is unsafe next to our threads).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["ingest.pool"])
        forkserver.ensure_running()  # restarts a server that was killed (the OOM killer picks big processes)
        return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(self.opts, os.getpid()))

    def scan(self, paths: list[str]) -> Iterator[tuple[str, Any]]:
        """(path, DicomFileHeader or InputError) for every path, in order of completion."""
        if self.workers == 1:
            for p in paths:
                yield p, scan_header(p)
        else:
            yield from self._map(scan_header, paths, _scan_crashed)

    def run(self, items: list[Item], handle: Callable[[Result], None]) -> None:
        """Process ``items``; ``handle`` sees each result, from one thread at a time."""
        if self.workers == 1:
            with memory_cap(self.opts.limits.max_memory):
                _pipelined(items, self.opts, handle)
        else:
            for _, res in self._map(_work, items, lambda it: crashed(it, self.opts)):
                handle(res)

    def _map(self, fn: Callable[[T], Any], items: list[T], on_crash: Callable[[T], Any]) -> Iterator[tuple[T, Any]]:
        queue = list(reversed(items))
        while queue:
            if self._ex is None:
                self._ex = self._executor(self.workers)
            inflight: dict[cf.Future, T] = {}
            try:
                while queue or inflight:
                    while queue and len(inflight) < 2 * self.workers:
                        fut = self._ex.submit(fn, queue[-1])  # raises on a broken pool: pop only once submitted
                        inflight[fut] = queue.pop()
                    done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        res = fut.result()  # raises BrokenProcessPool if a worker died; the item stays in flight
                        yield inflight.pop(fut), res
            except POOL_DOWN:
                self._ex.shutdown(cancel_futures=True)
                self._ex = None
                time.sleep(0.1)  # let a killed forkserver become reapable, so ensure_running() restarts it
                suspects = []
                for fut, it in inflight.items():
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        yield it, fut.result()
                    else:
                        suspects.append(it)
                for it in suspects:
                    yield it, self._isolated(fn, it, on_crash)

    def _isolated(self, fn: Callable[[T], Any], item: T, on_crash: Callable[[T], Any]) -> Any:
        for _ in range(3):
            ex = self._executor(1)
            try:
                return ex.submit(fn, item).result()
            except BrokenProcessPool:
                return on_crash(item)  # it killed its own worker: the item is the culprit
            except POOL_DOWN:
                time.sleep(0.1)  # the forkserver was down: not the item's fault, try again
            finally:
                ex.shutdown(cancel_futures=True)
        return on_crash(item)


def _pipelined(items: list[Item], opts: Options, handle: Callable[[Result], None]) -> None:
    """One worker, two stages: the main thread decodes item i+1 while a writer
    thread commits item i (hashing, compression, I/O, manifest, shard).

    Both stages spend their time in code that releases the GIL (zlib,
    hashlib, numpy, zarrs, file I/O), so one worker uses two cores; at most
    two volumes are in memory. The writer thread is the only one that calls
    ``handle``, in input order."""
    with cf.ThreadPoolExecutor(1, thread_name_prefix="medssl-writer") as writer:
        pending: cf.Future | None = None
        for it in items:
            prep = prepare(it, opts)
            if pending is not None:
                pending.result()  # bound the memory, and raise what the writer raised
            if isinstance(prep, Result):
                pending = writer.submit(handle, prep)
            else:
                pending = writer.submit(lambda p: handle(commit(p, opts)), prep)
        if pending is not None:
            pending.result()
