"""What a dataset holds, computed from its manifest and files (ingest and inspect share it)."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import ManifestRecord, latest, read_manifest
from medssl_scale.store.shards import read_index

MAX_LISTED = 50


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


def summarize(ds: DatasetDir, records: list[ManifestRecord] | None = None) -> dict[str, Any]:
    if records is None:
        records = sorted(latest(read_manifest(ds.manifest)).values(), key=lambda r: (r.source, r.kind))
    images = [r for r in records if r.kind == "image"]
    labels = [r for r in records if r.kind == "label"]
    ok = [r for r in images if r.status == "ok"]
    by_modality: dict[str, dict[str, int]] = {}
    for r in images:
        by_modality.setdefault(r.modality or "unknown", Counter())[r.status] += 1
    try:
        index = read_index(ds)
    except ValueError:  # an invalid index counts as none here; inspect reports it
        index = {"shards": [], "samples": 0}
    reasons = Counter(_reason_kind(r.reason or "") for r in records if r.status == "skipped")
    return {
        "items": len(records),
        "by_status": dict(Counter(r.status for r in images)),
        "by_modality": {k: dict(v) for k, v in sorted(by_modality.items())},
        "labels": dict(Counter(r.status for r in labels)),
        "volumes": len(ok),
        "labelled_volumes": sum(bool(r.has_label) for r in ok),
        "patients": len({r.patient for r in ok if r.patient}),
        "voxels": sum(_prod(r.shape) for r in ok),
        "bytes_in": sum(r.source_bytes or 0 for r in images),
        "bytes_out": _tree_bytes(ds.volumes) + _tree_bytes(ds.labels) + _tree_bytes(ds.shards),
        "shards": len(index["shards"]),
        "shard_samples": index["samples"],
        "skipped_reasons": dict(reasons.most_common(MAX_LISTED)),
        "failed": [{"source": r.source, "kind": r.kind, "reason": r.reason} for r in records if r.status == "failed"][:MAX_LISTED],
        "failed_total": sum(r.status == "failed" for r in records),
    }


def _reason_kind(reason: str) -> str:
    """Group reasons that differ only in ids and numbers ("4D image with 2 volumes (…)", "duplicate of v…")."""
    reason = re.sub(r"\bv[0-9a-f]{19}\b", "a stored volume", reason)
    reason = re.sub(r"\s*\([^)]*\)", "", reason)
    return re.sub(r"\d+", "N", reason)


def _prod(shape: list[int] | None) -> int:
    n = 1
    for s in shape or []:
        n *= s
    return n


def render(summary: dict[str, Any], title: str = "dataset") -> Any:
    """A rich renderable: counts by status and modality, sizes, throughput, failures."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # Everything that comes from a dataset or a path (title, names, reasons) is Text: never read as Rich markup.
    t = Table(title=Text(title), show_lines=False)
    t.add_column("modality")
    for s in ("ok", "skipped", "failed"):
        t.add_column(s, justify="right")
    for mod, counts in summary["by_modality"].items():
        t.add_row(Text(mod), *(str(counts.get(s, 0)) for s in ("ok", "skipped", "failed")))
    st = summary["by_status"]
    t.add_row("[b]all images", *(f"[b]{st.get(s, 0)}" for s in ("ok", "skipped", "failed")))
    lab = summary["labels"]
    if lab:
        t.add_row("label maps", *(str(lab.get(s, 0)) for s in ("ok", "skipped", "failed")))

    facts = Table.grid(padding=(0, 2))
    facts.add_row("volumes", f"{summary['volumes']} ({summary['labelled_volumes']} labelled, {summary['patients']} patients)")
    facts.add_row("data", f"{summary['bytes_in'] / 1e9:.3f} GB in, {summary['bytes_out'] / 1e9:.3f} GB out")
    facts.add_row("shards", f"{summary['shards']} holding {summary['shard_samples']} samples")
    run = summary.get("last_run")
    if run and run.get("seconds"):
        rate = run["processed"] / run["seconds"]
        facts.add_row(
            "last run",
            f"{run['processed']} items processed, {run['unchanged']} unchanged, {run['seconds']:.1f} s "
            f"({rate:.2f} items/s, {run['bytes_in'] / 1e6 / run['seconds']:.1f} MB/s in)",
        )
    parts: list[Any] = [t, facts]
    if summary["failed"]:
        f = Table(title=f"failed ({summary['failed_total']})", title_justify="left")
        f.add_column("source", overflow="fold")
        f.add_column("reason", overflow="fold")
        for r in summary["failed"]:
            f.add_row(Text(r["source"]), Text(r["reason"] or ""))  # a name like "[red]x" is not markup
        parts.append(f)
    if summary["skipped_reasons"]:
        s = Table(title="skipped, by reason", title_justify="left")
        s.add_column("count", justify="right")
        s.add_column("reason", overflow="fold")
        for reason, n in summary["skipped_reasons"].items():
            s.add_row(str(n), Text(reason or ""))
        parts.append(s)
    return Group(*parts)


__all__ = ["summarize", "render"]
