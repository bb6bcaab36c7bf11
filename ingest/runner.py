"""The ingest run: discover, scan DICOM headers, process items in parallel,
stream shards, compact the manifest, summarise.

Crash safety rests on three rules: every file is written under ``.tmp`` and
renamed when complete; the manifest gets a record only after the item's
volume and shard sample exist; shards are recorded in ``index.json`` only
after they are renamed into place. A run killed anywhere is finished by
``--resume``, which redoes exactly the items without a record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ingest import options, partitions
from ingest.deid import Pseudonymizer, load_secret
from ingest.discover import Item, Problem, discover, modality_for, parse_overrides
from ingest.pinned import read_pinned
from ingest.pipeline import Options, Result, sample_meta
from ingest.pool import Pool
from ingest.source_names import one_line
from medssl_scale.io import InputError, Limits, dicom
from medssl_scale.store.layout import (
    FORMAT_VERSION,
    DatasetDir,
    LockedError,
    WriterLock,
    atomic_write_text,
)
from medssl_scale.store.manifest import (
    ManifestAppender,
    ManifestRecord,
    compact,
    latest,
    read_manifest,
)
from medssl_scale.store.shards import ShardWriter
from medssl_scale.store.summary import summarize
from medssl_scale.store.volumes import VolumeLayout, label_store, volume_store


class OutputError(RuntimeError):
    """The dataset directory cannot be written, is not ours, or another run holds it."""


@dataclasses.dataclass
class IngestConfig:
    sources: list[Path]
    out: Path
    workers: int = 1
    resume: bool = False
    spacing: tuple[float, float, float] | None = None
    modality: list[str] = dataclasses.field(default_factory=list)
    max_voxels: int = Limits().max_voxels
    max_memory: int | None = None  # bytes one worker may hold (--max-worker-memory); None: no cap
    chunk: int = 64
    codec: str = "lz4"
    shard: int = 256
    shard_size: int = 1 << 30
    shard_codec: str = "npy"
    secret_file: Path | None = None
    hash_paths: bool = False
    subject_pattern: str | None = None
    partition: tuple[int, int] | None = None  # (i, N): ingest only partition i of N into ``out`` (see ingest.partitions)
    follow_symlinks: bool = False  # follow links that leave the source folders (never to special files)

    def pinned(self, fingerprint: str) -> dict[str, Any]:
        """The settings every run on one dataset must share: they decide what the stored data is."""
        return {
            "format_version": FORMAT_VERSION,
            "secret_fingerprint": fingerprint,
            "pseudonyms": "HMAC-SHA256",
            "spacing": list(self.spacing) if self.spacing else None,
            "hash_paths": self.hash_paths,
            "chunk": self.chunk,
            "codec": self.codec,
            "shard_shape": self.shard,
            "shard_codec": self.shard_codec,
            # Which linked items exist: a resume without it would turn their ok records into skipped ones.
            "follow_symlinks": self.follow_symlinks,
        }


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
    options.check(cfg)  # nothing bad is pinned into ingest.json, nothing is written
    ds = DatasetDir(cfg.out)
    overrides = parse_overrides(cfg.modality)
    secret, _ = load_secret(cfg.secret_file)
    pseud = Pseudonymizer(secret)
    opts = Options(
        out=ds.root.absolute(),
        secret=secret,
        spacing=cfg.spacing,
        limits=Limits(cfg.max_voxels, cfg.max_memory),
        layout=VolumeLayout(chunk=cfg.chunk, shard=cfg.shard, cname=cfg.codec, clevel=5 if cfg.codec == "lz4" else 3),
        shard_codec=cfg.shard_codec,
        hash_paths=cfg.hash_paths,
        subject_pattern=cfg.subject_pattern,
        direct_shards=cfg.workers <= 1,
    )
    settings = cfg.pinned(pseud.fingerprint)
    _check_output(ds, settings)  # refusals come before the first write
    lock = WriterLock(ds.lock)
    try:
        lock.acquire()
    except LockedError as e:
        raise OutputError(str(e)) from None
    if lock.interrupted and not cfg.resume:
        lock.release(finished=False)
        raise OutputError(f"{ds.root} holds an interrupted ingest: rerun the same command with --resume to finish it")
    finished = False
    log = _Log(ds)
    stats = RunStats()
    try:
        _remove_temporaries(ds)
        if not ds.settings.exists():
            atomic_write_text(ds.settings, json.dumps(settings, indent=1) + "\n")
        log.write(f"ingest of {len(cfg.sources)} source(s), workers={cfg.workers}, spacing={cfg.spacing}, resume={cfg.resume}")
        known = latest(read_manifest(ds.manifest))
        with ManifestAppender(ds.manifest) as manifest, Pool(cfg.workers, opts) as pool:
            shards = ShardWriter(ds, cfg.shard_size)
            _finish_pending_shards(ds, opts, known, shards)

            found = discover(cfg.sources, overrides, skip=_skip_root(cfg), follow_symlinks=cfg.follow_symlinks)
            dicom_roots = found.dicom_roots
            if cfg.partition:
                found = partitions.select(found, *cfg.partition)
            for p in found.problems:
                _record(manifest, known, [_problem_record(p, pseud, cfg.hash_paths)], stats, log)
            found.items += _dicom_items(found.dicom_files, dicom_roots, pool, overrides, pseud, cfg.hash_paths, manifest, known, stats, log, progress)
            if cfg.partition:
                partitions.write_order(ds, found.items, pseud.namer(cfg.hash_paths))

            vols = volume_store(ds)
            todo = [it for it in found.items if not _unchanged(it, known, pseud, cfg.hash_paths, vols)]
            stats.unchanged = len(found.items) - len(todo)

            def handle(res: Result) -> None:
                _take(res, manifest, known, shards, opts.shard_codec, stats, log)
                if progress:
                    progress("ingest", stats.processed, len(todo))

            pool.run(todo, handle)
            shards.close()
        records = compact(ds.manifest)
        _cleanup(ds)
        summary = summarize(ds, records)
        stats.seconds = time.perf_counter() - t0
        summary["last_run"] = dataclasses.asdict(stats)
        atomic_write_text(ds.summary, json.dumps(summary, indent=1, sort_keys=True) + "\n")
        log.write(f"done: {stats.processed} processed, {stats.unchanged} unchanged, {stats.new} in {stats.seconds:.1f}s")
        finished = True
    finally:
        log.close()
        lock.release(finished)
    return summary, stats


def _skip_root(cfg: IngestConfig) -> Path:
    # A part is written inside the dataset (DATASET/parts/...): discovery must not descend into the dataset itself.
    return cfg.out.parents[1] if cfg.partition else cfg.out


def _check_output(ds: DatasetDir, settings: dict[str, Any]) -> None:
    try:
        ds.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write the dataset directory {ds.root}: {e.strerror or e}") from e
    if not ds.is_dataset() and any(ds.root.iterdir()):
        raise OutputError(f"{ds.root} is not empty and not a medssl dataset: give --out a new or empty folder")
    if ds.finalize_plan.exists():
        raise OutputError(f"{ds.root} is being merged from its parts: finish that first by running the same "
                          "`medssl ingest --out ... --finalize N` again")
    if not os.access(ds.root, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the dataset directory {ds.root}: permission denied")
    if ds.settings.exists():
        try:  # untrusted like the rest of the dataset; settings pinned later read as their old behaviour
            have = read_pinned(ds.settings)
        except ValueError as e:
            raise OutputError(f"{ds.root} holds an ingest.json that no ingest wrote: {e}") from None
        if have.get("format_version") != settings["format_version"]:  # no setting the user could give again
            raise OutputError(
                f"{ds.root} is a dataset of format {have.get('format_version')}, older than this version writes "
                f"({settings['format_version']}): it cannot be added to; re-ingest into a new directory"
            )
        if have.get("secret_fingerprint") != settings["secret_fingerprint"]:
            raise OutputError(
                f"{ds.root} was ingested with a different site secret (fingerprint {have.get('secret_fingerprint')}, "
                f"now {settings['secret_fingerprint']}); pseudonyms would not link: use the same secret or a new dataset"
            )
        differ = [f"{k} {have.get(k)!r} (now {v!r})" for k, v in settings.items() if have.get(k) != v]
        if differ:
            raise OutputError(f"{ds.root} was ingested with other settings: {', '.join(differ)}; use them again or a new dataset")


def _remove_temporaries(ds: DatasetDir) -> None:
    """What a killed run left: partial files, never complete, never referenced."""
    if ds.tmp.exists():
        shutil.rmtree(ds.tmp)
    for d in (ds.root, ds.shards):  # atomic_write_* temporaries: ".<name>.<random>.tmp"
        for stale in d.glob(".*.tmp") if d.exists() else []:
            if stale.name.split(".")[1] in ("manifest", "summary", "ingest", "index", "zarr"):
                stale.unlink()


def _problem_record(p: Problem, pseud: Pseudonymizer, hash_paths: bool) -> ManifestRecord:
    return ManifestRecord(source=pseud.namer(hash_paths)(p.source), kind=p.kind, status=p.status, reason=p.reason)


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


def _unchanged(item: Item, known: dict, pseud: Pseudonymizer, hash_paths: bool, vols: Any) -> bool:
    """Recorded ok/skipped with the same size and mtime (label map included): no need to even hash it."""
    name = pseud.namer(hash_paths)
    old = known.get(("image", name(item.source)))
    if old is None or old.status == "failed" or old.source_bytes is None:
        return False
    if old.duplicate_of and not vols.exists(old.duplicate_of):
        return False  # the content it duplicated is gone (its owner failed): ingest this copy
    if _stat(item.paths) != (old.source_bytes, old.source_mtime_ns):
        return False
    if item.label_path:
        lab = known.get(("label", name(item.label_source)))
        if lab is None or (old.status == "ok" and not old.has_label and lab.status == "ok"):
            return False  # a label map appeared since, or its record was never written
        if _stat([item.label_path]) != (lab.source_bytes, lab.source_mtime_ns):
            return False  # the label map was edited
    return True


def _stat(paths: list[str]) -> tuple[int, int] | None:
    size, mtime = 0, 0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return size, mtime


def _take(res: Result, manifest: ManifestAppender, known: dict, shards: ShardWriter, codec: str, stats: RunStats, log: "_Log") -> None:
    stats.processed += 1
    for line in res.log:
        log.write(line)
    for rec in res.records:
        if rec.kind == "image":
            stats.bytes_in += rec.source_bytes or 0
        if rec.kind == "image" and rec.status == "ok":
            _shard(shards, rec.volume_id, codec, res.sample)
    _record(manifest, known, res.records, stats, log)
    stats.bytes_out += res.bytes_out


def _shard(shards: ShardWriter, vid: str, codec: str, sample: tuple | None = None) -> None:
    """Put a recorded volume into the open shard: from the worker's result, its pending
    fragment, or, when a crash lost both, the store itself."""
    if not shards.wants(vid):
        return
    if sample is not None:
        shards.add_sample(vid, *sample, codec=codec)
    elif (shards.ds.pending / f"{vid}.tar").exists():
        shards.add(vid)
    else:
        vols, labels = volume_store(shards.ds), label_store(shards.ds)
        if not vols.exists(vid):
            return
        image = vols.read(vid)
        label = labels.read(vid) if labels.exists(vid) else None
        classes = labels.attrs(vid).get("classes") if label is not None else None
        shards.add_sample(vid, image, sample_meta(vols.attrs(vid), image, classes), label, codec)


def _finish_pending_shards(ds: DatasetDir, opts: Options, known: dict, shards: ShardWriter) -> None:
    """A killed run may have recorded volumes whose shard was never sealed: shard them first."""
    for vid in sorted(r.volume_id for r in known.values() if r.status == "ok" and r.kind == "image"):
        _shard(shards, vid, opts.shard_codec)


def _dicom_items(dicom_files, dicom_roots, pool, overrides, pseud, hash_paths, manifest, known, stats, log, progress) -> list[Item]:
    """Read DICOM headers in parallel, group them into series items, each held to the source roots its files came from."""
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
    uid_of = {h.path: h.series_uid for h in headers}
    items = []
    for paths in dicom.group_series(headers):
        names = [name_of[p] for p in paths]
        folder = os.path.commonpath(names) if len(names) > 1 else names[0].rsplit("/", 1)[0]
        if len(paths) == 1:
            source = names[0]
        else:
            uid = uid_of[paths[0]]
            source = f"{folder}#series-{pseud('series', uid)[4:16] if uid else 'unknown'}"
        roots = [dicom_roots[p] for p in paths]
        one = all(r == roots[0] for r in roots)
        items.append(Item("dicom", source, list(paths), names, modality_for(source, overrides),
                          root=roots[0] if one else None, roots=None if one else roots))
    return items


def _cleanup(ds: DatasetDir) -> None:
    _remove_temporaries(ds)
    if ds.pending.exists():
        for f in ds.pending.iterdir():  # samples of volumes recorded as duplicates, or orphans
            f.unlink()
        ds.pending.rmdir()


class _Log:
    """logs/ingest-<UTC time>.log: statuses and reasons only, never header values.

    One message is one line: control characters in names or library messages are escaped."""

    def __init__(self, ds: DatasetDir):
        ds.logs.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path = ds.logs / f"ingest-{stamp}-{os.getpid()}.log"
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {one_line(line.rstrip())}\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
