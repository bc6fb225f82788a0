"""The functions F that EC modules compensate, made from nodes of a captured graph."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, fx, nn
import torch.nn.functional as F


class Slot:
    """Where a runtime value goes in an op's arguments: ``("in", i)`` or ``("extra", j)``."""

    __slots__ = ("kind", "index")

    def __init__(self, kind: str, index: int) -> None:
        self.kind, self.index = kind, index

    def __repr__(self) -> str:
        return f"{self.kind}{self.index}"


def _fill(template: Any, inputs: tuple, extras: tuple, consts: list) -> Any:
    if isinstance(template, Slot):
        if template.kind == "in":
            return inputs[template.index]
        if template.kind == "extra":
            return extras[template.index]
        return consts[template.index]
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, inputs, extras, consts) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, inputs, extras, consts) for k, v in template.items()}
    return template


class NodeFunction(nn.Module):
    """One graph op with its constant arguments baked in: ``F(*inputs, *extras)``.

    ``inputs`` are the dynamic (compensated) arguments, ``extras`` the analog ones that are
    the same at every step (an attention mask); constant tensors (norm weights) are float32
    buffers, so that F runs in float32 on the float32 running means like every EC function.

    Args:
        op: The ATen op.
        args, kwargs: Its arguments, with :class:`Slot` markers for runtime values and
            ``Slot("const", k)`` for ``consts[k]``.
        consts: The constant tensors.
    """

    def __init__(self, op: Callable, args: tuple, kwargs: dict, consts: list[Tensor], n_inputs: int) -> None:
        super().__init__()
        self.op, self.args, self.kwargs, self.n_inputs = op, args, kwargs, n_inputs
        self.n_consts = len(consts)
        for k, c in enumerate(consts):
            self.register_buffer(f"c{k}", c.detach().clone())

    def forward(self, *values: Any) -> Tensor:
        inputs, extras = values[:self.n_inputs], values[self.n_inputs:]
        consts = [getattr(self, f"c{k}") for k in range(self.n_consts)]
        return self.op(*_fill(self.args, inputs, extras, consts), **_fill(self.kwargs, inputs, extras, consts))

    def extra_repr(self) -> str:
        return f"{getattr(self.op, '__name__', self.op)}{self.args}"


class AttentionSoftmax(nn.Module):
    """F of the softmax EC of scaled-dot-product attention: ``softmax(scale·S + mask)``.

    The mask (additive float, or boolean with True = attend) and the causal mask are applied
    to the mean scores inside F, so a large negative value never accumulates over steps.
    """

    def __init__(self, scale: float, causal: bool = False) -> None:
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        scores = scores * self.scale
        if self.causal:
            L, S = scores.shape[-2:]
            keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()  # as SDPA's is_causal
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        return F.softmax(scores, dim=-1)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, causal={self.causal}"


def default_scale(q: fx.Node) -> float:
    return 1.0 / math.sqrt(q.meta["val"].shape[-1])
