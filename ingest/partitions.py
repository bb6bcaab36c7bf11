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

Everything finalize reads from DS and its parts is untrusted input: the plan
holds no paths, only part numbers, volume ids and shard names, each checked
against the store's patterns before a path is built from it; the parts' own
files (manifest, shard index, ``ingest.json``, ``part-order.json``) go
through their validators, and links are refused wherever finalize moves or
deletes anything.
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
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from ingest.discover import Found, Item
from ingest.options import MAX_PARTS
from ingest.pinned import PinnedSettings, read_pinned
from ingest.pipeline import duplicate_label_reason, duplicate_record
from medssl_scale.io.bounded import read_bounded
from medssl_scale.store.layout import (
    FORMAT_VERSION,
    SHARD_NAME,
    VOLUME_ID,
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
    """Parts that cannot be merged (missing, still running, ingested with other settings, or files that are not the store's)."""


PLAN_FORMAT = "medssl-finalize/2"
MAX_PLAN_BYTES = 1 << 31  # a plan holds every merged record: generous, but a bound
VolumeId = Annotated[str, Field(pattern=f"^{VOLUME_ID.pattern}$")]
ShardName = Annotated[str, Field(pattern=f"^{SHARD_NAME.pattern}$")]
PartName = Annotated[str, Field(pattern=r"^part-[0-9]{5}-of-[0-9]{5}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Order(_Strict):
    """One image of part-order.json: where a one-worker ingest meets it (DICOM last, then by first path), its label map."""

    key: tuple[bool, str]
    label: str | None


class _Move(_Strict):
    """A volume (or label map) of part ``part`` renamed into DS's store of the same kind."""

    part: int = Field(ge=0, lt=MAX_PARTS)
    store: Literal["volumes", "labels"]
    volume_id: VolumeId


class _ShardMove(_Strict):
    """Shard ``src`` of part ``part`` becomes DS's shard ``name``: whole, or filtered down to ``keep``."""

    part: int = Field(ge=0, lt=MAX_PARTS)
    src: ShardName
    name: ShardName
    keep: list[VolumeId] = Field(min_length=1)
    whole: bool
    bytes: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FinalizePlan(_Strict):
    """``.finalize-plan.json``: every move, decided before the first one. No paths: they are rebuilt from these."""

    format: Literal["medssl-finalize/2"]
    n: int = Field(ge=1, le=MAX_PARTS)
    parts: list[PartName]
    settings: PinnedSettings
    records: list[ManifestRecord]
    moves: list[_Move]
    shards: list[_ShardMove]


def _pydantic_error(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    field = ".".join(str(x) for x in err["loc"]) or "top level"
    got = f" (got {str(err['input'])[:80]!r})" if isinstance(err.get("input"), (str, int, float)) else ""
    return f"{where}: {field}: {err['msg']}{got}"


def read_plan(ds: DatasetDir, n: int) -> FinalizePlan:
    """The saved plan, validated whole and checked to be one for these ``n`` parts of ``ds``; PartitionError naming the file."""
    where = str(ds.finalize_plan)
    try:
        plan = FinalizePlan.model_validate_json(read_bounded(ds.finalize_plan, MAX_PLAN_BYTES, "a finalize plan"))
    except ValidationError as e:
        raise PartitionError(f"{_pydantic_error(e, where)}: not a plan finalize wrote (remove it only if no finalize ran)") from None
    except (OSError, ValueError) as e:
        raise PartitionError(f"{where}: unreadable ({e})") from None
    names = [part_dir(ds.root, i, n).name for i in range(n)]
    if plan.n != n or plan.parts != names:
        raise PartitionError(f"{where}: planned for {plan.n} parts ({', '.join(plan.parts[:3])}...), "
                             f"not the {n} parts of {ds.root} (finish it with --finalize {plan.n})")
    for m in [*plan.moves, *plan.shards]:
        if m.part >= n:
            raise PartitionError(f"{where}: names part {m.part}, but there are {n}")
    names_out = [s.name for s in plan.shards]
    if len(set(names_out)) != len(names_out):
        raise PartitionError(f"{where}: two shards are given the same name")
    return plan


def _read_order(path: Path) -> dict[str, dict[str, Any]]:
    """A part's part-order.json, validated (an absent one is empty: finalize then orders by name)."""
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        data = read_bounded(path, MAX_PLAN_BYTES, "part-order.json")
        order = _OrderFile.model_validate_json(data).root
    except ValidationError as e:
        raise PartitionError(_pydantic_error(e, str(path))) from None
    except (OSError, ValueError) as e:
        raise PartitionError(f"{path}: unreadable ({e})") from None
    return {k: {"key": list(v.key), "label": v.label} for k, v in order.items()}


def _refuse_links(*paths: Path) -> None:
    """Finalize moves and deletes below these: a link planted in the dataset would aim that elsewhere."""
    for p in paths:
        if p.is_symlink():
            raise PartitionError(f"{p} is a symbolic link: a dataset holds none (refused: finalize would move or delete through it)")


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


class _OrderFile(RootModel[dict[str, _Order]]):
    model_config = ConfigDict(strict=True)


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
            self.order |= _read_order(pds.part_order)
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
        for kind, store in (("volumes", volume_store(pds)), ("labels", label_store(pds))):
            moves += [{"part": k, "store": kind, "volume_id": vid} for vid in store.ids() if merge.origin.get(vid, -1) == k]
        moves += [{"part": k, "store": "labels", "volume_id": vid} for kk, vid in merge.label_moves if kk == k]
        for s in read_index(pds)["shards"]:
            keep = [v for v in s["volume_ids"] if merge.origin.get(v, -1) == k]
            if keep:
                shards.append({"part": k, "src": s["name"], "name": f"shard-{len(index['shards']) + len(shards):06d}.tar",
                               "keep": keep, "whole": keep == s["volume_ids"], "bytes": s["bytes"], "sha256": s["sha256"]})
    return {"moves": moves, "shards": shards, "parts": [p.name for p in parts]}


def finalize(out: Path, n: int, wait_s: float = 0.0, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Merge the ``n`` parts of ``out`` into it; returns the dataset summary."""
    ds = DatasetDir(Path(out).resolve())
    if not ds.finalize_plan.exists():
        wait_for_parts(ds.root, n, wait_s, progress)
    parts = [part_dir(ds.root, i, n) for i in range(n)]
    _refuse_links(ds.parts, *parts, ds.tmp, ds.shards, ds.logs, ds.volumes, ds.labels)
    locks = [WriterLock(ds.lock)] + [WriterLock(DatasetDir(p).lock) for p in parts if p.exists()]
    try:
        for lock in locks:
            lock.acquire()
    except LockedError as e:
        _release_untouched(locks)
        raise PartitionError(f"{e}: finalize waits for it to finish") from None
    finished = planned = False
    try:
        if ds.finalize_plan.exists() or ds.finalize_plan.is_symlink():
            planned = True
            plan = read_plan(ds, n)
        else:
            if locks[0].interrupted:
                raise PartitionError(f"{ds.root} holds an interrupted ingest: finish it with --resume before merging parts into it")
            plan = _make_plan(ds, parts, n)
            atomic_write_text(ds.finalize_plan, plan.model_dump_json())
            planned = True
        records = plan.records
        _carry_out(ds, plan, parts, records)
        summary = summarize(ds, records)
        atomic_write_text(ds.summary, json.dumps(summary, indent=1, sort_keys=True) + "\n")
        # Only the parts this finalize merged go; the plan goes once nothing of them is left to move.
        done = ds.tmp / "merged-parts"
        done.mkdir(parents=True, exist_ok=True)
        for p in parts:
            if p.exists():
                os.replace(p, done / p.name)
        ds.finalize_plan.unlink()
        shutil.rmtree(ds.tmp, ignore_errors=True)
        if ds.parts.exists() and not any(ds.parts.iterdir()):
            ds.parts.rmdir()
        finished = True
    finally:
        if not planned:
            _release_untouched(locks)
        else:
            for lock in locks[1:]:
                lock.release(finished=False)  # the parts' folders are gone once finished
            locks[0].release(finished)
    return summary


def _release_untouched(locks: list[WriterLock]) -> None:
    """A finalize that refused before its plan changed nothing: the lock files it made go, so a corrected rerun works.

    A lock file that was there before (an interrupted ingest) stays, for that ingest's --resume.
    """
    for lock in locks:
        lock.release(finished=not lock.interrupted)


def _make_plan(ds: DatasetDir, parts: list[Path], n: int) -> FinalizePlan:
    """The plan from the parts' own files, each validated (a bad one is a PartitionError naming it)."""
    try:
        settings = _common_settings(ds, parts)
        split = _split_series(parts)
        if split:
            raise PartitionError(f"{len(split)} DICOM series are split across parts (their files lie in several folders): "
                                 "ingest such a collection without --partition, or gather each series into one folder")
        merge = _Merge(ds, parts)
        records = merge.resolve()
        state = {"format": PLAN_FORMAT, "n": n, "settings": settings, "records": records, **_plan(ds, parts, merge)}
    except (OSError, ValueError) as e:  # the store's validators name the file and the field
        raise PartitionError(f"cannot merge the parts of {ds.root}: {e}") from None
    return FinalizePlan.model_validate(state, strict=False)


def _common_settings(ds: DatasetDir, parts: list[Path]) -> dict[str, Any]:
    seen = {p.name: read_pinned(DatasetDir(p).settings) for p in parts}
    if ds.settings.exists():
        seen[ds.root.name] = read_pinned(ds.settings)
    for name, s in seen.items():
        if s.get("format_version") != FORMAT_VERSION:  # no option the user could give again
            raise PartitionError(f"{name} is a dataset of format {s.get('format_version')}, older than this version "
                                 f"writes ({FORMAT_VERSION}): re-ingest it into a new directory")
    first_name, first = next(iter(seen.items()))
    for name, s in seen.items():
        if s != first:
            differ = sorted(k for k in set(s) | set(first) if s.get(k) != first.get(k))
            raise PartitionError(f"{name} was ingested with other settings than {first_name} ({', '.join(differ)}): "
                                 "every part must run with the same options and site secret")
    return first


def _store(ds: DatasetDir, kind: str):
    return volume_store(ds) if kind == "volumes" else label_store(ds)


def _regular(path: Path, what: str) -> Path:
    """``path`` if it is what the store writes there (a folder or a file, never a link); PartitionError otherwise."""
    if path.is_symlink() or not (path.is_dir() if what == "folder" else path.is_file()):
        raise PartitionError(f"{path}: not a {what} the store wrote (a link or another kind of file): refused")
    return path


def _carry_out(ds: DatasetDir, plan: FinalizePlan, parts: list[Path], records: list[ManifestRecord]) -> None:
    if not ds.settings.exists():
        atomic_write_text(ds.settings, json.dumps(plan.settings.model_dump(), indent=1) + "\n")
    for store in (volume_store(ds), label_store(ds)):
        store.ensure()
    for m in plan.moves:
        src, dst = _store(DatasetDir(parts[m.part]), m.store).path / m.volume_id, _store(ds, m.store).path / m.volume_id
        if (src.exists() or src.is_symlink()) and not dst.exists():
            publish_dir(_regular(src, "folder"), dst)
    index = read_index(ds)
    known = {s["name"] for s in index["shards"]}
    ds.shards.mkdir(parents=True, exist_ok=True)
    ds.tmp.mkdir(parents=True, exist_ok=True)
    for s in plan.shards:
        if s.name in known:
            continue
        src, dst = DatasetDir(parts[s.part]).shards / s.src, ds.shards / s.name
        entry = {"bytes": s.bytes, "sha256": s.sha256}
        if not dst.exists():
            if s.whole:
                os.replace(_regular(src, "file"), dst)
            else:
                tmp = ds.tmp / (s.name + ".partial")
                entry = filter_shard(_regular(src, "file"), tmp, set(s.keep))
                os.replace(tmp, dst)
        elif not s.whole:
            entry = file_digest(dst)
        index["shards"].append({"name": s.name, "samples": len(s.keep), **entry, "volume_ids": s.keep})
    index["samples"] = sum(x["samples"] for x in index["shards"])
    atomic_write_text(ds.shard_index, json.dumps(index, indent=1) + "\n")
    atomic_write_text(ds.manifest, "".join(r.to_line() for r in records))
    ds.logs.mkdir(parents=True, exist_ok=True)
    for p in parts:
        for log in (p / "logs").glob("*.log"):
            if not log.is_symlink():
                os.replace(log, ds.logs / f"{p.name}-{log.name}")
