"""Spiking building blocks assembled from MT neurons and EC modules (paper Fig. 1, Alg. 1).

Each block takes its spiking sites as modules from a *site factory*. Conversion passes MT
neurons; calibration passes observers that record the activation and let it through, so the
same structure serves both stages and, with observers, computes exactly the ANN function.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .compensation import ExpectationCompensation, MatMulEC
from .fusion import fusable, scan
from .neurons import MTNeuron
from .state import Stateful

SiteFactory = Callable[[str], nn.Module]
"""Makes the module placed at a spiking site, given the site's full dotted name."""


def link(*chain: nn.Module) -> bool:
    """Link a chain of modules through running means (see :mod:`ecmt.compensation`).

    ``chain[0]`` is the producer (an EC module, a MatMulEC or a SpikingLinear), ``chain[-1]`` the
    consumer (an EC module or an MT neuron), and the modules in between are EC modules or
    ``nn.Identity``.
    The caller guarantees that each module's output reaches only the next one, through linear
    maps at most (reshapes, transposes, token pooling), which commute with averaging over time.
    Nothing is linked unless every module supports it (e.g. calibration observers do not).

    Returns:
        Whether the chain was linked.
    """
    mods = [m for m in chain if not isinstance(m, nn.Identity)]
    if len(mods) < 2:
        return False
    head, *mid, tail = mods
    if not (isinstance(head, (ExpectationCompensation, MatMulEC, SpikingLinear))
            and isinstance(tail, (ExpectationCompensation, MTNeuron))
            and all(isinstance(m, ExpectationCompensation) for m in mid)):
        return False
    head.mean_output = True
    for m in mid:
        m.mean_input = m.mean_output = True
    tail.mean_input = True
    return True


def unlink(net: nn.Module) -> None:
    """Undo every :func:`link` in ``net``: all modules exchange per-step values (Eq. 15-16 as written).

    Used to compare the two formulations; call it before a simulation starts (between
    simulations the state is reset anyway).
    """
    for m in net.modules():
        for flag in ("mean_input", "mean_output"):
            if hasattr(m, flag):
                setattr(m, flag, False)
        if hasattr(m, "mean_inputs"):
            m.mean_inputs = [False] * len(m.mean_inputs)


def fire(neuron: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``neuron(x)``; a linked MT neuron (whose input is a float32 mean) is told the spikes' dtype."""
    return neuron(x, dtype) if getattr(neuron, "mean_input", False) else neuron(x)


GEMM_MIN_ROWS = 16
"""Rows per step from which a chunk's steps share one GEMM (:meth:`SpikingLinear._per_chunk`)."""


@fusable
def linear_mean(acc: Tensor, g: Tensor, t: int, bias: Optional[Tensor]) -> Tensor:
    """``Σ_t W·s(t)`` updated in place in ``acc`` by ``g = W·s(T)``; returns ``b + acc/T``."""
    acc.add_(g)
    mean = acc / t
    return mean if bias is None else mean + bias


@fusable
def linear_scan(gs: Tensor, t: int, acc: Tensor, bias: Optional[Tensor]) -> Tensor:
    """:func:`linear_mean` over the steps ``t, t+1, ...`` of ``gs`` (``[steps, *acc.shape]``), stacked."""
    return torch.stack([linear_mean.eager(acc, g, t + k, bias) for k, g in enumerate(gs.unbind(0))])


class SpikingLinear(Stateful):
    """A Linear layer fed by a spiking site (Alg. 1, line 9: an MT neuron before each Linear).

    With ``mean_output`` set (by :func:`link`), it returns the running mean of its outputs,
    ``b + W·(Σ_t s(t))/T`` (the Linear is affine), for a consumer that would otherwise
    accumulate them; ``Σ_t W·s(t)`` is accumulated in float32 (in a chunk of steps, from one GEMM over all of them).

    In a converted graph (:mod:`ecmt.graph`) the site runs as a node of its own, so that one
    site can feed several layers that read the same tensor (q, k and v projections): the
    layer is then built with ``fires=False`` and receives spikes; ``site`` is the site that
    feeds it, whether it is this layer's own child ``neuron`` or another layer's.

    Args:
        neuron: The site module (MT neuron or calibration observer), or None for a layer fed
            by another layer's site (then ``site`` names it).
        linear: The ANN's Linear layer (or, in a converted graph, a convolution); its weights
            are shared, not copied.
        fires: Whether ``forward`` runs the site itself (False: it receives spikes).
        site: The site feeding the layer, when ``neuron`` is None.
    """

    _state = {"t": 0, "acc": None}
    multi_step = True

    def __init__(self, neuron: Optional[nn.Module], linear: nn.Module, fires: bool = True,
                 site: Optional[nn.Module] = None) -> None:
        super().__init__()
        if neuron is not None:
            self.neuron = neuron
        self.__dict__["site"] = neuron if neuron is not None else site  # not registered twice
        self.linear = linear
        self.fires = fires
        self.mean_output = False  # return the running mean of the outputs (for a linked consumer)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        spikes = fire(self.neuron, x, self.linear.weight.dtype) if self.fires else x
        if not self.mean_output:
            return self._per_chunk(self.linear, spikes)
        w, b = self.linear.weight, self.linear.bias
        s = spikes.reshape(-1, spikes.shape[-1])  # (rows, in); in a chunk (steps·rows, in)
        g = self._per_chunk(lambda s: F.linear(s, w), s).float()  # W·s(t): one GEMM for all steps of a chunk
        if self.acc is None:
            self.acc = torch.zeros(s.shape[0], w.shape[0], dtype=torch.float32, device=s.device)  # (rows, out)
        t = self.t + 1
        self.t += self.steps
        gs = self.chunk(g, self.acc) if self.steps > 1 else g[None]
        mean = scan(linear_scan, gs, t, self.acc, None if b is None else b.float())
        return mean.view(*spikes.shape[:-1], w.shape[0])


    def _per_chunk(self, layer: Callable[[Tensor], Tensor], spikes: Tensor) -> Tensor:
        """``layer(spikes)``: one GEMM for all steps of a chunk, or one per step where a step has
        fewer than :data:`GEMM_MIN_ROWS` rows (BLAS computes those in another summation order
        than as part of a larger product: the result would differ from step mode in the last bit)."""
        if self.steps == 1 or spikes.numel() // spikes.shape[-1] // self.steps >= GEMM_MIN_ROWS:
            return layer(spikes)
        return torch.cat([layer(s) for s in spikes.chunk(self.steps)])


class SpikingMlp(nn.Module):
    """A transformer MLP in ECMT form: ``fc1`` → EC(act) → optional EC(norm) → ``fc2``.

    Running means are handed from ``fc1`` through the activation to ``fc2``'s MT neuron
    (:func:`link`): nothing between them accumulates or compensates per step.
    Dropout layers are left out: a converted network is only ever evaluated.

    Args:
        fc1, fc2: The two Linear layers, already in spiking form.
        act: The activation under EC.
        norm: An optional norm between them, under EC (or ``nn.Identity``).
    """

    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.norm = norm if norm is not None else nn.Identity()
        if isinstance(fc1, SpikingLinear) and isinstance(fc2, SpikingLinear):
            link(self.fc1, self.act, self.norm, fc2.neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class MaskedSoftmax(nn.Module):
    """Softmax over the last dimension after adding an optional attention mask.

    The mask is added inside F, to the mean of the accumulated scores, so that a large
    negative mask never accumulates over time steps.
    """

    def forward(self, scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
        return F.softmax(scores, dim=-1)


class SpikingAttention(nn.Module):
    """Multi-head self-attention in ECMT form (paper Fig. 1, Attention).

    ``qkv`` (a :class:`SpikingLinear` producing ``3·heads·head_dim`` features) → optional
    q/k norms under EC → MT neurons on q and k → MatMulEC (q·kᵀ) → EC(softmax) → MT neurons on
    the attention map and on v → MatMulEC (attn·v) → optional EC(norm) → ``proj``.

    Args:
        qkv: Fused q, k, v projection, already in spiking form.
        proj: Output projection in spiking form, or None for none (e.g. BERT, where the
            projection belongs to the next module).
        num_heads: Number of heads.
        head_dim: Width of one head.
        scale: Factor applied to q before the product (head_dim ** -0.5 usually).
        make_site: Factory for the four sites, called with the suffixes
            ``q_neuron``, ``k_neuron``, ``attn_neuron``, ``v_neuron``.
        q_norm, k_norm, norm: Optional ANN norms (wrapped in EC here).
    """

    def __init__(
        self,
        qkv: nn.Module,
        proj: Optional[nn.Module],
        *,
        num_heads: int,
        head_dim: int,
        scale: float,
        make_site: Callable[[str], nn.Module],
        q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
        norm: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.qkv = qkv
        self.q_norm = _compensated(q_norm)
        self.k_norm = _compensated(k_norm)
        self.q_neuron = make_site("q_neuron")
        self.k_neuron = make_site("k_neuron")
        self.qk = MatMulEC()
        self.softmax = ExpectationCompensation(MaskedSoftmax())
        self.attn_neuron = make_site("attn_neuron")
        self.v_neuron = make_site("v_neuron")
        self.av = MatMulEC()
        self.norm = _compensated(norm)
        self.proj = proj if proj is not None else nn.Identity()
        # Hand running means from product to product (Theorems 4.1, 4.2): no prev terms, no softmax accumulator.
        link(self.qk, self.softmax, self.attn_neuron)
        if isinstance(self.proj, SpikingLinear):
            link(self.av, self.norm, self.proj.neuron)

    def forward(
        self,
        x: Tensor,
        attn_mask: Optional[Tensor] = None,
        *,
        rope: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        if rope is not None or is_causal:
            raise NotImplementedError("rotary embeddings and causal attention are not supported")
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv.unbind(0)
        q = self.q_neuron(self.q_norm(q) * self.scale)  # (B, H, N, D)
        k = self.k_neuron(self.k_norm(k))
        attn = self.qk(q, k.transpose(-2, -1))  # (B, H, N, N)
        attn = fire(self.attn_neuron, self.softmax(attn, attn_mask), q.dtype)
        x = self.av(attn, self.v_neuron(v))  # (B, H, N, D)
        x = x.transpose(1, 2).reshape(B, N, H * D)
        return self.proj(self.norm(x))


def _compensated(fn: Optional[nn.Module]) -> nn.Module:
    if fn is None or isinstance(fn, nn.Identity):
        return nn.Identity()
    return ExpectationCompensation(fn)
