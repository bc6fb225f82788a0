"""Expectation links from the graph (Theorems 4.1 and 4.2 between modules).

Where a producer (an EC module, a matrix-product EC, a Linear layer) reaches exactly one
consumer that integrates its output (an EC module or an MT neuron) through linear ops that
mix in nothing else dynamic, the producer hands over the running mean of its outputs instead
of the per-step output, as :func:`ecmt.layers.link` does inside the adapters' blocks. The
linear ops between them then act on running means, which is exact as they are affine.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..compensation import ExpectationCompensation, MatMulEC
from ..layers import SpikingLinear
from ..neurons import MTNeuron
from . import rules
from .classify import Time


def _producer(m: nn.Module) -> bool:
    if isinstance(m, SpikingLinear):
        return isinstance(m.linear, nn.Linear)
    return isinstance(m, (ExpectationCompensation, MatMulEC))


def link_graph(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    """Link every producer-consumer pair of ``gm`` that allows it; returns how many were linked.

    Args:
        gm: A rewritten graph module (:mod:`ecmt.graph.sites`).
        dtype: The spikes' dtype (the model's), given to linked MT neurons.
    """
    modules = dict(gm.named_modules())

    def module(n: fx.Node):
        return modules.get(n.target) if n.op == "call_module" else None

    linked = 0
    for node in list(gm.graph.nodes):
        head = module(node)
        if head is None or not _producer(head) or getattr(head, "mean_output", False):
            continue
        cur = node
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            tail = module(user)
            if isinstance(tail, MTNeuron) and user.args[0] is cur and len(user.args) == 1:
                head.mean_output, tail.mean_input = True, True
                user.args = (cur, dtype)
                linked += 1
                break
            if isinstance(tail, ExpectationCompensation):
                dyn = list(user.args[:tail.arity])
                if dyn.count(cur) == 1 and cur not in user.args[tail.arity:]:
                    i = dyn.index(cur)
                    if tail.arity == 1:
                        tail.mean_input = True
                    else:
                        tail.mean_inputs[i] = True
                    head.mean_output = True
                    linked += 1
                break
            if user.op == "call_function" and _passes(user, cur):
                cur = user
                continue
            break
    gm.recompile()
    return linked


def _passes(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` is linear and ``x`` is its only input that varies over time."""
    if rules.packet(node) not in rules.LINEAR_OPS and node.target is not operator.getitem:
        return False
    if rules.packet(node) in (rules.aten.add, rules.aten.sub, rules.aten.cat, rules.aten.stack, rules.aten.where):
        others = [a for a in node.all_input_nodes if a is not x]
        return all(_constant_in_time(a) for a in others)
    return [a for a in node.all_input_nodes].count(x) == 1 and all(
        _constant_in_time(a) for a in node.all_input_nodes if a is not x)


def _constant_in_time(n: fx.Node) -> bool:
    """Inputs that the rewrite left as graph ops on constants or the analog input."""
    t = n.meta.get("ecmt_time")
    return t is not None and t is not Time.DYNAMIC
