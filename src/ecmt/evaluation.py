"""Top-1 accuracy of an ANN and of its SNN at every time step, from one simulation per batch.

Results are accumulated as integer counts per batch (:class:`Tally`): the number of images
and, for the ANN and for each step t = 1..T, the number classified correctly. Tallies add, so
partial results of several runs or processes combine exactly (as a tensor, with
:meth:`Tally.to_tensor` and :meth:`Tally.from_tensor`).

Example:
    >>> tally = evaluate(ann, snn, loader, T=8)     # doctest: +SKIP
    >>> tally.ann_top1, tally.snn_top1()[8]          # doctest: +SKIP
    (0.912, 0.905)
"""
from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .calibration import to_device
from .conversion import SpikingModel
from .energy import Measurement, OpCounter
from .simulation import simulate_steps


@dataclass(frozen=True)
class Tally:
    """Correct classifications counted over a set of images.

    Attributes:
        n: Number of images.
        snn_correct: ``snn_correct[t-1]``: images the SNN classified correctly after t steps.
        ann_correct: Images the ANN classified correctly, or None when no ANN was run.
    """

    n: int
    snn_correct: tuple[int, ...]
    ann_correct: Optional[int] = None

    @classmethod
    def zero(cls, T: int, with_ann: bool = True) -> "Tally":
        """The empty tally for T steps."""
        return cls(0, (0,) * T, 0 if with_ann else None)

    @property
    def T(self) -> int:
        return len(self.snn_correct)

    def __add__(self, other: "Tally") -> "Tally":
        if other.T != self.T:
            raise ValueError(f"cannot add tallies of {self.T} and {other.T} steps")
        ann = None if self.ann_correct is None or other.ann_correct is None else self.ann_correct + other.ann_correct
        return Tally(self.n + other.n, tuple(a + b for a, b in zip(self.snn_correct, other.snn_correct)), ann)

    @property
    def ann_top1(self) -> Optional[float]:
        """ANN top-1 accuracy in [0, 1] (None without an ANN)."""
        return None if self.ann_correct is None else self.ann_correct / max(self.n, 1)

    def snn_top1(self) -> dict[int, float]:
        """SNN top-1 accuracy in [0, 1] after each step t = 1..T."""
        return {t: c / max(self.n, 1) for t, c in enumerate(self.snn_correct, start=1)}

    def to_tensor(self) -> Tensor:
        """``[n, ann_correct (-1 if none), snn_correct...]`` as int64, for summing across processes."""
        ann = -1 if self.ann_correct is None else self.ann_correct
        return torch.tensor([self.n, ann, *self.snn_correct], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Tally":
        """Inverse of :meth:`to_tensor`, also of a sum of such tensors."""
        n, ann, *snn = (int(v) for v in t.tolist())
        return cls(n, tuple(snn), ann if ann >= 0 else None)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def subset(dataset: Dataset, limit: Optional[int], seed: int) -> Dataset:
    """All of ``dataset`` in order, or a random subset of ``limit`` images drawn with ``seed``.

    A random subset, not the first images: image folders are sorted by class.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=g)[:limit].tolist())


def loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Batches of ``(images, labels)`` in dataset order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def images_only(batches: Iterable[Any]) -> Iterable[Tensor]:
    """The images of ``(images, labels)`` batches (for calibration)."""
    return (x for x, _ in batches)


@torch.no_grad()
def evaluate_batch(ann: Optional[nn.Module], snn: SpikingModel, x: Any, y: Tensor, T: int) -> Tally:
    """Count the correct classifications of one batch, by the ANN and by the SNN at each t ≤ T."""
    ann_correct = None if ann is None else int((ann(x).argmax(-1) == y).sum())
    snn_correct = tuple(int((out.argmax(-1) == y).sum()) for out in simulate_steps(snn, x, T))
    return Tally(int(y.shape[0]), snn_correct, ann_correct)


def evaluate(ann: Optional[nn.Module], snn: SpikingModel, batches: Iterable[tuple[Any, Tensor]], T: int, *,
             device: torch.device = torch.device("cpu"), measure_batches: int = 0,
             progress: bool = True, desc: str = "evaluating") -> tuple[Tally, Optional[Measurement]]:
    """Evaluate the ANN and the SNN on every batch.

    Args:
        ann: The ANN (None to evaluate the SNN alone).
        snn: Its spiking form.
        batches: ``(images, labels)`` batches, e.g. from :func:`loader`.
        T: Number of time steps simulated per batch.
        device: Where to run.
        measure_batches: Count operations and spikes (:class:`ecmt.energy.OpCounter`) during
            the simulation of this many first batches.
        progress: Show a progress bar with the running accuracies.
        desc: Progress bar label.

    Returns:
        The tally, and the operation counts (:class:`ecmt.energy.Measurement`) of the measured batches (None if
        ``measure_batches`` is 0).
    """
    tally = Tally.zero(T, with_ann=ann is not None)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(batches, desc=desc, total=total, disable=not progress, unit="batch", dynamic_ncols=True)
    counter = OpCounter(snn) if measure_batches > 0 else None
    with ExitStack() as measuring:
        if counter is not None:
            measuring.enter_context(counter)
        for i, (x, y) in enumerate(bar):
            if i == measure_batches:
                measuring.close()  # counting stops: hooks removed, spike counters off
            tally += evaluate_batch(ann, snn, to_device(x, device), y.to(device), T)
            bar.set_postfix_str(_running(tally), refresh=False)
    return tally, None if counter is None else counter.result()


def _running(tally: Tally) -> str:
    snn = f"snn@{tally.T} {100 * tally.snn_top1()[tally.T]:.2f}%"
    return snn if tally.ann_top1 is None else f"ann {100 * tally.ann_top1:.2f}% {snn}"
