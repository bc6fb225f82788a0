"""Expectation Compensation modules (paper Sec. 4.2, Eq. 15-18).

Both keep the running sums of their inputs so that, after any number of steps T, the sum of
their outputs equals T times the ANN function of the mean input. Accumulators are float32
whatever the model's dtype, because Eq. 15 subtracts two quantities that grow with T.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .state import Stateful


class ExpectationCompensation(Stateful):
    """General EC module wrapping any function F (Eq. 15).

    At step T it outputs ``T·F(S(T)/T) − (T−1)·F(S(T−1)/(T−1))`` where ``S`` is the running sum
    of its inputs, so ``Σ_t O(t) = T·F(S(T)/T)`` (Theorem 4.1). At T = 1 the output is exactly
    ``F(S(1))``. Extra positional or keyword arguments are passed to F unchanged at every
    step (for example an additive attention mask).

    Args:
        fn: The nonlinearity (LayerNorm, GELU, Softmax, ...). A float32 copy is kept, so the
            caller's module (and the ANN it belongs to) is never modified.

    Example:
        >>> ec = ExpectationCompensation(nn.GELU())
        >>> xs = torch.randn(5, 3)
        >>> out = sum(ec(x) for x in xs)
        >>> torch.allclose(out, 5 * nn.GELU()(xs.mean(0)), atol=1e-5)
        True
    """

    _state = {"t": 0, "s": None, "prev": None}

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = copy.deepcopy(fn).float()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self.t += 1
        t = self.t
        s = x.float() if self.s is None else self.s + x  # accumulator S(T)
        cur = self.fn(s / t, *args, **kwargs)
        if t > 1:
            cur = cur * t
            out = cur - self.prev  # Eq. 15
        else:
            out = cur  # O(1) = F(S(1)) exactly
        self.s, self.prev = s, cur
        return out.to(x.dtype)


class MatMulEC(Stateful):
    """EC module for the product of two spiking tensors (Eq. 16-18).

    With ``S_A(T)``, ``S_B(T)`` the running sums of the two operands, the output at step T is
    ``S_A(T)·S_B(T)/T − S_A(T−1)·S_B(T−1)/(T−1)`` (Eq. 16), so ``Σ_t O(t) = S_A(T)·S_B(T)/T``
    (Theorem 4.2).

    On neuromorphic hardware ``S_K(T) = S_A(T)·S_B(T)`` is built incrementally from spike
    products (Eq. 17-18, see :func:`eq18_increment`), mostly with additions. On dense hardware
    one matmul of the running sums per step gives the same numbers and is three times cheaper,
    so that is what this module computes; the energy accounting counts the operations of
    Eq. 18, not of this formulation.

    Example:
        >>> mm = MatMulEC()
        >>> a, b = torch.randn(4, 2, 3), torch.randn(4, 3, 5)
        >>> out = sum(mm(a[t], b[t]) for t in range(4))
        >>> torch.allclose(out, a.sum(0) @ b.sum(0) / 4, atol=1e-5)
        True
    """

    _state = {"t": 0, "sa": None, "sb": None, "prev": None}

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        self.t += 1
        if self.sa is None:
            self.sa, self.sb = a.float(), b.float()
        else:
            self.sa = self.sa + a
            self.sb = self.sb + b
        cur = torch.matmul(self.sa, self.sb)
        if self.t > 1:
            cur = cur / self.t
            out = cur - self.prev  # Eq. 16
        else:
            out = cur
        self.prev = cur
        return out.to(a.dtype)


def eq18_increment(a: Tensor, b: Tensor, sa_prev: Tensor, sb_prev: Tensor) -> Tensor:
    """K(T) of Eq. 18: the increment of S_K from the step's spikes and the previous sums.

    ``K(T) = A(T)·B(T) + A(T)·S_B(T−1) + S_A(T−1)·B(T)``, where A(T) and B(T) are the
    threshold-weighted spike tensors of step T. The first term multiplies two spike tensors;
    the other two add rows or columns of an accumulated sum wherever a spike arrives.
    """
    return a @ b + a @ sb_prev + sa_prev @ b
