"""``medssl inspect DATASET``: summary, integrity checks, thumbnails."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from medssl_scale.store.integrity import VolumeError
from medssl_scale.store.layout import VOLUME_ID, DatasetDir
from medssl_scale.store.manifest import ManifestRecord, TornManifestError, latest, read_manifest
from medssl_scale.store.shards import read_index, verify_shards
from medssl_scale.store.summary import render, summarize
from medssl_scale.store.volumes import ArrayStore, label_store, volume_store


def load_records(ds: DatasetDir) -> tuple[list[ManifestRecord], list[str]]:
    """The manifest's current records and what is wrong with it (a torn last line; an invalid record: no records)."""
    try:
        return list(latest(read_manifest(ds.manifest, torn_tail="refuse")).values()), []
    except TornManifestError as e:
        return list(latest(read_manifest(ds.manifest)).values()), [str(e)]
    except (OSError, ValueError) as e:
        return [], [str(e)]


def check_arrays(store: ArrayStore, name: str, rehash: bool) -> tuple[set[str], list[str]]:
    """(the arrays that are sound, problems): names, metadata, every stored file (``rehash``: by sha256)."""
    sound, problems = set(), []
    for vid in store.ids():
        if not VOLUME_ID.fullmatch(vid):
            problems.append(f"{name}/{vid}: not a volume id (v + 19 hex digits)")
            continue
        found = store.verify(vid, rehash=rehash)
        if not found and store.attrs(vid).get("volume_id", vid) != vid:
            found = [f"{name}/{vid}: its attributes name another volume, {store.attrs(vid)['volume_id']}"]
        problems += found
        if not found:
            sound.add(vid)
    return sound, problems


def _disagreements(r: ManifestRecord, vols: ArrayStore) -> list[str]:
    """Where a sound stored volume and its manifest record disagree: shape, data type, spacing."""
    meta, where = vols.meta(r.volume_id), f"volumes.zarr/{r.volume_id}"
    out = []
    shape = list(reversed(meta["shape"]))
    if shape != r.shape:
        out.append(f"{r.source}: {where} has shape {shape}, the manifest says {r.shape}")
    if r.dtype is not None and meta["data_type"] != r.dtype:
        out.append(f"{r.source}: {where} holds {meta['data_type']}, the manifest says {r.dtype}")
    spacing = meta.get("attributes", {}).get("spacing")
    if r.spacing is not None and (spacing is None or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(spacing, r.spacing))):
        out.append(f"{r.source}: {where} has spacing {spacing}, the manifest says {r.spacing}")
    return out


def check_dataset(ds: DatasetDir, verify_checksums: bool = True, records: list[ManifestRecord] | None = None) -> list[str]:
    """Everything that disagrees between manifest, Zarr stores and shard index, and every file that is not as written.

    ``verify_checksums``: re-hash every chunk and shard file; without it (``--quick``) files are
    still checked for presence and size, and metadata and attributes for shape and type.
    """
    if not ds.manifest.exists():
        return [f"no manifest at {ds.manifest}: not a dataset directory"]
    problems: list[str] = []
    if records is None:
        records, problems = load_records(ds)
    vols, labs = volume_store(ds), label_store(ds)
    stored = set(vols.ids())
    sound, found = check_arrays(vols, "volumes.zarr", verify_checksums)
    problems += found
    sound_labels, found = check_arrays(labs, "labels.zarr", verify_checksums)
    problems += found
    ok_ids, labelled = set(), set()
    for r in records:
        if r.kind != "image" or r.status != "ok":
            continue
        if r.volume_id is None or r.shape is None:
            problems.append(f"{r.source}: ok record without a volume id or shape")
            continue
        ok_ids.add(r.volume_id)
        if r.volume_id not in stored:
            problems.append(f"{r.source}: volume {r.volume_id} is in the manifest but not in volumes.zarr")
        elif r.volume_id in sound:
            problems += _disagreements(r, vols)
        if r.has_label:
            labelled.add(r.volume_id)
            if not labs.exists(r.volume_id):
                problems.append(f"{r.source}: has_label but no labels.zarr/{r.volume_id}")
            elif r.volume_id in sound_labels and list(labs.shape(r.volume_id)) != r.shape:
                problems.append(f"{r.source}: labels.zarr/{r.volume_id} has shape {list(labs.shape(r.volume_id))}, the image {r.shape}")
    for vid in sorted(stored - ok_ids):
        problems.append(f"volumes.zarr/{vid} is not referenced by any manifest record")
    for vid in sorted(set(labs.ids()) - labelled):
        problems.append(f"labels.zarr/{vid} belongs to no labelled volume in the manifest")
    for r in records:
        if r.duplicate_of and r.duplicate_of not in stored:
            problems.append(f"{r.source}: duplicate of {r.duplicate_of}, which is not in volumes.zarr")
    try:
        index = read_index(ds)
    except ValueError as e:  # an index that does not validate: nothing in it can be trusted
        problems.append(str(e))
        index = None
    sharded = [v for s in (index or {"shards": []})["shards"] for v in s["volume_ids"]]
    if len(sharded) != len(set(sharded)):
        problems.append("a volume appears in more than one shard")
    missing = ok_ids - set(sharded)
    if missing:
        problems.append(f"{len(missing)} ok volume(s) are in no shard, e.g. {sorted(missing)[0]}")
    unknown = set(sharded) - ok_ids
    if unknown:
        problems.append(f"{len(unknown)} sharded volume(s) have no ok manifest record, e.g. {sorted(unknown)[0]}")
    recorded = {s["name"] for s in (index or {"shards": []})["shards"]}
    for f in sorted(ds.shards.glob("*.tar")) if ds.shards.exists() and index is not None else []:
        if f.name not in recorded:
            problems.append(f"shards/{f.name} is not in shards/index.json")
    if verify_checksums and index is not None:
        problems += verify_shards(ds)
    for leftover in (ds.tmp, ds.pending, ds.lock):
        if leftover.exists():
            problems.append(f"{leftover.name} is present: an ingest is running or was interrupted (rerun it with --resume)")
    return problems


def write_thumbnails(ds: DatasetDir, out: Path, progress: Any = None) -> list[Path]:
    from medssl_scale.viz import thumbnail

    out.mkdir(parents=True, exist_ok=True)
    vols, labs = volume_store(ds), label_store(ds)
    written = []
    ids = [vid for vid in vols.ids() if VOLUME_ID.fullmatch(vid)]
    for n, vid in enumerate(ids, 1):
        try:
            arr = vols.read(vid)
            attrs = vols.attrs(vid)
            label = labs.read(vid) if labs.exists(vid) else None
        except VolumeError:
            continue  # reported among the problems
        title = f"{vid}  {attrs.get('modality')}  {'x'.join(map(str, arr.shape))} @ {'x'.join(f'{s:g}' for s in attrs['spacing'])} mm  (RAS; viewer's right = patient's right)"
        img = thumbnail(arr, tuple(attrs["spacing"]), attrs.get("modality", "MR"), title, label)
        path = out / f"{vid}.png"
        img.save(path)
        written.append(path)
        if progress:
            progress(n, len(ids))
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise and verify a dataset directory; optional thumbnails")
    p.add_argument("dataset", type=Path, metavar="DATASET")
    p.add_argument("--thumbnails", type=Path, metavar="DIR", help="write one PNG per volume with its three mid-planes")
    p.add_argument("--quick", action="store_true",
                   help="skip re-hashing volume chunks and shards (files are still checked for presence and size)")
    p.add_argument("--no-verify", dest="quick", action="store_true", help=argparse.SUPPRESS)  # the old name of --quick
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return execute(args.dataset, thumbnails=args.thumbnails, verify=not args.quick, as_json=args.json)


def execute(dataset: Path, thumbnails: Path | None = None, verify: bool = True, as_json: bool = False) -> int:
    """Print the summary and any problems; 0 when the dataset is sound."""
    from rich.console import Console
    from rich.text import Text

    # Names and reasons come from the dataset: printed as plain text, never as Rich markup.
    out, err = Console(), Console(stderr=True, soft_wrap=True)
    ds = DatasetDir(dataset)
    if not ds.manifest.exists():
        err.print(Text(f"medssl inspect: {ds.root} is not a dataset directory (no manifest.jsonl)", style="red"))
        return 2
    records, problems = load_records(ds)
    summary = summarize(ds, sorted(records, key=lambda r: (r.source, r.kind)))
    problems += check_dataset(ds, verify_checksums=verify, records=records)
    if as_json:
        print(json.dumps({**summary, "problems": problems}, indent=1, sort_keys=True))
    else:
        out.print(render(summary, title=str(ds.root)))
        for p in problems:
            err.print(Text(f"problem: {p}", style="red"))
        if not problems:
            out.print(Text(f"{'volume and shard checksums verified; ' if verify else ''}manifest, volumes and shard index agree", style="green"))
    if thumbnails:
        paths = write_thumbnails(ds, thumbnails)
        if not as_json:
            out.print(Text(f"{len(paths)} thumbnails in {thumbnails}"))
    return 1 if problems else 0
