"""Expectation Compensation modules (paper Sec. 4.2, Eq. 15-18).

Both keep the running sums of their inputs so that, after any number of steps T, the sum of
their outputs equals T times the ANN function of the mean input. Accumulators are float32
whatever the model's dtype, because Eq. 15 subtracts two quantities that grow with T. The state
is allocated at the first step and updated in place, so memory does not grow with T.

**Expectation links.** By Theorems 4.1 and 4.2 the running mean of a module's outputs over
steps 1..T is known in closed form: ``F(S(T)/T)`` for EC, ``S_A(T)·S_B(T)/T²`` for a matrix
product (and ``b + W·Σ_t s(t)/T`` for a Linear layer, :class:`ecmt.layers.SpikingLinear`).
When a module's output feeds only one consumer that integrates it (another EC module, or an MT neuron, see :attr:`ecmt.neurons.MTNeuron.mean_input`), the producer can hand over that
running mean instead of the per-step output: it sets ``mean_output`` and the consumer
``mean_input``. The consumer then needs neither its own accumulator nor the producer's ``prev``
term of Eq. 15/16, which saves memory passes and state on dense hardware. The spikes are the
same up to float rounding; the counted operations (:mod:`ecmt.energy`) are those of Eq. 15-18
either way. Blocks set the links with :func:`ecmt.layers.link`. Mean tensors are float32.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .fusion import flat, fusable, scan
from .state import Stateful


@fusable
def accumulate_mean(s: Tensor, x: Tensor, t: int) -> Tensor:
    """``S(T) = S(T−1) + x``, in place in the float32 accumulator ``s``; returns ``S(T)/T``."""
    s.add_(x)
    return s / t


@fusable
def compensate(f_mean: Tensor, prev: Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """Eq. 15 at step ``t >= 2``: returns ``T·F(S(T)/T) − prev`` cast to ``dtype``.

    ``prev`` holds (T−1)·F(S(T−1)/(T−1)) and is overwritten with T·F(S(T)/T).
    """
    cur = f_mean * t
    out = (cur - prev).to(dtype)
    prev.copy_(cur)
    return out


@fusable
def accumulate_pair(sa: Tensor, a: Tensor, sb: Tensor, b: Tensor) -> None:
    """``S_A(T) = S_A(T−1) + A(T)`` and ``S_B(T) = S_B(T−1) + B(T)``, in place."""
    sa.add_(a)
    sb.add_(b)


@fusable
def rescale(product: Tensor, prev: Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """Eq. 16 at step ``t >= 2``: returns ``S_K(T)/T − prev`` cast to ``dtype``.

    ``prev`` holds S_K(T−1)/(T−1) and is overwritten with S_K(T)/T.
    """
    cur = product / t
    out = (cur - prev).to(dtype)
    prev.copy_(cur)
    return out


@fusable
def mean_scan(xs: Tensor, t: int, s: Tensor) -> Tensor:
    """:func:`accumulate_mean` over the steps ``t, t+1, ...`` of ``xs`` (``[steps, *s.shape]``): the
    running means, stacked."""
    return torch.stack([accumulate_mean.eager(s, x, t + k) for k, x in enumerate(xs.unbind(0))])


@fusable
def sum_scan(xs: Tensor, t: int, s: Tensor) -> Tensor:
    """The running sums ``S(t), S(t+1), ...`` of ``xs`` (``[steps, *s.shape]``), stacked; ``s`` ends
    as the last (``t`` is unused)."""
    return torch.stack([s.add_(x).clone() for x in xs.unbind(0)])


@fusable
def compensate_scan(fs: Tensor, t: int, prev: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`compensate` over the steps ``t, t+1, ...`` of ``fs`` (``[steps, *prev.shape]``), stacked."""
    return torch.stack([compensate.eager(f, prev, t + k, dtype) for k, f in enumerate(fs.unbind(0))])


@fusable
def rescale_scan(products: Tensor, t: int, prev: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`rescale` over the steps ``t, t+1, ...`` of ``products`` (``[steps, *prev.shape]``), stacked."""
    return torch.stack([rescale.eager(p, prev, t + k, dtype) for k, p in enumerate(products.unbind(0))])


class ExpectationCompensation(Stateful):
    """General EC module wrapping any function F (Eq. 15), of one or more inputs.

    At step T it outputs ``T·F(S(T)/T) − (T−1)·F(S(T−1)/(T−1))`` where ``S`` is the running sum
    of its inputs, so ``Σ_t O(t) = T·F(S(T)/T)`` (Theorem 4.1). At T = 1 the output is exactly
    ``F(S(1))``. Extra positional or keyword arguments are passed to F unchanged at every
    step (for example an additive attention mask).

    Args:
        fn: The nonlinearity (LayerNorm, GELU, Softmax, ...). A float32 copy is kept, so the
            caller's module (and the ANN it belongs to) is never modified.
        arity: How many leading arguments are inputs to compensate. With ``arity = k`` each
            of them keeps its own running sum and F sees all k running means (the SwiGLU gate
            ``F(a, b) = silu(a)·b``); the sum of the outputs is still ``T·F(means)``.

    Example:
        >>> ec = ExpectationCompensation(nn.GELU())
        >>> xs = torch.randn(5, 3)
        >>> out = sum(ec(x) for x in xs)
        >>> torch.allclose(out, 5 * nn.GELU()(xs.mean(0)), atol=1e-5)
        True
    """

    _state = {"t": 0, "s": None, "prev": None}
    multi_step = True

    def __init__(self, fn: nn.Module, arity: int = 1) -> None:
        super().__init__()
        self.fn = copy.deepcopy(fn).float()
        self.arity = arity  # how many leading arguments are compensated inputs (n-ary F, e.g. a·b)
        self.mean_input = False  # x is already S(T)/T, the running mean of the inputs (from a linked producer)
        self.mean_output = False  # return F(S(T)/T), the running mean of the outputs (for a linked consumer)
        self.mean_inputs = [False] * arity  # per input, for arity > 1

    def forward(self, *args, **kwargs) -> Tensor:
        if self.steps > 1:
            return self._chunk_forward(*args, **kwargs)
        self.t += 1
        x = args[0]
        if self.arity > 1:
            means = self._means(args[:self.arity])
            f_mean = self.fn(*means, *args[self.arity:], **kwargs)
        else:
            if self.mean_input:
                mean = x.float()
            else:
                if self.s is None:
                    self.s = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # S(0) = 0
                mean = accumulate_mean(*flat(self.s, x), self.t, numel=x.numel())  # S(T)/T, S(T) kept in self.s
            f_mean = self.fn(mean.view(x.shape), *args[1:], **kwargs)  # a new tensor: F may work in place
        if self.mean_output:
            return f_mean  # Theorem 4.1: the mean of the outputs of Eq. 15 over steps 1..T
        if self.t == 1:
            self.prev = f_mean.contiguous()  # updated in place from now on: the output is a copy
            return f_mean.to(x.dtype, copy=True)  # O(1) = F(S(1)) exactly
        return compensate(*flat(f_mean, self.prev), self.t, x.dtype, numel=f_mean.numel()).view(f_mean.shape)

    def _chunk_forward(self, *args, **kwargs) -> Tensor:
        """A chunk of steps (see :mod:`ecmt.state`): the running means of all its steps, F once
        on all of them, then Eq. 15 per step, in the arithmetic of one step at a time."""
        t, x = self.t + 1, args[0]  # the chunk's first step (a chunk follows a first single step)
        self.t += self.steps
        if self.arity > 1:
            sums = self.s if self.s is not None else [None] * self.arity
            means = [x_i.float() if s is None else self._chunk_means(x_i, t, s) for x_i, s in zip(args, sums)]
            f_mean = self.fn(*means, *args[self.arity:], **kwargs)
        else:
            mean = x.float() if self.mean_input else self._chunk_means(x, t, self.s)
            f_mean = self.fn(mean, *args[1:], **kwargs)
        if self.mean_output:
            return f_mean
        fs = self.chunk(f_mean, self.prev)
        return scan(compensate_scan, fs, t, self.prev, x.dtype).view(f_mean.shape)

    def _chunk_means(self, x: Tensor, t: int, s: Tensor) -> Tensor:
        return scan(mean_scan, self.chunk(x, s), t, s).view(x.shape)  # S(t)/t of every step, time-major

    def _means(self, xs: tuple) -> list[Tensor]:
        """The running mean of every input (Eq. 15 for n-ary F: one running sum per input)."""
        if self.s is None:
            self.s = [None if linked else torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                      for x, linked in zip(xs, self.mean_inputs)]
        return [x.float() if s is None else accumulate_mean(*flat(s, x), self.t, numel=x.numel()).view(x.shape)
                for x, s in zip(xs, self.s)]


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

    Args:
        key_axis: For the products of attention (``q·kᵀ``, ``attn·v``), the axis of ``b`` that
            runs over key positions, along which :class:`ecmt.kvcache.SpikingKVCache` prepends
            the cached operands of earlier positions; None for other products.

    Example:
        >>> mm = MatMulEC()
        >>> a, b = torch.randn(4, 2, 3), torch.randn(4, 3, 5)
        >>> out = sum(mm(a[t], b[t]) for t in range(4))
        >>> torch.allclose(out, a.sum(0) @ b.sum(0) / 4, atol=1e-5)
        True
    """

    _state = {"t": 0, "sa": None, "sb": None, "prev": None}
    multi_step = True

    def __init__(self, key_axis: Optional[int] = None) -> None:
        super().__init__()
        self.mean_output = False  # return S_A(T)·S_B(T)/T², the running mean of the outputs (for a linked consumer)
        self.key_axis = key_axis  # attention products: the axis of b that runs over key positions (ecmt.kvcache)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.steps > 1:
            return self._chunk_forward(a, b)
        self.t += 1
        if self.t == 1:  # the state is owned by the module and updated in place from now on
            self.sa, self.sb = _accumulator(a), _accumulator(b)
            product = torch.matmul(self.sa, self.sb)
            if self.mean_output:
                return product
            self.prev = product
            return self.prev.to(a.dtype, copy=True)
        accumulate_pair(self.sa, a, self.sb, b, numel=a.numel() + b.numel())
        product = torch.matmul(self.sa, self.sb)
        if self.mean_output:
            return product.div_(self.t * self.t)  # Theorem 4.2: Σ_t O(t) / T = S_A(T)·S_B(T) / T²
        return rescale(*flat(product, self.prev), self.t, a.dtype, numel=product.numel()).view(product.shape)

    def _chunk_forward(self, a: Tensor, b: Tensor) -> Tensor:
        """A chunk of steps: the running sums of every step, then one batched matmul of all of
        them (Eq. 16 per step in the arithmetic of one step at a time)."""
        t = self.t + 1
        self.t += self.steps
        product = torch.matmul(_chunk_sums(self, a, self.sa), _chunk_sums(self, b, self.sb))  # (steps·B, ..., M, N)
        if self.mean_output:  # Theorem 4.2, per step
            ps = product.unflatten(0, (self.steps, -1))
            for k in range(self.steps):
                ps[k].div_((t + k) * (t + k))
            return product
        return scan(rescale_scan, self.chunk(product, self.prev), t, self.prev, a.dtype).view(product.shape)


def _accumulator(x: Tensor) -> Tensor:
    """A float32 copy of a matmul operand, laid out so that matmul uses it without copying.

    Row-major, or row-major transposed for an operand that is a transposed view (kᵀ): then
    the batch dimensions flatten into one and the product is a single batched GEMM.
    """
    if x.dim() >= 2 and x.stride(-2) == 1 and x.stride(-1) != 1:
        return x.mT.to(torch.float32, memory_format=torch.contiguous_format, copy=True).mT
    return x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _chunk_sums(m: Stateful, x: Tensor, s: Tensor) -> Tensor:
    """The running sums of every step of the chunk ``x``, time-major, in the layout of ``s``
    (a transposed operand stays transposed, so each step's matmul is the one-step matmul)."""
    xs = m.chunk(x, s)
    if s.dim() >= 2 and s.stride(-2) == 1 and s.stride(-1) != 1:  # kᵀ: scan the contiguous kᵀᵀ
        return scan(sum_scan, xs.mT, 0, s.mT).mT.flatten(0, 1)
    return scan(sum_scan, xs, 0, s).flatten(0, 1)


def eq18_increment(a: Tensor, b: Tensor, sa_prev: Tensor, sb_prev: Tensor) -> Tensor:
    """K(T) of Eq. 18: the increment of S_K from the step's spikes and the previous sums.

    ``K(T) = A(T)·B(T) + A(T)·S_B(T−1) + S_A(T−1)·B(T)``, where A(T) and B(T) are the
    threshold-weighted spike tensors of step T. The first term multiplies two spike tensors;
    the other two add rows or columns of an accumulated sum wherever a spike arrives.
    """
    return a @ b + a @ sb_prev + sa_prev @ b
