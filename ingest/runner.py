"""The ingest run: discover, scan DICOM headers, process items in parallel,
stream shards, compact the manifest, summarise.

Crash safety rests on three rules: every file is written under ``.tmp`` and
renamed when complete; the manifest gets a record only after the item's
volume and shard sample exist; shards are recorded in ``index.json`` only
after they are renamed into place. A run killed anywhere is finished by
``--resume``, which redoes exactly the items without a record.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
from multiprocessing import forkserver
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ingest.deid import Pseudonymizer, load_secret
from ingest.discover import Item, Problem, discover, parse_overrides
from ingest.pipeline import Options, Result, commit, prepare, process_item, sample_meta
from medssl_scale.io import InputError, Limits, dicom
from medssl_scale.store.layout import DatasetDir, atomic_write_text
from medssl_scale.store.manifest import ManifestAppender, ManifestRecord, compact, latest, read_manifest
from medssl_scale.store.shards import ShardWriter, write_sample_fragment
from medssl_scale.store.summary import summarize
from medssl_scale.store.volumes import VolumeLayout, label_store, volume_store


class OutputError(RuntimeError):
    """The dataset directory cannot be written, or another run holds it."""


@dataclasses.dataclass
class IngestConfig:
    sources: list[Path]
    out: Path
    workers: int = 1
    resume: bool = False
    spacing: tuple[float, float, float] | None = None
    modality: list[str] = dataclasses.field(default_factory=list)
    max_voxels: int = Limits().max_voxels
    chunk: int = 64
    shard: int = 256
    shard_size: int = 1 << 30
    shard_codec: str = "npy"
    secret_file: Path | None = None
    hash_paths: bool = False
    subject_pattern: str | None = None


@dataclasses.dataclass
class RunStats:
    processed: int = 0
    unchanged: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    new: dict[str, int] = dataclasses.field(default_factory=dict)  # status -> count this run


Progress = Callable[[str, int, int], None]  # (phase, done, total)


def run_ingest(cfg: IngestConfig, progress: Progress | None = None) -> tuple[dict[str, Any], RunStats]:
    t0 = time.perf_counter()
    ds = DatasetDir(cfg.out)
    overrides = parse_overrides(cfg.modality)
    secret, _ = load_secret(cfg.secret_file)
    opts = Options(
        out=ds.root.absolute(),
        secret=secret,
        spacing=cfg.spacing,
        limits=Limits(cfg.max_voxels),
        layout=VolumeLayout(chunk=cfg.chunk, shard=cfg.shard),
        shard_codec=cfg.shard_codec,
        hash_paths=cfg.hash_paths,
        subject_pattern=cfg.subject_pattern,
        direct_shards=cfg.workers <= 1,
    )
    _prepare_output(ds, cfg.resume)
    log = _Log(ds)
    stats = RunStats()
    try:
        log.write(f"ingest of {len(cfg.sources)} source(s), workers={cfg.workers}, spacing={cfg.spacing}, resume={cfg.resume}")
        _check_fingerprint(ds, Pseudonymizer(secret).fingerprint)
        known = latest(read_manifest(ds.manifest))
        with ManifestAppender(ds.manifest) as manifest, _Pool(cfg.workers, opts) as pool:
            shards = ShardWriter(ds, cfg.shard_size)
            _finish_pending_shards(ds, opts, known, shards)

            found = discover(cfg.sources, overrides, skip=ds.root)
            pseud = Pseudonymizer(secret)
            for p in found.problems:
                _record(manifest, known, [_problem_record(p, pseud, cfg.hash_paths)], stats, log)
            found.items += _dicom_items(found.dicom_files, pool, overrides, pseud, cfg.hash_paths, manifest, known, stats, log, progress)

            todo = [it for it in found.items if not _unchanged(it, known, pseud, cfg.hash_paths)]
            stats.unchanged = len(found.items) - len(todo)

            def handle(res: Result) -> None:
                _take(res, manifest, known, shards, opts.shard_codec, stats, log)
                if progress:
                    progress("ingest", stats.processed, len(todo))

            pool.run(todo, handle)
            shards.close()
        records = compact(ds.manifest)
        _cleanup(ds, records)
        summary = summarize(ds, records)
        stats.seconds = time.perf_counter() - t0
        summary["last_run"] = dataclasses.asdict(stats)
        atomic_write_text(ds.summary, json.dumps(summary, indent=1, sort_keys=True) + "\n")
        log.write(f"done: {stats.processed} processed, {stats.unchanged} unchanged, {stats.new} in {stats.seconds:.1f}s")
    finally:
        log.close()
    ds.lock.unlink(missing_ok=True)
    return summary, stats


def _prepare_output(ds: DatasetDir, resume: bool) -> None:
    try:
        ds.root.mkdir(parents=True, exist_ok=True)
        probe = ds.root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write the dataset directory {ds.root}: {e.strerror or e}") from e
    if ds.lock.exists():
        pid = _lock_pid(ds.lock)
        if pid and pid != os.getpid() and _alive(pid):
            raise OutputError(f"another ingest (pid {pid}) is writing {ds.root}")
        if not resume:
            raise OutputError(f"{ds.root} holds an interrupted ingest: rerun the same command with --resume to finish it")
    atomic_write_text(ds.lock, json.dumps({"pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat()}))
    if ds.tmp.exists():  # partial files of a killed run: never complete, never referenced
        shutil.rmtree(ds.tmp)
    for d in (ds.root, ds.shards):  # temporaries of atomic_write_* killed before their rename
        for stale in d.glob(".*.tmp") if d.exists() else []:
            stale.unlink()


def _lock_pid(lock: Path) -> int | None:
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_fingerprint(ds: DatasetDir, fingerprint: str) -> None:
    """Refuse to mix pseudonyms made under two secrets in one dataset."""
    path = ds.root / "deid.json"
    if path.exists():
        have = json.loads(path.read_text()).get("secret_fingerprint")
        if have != fingerprint:
            raise OutputError(
                f"{ds.root} was ingested with a different site secret (fingerprint {have}, now {fingerprint}); "
                "pseudonyms would not link: use the same secret or a new dataset"
            )
    else:
        atomic_write_text(path, json.dumps({"secret_fingerprint": fingerprint, "pseudonyms": "HMAC-SHA256"}, indent=1) + "\n")


def _problem_record(p: Problem, pseud: Pseudonymizer, hash_paths: bool) -> ManifestRecord:
    return ManifestRecord(source=pseud.path(p.source) if hash_paths else p.source, kind=p.kind, status=p.status, reason=p.reason)


def _record(manifest: ManifestAppender, known: dict, recs: list[ManifestRecord], stats: RunStats, log: "_Log") -> None:
    """Append an item's records (image and label together) unless the manifest already says the same."""
    fresh = [r for r in recs if known.get(r.key) != r]  # re-running on the same inputs adds nothing
    if not fresh:
        return
    manifest.append(*fresh)
    for rec in fresh:
        known[rec.key] = rec
        stats.new[rec.status] = stats.new.get(rec.status, 0) + 1
        if rec.status != "ok":
            log.write(f"{rec.status} {rec.kind} {rec.source}: {rec.reason}")
        for w in rec.warnings or []:
            log.write(f"warning {rec.source}: {w}")


def _unchanged(item: Item, known: dict, pseud: Pseudonymizer, hash_paths: bool) -> bool:
    """Already recorded ok/skipped with the same size and mtime: no need to even hash it."""
    name = pseud.path(item.source) if hash_paths else item.source
    old = known.get(("image", name))
    if old is None or old.status == "failed" or old.source_bytes is None:
        return False
    size, mtime = 0, 0
    for p in item.paths:
        try:
            st = os.stat(p)
        except OSError:
            return False
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    if item.label_source:
        label_name = pseud.path(item.label_source) if hash_paths else item.label_source
        if ("label", label_name) not in known or (old.status == "ok" and not old.has_label):
            return False  # a label map appeared since, or its record was never written
    return size == old.source_bytes and mtime == old.source_mtime_ns


def _take(res: Result, manifest: ManifestAppender, known: dict, shards: ShardWriter, codec: str, stats: RunStats, log: "_Log") -> None:
    stats.processed += 1
    for line in res.log:
        log.write(line)
    for rec in res.records:
        if rec.kind == "image":
            stats.bytes_in += rec.source_bytes or 0
        if rec.kind != "image" or rec.status != "ok" or not shards.wants(rec.volume_id):
            continue
        if res.sample is not None:
            shards.add_sample(rec.volume_id, *res.sample, codec=codec)
        elif _ensure_fragment(shards.ds, rec.volume_id, shards, codec):
            shards.add(rec.volume_id)
    _record(manifest, known, res.records, stats, log)
    stats.bytes_out += res.bytes_out


def _ensure_fragment(ds: DatasetDir, vid: str, shards: ShardWriter, codec: str) -> bool:
    """The volume's shard sample exists or is rebuilt from the store (a crash lost it)."""
    if vid in shards.done or (ds.pending / f"{vid}.tar").exists():
        return True
    vols = volume_store(ds)
    if not vols.exists(vid):
        return False
    attrs = vols.attrs(vid)
    image = vols.read(vid)
    labels = label_store(ds)
    label = labels.read(vid) if labels.exists(vid) else None
    classes = labels.attrs(vid).get("classes") if label is not None else None
    write_sample_fragment(ds, vid, image, sample_meta(attrs, image, classes), label, codec)
    return True


def _finish_pending_shards(ds: DatasetDir, opts: Options, known: dict, shards: ShardWriter) -> None:
    """A killed run may have recorded volumes whose shard was never sealed: shard them first."""
    for vid in sorted(r.volume_id for r in known.values() if r.status == "ok" and r.kind == "image"):
        if vid not in shards.done and _ensure_fragment(ds, vid, shards, opts.shard_codec):
            shards.add(vid)


def _dicom_items(dicom_files, pool, overrides, pseud, hash_paths, manifest, known, stats, log, progress) -> list[Item]:
    """Read DICOM headers in parallel, group them into series items."""
    from ingest.discover import modality_for

    if not dicom_files:
        return []
    name_of = dict(dicom_files)
    headers = []
    for n, (path, res) in enumerate(pool.scan([p for p, _ in dicom_files]), 1):
        if isinstance(res, InputError):
            _record(manifest, known, [_problem_record(Problem(name_of[path], res.status, res.reason), pseud, hash_paths)], stats, log)
        else:
            headers.append(res)
        if progress:
            progress("scan DICOM headers", n, len(dicom_files))
    items = []
    for paths in dicom.group_series(headers):
        names = [name_of[p] for p in paths]
        folder = os.path.commonpath(names) if len(names) > 1 else names[0].rsplit("/", 1)[0]
        if len(paths) == 1:
            source = names[0]
        else:
            uid = next(h.series_uid for h in headers if h.path == paths[0])
            source = f"{folder}#series-{pseud('series', uid)[4:16] if uid else 'unknown'}"
        items.append(Item("dicom", source, list(paths), names, modality_for(source, overrides)))
    return items


def _cleanup(ds: DatasetDir, records: list[ManifestRecord]) -> None:
    if ds.tmp.exists():
        shutil.rmtree(ds.tmp)
    if ds.pending.exists():
        for f in ds.pending.iterdir():  # samples of volumes recorded as duplicates, or orphans
            f.unlink()
        ds.pending.rmdir()


class _Log:
    """logs/ingest-<UTC time>.log: statuses and reasons only, never header values."""

    def __init__(self, ds: DatasetDir):
        ds.logs.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path = ds.logs / f"ingest-{stamp}-{os.getpid()}.log"
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line.rstrip()}\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# --- worker pool --------------------------------------------------------------------------

_OPTS: Options | None = None


def _init_worker(opts: Options) -> None:
    global _OPTS
    _OPTS = opts
    # One volume per worker at a time: let the codecs use the cores, not thread pools stacked per worker.
    from medssl_scale.store.volumes import use_fast_codecs

    use_fast_codecs()


def _work(item: Item) -> Result:
    assert _OPTS is not None
    return process_item(item, _OPTS)


def _scan(path: str) -> Any:
    try:
        return dicom.scan_header(path)
    except InputError as e:
        return e


class _Pool:
    """Process pool with bounded in-flight work and isolation of crashing readers.

    A decoder that segfaults or a volume that exhausts memory kills its worker
    and breaks the pool. The items that were in flight are then retried one
    at a time in a fresh pool; the one that breaks it again is recorded as
    failed, and the run goes on.
    """

    def __init__(self, workers: int, opts: Options):
        self.workers = max(1, int(workers))
        self.opts = opts
        self._ex: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> _Pool:
        if self.workers == 1:
            _init_worker(self.opts)  # in-process: no pickling, easier to profile and debug
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)

    def _executor(self, workers: int) -> cf.ProcessPoolExecutor:
        # forkserver: workers fork from a clean server that imported the readers once
        # (spawn re-imports everything per worker; plain fork is unsafe next to our threads).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["ingest.pipeline"])
        forkserver.ensure_running()  # restarts a server that was killed (the OOM killer picks big processes)
        return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(self.opts,))

    def scan(self, paths: list[str]) -> Iterator[tuple[str, Any]]:
        if self.workers == 1:
            for p in paths:
                yield p, _scan(p)
            return
        if self._ex is None:
            self._ex = self._executor(self.workers)
        yield from zip(paths, self._ex.map(_scan, paths, chunksize=64))

    def run(self, items: list[Item], handle: Callable[[Result], None]) -> None:
        """Process ``items``; ``handle`` sees each result, from one thread at a time."""
        if self.workers == 1:
            _pipelined(items, self.opts, handle)
        else:
            for res in self._map(items):
                handle(res)

    def _map(self, items: list[Item]) -> Iterator[Result]:
        queue = list(reversed(items))
        while queue:
            if self._ex is None:
                self._ex = self._executor(self.workers)
            inflight: dict[cf.Future, Item] = {}
            try:
                while queue or inflight:
                    while queue and len(inflight) < 2 * self.workers:
                        fut = self._ex.submit(_work, queue[-1])  # raises on a broken pool: pop only once submitted
                        inflight[fut] = queue.pop()
                    done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        res = fut.result()  # raises BrokenProcessPool if a worker died; the item stays in flight
                        del inflight[fut]
                        yield res
            except BrokenProcessPool:
                self._ex.shutdown(cancel_futures=True)
                self._ex = None
                suspects = []
                for fut, it in inflight.items():
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        yield fut.result()
                    else:
                        suspects.append(it)
                yield from self._isolate(suspects)

    def _isolate(self, items: Iterable[Item]) -> Iterator[Result]:
        for it in items:
            ex = self._executor(1)
            try:
                yield ex.submit(_work, it).result()
            except BrokenProcessPool:
                yield _crashed(it, self.opts)
            finally:
                ex.shutdown(cancel_futures=True)


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


def _crashed(item: Item, opts: Options) -> Result:
    pseud = Pseudonymizer(opts.secret)
    name = pseud.path(item.source) if opts.hash_paths else item.source
    reason = "the reader process died on this input (a decoder crash, or not enough memory for it)"
    return Result([ManifestRecord(source=name, status="failed", reason=reason)])


__all__ = ["IngestConfig", "OutputError", "RunStats", "run_ingest"]
