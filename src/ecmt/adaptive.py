"""Adaptive time steps: stop simulating an input once its prediction has settled.

An SNN's running output sharpens with every step, and most inputs are classified correctly
long before the last one. The stopping rule (:class:`StopRule`) decides per input, from the
running outputs alone, when further steps would no longer change the answer:

    input i stops at the first step t at which its top-1 class is the same as at each of
    the ``patience`` previous steps, and the softmax probability of that class exceeds the
    runner-up's by at least ``margin``. An input that never settles stops at T.

The margin is taken between softmax probabilities, not logits: it lies in [0, 1] whatever
the scale of the model's logits, so one bound means the same for every model.

Stopping is decided inside one simulation of T steps (:class:`StopTracker` follows the
running outputs step by step), so the adaptive result and the fixed-T results come from the
same spikes. This is exact, not an approximation of stopping the simulation: the inputs of a
batch do not interact, so an input's outputs up to its stop step are the same whether or not
it is simulated further. To save the compute, the settled inputs can leave the batch
(:meth:`ecmt.simulation.Simulation.keep`, ``compact=True`` in :func:`ecmt.evaluation.evaluate`):
the stop steps and predictions stay the same, bit for bit.

Energy (:func:`mean_energy`): an input stopped at step t costs the cumulative energy of
steps 1..t. The mean over inputs is computed exactly from the number of inputs stopping at
each step, with the cumulative energy per step measured by :class:`ecmt.energy.OpCounter`
(averaged over the measured images, which run all T steps).

Example:
    >>> rule = StopRule(patience=2, margin=0.5)
    >>> out = ecmt.simulate(snn, images, T=16)      # doctest: +SKIP
    >>> steps, preds = stop_steps(out, rule)        # doctest: +SKIP
    >>> steps.float().mean()                        # doctest: +SKIP
    tensor(2.7)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class StopRule:
    """When an input's prediction counts as settled.

    The defaults are the fastest rule within 1 point of the ANN on 1,000 training images of
    the reference model that were used neither for calibration nor for testing (README).

    Attributes:
        patience: k: the top-1 class must be unchanged over the last k steps (the same at steps
            t-k..t). With k = 0 only the margin is checked; the earliest possible stop is
            step k + 1.
        margin: m in [0, 1]: the softmax probability of the top-1 class must exceed the
            runner-up's by at least m.

    Example:
        >>> StopRule(patience=1, margin=0.2)
        StopRule(patience=1, margin=0.2)
    """

    patience: int = 1
    margin: float = 0.7

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be a non-negative integer, got {self.patience!r}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin!r}")


def probability_margin(out: Tensor) -> Tensor:
    """Softmax probability of the top-1 class minus the runner-up's: ``[B, C] -> [B]``."""
    if out.shape[-1] < 2:
        return torch.ones(out.shape[:-1], device=out.device)
    top2 = out.float().softmax(-1).topk(2, dim=-1).values  # (B, 2)
    return top2[..., 0] - top2[..., 1]


class StopTracker:
    """Applies a :class:`StopRule` to the running outputs of one simulation, step by step.

    Args:
        rule: The stopping rule.

    Example:
        >>> tracker = StopTracker(StopRule(patience=1, margin=0.0))
        >>> for out in torch.tensor([[[0., 1.]], [[0., 2.]], [[3., 0.]]]):
        ...     tracker.update(out)
        >>> tracker.result()
        (tensor([2]), tensor([1]))
    """

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.t = 0
        self._pred: Optional[Tensor] = None  # (B,) top-1 class at the last step
        self._run: Optional[Tensor] = None  # (B,) steps for which it has been top-1
        self._stop: Optional[Tensor] = None  # (B,) stop step, 0 while running
        self._stop_pred: Optional[Tensor] = None  # (B,) top-1 class at the stop step

    def update(self, out: Tensor) -> None:
        """Take the running output ``[B, C]`` after the next step."""
        self.t += 1
        pred = out.argmax(-1)
        if self._pred is None:
            self._run = torch.ones_like(pred)
            self._stop = torch.zeros_like(pred)
            self._stop_pred = pred.clone()
        else:
            self._run = torch.where(pred == self._pred, self._run + 1, 1)
        self._pred = pred
        settled = (self._run > self.rule.patience) & (probability_margin(out) >= self.rule.margin)
        now = settled & (self._stop == 0)
        self._stop[now] = self.t
        self._stop_pred[now] = pred[now]

    @property
    def settled(self) -> Tensor:
        """``[B]`` bool: the inputs that have stopped (before any step: none)."""
        return torch.zeros(0, dtype=torch.bool) if self._stop is None else self._stop != 0

    def result(self) -> tuple[Tensor, Tensor]:
        """Per input, the stop step in 1..t and the top-1 class there; unsettled inputs stop at t.

        Raises:
            ValueError: No step was taken.
        """
        if self._pred is None:
            raise ValueError("no step was taken")
        running = self._stop == 0
        return torch.where(running, self.t, self._stop), torch.where(running, self._pred, self._stop_pred)


def stop_steps(outputs: Tensor, rule: StopRule) -> tuple[Tensor, Tensor]:
    """Stop steps and predictions from the running outputs of a simulation.

    Args:
        outputs: ``[T, B, C]``, ``outputs[t-1]`` the running output after step t (as from
            :func:`ecmt.simulate`).
        rule: The stopping rule.

    Returns:
        ``(steps, preds)``, both ``[B]`` int64: the step in 1..T at which each input stops
        (T if it never settles) and its top-1 class at that step.
    """
    tracker = StopTracker(rule)
    for out in outputs:
        tracker.update(out)
    return tracker.result()


def mean_energy(stops: Sequence[int], ratio: Mapping[int, float]) -> float:
    """Mean energy of inputs stopped at different steps.

    Args:
        stops: ``stops[t-1]``: the number of inputs that stopped at step t.
        ratio: ``{t: E(1..t)}``, the cumulative energy (or energy ratio, Eq. 30) of steps 1..t
            per input, e.g. :func:`ecmt.energy.energy_ratio`; needed for every t with stops.

    Returns:
        ``Σ_t stops[t-1] · ratio[t] / Σ_t stops[t-1]`` (NaN without inputs).
    """
    n = sum(stops)
    if n == 0:
        return math.nan
    return sum(c * ratio[t] for t, c in enumerate(stops, start=1) if c) / n


__all__ = ["StopRule", "StopTracker", "mean_energy", "probability_margin", "stop_steps"]
