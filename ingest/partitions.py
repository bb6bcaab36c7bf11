"""Partitioned ingest: N independent parts (one per pod of an Indexed Job), then one finalize step that merges them.

``medssl ingest SRC... --out DS --partition i/N`` ingests the inputs whose
hash falls in partition *i* into ``DS/parts/part-i-of-N/``, a complete dataset
directory of its own (resumable, locked, as any ingest). Inputs are assigned
by a hash of their source name, and DICOM files by the hash of their folder,
so a series (one folder, as scanners and PACS exports write them) stays in one
part. ``medssl ingest --out DS --finalize N`` waits until every part is
complete, then merges them into DS:

- volumes and label maps are renamed into DS's Zarr groups (the same
  filesystem: no copy);
- shards are renamed into ``DS/shards`` and numbered after DS's own, and the
  shard indices merged;
- manifests are merged; content stored by several parts (duplicates across
  parts) is owned by the input a single-process ingest with one worker would
  have met first (other formats before DICOM series, then by source name), and
  the others are recorded as its duplicates, exactly as that ingest records
  them; their copies, and their samples, are dropped.

The result equals a single-process ingest of the same inputs: the same
manifest, volume ids and arrays (shard boundaries differ). Finalize is
crash-safe: it writes its plan first and carries it out idempotently, so a
killed finalize is finished by running it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingest.discover import Found
from medssl_scale.store.layout import (
    DatasetDir,
    LockedError,
    WriterLock,
    atomic_write_text,
    publish_dir,
)
from medssl_scale.store.manifest import ManifestRecord, latest, read_manifest
from medssl_scale.store.shards import END_OF_ARCHIVE, _HashingFile, read_index
from medssl_scale.store.summary import summarize
from medssl_scale.store.volumes import label_store, volume_store


class PartitionError(RuntimeError):
    """Parts that cannot be merged (missing, still running, ingested with other settings)."""


def partition_of(key: str, n: int) -> int:
    """Which of ``n`` partitions ``key`` belongs to: stable across machines and runs (not Python's hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n


def parse(spec: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N), with 0 <= i < N."""
    try:
        i, n = (int(p) for p in spec.split("/"))
    except ValueError:
        raise ValueError(f"--partition takes I/N (e.g. 3/8), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--partition {spec}: the index must be in [0, {n})")
    return i, n


def part_dir(out: Path, i: int, n: int) -> Path:
    return Path(out) / "parts" / f"part-{i:05d}-of-{n:05d}"


def select(found: Found, i: int, n: int) -> Found:
    """The part of what discovery found that partition ``i`` of ``n`` ingests."""
    return Found(
        items=[it for it in found.items if partition_of(it.source, n) == i],
        problems=[p for p in found.problems if partition_of(p.source, n) == i],
        # By folder: every file of a series (one folder) lands in the same part, which groups it.
        dicom_files=[(path, name) for path, name in found.dicom_files if partition_of(name.rsplit("/", 1)[0], n) == i],
    )


def _complete(part: Path) -> bool:
    ds = DatasetDir(part)
    return ds.summary.exists() and not ds.lock.exists()


def wait_for_parts(out: Path, n: int, wait_s: float, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    parts = [part_dir(out, i, n) for i in range(n)]
    deadline = time.monotonic() + wait_s
    while True:
        done = [p for p in parts if _complete(p)]
        if progress:
            progress(len(done), n)
        if len(done) == n:
            return parts
        if time.monotonic() >= deadline:
            missing = [p.name for p in parts if not _complete(p)]
            raise PartitionError(f"{len(missing)} of {n} part(s) of {out} are not complete: {', '.join(missing[:10])}"
                                 + (" ..." if len(missing) > 10 else "") + " (run their ingest, or wait longer with --wait)")
        time.sleep(min(10.0, max(0.2, wait_s / 100)))


def _precedence(rec: ManifestRecord) -> tuple[bool, str]:
    # The order a single-process, one-worker ingest meets inputs in: files sorted by name, then DICOM series.
    return (rec.format == "dicom", rec.source)


def merge_records(existing: list[ManifestRecord], parts: list[list[ManifestRecord]]) -> tuple[list[ManifestRecord], dict[str, int | None]]:
    """The merged manifest, and for each kept volume id the part its copy comes from (None: DS already holds it)."""
    current = latest(existing)
    held = {r.volume_id: r.source for r in current.values() if r.kind == "image" and r.status == "ok" and r.volume_id}
    for recs in parts:
        current.update(latest(recs))
    source_part = {r.source: k for k, recs in enumerate(parts) for r in recs if r.kind == "image"}
    by_vid: dict[str, list[ManifestRecord]] = {}
    for r in current.values():
        if r.kind == "image" and r.status == "ok" and r.volume_id:
            by_vid.setdefault(r.volume_id, []).append(r)
    origin: dict[str, int | None] = {}
    for vid, owners in by_vid.items():
        if vid in held and held[vid] in {r.source for r in owners}:
            winner = next(r for r in owners if r.source == held[vid])
        else:
            winner = min(owners, key=_precedence)
        origin[vid] = None if vid in held and winner.source == held[vid] else source_part[winner.source]
        for r in owners:
            if r is not winner:
                _demote(current, r, vid, winner.source)
    # Duplicates a part recorded itself name that part's owner: name the owner of the merged dataset.
    for r in list(current.values()):
        if r.kind == "image" and r.duplicate_of and r.duplicate_of in by_vid:
            owner = next(o for o in by_vid[r.duplicate_of] if current[o.key].status == "ok").source
            current[r.key] = r.model_copy(update={"reason": f"duplicate of {r.duplicate_of} (same content as {owner})"})
    return sorted(current.values(), key=lambda r: (r.source, r.kind)), origin


def _demote(current: dict, rec: ManifestRecord, vid: str, owner: str) -> None:
    """What the pipeline records for an input whose content another input already stored."""
    base = {k: getattr(rec, k) for k in ("source", "files", "source_sha256", "source_bytes", "source_mtime_ns")}
    current[rec.key] = ManifestRecord(status="skipped", reason=f"duplicate of {vid} (same content as {owner})", duplicate_of=vid, **base)
    lab = current.get(("label", rec.label_source)) if rec.label_source else None
    if lab is not None:
        current[lab.key] = ManifestRecord(source=lab.source, kind="label", status="skipped", reason=f"its image is a duplicate of {vid}",
                                          source_bytes=lab.source_bytes, source_mtime_ns=lab.source_mtime_ns)


def _plan(ds: DatasetDir, parts: list[Path], origin: dict[str, int | None]) -> dict[str, Any]:
    """Every move finalize makes, decided before the first one (and saved, so a rerun carries out the same)."""
    index = read_index(ds)
    moves, shards = [], []
    for k, part in enumerate(parts):
        pds = DatasetDir(part)
        for store, root in (("volumes.zarr", pds.volumes), ("labels.zarr", pds.labels)):
            for vid in sorted(p.name for p in root.iterdir() if (p / "zarr.json").exists()) if root.exists() else []:
                if origin.get(vid, -1) == k:
                    moves.append([str(root / vid), str(ds.root / store / vid)])
        for s in read_index(pds)["shards"]:
            keep = [v for v in s["volume_ids"] if origin.get(v, -1) == k]
            if keep:
                name = f"shard-{len(index['shards']) + len(shards):06d}.tar"
                shards.append({"src": str(pds.shards / s["name"]), "name": name, "keep": keep, "whole": keep == s["volume_ids"],
                               "entry": {k2: v for k2, v in s.items() if k2 != "name"}})
    return {"moves": moves, "shards": shards}


def _copy_samples(src: Path, dst_tmp: Path, keep: set[str]) -> dict[str, Any]:
    """A shard with only the samples of ``keep`` (a duplicate's sample is dropped): bytes of kept members as they were."""
    out = _HashingFile(dst_tmp)
    with tarfile.open(src, "r|") as tf:
        for m in tf:
            if m.name.split(".", 1)[0] not in keep:
                continue
            data = tf.extractfile(m).read() if m.isfile() else b""
            m.pax_headers = dict(m.pax_headers)
            out.write(m.tobuf(format=tarfile.PAX_FORMAT))
            out.write(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                out.write(b"\0" * pad)
    out.write(END_OF_ARCHIVE)
    out.f.flush()
    os.fsync(out.f.fileno())
    out.f.close()
    return {"bytes": out.size, "sha256": out.sha.hexdigest()}


def finalize(out: Path, n: int, wait_s: float = 0.0, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Merge the ``n`` parts of ``out`` into it; returns the dataset summary."""
    ds = DatasetDir(out)
    plan_path = ds.root / ".finalize-plan.json"
    if not plan_path.exists():
        parts = wait_for_parts(out, n, wait_s, progress)
    else:
        parts = [part_dir(out, i, n) for i in range(n)]
    lock = WriterLock(ds.lock)
    try:
        lock.acquire()
    except LockedError as e:
        raise PartitionError(str(e)) from None
    finished = False
    try:
        if plan_path.exists():
            state = json.loads(plan_path.read_text())
        else:
            settings = _common_settings(ds, parts)
            records, origin = merge_records(read_manifest(ds.manifest), [read_manifest(DatasetDir(p).manifest) for p in parts])
            state = {"settings": settings, "records": [r.model_dump(mode="json", exclude_none=True) for r in records],
                     **_plan(ds, parts, origin)}
            atomic_write_text(plan_path, json.dumps(state))
        _carry_out(ds, state)
        plan_path.unlink()
        shutil.rmtree(ds.root / "parts", ignore_errors=True)
        shutil.rmtree(ds.tmp, ignore_errors=True)
        finished = True
    finally:
        lock.release(finished)
    records = [ManifestRecord.model_validate(r) for r in state["records"]]
    summary = summarize(ds, records)
    atomic_write_text(ds.summary, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def _common_settings(ds: DatasetDir, parts: list[Path]) -> dict[str, Any]:
    seen = {p.name: json.loads(DatasetDir(p).settings.read_text()) for p in parts}
    if ds.settings.exists():
        seen[ds.root.name] = json.loads(ds.settings.read_text())
    first_name, first = next(iter(seen.items()))
    for name, s in seen.items():
        if s != first:
            differ = sorted(k for k in set(s) | set(first) if s.get(k) != first.get(k))
            raise PartitionError(f"{name} was ingested with other settings than {first_name} ({', '.join(differ)}): "
                                 "every part must run with the same options and site secret")
    return first


def _carry_out(ds: DatasetDir, state: dict[str, Any]) -> None:
    if not ds.settings.exists():
        atomic_write_text(ds.settings, json.dumps(state["settings"], indent=1) + "\n")
    for store in (volume_store(ds), label_store(ds)):
        store.ensure()
    for src, dst in state["moves"]:
        if Path(src).exists() and not Path(dst).exists():
            publish_dir(Path(src), Path(dst))
    index = read_index(ds)
    known = {s["name"] for s in index["shards"]}
    ds.shards.mkdir(parents=True, exist_ok=True)
    ds.tmp.mkdir(parents=True, exist_ok=True)
    for s in state["shards"]:
        dst = ds.shards / s["name"]
        if s["name"] not in known:
            entry = dict(s["entry"])
            if not dst.exists():
                if s["whole"]:
                    os.replace(s["src"], dst)
                else:
                    tmp = ds.tmp / (s["name"] + ".partial")
                    entry |= _copy_samples(Path(s["src"]), tmp, set(s["keep"]))
                    os.replace(tmp, dst)
            elif not s["whole"]:
                entry |= _file_digest(dst)
            entry |= {"samples": len(s["keep"]), "volume_ids": s["keep"]}
            index["shards"].append({"name": s["name"], **entry})
    index["samples"] = sum(x["samples"] for x in index["shards"])
    atomic_write_text(ds.shard_index, json.dumps(index, indent=1) + "\n")
    records = [ManifestRecord.model_validate(r) for r in state["records"]]
    atomic_write_text(ds.manifest, "".join(r.to_line() for r in records))
    ds.logs.mkdir(parents=True, exist_ok=True)
    for log in (ds.root / "parts").glob("*/logs/*.log"):
        os.replace(log, ds.logs / f"{log.parent.parent.name}-{log.name}")


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
