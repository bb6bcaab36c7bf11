"""Two real processes (torch.distributed, gloo): disjoint and complete epochs, no hang on unequal shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ports import free_port
from sample_data import reshard, training_dataset

from medssl_scale.data import Catalog, EpochPlan, PlanSampler

HERE = Path(__file__).parent


def run_ranks(out: Path, scenarios: dict, world: int = 2, timeout: float = 240) -> dict:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(HERE.parent)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_data_worker.py"), str(out), json.dumps(scenarios)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("ranks hung:\n" + "\n".join(logs)) from None
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return json.loads(out.read_text())


def test_two_ranks_disjoint_complete_and_never_waiting(tmp_path):
    data = training_dataset(tmp_path / "a")
    uneven = tmp_path / "uneven"
    shutil.copytree(data, uneven)
    reshard(data, [3, 1, 2])  # balanced by count: 3 | 1 + 2
    reshard(uneven, [4, 1, 1])  # 4 | 1 + 1: one rank must repeat, the other stop early
    base = {"crop": 16, "batch_size": 2, "workers": 2, "crops_per_visit": 2, "seed": 5}
    res = run_ranks(tmp_path / "out.json", {
        "zarr": {**base, "dataset": str(data), "source": "zarr"},
        "shards": {**base, "dataset": str(data), "source": "shards"},
        "uneven": {**base, "dataset": str(uneven), "source": "shards"},
    })

    # Zarr crops: the two ranks' slots partition the epoch, and hold what the plan says.
    r0, r1 = res["zarr"]
    s0, s1 = {s[2] for s in r0["seen"]}, {s[2] for s in r1["seen"]}
    assert r0["batches"] == r1["batches"] and len(r0["seen"]) == len(r1["seen"])
    assert not s0 & s1
    plan = EpochPlan(Catalog.load(data), seed=5, crops_per_visit=2, world=2, batch_size=2)
    assert s0 | s1 == set(range(2 * plan.samples_per_rank()))
    want0 = {s.slot for b in PlanSampler(plan, 0, workers=2).batches(0) for s in b}
    assert s0 == want0
    crops = [(v, tuple(box)) for r in (r0, r1) for v, box, _ in r["seen"]]
    assert len(set(crops)) == len(crops)

    # Shards, balanced: every volume on exactly one rank, each cut crops_per_visit times.
    r0, r1 = res["shards"]
    v0, v1 = [v for v, _, _ in r0["seen"]], [v for v, _, _ in r1["seen"]]
    assert not set(v0) & set(v1)
    assert set(v0) | set(v1) == {v.volume_id for v in Catalog.load(data).volumes}
    assert all(v0.count(v) == 2 for v in set(v0))

    # Shards, unequal: the same number of batches on both ranks, still disjoint.
    r0, r1 = res["uneven"]
    assert r0["batches"] == r1["batches"] == 3
    assert len(r0["seen"]) == len(r1["seen"]) == 6
    assert not {v for v, _, _ in r0["seen"]} & {v for v, _, _ in r1["seen"]}
