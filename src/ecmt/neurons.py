"""The Multi-Threshold (MT) neuron of ECMT (paper Sec. 4.3, Eq. 19-25)."""
from __future__ import annotations

from enum import Enum
from typing import Optional, Union

import torch
from torch import Tensor

from .errors import InvalidInputError, ThresholdError
from .fusion import flat, fusable, scan
from .state import Stateful

MIN_THETA = 1e-30
"""Base thresholds at or below this disable their side of the neuron (it never fires)."""

_EXPONENT_BITS = 0x7F800000  # of a float32: clearing the others rounds down to a power of two


class SpikeRule(str, Enum):
    """How an MT neuron picks its spike from the membrane (the level boundaries).

    * ``eq25``, the paper's Eq. 25: the largest threshold λ_k with ``|m| >= λ_k − θ/2``;
    * ``nearest``: the threshold nearest to ``|m|``, i.e. level k on ``|m|`` in
      ``[3/4·θ·2**k, 3/2·θ·2**k)`` (midpoints between adjacent thresholds). Not in the paper.

    Both have the zero band ``−θ2/2 <= m < θ1/2``, the same 2n thresholds, one spike per step and
    reset by subtraction, so everything else (EC, Eq. 27-29, the energy counts) is unchanged.
    Below the top level, ``nearest`` leaves a residual of at most ``max(θ/2, |m|/3)`` where
    Eq. 25 leaves up to about ``|m|/2``, so the running mean converges faster at low T.
    ``ecmt.tune`` uses it by default. Members equal their names as strings (``"nearest"``).
    """

    eq25 = "eq25"
    nearest = "nearest"

    def __str__(self) -> str:
        return self.value


RULES = tuple(r.value for r in SpikeRule)
"""The spike rules' names, as the CLI's ``--rule`` takes them."""

MAX_LEVELS = 16
"""The most thresholds per side: the top one, θ·2**(n-1), stays finite (and exact) in float16 for θ < 2,
and 2**15 is a dynamic range no calibrated site needs."""


def check_levels(levels: object) -> int:
    """``levels`` if it is an integer n in 1..MAX_LEVELS (not a bool, not a float), else InvalidInputError."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise InvalidInputError(f"levels must be an integer in 1..{MAX_LEVELS}, got {levels!r}")
    return levels


_NEAREST_SCALE = 4.0 / 3.0  # u = 4/3·|m|/θ: level k on u in [2**k, 2**(k+1))


def _fire(m: Tensor, theta_pos: Tensor, theta_neg: Tensor, inv_pos: Tensor, inv_neg: Tensor, top: float,
          dtype: torch.dtype, nearest: bool = False) -> Tensor:
    """The spike of MT neurons with membrane ``m`` (Eq. 22-23, 25), in ``dtype``.

    Rule ``eq25``: with ``u = |m| / θ + 1/2`` the neuron fires iff ``u >= 1``, with value
    ``±θ·2**k`` for ``k = floor(log2 u)`` clamped to n − 1. Rule ``nearest`` (``inv_*`` then
    carry the factor 4/3): with ``u = 4/3·|m| / θ`` it fires iff ``u >= 2/3``, on
    ``k = floor(log2 u)`` clamped to 0..n − 1. ``2**floor(log2 u)`` is read exactly from the
    exponent bits of u, so there is no rounding at the level boundaries other than that of u.
    """
    pos = m >= 0
    u = m * torch.where(pos, inv_pos, inv_neg)  # >= 0 on both sides
    if nearest:
        p = (u.view(torch.int32) & _EXPONENT_BITS).view(torch.float32).clamp(1.0, top)  # 2**level
        fires = u >= 2.0 / 3.0  # |m| >= θ/2
    else:
        u = u + 0.5
        p = (u.view(torch.int32) & _EXPONENT_BITS).view(torch.float32).clamp(max=top)  # Eq. 25: 2**level
        fires = u >= 1.0
    out = torch.where(fires, torch.where(pos, theta_pos, theta_neg) * p, 0.0)  # Eq. 22-23
    return out.to(dtype)  # the membrane subtracts exactly what the next layer receives


@fusable
def mt_step(v: Tensor, x: Tensor, theta_pos: Tensor, theta_neg: Tensor, inv_pos: Tensor, inv_neg: Tensor,
            top: float, nearest: bool = False) -> Tensor:
    """One step of MT neurons: returns their output and updates ``v`` in place.

    Args:
        v: Membrane potentials after the previous step (float32, zeros before the first);
            overwritten with those after this step.
        x: Input of this step.
        theta_pos, theta_neg: θ1 and −θ2 (0-dim tensors): the signed base thresholds.
        inv_pos, inv_neg: 1/θ1 and −1/θ2, or 0 for a disabled side (times 4/3 for ``nearest``).
        top: 2**(n−1), the largest threshold multiplier.
        nearest: Use the ``nearest`` rule instead of Eq. 25 (see :class:`SpikeRule`).

    The spike is chosen in closed form by :func:`_fire`. Runs as one fused kernel on large
    tensors (see :mod:`ecmt.fusion`).
    """
    v.add_(x)  # Eq. 21: m = v + I
    out = _fire(v, theta_pos, theta_neg, inv_pos, inv_neg, top, x.dtype, nearest)
    v.sub_(out)  # Eq. 24, soft reset (v stays float32)
    return out


@fusable
def mt_step_mean(w: Tensor, xbar: Tensor, t: int, theta_pos: Tensor, theta_neg: Tensor, inv_pos: Tensor,
                 inv_neg: Tensor, top: float, dtype: torch.dtype, nearest: bool = False) -> Tensor:
    """One step of MT neurons given the running mean of their inputs; updates ``w`` in place.

    Summing Eq. 21 and Eq. 24 over steps 1..T gives the membrane
    ``m(T) = Σ_t I(t) − Σ_{t<T} s(t) = T·x̄(T) + w``, where ``x̄(T)`` is the mean input over
    steps 1..T and ``w = −Σ_{t<T} s(t)`` (float32, zeros before the first step). So a neuron fed
    by a linked producer (see :mod:`ecmt.compensation`) fires exactly as if it had integrated
    the per-step inputs, up to float rounding.
    """
    m = xbar * t + w  # Eq. 21, summed over time
    out = _fire(m, theta_pos, theta_neg, inv_pos, inv_neg, top, dtype, nearest)
    w.sub_(out)  # Eq. 24, summed over time
    return out


@fusable
def mt_scan(xs: Tensor, t: int, v: Tensor, theta_pos: Tensor, theta_neg: Tensor, inv_pos: Tensor,
            inv_neg: Tensor, top: float, nearest: bool = False) -> Tensor:
    """:func:`mt_step` over the steps of ``xs`` (``[steps, *v.shape]``): their outputs, stacked.

    Fused, it is one kernel in which each membrane stays in a register over the steps (``t`` is
    unused: the steps need no count)."""
    return torch.stack([mt_step.eager(v, x, theta_pos, theta_neg, inv_pos, inv_neg, top, nearest)
                        for x in xs.unbind(0)])


@fusable
def mt_scan_mean(xbars: Tensor, t: int, w: Tensor, theta_pos: Tensor, theta_neg: Tensor, inv_pos: Tensor,
                 inv_neg: Tensor, top: float, dtype: torch.dtype, nearest: bool = False) -> Tensor:
    """:func:`mt_step_mean` over the steps ``t, t+1, ...`` of ``xbars`` (``[steps, *w.shape]``), stacked."""
    return torch.stack([mt_step_mean.eager(w, x, t + k, theta_pos, theta_neg, inv_pos, inv_neg, top, dtype, nearest)
                        for k, x in enumerate(xbars.unbind(0))])


class MTNeuron(Stateful):
    """Integrate-and-fire neuron with 2n thresholds and reset by subtraction.

    The thresholds are ``theta_pos * 2**k`` and ``-theta_neg * 2**k`` for ``k = 0..n-1``
    (Eq. 19). At each step the neuron integrates its input (Eq. 21), emits at most one spike on
    the largest threshold its membrane reaches, with the half-threshold boundaries of Eq. 25,
    and subtracts the emitted value from the membrane (Eq. 24). With ``rule="nearest"`` the
    spike is instead the threshold nearest to the membrane (see :class:`SpikeRule`).

    The spike is chosen in closed form rather than by 2n comparisons (:func:`_fire`, for both
    rules). Ties at an exact boundary between two levels go to the larger level on both sides;
    the zero band is ``-theta_neg/2 <= v < theta_pos/2`` as in Eq. 25.

    A side whose base threshold is 0 (or below ``MIN_THETA``) is disabled: it never fires. This
    is what calibration gives a site whose activations never reach that sign.

    State: ``v`` (float32), normally the membrane potential after the step, ``Σ I − Σ s``. With
    ``mean_input`` set (the neuron is fed the running mean ``x̄`` of its inputs by a linked
    producer, see :mod:`ecmt.compensation`), ``v`` holds ``−Σ s``, the membrane after step T is
    ``T·x̄(T) + v``, and ``t`` counts the steps since the last reset.

    Args:
        theta_pos: Positive base threshold θ1 (>= 0); a sequence of C values gives per-channel
            thresholds, one per channel of the input's last dimension (outlier channels of
            LLM activations get their own scale).
        theta_neg: Magnitude of the negative base threshold θ2 (>= 0); per channel likewise.
        levels: n, the number of thresholds on each side.
        rule: How the spike is chosen (:class:`SpikeRule`): ``"eq25"`` (the paper) or ``"nearest"``.

    Example:
        >>> n = MTNeuron(1.0, 0.5, levels=4)
        >>> n(torch.tensor([0.4, 0.6, 3.1, -0.3, -100.0]))
        tensor([ 0.0000,  1.0000,  2.0000, -0.5000, -4.0000])
    """

    _state = {"v": None, "t": 0}
    multi_step = True

    def __init__(self, theta_pos: float, theta_neg: float, levels: int,
                 rule: Union[str, SpikeRule] = SpikeRule.eq25) -> None:
        super().__init__()
        levels = check_levels(levels)
        theta = _theta(theta_pos, theta_neg)
        if not torch.isfinite(theta * 2.0 ** (levels - 1)).all() or (theta < 0).any():
            raise ThresholdError(f"thresholds must be finite and >= 0, got {theta.tolist()}")
        self.levels = levels
        self.rule = check_rule(rule)
        self.mean_input = False  # the input is the running mean of the inputs (see mt_step_mean)
        self.record = False  # count spikes per level (for firing rates and energy)
        self.exact = False  # pass the input on unquantized (see forward; for ecmt.analysis)
        self.register_buffer("theta", theta)
        # Spikes per (sign, level) since the counters were last cleared; sign 0 is positive.
        self.register_buffer("spike_counts", torch.zeros(2, levels, dtype=torch.int64), persistent=False)
        self.register_buffer("neuron_steps", torch.zeros((), dtype=torch.int64), persistent=False)
        self._refresh()

    def _refresh(self) -> None:
        """Derive the per-step constants from ``theta`` (after loading or editing it)."""
        th = self.theta
        inv = torch.where(th > MIN_THETA, 1.0 / th.clamp_min(MIN_THETA), torch.zeros_like(th))
        self._nearest = self.rule is SpikeRule.nearest
        if self._nearest:
            inv = inv * _NEAREST_SCALE
        # Signed values so that u = v * inv_signed + 1/2 works for both signs in one pass.
        self._theta_signed = (th[0].clone(), -th[1])
        self._inv_signed = (inv[0].clone(), -inv[1])
        self._top = float(2 ** (self.levels - 1))

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    @property
    def per_channel(self) -> bool:
        """Whether the base thresholds are per channel (the last dimension of the input)."""
        return self.theta.dim() == 2

    @property
    def theta_pos(self) -> float:
        """θ1 (for per-channel thresholds: their largest value)."""
        return float(self.theta[0].max())

    @property
    def theta_neg(self) -> float:
        """θ2 (for per-channel thresholds: their largest value)."""
        return float(self.theta[1].max())

    def thresholds(self) -> Tensor:
        """The 2n thresholds λ_1..λ_2n of Eq. 19, positive side first (``[2n, C]`` per channel)."""
        k = torch.exp2(torch.arange(self.levels, dtype=torch.float32, device=self.theta.device))
        if self.per_channel:  # (2n, C)
            return torch.cat([k[:, None] * self.theta[0], -k[:, None] * self.theta[1]])
        return torch.cat([self.theta[0] * k, -self.theta[1] * k])

    def forward(self, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """One time step (or a chunk of :attr:`steps`, see :mod:`ecmt.state`). ``dtype``: that of
        the spikes when ``mean_input`` is set (else that of ``x``).

        With ``exact`` set, the neuron sends its whole membrane at every step, so nothing is
        left in it (Eq. 21 and 24 with s = m): the limit of infinitely many levels. Its output is
        its input, or with ``mean_input`` the input of this step, ``t·x̄(t) − (t−1)·x̄(t−1)``.
        """
        if self.exact and not self.mean_input:
            return x
        if self.exact:
            return self._exact_forward(x, dtype)
        if self.steps > 1:
            out = self._chunk_forward(x, dtype)
        else:
            out = self._step_forward(x, dtype)
        if self.record:
            self._count(out)
        return out

    def _exact_forward(self, x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """``exact`` with ``mean_input``: the membrane of each step, sent whole."""
        if self.v is None:
            self.v = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # v(0) = 0
        outs = []
        for xk in (self.chunk(x, self.v).unbind(0) if self.steps > 1 else [x]):
            self.t += 1
            m = xk.float() * self.t + self.v  # Eq. 21, summed over time
            self.v.sub_(m)  # Eq. 24 with s = m
            outs.append(m.to(dtype or x.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _step_forward(self, x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        if self.v is None:
            self.v = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # v(0) = 0
        v, xf = (self.v, x) if self.per_channel else flat(self.v, x)  # per channel: thresholds broadcast
        if self.mean_input:
            self.t += 1
            out = mt_step_mean(v, xf, self.t, *self._theta_signed, *self._inv_signed, self._top, dtype or x.dtype,
                               self._nearest, numel=x.numel())
        else:
            out = mt_step(v, xf, *self._theta_signed, *self._inv_signed, self._top, self._nearest, numel=x.numel())
        return out.view(x.shape)

    def _chunk_forward(self, x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """The steps of a chunk as one scan over time, the same arithmetic as step by step."""
        xs = self.chunk(x, self.v)  # (steps, *v.shape)
        v = self.v
        if xs.is_contiguous():  # one compiled kernel for every shape (per channel: the channels stay last)
            v = v.view(-1, v.shape[-1]) if self.per_channel else v.view(-1)
            xs = xs.reshape(self.steps, *v.shape)
        if self.mean_input:
            out = scan(mt_scan_mean, xs, self.t + 1, v, *self._theta_signed, *self._inv_signed, self._top,
                       dtype or x.dtype, self._nearest)
            self.t += self.steps
        else:
            out = scan(mt_scan, xs, 0, v, *self._theta_signed, *self._inv_signed, self._top, self._nearest)
        return out.view(x.shape)

    def _count(self, out: Tensor) -> None:
        """Add this step's spikes to the counters, reading each spike's level from its value."""
        fire = out != 0
        spikes = out[fire].float()
        pos = spikes > 0
        # A spike is exactly ±θ·2**k (in the output dtype), so k is a difference of exponents.
        _, e = torch.frexp(spikes.abs())
        _, e_theta = torch.frexp(self.theta.to(out.dtype).float())
        if self.per_channel:  # each spike's channel's exponents
            e_pos, e_neg = (e_theta[i].expand(out.shape)[fire] for i in (0, 1))
        else:
            e_pos, e_neg = e_theta[0], e_theta[1]
        level = (e - torch.where(pos, e_pos, e_neg)).clamp_(0, self.levels - 1)
        idx = torch.where(pos, 0, self.levels) + level.long()
        self.spike_counts += torch.bincount(idx, minlength=2 * self.levels).view(2, self.levels)
        self.neuron_steps += fire.numel()

    def clear_counts(self) -> None:
        """Zero the spike counters (they are not part of the time-step state)."""
        self.spike_counts.zero_()
        self.neuron_steps.zero_()

    def extra_repr(self) -> str:
        rule = "" if self.rule is SpikeRule.eq25 else f", rule={self.rule.value!r}"
        chans = f", channels={self.theta.shape[1]}" if self.per_channel else ""
        return f"theta_pos={self.theta_pos:.4g}, theta_neg={self.theta_neg:.4g}, levels={self.levels}{rule}{chans}"


def _theta(theta_pos, theta_neg) -> Tensor:
    """``[θ1, θ2]``: shape (2,) for scalars, (2, C) for per-channel thresholds (sequences of C values)."""
    if isinstance(theta_pos, (int, float)) and isinstance(theta_neg, (int, float)):
        return torch.tensor([float(theta_pos), float(theta_neg)], dtype=torch.float32)
    pos = torch.as_tensor(theta_pos, dtype=torch.float32).flatten()
    neg = torch.as_tensor(theta_neg, dtype=torch.float32).flatten()
    if pos.numel() == 1 and neg.numel() == 1:
        return torch.stack([pos[0], neg[0]])
    pos, neg = torch.broadcast_tensors(pos, neg)
    return torch.stack([pos, neg]).contiguous()


def check_rule(rule: Union[str, SpikeRule], error: type[Exception] = InvalidInputError) -> SpikeRule:
    """``rule`` as a :class:`SpikeRule`; ``error`` if it names none."""
    if rule not in RULES:
        raise error(f"unknown spike rule {str(rule)!r}: choose one of {', '.join(RULES)}")
    return SpikeRule(rule)
