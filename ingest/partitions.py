"""Partitioned ingest: N independent parts (one per pod of an Indexed Job), then one finalize step that merges them.

``medssl ingest SRC... --out DS --partition i/N`` ingests the inputs whose
hash falls in partition *i* into ``DS/parts/part-i-of-N/``, a complete dataset
directory of its own (resumable, locked, as any ingest). Inputs are assigned
by a hash of their source name, and DICOM files by the hash of their folder,
so a series (one folder, as scanners and PACS exports write them) stays in one
part; finalize refuses a series that was split anyway. ``medssl ingest --out DS
--finalize N`` waits until every part is complete, then merges them into DS:

- volumes and label maps are renamed into DS's Zarr groups (the same
  filesystem: no copy);
- shards are renamed into ``DS/shards`` and numbered after DS's own, and the
  shard indices merged;
- manifests are merged; content stored by several parts (duplicates across
  parts), or already in DS, is owned by the input a single-process ingest
  with one worker would have met first (DS's own first, then files by path,
  then DICOM series by their first file: each part writes that order down),
  and the others are recorded as its duplicates, exactly as that ingest
  records them; their copies, and their samples, are dropped.

The result equals a single-process, one-worker ingest of the same inputs:
the same manifest, volume ids and arrays (shard boundaries differ). With
``--workers`` > 1 in a part, which of two identical inputs *in that part* owns
the content depends on timing, as it does in any parallel ingest.

Finalize is crash-safe: it locks DS and every part, writes its plan before
the first move and carries it out idempotently, so a killed finalize is
finished by running it again (a plain ingest of DS refuses meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ingest.discover import Found, Item
from ingest.pipeline import duplicate_label_reason, duplicate_record
from medssl_scale.store.layout import (
    DatasetDir,
    LockedError,
    WriterLock,
    atomic_write_text,
    publish_dir,
)
from medssl_scale.store.manifest import ManifestRecord, latest, read_manifest
from medssl_scale.store.shards import file_digest, filter_shard, read_index
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
    return DatasetDir(out).parts / f"part-{i:05d}-of-{n:05d}"


def select(found: Found, i: int, n: int) -> Found:
    """The part of what discovery found that partition ``i`` of ``n`` ingests."""
    return Found(
        items=[it for it in found.items if partition_of(it.source, n) == i],
        problems=[p for p in found.problems if partition_of(p.source, n) == i],
        # By folder: every file of a series (one folder) lands in the same part, which groups it.
        dicom_files=[(path, name) for path, name in found.dicom_files if partition_of(name.rsplit("/", 1)[0], n) == i],
    )


def write_order(ds: DatasetDir, items: list[Item], name: Callable[[str], str]) -> None:
    """For finalize: per image (as the manifest names it), where a one-worker ingest meets it, and its label map's name."""
    order = {name(it.source): {"key": [it.kind == "dicom", it.paths[0]], "label": name(it.label_source) if it.label_source else None}
             for it in items}
    atomic_write_text(ds.part_order, json.dumps(order))


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


class _Merge:
    """The merged manifest and, per kept volume id, which part's copy is kept (None: DS's own)."""

    def __init__(self, ds: DatasetDir, parts: list[Path]):
        self.ds, self.parts = ds, parts
        self.current = latest(read_manifest(ds.manifest))
        vols = volume_store(ds)
        self.held = {vid: vols.attrs(vid).get("source") for vid in vols.ids()}  # what DS stores, and whose it is
        self.order: dict[str, dict[str, Any]] = {}
        self.part_of: dict[str, int] = {}
        for k, part in enumerate(parts):
            pds = DatasetDir(part)
            recs = latest(read_manifest(pds.manifest))
            self.current.update(recs)
            self.order |= json.loads(pds.part_order.read_text()) if pds.part_order.exists() else {}
            self.part_of |= {r.source: k for r in recs.values() if r.kind == "image"}
        self.origin: dict[str, int | None] = {}
        self.label_moves: list[tuple[int, str]] = []

    def _key(self, rec: ManifestRecord) -> tuple:
        if self.held.get(rec.volume_id) == rec.source:
            return (0,)  # DS's own owner stays the owner, as it would in a re-run of a single ingest
        o = self.order.get(rec.source)
        return (1, *o["key"]) if o else (1, rec.format == "dicom", rec.source)

    def resolve(self) -> list[ManifestRecord]:
        cur = self.current
        owners: dict[str, list[ManifestRecord]] = {}
        for r in cur.values():
            if r.kind == "image" and r.status == "ok" and r.volume_id:
                owners.setdefault(r.volume_id, []).append(r)
        owner_of: dict[str, str] = {}
        for vid, recs in owners.items():
            winner = min(recs, key=self._key)
            if vid in self.held and self.held[vid] != winner.source:
                owner_of[vid] = self.held[vid]  # DS holds it under another input: every part's copy is a duplicate
                losers = recs
            else:
                owner_of[vid], losers = winner.source, [r for r in recs if r is not winner]
                self.origin[vid] = None if vid in self.held else self.part_of[winner.source]
                if vid in self.held and winner.source in self.part_of:
                    self._label_for_held(winner)
            for r in losers:
                self._demote(r, vid, owner_of[vid])
        for r in list(cur.values()):  # duplicates a part resolved itself name the merged dataset's owner
            if r.kind == "image" and r.duplicate_of and r.duplicate_of in owner_of and r.status == "skipped":
                cur[r.key] = r.model_copy(update={"reason": duplicate_record({"source": r.source}, r.duplicate_of,
                                                                              owner_of[r.duplicate_of]).reason})
        return sorted(cur.values(), key=lambda r: (r.source, r.kind))

    def _demote(self, rec: ManifestRecord, vid: str, owner: str) -> None:
        base = {k: getattr(rec, k) for k in ("source", "files", "source_sha256", "source_bytes", "source_mtime_ns")}
        self.current[rec.key] = duplicate_record(base, vid, owner)
        label = (self.order.get(rec.source) or {}).get("label") or rec.label_source
        lab = self.current.get(("label", label)) if label else None
        if lab is not None:  # ok or failed, the label map of a duplicate is skipped with it
            self.current[lab.key] = ManifestRecord(source=lab.source, kind="label", status="skipped", reason=duplicate_label_reason(vid),
                                                   source_bytes=lab.source_bytes, source_mtime_ns=lab.source_mtime_ns)

    def _label_for_held(self, rec: ManifestRecord) -> None:
        """A part re-ingested an input DS holds (its label map appeared or changed): as a single ingest's label attach."""
        if not rec.has_label:
            return
        k = self.part_of[rec.source]
        labels, part_labels = label_store(self.ds), label_store(DatasetDir(self.parts[k]))
        if not part_labels.exists(rec.volume_id):
            return
        if not labels.exists(rec.volume_id):
            self.label_moves.append((k, rec.volume_id))
            note = "label map added after the volume was sharded: it is in labels.zarr, not in the shard sample"
            self.current[rec.key] = rec.model_copy(update={"warnings": [*(rec.warnings or []), note]})
        elif not np.array_equal(labels.read(rec.volume_id), part_labels.read(rec.volume_id)):
            reason = "differs from the label map already stored for this volume (labels are never replaced: ingest into a new dataset)"
            self.current[rec.key] = rec.model_copy(update={"has_label": False, "label_source": None})
            lab = self.current[("label", rec.label_source)]
            self.current[lab.key] = lab.model_copy(update={"status": "failed", "reason": reason})


def _split_series(parts: list[Path]) -> list[str]:
    """Series (``#series-<hash>`` sources) found in more than one part: their files were in several folders."""
    seen: dict[str, set[int]] = {}
    for k, part in enumerate(parts):
        for r in read_manifest(DatasetDir(part).manifest):
            m = re.search(r"#series-([0-9a-f]+)$", r.source)
            if m:
                seen.setdefault(m.group(1), set()).add(k)
    return sorted(h for h, ks in seen.items() if len(ks) > 1)


def _plan(ds: DatasetDir, parts: list[Path], merge: _Merge) -> dict[str, Any]:
    """Every move finalize makes, decided before the first one (and saved, so a rerun carries out the same)."""
    index = read_index(ds)
    moves, shards = [], []
    for k, part in enumerate(parts):
        pds = DatasetDir(part)
        for store, own in ((volume_store(pds), volume_store(ds)), (label_store(pds), label_store(ds))):
            moves += [[str(store.path / vid), str(own.path / vid)] for vid in store.ids() if merge.origin.get(vid, -1) == k]
        moves += [[str(label_store(pds).path / vid), str(label_store(ds).path / vid)] for kk, vid in merge.label_moves if kk == k]
        for s in read_index(pds)["shards"]:
            keep = [v for v in s["volume_ids"] if merge.origin.get(v, -1) == k]
            if keep:
                shards.append({"src": str(pds.shards / s["name"]), "name": f"shard-{len(index['shards']) + len(shards):06d}.tar",
                               "keep": keep, "whole": keep == s["volume_ids"], "entry": {x: s[x] for x in ("bytes", "sha256")}})
    return {"moves": moves, "shards": shards, "parts": [str(p) for p in parts]}


def finalize(out: Path, n: int, wait_s: float = 0.0, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Merge the ``n`` parts of ``out`` into it; returns the dataset summary."""
    ds = DatasetDir(Path(out).resolve())
    if not ds.finalize_plan.exists():
        wait_for_parts(ds.root, n, wait_s, progress)
    parts = [part_dir(ds.root, i, n) for i in range(n)]
    locks = [WriterLock(ds.lock)] + [WriterLock(DatasetDir(p).lock) for p in parts if p.exists()]
    try:
        for lock in locks:
            lock.acquire()
    except LockedError as e:
        for lock in locks:
            lock.release(finished=False)
        raise PartitionError(f"{e}: finalize waits for it to finish") from None
    finished = False
    try:
        if ds.finalize_plan.exists():
            state = json.loads(ds.finalize_plan.read_text())
        else:
            if locks[0].interrupted:
                raise PartitionError(f"{ds.root} holds an interrupted ingest: finish it with --resume before merging parts into it")
            settings = _common_settings(ds, parts)
            split = _split_series(parts)
            if split:
                raise PartitionError(f"{len(split)} DICOM series are split across parts (their files lie in several folders): "
                                     "ingest such a collection without --partition, or gather each series into one folder")
            merge = _Merge(ds, parts)
            records = merge.resolve()
            state = {"settings": settings, "records": [r.model_dump(mode="json", exclude_none=True) for r in records],
                     **_plan(ds, parts, merge)}
            atomic_write_text(ds.finalize_plan, json.dumps(state))
        records = [ManifestRecord.model_validate(r) for r in state["records"]]
        _carry_out(ds, state, records)
        summary = summarize(ds, records)
        atomic_write_text(ds.summary, json.dumps(summary, indent=1, sort_keys=True) + "\n")
        # Only the parts this finalize merged go; the plan goes once nothing of them is left to move.
        done = ds.tmp / "merged-parts"
        done.mkdir(parents=True, exist_ok=True)
        for p in map(Path, state["parts"]):
            if p.exists():
                os.replace(p, done / p.name)
        ds.finalize_plan.unlink()
        shutil.rmtree(ds.tmp, ignore_errors=True)
        if ds.parts.exists() and not any(ds.parts.iterdir()):
            ds.parts.rmdir()
        finished = True
    finally:
        for lock in locks[1:]:
            lock.release(finished=False)  # the parts' folders are gone once finished
        locks[0].release(finished)
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


def _carry_out(ds: DatasetDir, state: dict[str, Any], records: list[ManifestRecord]) -> None:
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
        if s["name"] in known:
            continue
        dst = ds.shards / s["name"]
        entry = dict(s["entry"])
        if not dst.exists():
            if s["whole"]:
                os.replace(s["src"], dst)
            else:
                tmp = ds.tmp / (s["name"] + ".partial")
                entry = filter_shard(Path(s["src"]), tmp, set(s["keep"]))
                os.replace(tmp, dst)
        elif not s["whole"]:
            entry = file_digest(dst)
        index["shards"].append({"name": s["name"], "samples": len(s["keep"]), **entry, "volume_ids": s["keep"]})
    index["samples"] = sum(x["samples"] for x in index["shards"])
    atomic_write_text(ds.shard_index, json.dumps(index, indent=1) + "\n")
    atomic_write_text(ds.manifest, "".join(r.to_line() for r in records))
    ds.logs.mkdir(parents=True, exist_ok=True)
    for p in map(Path, state["parts"]):
        for log in (p / "logs").glob("*.log"):
            os.replace(log, ds.logs / f"{p.name}-{log.name}")
