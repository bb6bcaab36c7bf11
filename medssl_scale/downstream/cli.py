"""``medssl finetune``: a pulled encoder against the same network from scratch, with few labels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a registered encoder for segmentation and compare with training from scratch")
    p.add_argument("--encoder", help="models:/NAME@ALIAS, models:/NAME/VERSION or an encoder directory")
    p.add_argument("--data", help="dataset directory with labelled volumes")
    p.add_argument("--label-fraction", type=float, help="share of the training patients whose labels are used (default 0.1)")
    p.add_argument("--seeds", type=int, help="repeats with different seeds (default 1)")
    p.add_argument("--baseline", choices=["scratch", "none"], help="also train a randomly initialised encoder (default scratch)")
    p.add_argument("--steps", type=int)
    p.add_argument("--crop", type=int, help="cubic crop (and sliding-window) size; a multiple of the encoder's coarsest stride")
    p.add_argument("--class-names", help="comma-separated names of classes 1..K-1")
    p.add_argument("--tracking-uri", help="MLflow URI for the registry and the fine-tuning runs (default: MLFLOW_TRACKING_URI, "
                                          "else runs/mlruns.db, as pretrain and registry)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--config", type=Path, help="YAML with any FinetuneConfig settings; flags and overrides win")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. lr=3e-4 eval_every=50")
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from medssl_scale.config import apply_overrides, load_yaml
    from medssl_scale.downstream.finetune import FinetuneConfig

    raw = load_yaml(args.config) if args.config else {}
    flags = {"encoder": args.encoder, "dataset": args.data, "label_fraction": args.label_fraction, "seeds": args.seeds,
             "baseline": args.baseline, "steps": args.steps, "crop": args.crop, "tracking_uri": args.tracking_uri,
             "workdir": str(args.workdir) if args.workdir else None,
             "class_names": args.class_names.split(",") if args.class_names else None}
    raw.update({k: v for k, v in flags.items() if v is not None})
    raw = apply_overrides(raw, args.overrides)
    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{len(e.errors())} problem(s) in the fine-tuning settings"]
        lines += [f"  {'.'.join(map(str, err['loc'])) or '(settings)'}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise ValueError("\n".join(lines)) from None


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medssl_scale.downstream.finetune import print_table, run
    from medssl_scale.registry import EncoderLoadError

    console = Console()
    try:
        cfg = config_from_args(args)
        table = run(cfg, console)
    except (ValueError, FileNotFoundError, EncoderLoadError) as e:
        print(f"medssl finetune: {e}", file=sys.stderr)
        return 2
    print_table(table, console)
    console.print(f"results: {Path(cfg.workdir) / 'results.json'}; MLflow run {table['mlflow_run_id']} at {table['tracking_uri']}")
    return 0
