"""``medssl registry publish|alias|list``: the encoder registry from the command line."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="publish pre-trained encoders to the MLflow registry and list them")
    rs = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    def where(q: argparse.ArgumentParser) -> None:
        q.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, "
                                              "else the local store of --workdir)")
        q.add_argument("--workdir", type=Path, default=Path("runs"), help="the runs' workdir, for its local store (default: runs)")

    q = rs.add_parser("publish", help="register the encoder of a finished pre-training run")
    q.add_argument("--run", required=True, help="MLflow run id of the pre-training run")
    q.add_argument("--name", required=True, help="registered model name, e.g. ct-mr-encoder")
    q.add_argument("--alias", help="alias to point at the new version, e.g. champion")
    q.add_argument("--description")
    where(q)
    q.set_defaults(func=_publish)

    q = rs.add_parser("alias", help="point an alias at a version")
    q.add_argument("--name", required=True)
    q.add_argument("--version", required=True, type=int)
    q.add_argument("--alias", required=True)
    where(q)
    q.set_defaults(func=_alias)

    q = rs.add_parser("pull", help="copy a published encoder to a directory (hashes checked), for machines without registry access")
    q.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    q.add_argument("--out", type=Path, required=True)
    where(q)
    q.set_defaults(func=_pull)

    q = rs.add_parser("list", help="registered encoders: versions, aliases, provenance")
    q.add_argument("--name", help="only this model")
    where(q)
    q.set_defaults(func=_list)


def resolve_uri(args: argparse.Namespace) -> str:
    from medssl_scale.mlflow_access import tracking_uri

    return args.tracking_uri or tracking_uri(args.workdir)


def _publish(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medssl_scale.registry.publish import publish
    from medssl_scale.mlflow_access import redact

    uri = resolve_uri(args)
    try:
        mv = publish(args.run, args.name, alias=args.alias, tracking_uri=uri, description=args.description)
    except ValueError as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {e}")
        return 2
    ref = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{mv.version}"
    Console().print(f"registered {args.name} version {mv.version} from run {args.run}: load it with "
                    f"medssl_scale.load_encoder({ref!r}) (MLFLOW_TRACKING_URI={redact(uri)})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from medssl_scale.registry import EncoderLoadError, pull

    try:
        out = pull(args.uri, args.out, resolve_uri(args))
    except EncoderLoadError as e:
        print(f"medssl registry pull: {e}", file=sys.stderr)
        return 2
    print(f"{args.uri} -> {out} (load it with medssl_scale.load_encoder({str(out)!r}))")
    return 0


def _alias(args: argparse.Namespace) -> int:
    from medssl_scale.registry.publish import client

    client(resolve_uri(args)).set_registered_model_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from medssl_scale.registry.publish import listing

    rows = listing(resolve_uri(args), args.name)
    from medssl_scale.mlflow_access import redact

    t = Table(title=f"registered encoders ({redact(resolve_uri(args))})")
    for col in ("name", "version", "aliases", "objective", "architecture", "source run", "dataset manifest", "created"):
        t.add_column(col)
    for r in rows:
        tags = r["tags"]
        created = datetime.datetime.fromtimestamp(r["created"] / 1000).strftime("%Y-%m-%d %H:%M")
        t.add_row(r["name"], str(r["version"]), ", ".join(r["aliases"]), tags.get("medssl.objective", ""),
                  tags.get("medssl.architecture", ""), (r["run_id"] or "")[:12], tags.get("medssl.dataset_manifest_sha256", "")[:12], created)
    # Piped output is for reading in full (logs, grep): no column squeezed to an ellipsis.
    Console(width=None if sys.stdout.isatty() else 200).print(t if rows else "no registered encoders")
    return 0
