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
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional

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
from .simulation import Simulation


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
        snn_correct5: ``snn_correct5[t-1]``: images whose label is among the SNN's 5 highest
            outputs after t steps (None for models of at most 5 classes, where top-5 is trivial).
        ann_correct5: The same for the ANN (None without an ANN or top-5).
        skipped: Images that could not be read (:data:`ecmt.data.SKIPPED`): not in ``n``, never
            counted correct or wrong.
    """

    n: int
    snn_correct: tuple[int, ...]
    ann_correct: Optional[int] = None
    adaptive_correct: Optional[int] = None
    adaptive_stops: Optional[tuple[int, ...]] = None
    snn_correct5: Optional[tuple[int, ...]] = None
    ann_correct5: Optional[int] = None
    skipped: int = 0

    @classmethod
    def zero(cls, T: int, with_ann: bool = True, adaptive: bool = False, top5: bool = False) -> "Tally":
        """The empty tally for T steps (with the adaptive counts if ``adaptive``, top-5 if ``top5``)."""
        return cls(0, (0,) * T, 0 if with_ann else None, 0 if adaptive else None, (0,) * T if adaptive else None,
                   (0,) * T if top5 else None, 0 if top5 and with_ann else None)

    @property
    def T(self) -> int:
        return len(self.snn_correct)

    def __add__(self, other: "Tally") -> "Tally":
        if other.T != self.T:
            raise ValueError(f"cannot add tallies of {self.T} and {other.T} steps")
        ann = None if self.ann_correct is None or other.ann_correct is None else self.ann_correct + other.ann_correct
        adaptive = self.adaptive_stops is not None and other.adaptive_stops is not None
        top5 = self.snn_correct5 is not None and other.snn_correct5 is not None
        ann5 = top5 and self.ann_correct5 is not None and other.ann_correct5 is not None
        return Tally(self.n + other.n, _add(self.snn_correct, other.snn_correct), ann,
                     self.adaptive_correct + other.adaptive_correct if adaptive else None,  # type: ignore[operator]
                     _add(self.adaptive_stops, other.adaptive_stops) if adaptive else None,  # type: ignore[arg-type]
                     _add(self.snn_correct5, other.snn_correct5) if top5 else None,  # type: ignore[arg-type]
                     self.ann_correct5 + other.ann_correct5 if ann5 else None,  # type: ignore[operator]
                     self.skipped + other.skipped)

    @property
    def ann_top1(self) -> Optional[float]:
        """ANN top-1 accuracy in [0, 1] (None without an ANN)."""
        return None if self.ann_correct is None else self.ann_correct / max(self.n, 1)

    def snn_top1(self) -> dict[int, float]:
        """SNN top-1 accuracy in [0, 1] after each step t = 1..T."""
        return {t: c / max(self.n, 1) for t, c in enumerate(self.snn_correct, start=1)}

    @property
    def ann_top5(self) -> Optional[float]:
        """ANN top-5 accuracy in [0, 1] (None without an ANN or top-5)."""
        return None if self.ann_correct5 is None else self.ann_correct5 / max(self.n, 1)

    def snn_top5(self) -> Optional[dict[int, float]]:
        """SNN top-5 accuracy in [0, 1] after each step t = 1..T (None without top-5)."""
        if self.snn_correct5 is None:
            return None
        return {t: c / max(self.n, 1) for t, c in enumerate(self.snn_correct5, start=1)}

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
        """``[n, ann_correct, snn_correct..., adaptive_correct, adaptive_stops..., top5, ann_correct5,
        snn_correct5..., skipped]`` as int64, for summing across processes; -1 stands for None
        (``top5``: 0 without top-5 counts, 1 with), and absent counts are zeros."""
        def known(v: Optional[int]) -> int:
            return -1 if v is None else v

        stops = self.adaptive_stops or (0,) * self.T
        top5 = self.snn_correct5 or (0,) * self.T
        return torch.tensor([self.n, known(self.ann_correct), *self.snn_correct, known(self.adaptive_correct), *stops,
                             int(self.snn_correct5 is not None), known(self.ann_correct5), *top5, self.skipped],
                            dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: Tensor, T: Optional[int] = None) -> "Tally":
        """Inverse of :meth:`to_tensor`, also of a sum of such tensors.

        Given the number of steps ``T``, also reads the layouts written before top-5 counts
        and skipped images were counted (``[n, ann_correct, snn_correct..., adaptive_correct,
        adaptive_stops...]``, with ``skipped`` after it or top-5 counts).
        """
        values = [int(v) for v in t.tolist()]
        if T is not None and len(values) in (2 * T + 3, 2 * T + 4):  # no top-5 counts
            skipped = values[2 * T + 3:] or [0]
            values = values[:2 * T + 3] + [0, -1, *(0,) * T] + skipped
        elif T is not None and len(values) == 3 * T + 5:  # no skipped count
            values += [0]
        n, ann, *rest, skipped = values
        T = (len(rest) - 3) // 3
        snn, adaptive, stops = rest[:T], rest[T], rest[T + 1:2 * T + 1]
        top5, ann5, snn5 = rest[2 * T + 1], rest[2 * T + 2], rest[2 * T + 3:]
        return cls(n, tuple(snn), ann if ann >= 0 else None, adaptive if adaptive >= 0 else None,
                   tuple(stops) if adaptive >= 0 else None, tuple(snn5) if top5 > 0 else None,
                   ann5 if top5 > 0 and ann5 >= 0 else None, skipped)


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
                   stop_rule: Optional[StopRule] = None, top5: bool = False, compact: bool = False) -> Tally:
    """Count the correct classifications of one batch, by the ANN and by the SNN at each t ≤ T.

    With ``stop_rule``, also those of the SNN at each image's stop step, decided from the same
    simulation's running outputs, and the number of images stopping at each step; with
    ``top5``, also the images whose label is among the 5 highest outputs. With ``compact``
    (and ``stop_rule``), settled images leave the simulation (:meth:`Simulation.keep`), which
    saves their steps: the adaptive counts are the same, and the count at step t takes each
    image's output at ``min(t, its stop step)``.
    """
    x, y, skipped = readable(x, y)
    if not y.shape[0]:
        return replace(Tally.zero(T, with_ann=ann is not None, adaptive=stop_rule is not None, top5=top5),
                       skipped=skipped)
    ann_out = None if ann is None else ann(x)
    ann_correct = None if ann_out is None else int((ann_out.argmax(-1) == y).sum())
    ann_correct5 = None if ann_out is None or not top5 else _in_top5(ann_out, y)
    tracker = None if stop_rule is None else StopTracker(stop_rule)
    sim = Simulation(snn, x, T, growing=compact and tracker is not None)
    compacting = compact and tracker is not None and sim.compacts
    snn_correct, snn_correct5 = [], []
    answer: Optional[Tensor] = None  # (B, C): each image's output at min(t, its stop step)
    for out in sim:
        if compacting:
            live = ~tracker.settled[sim.rows] if answer is not None else slice(None)
            answer = out.clone() if answer is None else answer.index_copy_(0, sim.rows[live], out[live])
            out = answer
        snn_correct.append(int((out.argmax(-1) == y).sum()))
        if top5:
            snn_correct5.append(_in_top5(out, y))
        if tracker is not None:
            tracker.update(out)
            if compacting:
                sim.keep(~tracker.settled[sim.rows])
    for _ in range(T - len(snn_correct)):  # every image settled before T
        snn_correct.append(snn_correct[-1])
        if top5:
            snn_correct5.append(snn_correct5[-1])
    n, top5_counts = int(y.shape[0]), tuple(snn_correct5) if top5 else None
    if tracker is None:
        return Tally(n, tuple(snn_correct), ann_correct, snn_correct5=top5_counts, ann_correct5=ann_correct5,
                     skipped=skipped)
    steps, preds = tracker.result()
    stops = torch.bincount(steps.flatten() - 1, minlength=T).tolist()
    return Tally(n, tuple(snn_correct), ann_correct, int((preds == y).sum()), tuple(stops), top5_counts,
                 ann_correct5, skipped)


def _in_top5(out: Tensor, y: Tensor) -> int:
    """How many labels ``y`` are among the 5 highest of their row of ``out``."""
    return int((out.topk(5, dim=-1).indices == y.unsqueeze(-1)).any(-1).sum())


def evaluate(ann: Optional[nn.Module], snn: SpikingModel, batches: Iterable[tuple[Any, Tensor]], T: int, *,
             device: torch.device = torch.device("cpu"), measure_batches: int = 0,
             progress: bool = True, desc: str = "evaluating",
             stop_rule: Optional[StopRule] = None, top5: bool = False, compact: bool = False,
             log: Optional[Callable[[str], None]] = None) -> tuple[Tally, Optional[Measurement]]:
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
        top5: Also count top-5 classifications (for models of more than 5 classes).
        compact: With ``stop_rule``, settled images leave the simulation, which saves their
            steps (see :func:`evaluate_batch`; not in the measured batches, which run to T).
        log: Where to write plain progress lines (:class:`ProgressLog`), for logs that are not
            terminals; None: none.

    Returns:
        The tally, and the operation counts (:class:`ecmt.energy.Measurement`) of the measured batches (None if
        ``measure_batches`` is 0).

    Raises:
        InvalidInputError: ``device`` is not available, or see :func:`ecmt.simulate`.
    """
    device = resolve_device(device)
    tally = Tally.zero(T, with_ann=ann is not None, adaptive=stop_rule is not None, top5=top5)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(batches, desc=desc, total=total, disable=None if progress is None else not progress, unit="batch",
               dynamic_ncols=True)
    lines = None if log is None or total is None else ProgressLog(total, log, desc=desc)
    counter = OpCounter(snn) if measure_batches > 0 else None
    with ExitStack() as measuring:
        if counter is not None:
            measuring.enter_context(counter)
        for i, (x, y) in enumerate(bar):
            if i == measure_batches:
                measuring.close()  # counting stops: hooks removed, spike counters off
            tally += evaluate_batch(ann, snn, to_device(x, device), y.to(device), T, stop_rule, top5, compact)
            bar.set_postfix_str(_running(tally), refresh=False)
            if lines is not None:
                lines.update(i + 1, tally)
    return tally, None if counter is None else counter.result()


def _running(tally: Tally) -> str:
    snn = f"snn@{tally.T} {100 * tally.snn_top1()[tally.T]:.2f}%"
    if tally.adaptive_top1 is not None:
        snn += f" adaptive {100 * tally.adaptive_top1:.2f}%@{tally.mean_steps:.2f}"
    return snn if tally.ann_top1 is None else f"ann {100 * tally.ann_top1:.2f}% {snn}"


class ProgressLog:
    """Plain progress lines for a log file, where a progress bar writes nothing useful.

    A line is written when another tenth of the batches is done or ``every`` seconds have
    passed since the last line, whichever comes first, and at the end: the batches and images
    done, the running accuracies and the time left.

    Args:
        total: Number of batches of the whole evaluation.
        log: Writes one line (e.g. to stderr).
        every: Seconds between lines at most.
        start: Batches already done when counting starts (a resumed run).
        desc: What is being evaluated, at the start of each line.
    """

    def __init__(self, total: int, log: Callable[[str], None], every: float = 30.0, start: int = 0,
                 desc: str = "evaluating") -> None:
        self.total, self.log, self.every, self.desc = total, log, every, desc
        self.start = self.last_done = start
        self.began = self.last_time = time.monotonic()

    def update(self, done: int, tally: Tally) -> None:
        """Report ``done`` batches finished, with the counts ``tally`` so far, if a line is due."""
        now = time.monotonic()
        tenth = max(self.total // 10, 1)
        due = done >= self.total or done // tenth > self.last_done // tenth or now - self.last_time >= self.every
        if not due or done <= self.last_done:
            return
        self.last_done, self.last_time = done, now
        elapsed = now - self.began
        left = elapsed / max(done - self.start, 1) * (self.total - done)
        self.log(f"ecmt: {self.desc}: {done}/{self.total} batches ({100 * done / max(self.total, 1):.0f} %, "
                 f"{tally.n} images), {_running(tally)}; {_duration(elapsed)} elapsed, "
                 f"{_duration(left)} left")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
