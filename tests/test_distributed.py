"""Calibration and evaluation under torch.distributed (gloo, 2 CPU processes) equal a single process."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import ecmt
from ecmt import cli, distributed

sys.path.insert(0, os.path.dirname(__file__))
from test_cli import _evaluate_args, checkpoint  # noqa: E402,F401  (registers the tiny timm models)
from test_resume import _results, _untimed, interrupt_after  # noqa: E402
from tiny_models import make  # noqa: E402


def _data():
    model, shape = make("class_token")
    g = torch.Generator().manual_seed(3)
    return model, [torch.randn(4, *shape, generator=g) for _ in range(5)]


def _worker(rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    model, batches = _data()
    th = ecmt.calibrate(model, distributed.shard(batches, ctx), **kwargs)
    if ctx.is_main:
        torch.save(th.sites, out)
    distributed.shutdown()


@pytest.mark.parametrize("kwargs", [{}, {"path": "graph"}, {"per_channel": True}], ids=["adapter", "graph", "per_channel"])
def test_two_process_calibration_equals_one_process(tmp_path, kwargs):
    out = str(tmp_path / "th.pt")
    port = 29500 + os.getpid() % 1000 + 7 * len(kwargs) + (3 if "per_channel" in kwargs else 0)
    mp.spawn(_worker, args=(2, port, out, kwargs), nprocs=2, join=True)
    model, batches = _data()
    assert torch.load(out) == ecmt.calibrate(model, batches, **kwargs).sites


def test_shard_splits_batches_without_duplicates():
    items = list(range(11))
    parts = [list(distributed.shard(items, distributed.Context(r, 3))) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def _cli_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank of ``torchrun --nproc_per_node=world -m ecmt ...``: the environment torchrun sets."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    assert cli.main(argv) == 0


def _torchrun(argv: list[str], port_offset: int, world: int = 2) -> None:
    mp.spawn(_cli_worker, args=(world, 31000 + port_offset + 2 * (os.getpid() % 1000), argv), nprocs=world)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An image folder of 300 small images in 3 classes: 19 batches of 16, the last of 12."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for c in range(3):
        (root / f"n0{c}").mkdir()
        for i in range(100):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / f"n0{c}" / f"img{i}.png")
    return root


def _args(checkpoint: Path, images: Path, *extra: str) -> list[str]:
    """3 calibration batches (2 ranks: 2 and 1), 3 measured batches; later options win in argparse."""
    return _evaluate_args(checkpoint, images, "--batch-size", "16", "--T", "3", "--calib-batches", "3",
                          "--energy-batches", "3", "--threads", "1", *extra)


def test_two_process_evaluation_equals_one_process(checkpoint, images, tmp_path):
    """Calibration, counts per T and energy of ``ecmt evaluate`` under 2 gloo ranks."""
    _torchrun(_args(checkpoint, images, "--json", str(tmp_path / "two.json")), port_offset=0)
    assert cli.main(_args(checkpoint, images, "--json", str(tmp_path / "one.json"))) == 0
    two, one = (_untimed(json.loads((tmp_path / f"{n}.json").read_text())) for n in ("two", "one"))
    assert two == one and one["n_images"] == 300 and one["energy_images"] == 3 * 16 and one["firing_rates"]


def test_resume_with_another_number_of_processes(checkpoint, images, tmp_path, monkeypatch):
    """A single-process run stopped after 2 of 3 measured batches, resumed by 2 ranks, equals one whole run."""
    interrupt_after(2, monkeypatch)
    assert cli.main(_args(checkpoint, images, "--out", str(tmp_path / "cut"))) == 130
    monkeypatch.undo()
    _torchrun(_args(checkpoint, images, "--out", str(tmp_path / "cut"), "--resume"), port_offset=1)
    assert cli.main(_args(checkpoint, images, "--out", str(tmp_path / "one"))) == 0
    assert _results(tmp_path / "cut") == _results(tmp_path / "one")
