"""A key-value cache in spiking form, for generation with a causal SNN.

In a causal SNN, what position i computes at step t depends on positions <= i only, so when a
token is appended, the earlier positions would go through exactly the same T steps again. The
only values the new position reads from earlier ones are the key and value operands of the
attention products ``q·kᵀ`` and ``attn·v`` (:class:`ecmt.compensation.MatMulEC` with a
``key_axis``): the threshold-weighted spikes of k and v at each step. :class:`SpikingKVCache`
keeps them, per product and per time step, and at step t prepends those of step t to the new
position's operand, so the product's running sums (Eq. 16-18) are those of the whole prefix and
each new token simulates only its own position for T steps. Its neurons and EC modules start
from their reset state, as the same position does in a simulation of the whole prefix.

The graph must take ``position_ids`` (rotary or learned position embeddings): LMs calibrated on
:meth:`ecmt.lm.LanguageModel.tokenize` batches are. The new tokens need no mask: they are the
last positions and may attend to every earlier one.

Example:
    >>> cache = SpikingKVCache(snn)                                  # doctest: +SKIP
    >>> logits = cache.extend(prompt_ids, T=16)     # the whole prompt   # doctest: +SKIP
    >>> logits = cache.extend(torch.cat([prompt_ids, next_id], 1), T=16)  # its last position only  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .compensation import MatMulEC
from .conversion import SpikingModel
from .errors import InvalidInputError
from .simulation import simulate_steps


class SpikingKVCache:
    """The per-step key and value operands of the positions an SNN has simulated.

    Args:
        snn: A converted causal LM (generic graph path, SDPA attention, ``position_ids`` input).

    Raises:
        InvalidInputError: The SNN has no attention products with a key axis, or takes no
            ``position_ids``.
    """

    def __init__(self, snn: SpikingModel) -> None:
        self.snn = snn
        self.products = [m for m in snn.net.modules() if isinstance(m, MatMulEC) and m.key_axis is not None]
        if not self.products:
            raise InvalidInputError("this SNN has no attention products over key positions (convert a causal LM "
                                    "with SDPA attention on the generic graph path) to cache")
        graph = getattr(snn.net, "graph", None)
        if graph is None or "position_ids" not in [n.target for n in graph.nodes if n.op == "placeholder"]:
            raise InvalidInputError("this SNN takes no position_ids, so a cached position cannot be placed: "
                                    "calibrate and convert on batches of ecmt.lm.LanguageModel.tokenize")
        self.ids: Optional[Tensor] = None
        self.operands: list[list[Tensor]] = [[] for _ in self.products]  # per product, per step: [B, ..., S, ...]

    @property
    def length(self) -> int:
        """Positions cached."""
        return 0 if self.ids is None else self.ids.shape[1]

    def clear(self) -> None:
        self.ids, self.operands = None, [[] for _ in self.products]

    @torch.no_grad()
    def extend(self, ids: Tensor, T: int) -> Tensor:
        """The SNN's logits estimate after T steps for the positions of ``ids`` ``[B, L]`` not yet
        cached, ``[B, L - cached, vocab]``; they are cached from then on.

        If ``ids`` does not begin with the cached positions, or T differs from theirs, the cache
        starts again from ``ids``.

        Raises:
            InvalidInputError: ``ids`` adds nothing to the cache, or more than one position to a
                non-empty cache (an appended position may attend to all before it; several
                would need a causal mask among themselves).
        """
        if self.ids is not None and (ids.shape[1] <= self.length or ids.shape[0] != self.ids.shape[0]
                                     or not torch.equal(ids[:, :self.length], self.ids)
                                     or len(self.operands[0]) != T):
            self.clear()
        start = self.length
        new = ids[:, start:]
        if start and new.shape[1] != 1:
            raise InvalidInputError(f"a non-empty spiking KV cache takes one new position at a time, got {new.shape[1]}")
        positions = torch.arange(start, ids.shape[1], device=ids.device).expand_as(new)
        x = {"input_ids": new, "attention_mask": torch.ones_like(new), "position_ids": positions}
        steps: list[list[Tensor]] = [[] for _ in self.products]

        def hook(i: int):
            def prepend(module: MatMulEC, args: tuple) -> tuple:
                a, b = args
                if start:
                    b = torch.cat([self.operands[i][module.t], b], dim=module.key_axis)  # module.t: steps done
                steps[i].append(b.clone() if not start else b)  # kept as it was given (spikes may be reused)
                return a, b
            return prepend

        handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(self.products)]
        try:
            for y in simulate_steps(self.snn, x, T):
                pass
        finally:
            for h in handles:
                h.remove()
        self.ids, self.operands = ids.clone(), steps
        return y
