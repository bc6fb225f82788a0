"""Calibration under torch.distributed (gloo, 2 CPU processes) equals a single process."""
import os
import sys

import torch
import torch.multiprocessing as mp

import ecmt
from ecmt import distributed

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make  # noqa: E402


def _data():
    model, shape = make("class_token")
    g = torch.Generator().manual_seed(3)
    return model, [torch.randn(4, *shape, generator=g) for _ in range(5)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    model, batches = _data()
    th = ecmt.calibrate(model, distributed.shard(batches, ctx))
    if ctx.is_main:
        torch.save(th.sites, out)
    distributed.shutdown()


def test_two_process_calibration_equals_one_process(tmp_path):
    out = str(tmp_path / "th.pt")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    model, batches = _data()
    assert torch.load(out) == ecmt.calibrate(model, batches).sites


def test_shard_splits_batches_without_duplicates():
    items = list(range(11))
    parts = [list(distributed.shard(items, distributed.Context(r, 3), first_to_main=2)) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert parts[0][:2] == [0, 1]
