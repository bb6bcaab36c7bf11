"""``medssl ingest``: the command line of the ingest tool."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from ingest import options, partitions
from ingest.deid import SecretError
from ingest.discover import SourceError, root_names
from ingest.runner import IngestConfig, OutputError, run_ingest
from medssl_scale.io import Limits

EXIT_OK, EXIT_FAILURES, EXIT_ERROR = 0, 1, 2


# Types refuse what cannot be parsed; the rules between options live in ingest.options, which
# run_ingest applies too. Either way a bad value exits 2 before the dataset directory is touched.


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 1GB)")
    size = int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte")
    return size


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r} (X,Y,Z in mm, or one value)") from None
    if len(parts) == 1:
        parts *= 3
    try:
        return options.spacing(tuple(parts))
    except options.OptionError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--spacing ")) from None


def _whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, a finite number >= 0")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="turn CT/MR collections (NIfTI, DICOM, NRRD, MHA) into a dataset directory",
        description="Ingest medical image collections into a canonical dataset: Zarr v3 volumes (RAS), "
        "WebDataset shards and a manifest that accounts for every input. Re-running adds only new inputs.",
    )
    p.add_argument("sources", nargs="*", type=Path, metavar="SRC", help="files or folders, searched recursively")
    p.add_argument("--out", required=True, type=Path, metavar="DATASET", help="dataset directory (created or extended)")
    p.add_argument("--workers", type=_whole(1), default=1, help="parallel worker processes (default 1)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted ingest of this dataset")
    p.add_argument("--strict", action="store_true", help="exit 1 if any input failed")
    p.add_argument("--spacing", type=_spacing, metavar="X,Y,Z", help="resample to this voxel spacing in mm")
    p.add_argument("--modality", action="append", default=[], metavar="[PATTERN=]CT|MR",
                   help="override the modality for sources matching PATTERN (a source prefix or glob), or for all")
    p.add_argument("--max-voxels", type=_whole(1), default=Limits().max_voxels, help="refuse volumes whose header declares more voxels")
    p.add_argument("--max-worker-memory", type=_size, metavar="SIZE",
                   help="cap each worker's memory (e.g. 4GB; with --workers 1, the ingest process's): a volume that "
                        "does not fit fails as 'not enough memory' and the run goes on (default: no cap)")
    p.add_argument("--chunk", type=_whole(1), default=64, help="Zarr chunk edge in voxels (default 64)")
    p.add_argument("--codec", choices=options.CODECS, default="lz4",
                   help="Blosc codec of volume chunks: lz4 decodes ~3x faster, zstd stores ~25%% smaller (default lz4)")
    p.add_argument("--shard-shape", type=_whole(0), default=256,
                   help="Zarr shard edge in voxels, a multiple of --chunk, 0 for none (default 256)")
    p.add_argument("--shard-size", type=_size, default=_size("1GB"), help="target size of WebDataset shards (default 1GB)")
    p.add_argument("--shard-codec", choices=options.SHARD_CODECS, default="npy", help="encoding of arrays in shards")
    p.add_argument("--secret-file", type=Path, help="site secret for pseudonyms (else $MEDSSL_SITE_SECRET, "
                   "$MEDSSL_SITE_SECRET_FILE or ~/.config/medssl/site-secret)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="follow symlinks that leave the source folders (by default they are recorded as skipped)")
    p.add_argument("--hash-paths", action="store_true", help="record source paths as keyed hashes (folder names with identifiers)")
    p.add_argument("--subject-pattern", metavar="REGEX",
                   help="regex on the source path whose first group is the patient id, for formats without one (e.g. 'sub-[^/]+')")
    p.add_argument("--partition", metavar="I/N", help="ingest only partition I of N (by a hash of each input) into "
                   "DATASET/parts/, e.g. one pod of an Indexed Job each; then merge with --finalize N")
    p.add_argument("--finalize", type=_whole(1), metavar="N", help="merge the N parts of a partitioned ingest into DATASET (no SRC)")
    p.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS", help="with --finalize: wait this long for parts to complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, soft_wrap=True)
    if args.finalize is not None:
        if args.sources or args.partition:
            err.print("[red]medssl ingest: --finalize N merges parts already ingested: give it --out only")
            return EXIT_ERROR
        return finalize(args.out, args.finalize, args.wait, not args.no_progress)
    if not args.sources:
        err.print("[red]medssl ingest: give at least one SRC (or --finalize N to merge a partitioned ingest)")
        return EXIT_ERROR
    out, part = args.out, None
    if args.partition:
        try:
            part = partitions.parse(args.partition)
        except ValueError as e:
            err.print(f"[red]medssl ingest: {escape(str(e))}")
            return EXIT_ERROR
        out = partitions.part_dir(args.out, *part)
    cfg = IngestConfig(
        sources=args.sources,
        out=out,
        partition=part,
        workers=args.workers,
        resume=args.resume,
        spacing=args.spacing,
        modality=args.modality,
        max_voxels=args.max_voxels,
        max_memory=args.max_worker_memory,
        chunk=args.chunk,
        codec=args.codec,
        shard=args.shard_shape,
        shard_size=args.shard_size,
        shard_codec=args.shard_codec,
        secret_file=args.secret_file,
        hash_paths=args.hash_paths,
        follow_symlinks=args.follow_symlinks,
        subject_pattern=args.subject_pattern,
    )
    try:
        options.check(cfg)
        root_names(cfg.sources)  # every SRC exists, no two share a name
    except (options.OptionError, SourceError) as e:
        err.print(f"[red]medssl ingest: {escape(str(e))}")  # a pattern's [..] is not markup
        return EXIT_ERROR
    return execute(cfg, strict=args.strict, show_progress=not args.no_progress)


def execute(cfg: IngestConfig, strict: bool = False, show_progress: bool = True) -> int:
    """Run an ingest with a progress bar and the summary table; returns the exit code."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from rich.markup import escape

    from medssl_scale.store.summary import render

    err = Console(stderr=True, soft_wrap=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err, disable=not show_progress)
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    try:
        with bar:
            summary, _ = run_ingest(cfg, progress)
    except (OutputError, SourceError, SecretError, options.OptionError) as e:
        err.print(f"[red]medssl ingest: {escape(str(e))}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print(f"[yellow]medssl ingest: interrupted; rerun the same command with --resume to finish {escape(str(cfg.out))}")
        return 130
    except Exception as e:  # not an input's fault (inputs become records): say so, keep it apart from --strict's 1
        from ingest.pipeline import storage_full

        if full := storage_full(e):  # the manifest or a shard could not be written: the disk, not a bug
            err.print(f"[red]medssl ingest: could not write the dataset {escape(str(cfg.out))}: {full}; "
                      "free space, then rerun with --resume to finish it")
            return EXIT_ERROR
        err.print_exception(max_frames=8)
        err.print(f"[red]medssl ingest: stopped by an internal error; fix the cause, then rerun with --resume to finish {escape(str(cfg.out))}")
        return EXIT_ERROR
    Console().print(render(summary, title=f"ingest into {cfg.out}"))
    if summary["failed_total"]:
        err.print(f"[yellow]{summary['failed_total']} input(s) failed: reasons in {escape(str(cfg.out))}/manifest.jsonl and {escape(str(cfg.out))}/logs/")
        if strict:
            return EXIT_FAILURES
    return EXIT_OK


def finalize(out: Path, n: int, wait_s: float, show_progress: bool = True) -> int:
    """Merge the parts of a partitioned ingest; returns the exit code."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.markup import escape

    from medssl_scale.store.summary import render

    err = Console(stderr=True, soft_wrap=True)
    if n < 1:
        err.print(f"[red]medssl ingest: --finalize takes the number of parts (at least 1), got {n}")
        return EXIT_ERROR
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                   disable=not show_progress)
    task = bar.add_task("parts complete", total=n)
    try:
        with bar:
            summary = partitions.finalize(out, n, wait_s, lambda done, total: bar.update(task, completed=done))
    except partitions.PartitionError as e:
        err.print(f"[red]medssl ingest: {escape(str(e))}")  # quotes values from the plan and the parts
        return EXIT_ERROR
    Console().print(render(summary, title=f"{n} parts merged into {out}"))
    return EXIT_OK
