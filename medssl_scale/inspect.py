"""``medssl inspect DATASET``: summary, integrity checks, thumbnails."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest
from medssl_scale.store.shards import read_index, verify_shards
from medssl_scale.store.summary import render, summarize
from medssl_scale.store.volumes import label_store, volume_store


def check_dataset(ds: DatasetDir, verify_checksums: bool = True) -> list[str]:
    """Everything that disagrees between manifest, Zarr stores and shard index."""
    problems: list[str] = []
    if not ds.manifest.exists():
        return [f"no manifest at {ds.manifest}: not a dataset directory"]
    records = list(latest(read_manifest(ds.manifest)).values())
    vols, labs = volume_store(ds), label_store(ds)
    stored = set(vols.ids())
    ok_ids, labelled = set(), set()
    for r in records:
        if r.kind != "image" or r.status != "ok":
            continue
        ok_ids.add(r.volume_id)
        if r.volume_id not in stored:
            problems.append(f"{r.source}: volume {r.volume_id} is in the manifest but not in volumes.zarr")
        elif r.has_label and not labs.exists(r.volume_id):
            problems.append(f"{r.source}: has_label but no labels.zarr/{r.volume_id}")
        if r.has_label:
            labelled.add(r.volume_id)
    for vid in sorted(stored - ok_ids):
        problems.append(f"volumes.zarr/{vid} is not referenced by any manifest record")
    for vid in sorted(set(labs.ids()) - labelled):
        problems.append(f"labels.zarr/{vid} belongs to no labelled volume in the manifest")
    for r in records:
        if r.duplicate_of and r.duplicate_of not in stored:
            problems.append(f"{r.source}: duplicate of {r.duplicate_of}, which is not in volumes.zarr")
    sharded = [v for s in read_index(ds)["shards"] for v in s["volume_ids"]]
    if len(sharded) != len(set(sharded)):
        problems.append("a volume appears in more than one shard")
    missing = ok_ids - set(sharded)
    if missing:
        problems.append(f"{len(missing)} ok volume(s) are in no shard, e.g. {sorted(missing)[0]}")
    unknown = set(sharded) - ok_ids
    if unknown:
        problems.append(f"{len(unknown)} sharded volume(s) have no ok manifest record, e.g. {sorted(unknown)[0]}")
    recorded = {s["name"] for s in read_index(ds)["shards"]}
    for f in sorted(ds.shards.glob("*.tar")) if ds.shards.exists() else []:
        if f.name not in recorded:
            problems.append(f"shards/{f.name} is not in shards/index.json")
    if verify_checksums:
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
    ids = vols.ids()
    for n, vid in enumerate(ids, 1):
        arr = vols.read(vid)
        attrs = vols.attrs(vid)
        label = labs.read(vid) if labs.exists(vid) else None
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
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the shards")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return execute(args.dataset, thumbnails=args.thumbnails, verify=not args.no_verify, as_json=args.json)


def execute(dataset: Path, thumbnails: Path | None = None, verify: bool = True, as_json: bool = False) -> int:
    """Print the summary and any problems; 0 when the dataset is sound."""
    from rich.console import Console

    out, err = Console(), Console(stderr=True)
    ds = DatasetDir(dataset)
    if not ds.manifest.exists():
        err.print(f"[red]medssl inspect: {ds.root} is not a dataset directory (no manifest.jsonl)")
        return 2
    summary = summarize(ds)
    problems = check_dataset(ds, verify_checksums=verify)
    if as_json:
        print(json.dumps({**summary, "problems": problems}, indent=1, sort_keys=True))
    else:
        out.print(render(summary, title=str(ds.root)))
        for p in problems:
            err.print(f"[red]problem: {p}")
        if not problems:
            out.print(f"[green]{'shard checksums verified; ' if verify else ''}manifest, volumes and shard index agree")
    if thumbnails:
        paths = write_thumbnails(ds, thumbnails)
        if not as_json:
            out.print(f"{len(paths)} thumbnails in {thumbnails}")
    return 1 if problems else 0
