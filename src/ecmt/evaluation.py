"""Top-1 accuracy of an ANN and of its SNN at every time step, from one simulation per batch.

Results are accumulated as integer counts per batch (:class:`Tally`): the number of images
and, for the ANN and for each step t = 1..T, the number classified correctly; with a stopping
rule (:mod:`ecmt.adaptive`), also the number classified correctly at each input's own stop
step and the number of inputs stopping at each step, decided from the same simulation. Tallies add, so
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
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .adaptive import StopRule, StopTracker
from .calibration import to_device
from .conversion import SpikingModel
from .data import SKIPPED
from .distributed import resolve_device
from .energy import Measurement, OpCounter
from .errors import InvalidInputError
from .simulation import simulate_steps


@dataclass(frozen=True)
class Tally:
    """Correct classifications counted over a set of images.

    Attributes:
        n: Number of images.
        snn_correct: ``snn_correct[t-1]``: images the SNN classified correctly after t steps.
        ann_correct: Images the ANN classified correctly, or None when no ANN was run.
        adaptive_correct: Images the SNN classified correctly at their stop step
            (:mod:`ecmt.adaptive`), or None without a stopping rule.
        adaptive_stops: ``adaptive_stops[t-1]``: images that stopped at step t (None without
            a stopping rule).
        skipped: Images that could not be read (:data:`ecmt.data.SKIPPED`): not in ``n``, never
            counted correct or wrong.
    """

    n: int
    snn_correct: tuple[int, ...]
    ann_correct: Optional[int] = None
    adaptive_correct: Optional[int] = None
    adaptive_stops: Optional[tuple[int, ...]] = None
    skipped: int = 0

    @classmethod
    def zero(cls, T: int, with_ann: bool = True, adaptive: bool = False) -> "Tally":
        """The empty tally for T steps (with the adaptive counts if ``adaptive``)."""
        return cls(0, (0,) * T, 0 if with_ann else None, 0 if adaptive else None, (0,) * T if adaptive else None)

    @property
    def T(self) -> int:
        return len(self.snn_correct)

    def __add__(self, other: "Tally") -> "Tally":
        if other.T != self.T:
            raise ValueError(f"cannot add tallies of {self.T} and {other.T} steps")
        ann = None if self.ann_correct is None or other.ann_correct is None else self.ann_correct + other.ann_correct
        adaptive = self.adaptive_stops is not None and other.adaptive_stops is not None
        return Tally(self.n + other.n, _add(self.snn_correct, other.snn_correct), ann,
                     self.adaptive_correct + other.adaptive_correct if adaptive else None,  # type: ignore[operator]
                     _add(self.adaptive_stops, other.adaptive_stops) if adaptive else None,  # type: ignore[arg-type]
                     self.skipped + other.skipped)

    @property
    def ann_top1(self) -> Optional[float]:
        """ANN top-1 accuracy in [0, 1] (None without an ANN)."""
        return None if self.ann_correct is None else self.ann_correct / max(self.n, 1)

    def snn_top1(self) -> dict[int, float]:
        """SNN top-1 accuracy in [0, 1] after each step t = 1..T."""
        return {t: c / max(self.n, 1) for t, c in enumerate(self.snn_correct, start=1)}

    @property
    def adaptive_top1(self) -> Optional[float]:
        """SNN top-1 accuracy at each image's stop step (None without a stopping rule)."""
        return None if self.adaptive_correct is None else self.adaptive_correct / max(self.n, 1)

    @property
    def adaptive_steps(self) -> Optional[int]:
        """Time steps used, summed over the images (None without a stopping rule)."""
        return None if self.adaptive_stops is None else sum(t * c for t, c in enumerate(self.adaptive_stops, start=1))

    @property
    def mean_steps(self) -> Optional[float]:
        """Mean number of time steps used per image (None without a stopping rule)."""
        return None if self.adaptive_steps is None else self.adaptive_steps / max(self.n, 1)

    def to_tensor(self) -> Tensor:
        """``[n, ann_correct, snn_correct..., adaptive_correct, adaptive_stops..., skipped]`` as int64,
        for summing across processes; -1 stands for None, and absent stops are zeros."""
        ann = -1 if self.ann_correct is None else self.ann_correct
        adaptive = -1 if self.adaptive_correct is None else self.adaptive_correct
        stops = self.adaptive_stops or (0,) * self.T
        return torch.tensor([self.n, ann, *self.snn_correct, adaptive, *stops, self.skipped], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Tally":
        """Inverse of :meth:`to_tensor`, also of a sum of such tensors."""
        n, ann, *rest, skipped = (int(v) for v in t.tolist())
        T = (len(rest) - 1) // 2
        snn, adaptive, stops = rest[:T], rest[T], rest[T + 1:]
        return cls(n, tuple(snn), ann if ann >= 0 else None, adaptive if adaptive >= 0 else None,
                   tuple(stops) if adaptive >= 0 else None, skipped)


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))


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
    """Batches of ``(images, labels)`` in dataset order.

    Raises:
        InvalidInputError: ``batch_size`` < 1.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch size must be a positive integer, got {batch_size!r}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def images_only(batches: Iterable[Any]) -> Iterable[Tensor]:
    """The images of ``(images, labels)`` batches (for calibration), without unreadable ones."""
    for x, y in batches:
        x, _, _ = readable(x, y)
        if x.shape[0]:
            yield x


def readable(x: Any, y: Tensor) -> tuple[Any, Tensor, int]:
    """The images and labels of a batch without those that could not be read, and how many those were."""
    keep = y != SKIPPED
    skipped = int((~keep).sum())
    return (x, y, 0) if not skipped else (x[keep], y[keep], skipped)


@torch.no_grad()
def evaluate_batch(ann: Optional[nn.Module], snn: SpikingModel, x: Any, y: Tensor, T: int,
                   stop_rule: Optional[StopRule] = None) -> Tally:
    """Count the correct classifications of one batch, by the ANN and by the SNN at each t ≤ T.

    With ``stop_rule``, also those of the SNN at each image's stop step, decided from the same
    simulation's running outputs, and the number of images stopping at each step.
    """
    x, y, skipped = readable(x, y)
    if not y.shape[0]:
        return replace(Tally.zero(T, with_ann=ann is not None, adaptive=stop_rule is not None), skipped=skipped)
    ann_correct = None if ann is None else int((ann(x).argmax(-1) == y).sum())
    tracker = None if stop_rule is None else StopTracker(stop_rule)
    snn_correct = []
    for out in simulate_steps(snn, x, T):
        snn_correct.append(int((out.argmax(-1) == y).sum()))
        if tracker is not None:
            tracker.update(out)
    if tracker is None:
        return Tally(int(y.shape[0]), tuple(snn_correct), ann_correct, skipped=skipped)
    steps, preds = tracker.result()
    stops = torch.bincount(steps.flatten() - 1, minlength=T).tolist()
    return Tally(int(y.shape[0]), tuple(snn_correct), ann_correct, int((preds == y).sum()), tuple(stops), skipped)


def evaluate(ann: Optional[nn.Module], snn: SpikingModel, batches: Iterable[tuple[Any, Tensor]], T: int, *,
             device: torch.device = torch.device("cpu"), measure_batches: int = 0,
             progress: bool = True, desc: str = "evaluating",
             stop_rule: Optional[StopRule] = None) -> tuple[Tally, Optional[Measurement]]:
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
        stop_rule: Also count the SNN's accuracy and steps with adaptive time steps
            (:mod:`ecmt.adaptive`), from the same simulations.

    Returns:
        The tally, and the operation counts (:class:`ecmt.energy.Measurement`) of the measured batches (None if
        ``measure_batches`` is 0).

    Raises:
        InvalidInputError: ``device`` is not available, or see :func:`ecmt.simulate`.
    """
    device = resolve_device(device)
    tally = Tally.zero(T, with_ann=ann is not None, adaptive=stop_rule is not None)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(batches, desc=desc, total=total, disable=None if progress is None else not progress, unit="batch",
               dynamic_ncols=True)
    counter = OpCounter(snn) if measure_batches > 0 else None
    with ExitStack() as measuring:
        if counter is not None:
            measuring.enter_context(counter)
        for i, (x, y) in enumerate(bar):
            if i == measure_batches:
                measuring.close()  # counting stops: hooks removed, spike counters off
            tally += evaluate_batch(ann, snn, to_device(x, device), y.to(device), T, stop_rule)
            bar.set_postfix_str(_running(tally), refresh=False)
    return tally, None if counter is None else counter.result()


def _running(tally: Tally) -> str:
    snn = f"snn@{tally.T} {100 * tally.snn_top1()[tally.T]:.2f}%"
    if tally.adaptive_top1 is not None:
        snn += f" adaptive {100 * tally.adaptive_top1:.2f}%@{tally.mean_steps:.2f}"
    return snn if tally.ann_top1 is None else f"ann {100 * tally.ann_top1:.2f}% {snn}"
