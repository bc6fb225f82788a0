"""Multi-process evaluation with ``torch.distributed``, launched by ``torchrun``.

Nothing changes for the user but the launcher: ``torchrun --nproc_per_node=N -m ecmt
evaluate ...``. Every rank builds the same model; work is split by whole batches, so each
image is computed in the same batch, with the same shapes, as in a single process, and the
integer results (activation histograms, correct counts per T) are summed across ranks, the
operation counts gathered (:mod:`ecmt.progress`). The results are therefore identical to a
one-process run, whatever the number of processes.

The backend is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sized, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .errors import InvalidInputError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0 in a single process).
        world_size: Number of processes.
        device: The device this rank computes on.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs and draws the progress bar."""
        return self.rank == 0


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, checked to exist on this machine.

    Raises:
        InvalidInputError: CUDA is requested but not available.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {str(device)!r}: CUDA is not available on this machine; use the CPU")
    return dev


def launched() -> bool:
    """True when started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> Context:
    """Join the process group if launched by torchrun; a single-process context otherwise.

    Args:
        device: ``"cpu"`` or ``"cuda"``; with CUDA each rank takes GPU ``LOCAL_RANK``.

    Raises:
        InvalidInputError: CUDA is requested but not available.
    """
    dev = resolve_device(device)
    if not launched():
        return Context(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return Context(dist.get_rank(), dist.get_world_size(), dev)


def shard(batches: Iterable[T], ctx: Context) -> Iterator[T]:
    """This rank's batches of ``batches``, dealt round-robin (batch i to rank i mod world_size).

    No batch is duplicated or dropped: e.g. ``ecmt.calibrate(model, shard(batches, ctx))`` on
    every rank gives every rank the thresholds of all the batches.
    """
    for i, batch in enumerate(batches):
        if i % ctx.world_size == ctx.rank:
            yield batch


def batch_ids(n_batches: int, ctx: Context, start: int = 0) -> range:
    """This rank's share of the batches ``start..n_batches-1``: batch ``start + rank``, then
    every ``world_size``-th after it (round-robin; the last round may leave ranks without one)."""
    return range(start + ctx.rank, n_batches, ctx.world_size)


def whole_batches(dataset: Dataset, batch_size: int, ids: Iterable[int], workers: int = 0) -> DataLoader:
    """The batches ``ids`` of ``dataset`` cut in order into batches of ``batch_size`` images.

    Batch i holds items ``i·batch_size`` up to ``(i+1)·batch_size`` (the last one fewer), as in
    :func:`ecmt.evaluation.loader`; only the given batches are loaded.
    """
    n = len(dataset)  # type: ignore[arg-type]
    sampler = [list(range(i * batch_size, min((i + 1) * batch_size, n))) for i in ids]
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers)


def count_batches(dataset: Sized, batch_size: int) -> int:
    """Number of batches of ``batch_size`` that ``dataset`` is cut into (the last may be short)."""
    return -(-len(dataset) // batch_size)


def is_main() -> bool:
    """True in rank 0 of a job, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over all ranks, in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
