"""``medssl``: one command, a subcommand per job."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from ingest import cli as ingest_cli
    from medssl_scale import demo, inspect
    from medssl_scale.data import preview
    from medssl_scale.downstream import cli as finetune_cli
    from medssl_scale.registry import cli as registry_cli
    from medssl_scale.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="medssl", description="Self-supervised pre-training on 3D CT and MRI, at scale.")
    parser.add_argument("--version", action="version", version=f"medssl-scale {__import__('medssl_scale').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ingest_cli.add_parser(sub)
    inspect.add_parser(sub)
    demo.add_parser(sub)
    preview.add_parser(sub)
    train_cli.add_parser(sub)
    registry_cli.add_parser(sub)
    finetune_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
