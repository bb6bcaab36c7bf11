"""One rank of the 2-process data test (run by test_data_dist.py with RANK, WORLD_SIZE, MASTER_ADDR/PORT set).

For each scenario it iterates one epoch the way DDP training does, with a
collective per step: a rank with fewer batches than the other would leave
that collective waiting until the group's timeout.
"""

import datetime
import json
import sys

import torch
import torch.distributed as dist

from medssl_scale.data import DataConfig, Loader


def main() -> None:
    out, scenarios = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results = {}
    for name, cfg in scenarios.items():
        loader = Loader(DataConfig(**cfg))  # rank and world from torch.distributed
        seen = []
        for batch in loader.epoch_batches():
            dist.all_reduce(torch.ones(1))  # what a DDP step does: both ranks must be here
            for i, vid in enumerate(batch["volume"]):
                seen.append([vid, batch["box"][i].flatten().tolist(), int(batch["slot"][i]) if "slot" in batch else -1])
        gathered = [None, None]
        dist.all_gather_object(gathered, {"batches": len(loader), "seen": seen})
        results[name] = gathered
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
