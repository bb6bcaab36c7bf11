"""The per-rank entry: what torchrun, the deepspeed launcher and Kubernetes pods run.

    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] \
        launchers/rank.py --config FILE [key=value ...] [--resume auto|never|PATH]

It reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the
environment (the launchers set them) and holds no training logic.
"""

from __future__ import annotations

import sys

from medssl_scale.train.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main(sys.argv[1:]))
