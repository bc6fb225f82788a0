"""Which values of a captured graph vary over time steps.

The analog input is presented unchanged at every step, so everything computed from it and
from constants alone is the same at every step (``RAW``). The first weighted layer on it (the
patch or token embedding) is the encoding layer: it stays analog (``ENCODED``), as in the
paper. Every later weighted layer gets an MT neuron on its input (Alg. 1), and from there on
values are spike-driven and change from step to step (``DYNAMIC``).
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any

from torch import fx

from . import rules
from .rules import Kind


class Time(IntEnum):
    CONST = 0  # no input reaches it: parameters, buffers, shapes
    RAW = 1  # the analog input, and what is computed from it before any weighted layer
    ENCODED = 2  # analog, after the encoding layer
    DYNAMIC = 3  # varies over time steps


def node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def classify(gm: fx.GraphModule) -> dict[fx.Node, Time]:
    """The :class:`Time` of every node, in one pass in graph order."""
    time: dict[fx.Node, Time] = {}

    def dynamic(x: Any) -> bool:
        return isinstance(x, fx.Node) and time.get(x, Time.CONST) is Time.DYNAMIC

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            time[node] = Time.RAW
            continue
        if node.op in ("get_attr", "output"):
            time[node] = Time.CONST
            continue
        t_in = max((time[n] for n in node_inputs(node)), default=Time.CONST)
        if node.op != "call_function":
            time[node] = t_in
            continue
        kind = rules.kind_of(node, dynamic) if t_in is Time.DYNAMIC else _analog_kind(node)
        if kind is Kind.SHAPE:
            time[node] = Time.CONST
        elif kind is Kind.WEIGHTED and t_in is not Time.DYNAMIC:
            data = node.args[1] if rules.packet(node) in (rules.aten.addmm, rules.aten.embedding) else node.args[0]
            t_data = time.get(data, Time.CONST) if isinstance(data, fx.Node) else Time.CONST
            time[node] = {Time.CONST: Time.CONST, Time.RAW: Time.ENCODED}.get(t_data, Time.DYNAMIC)
        else:
            time[node] = t_in
    return time


def _analog_kind(node: fx.Node) -> Kind | None:
    """The kind of a node none of whose inputs is dynamic (only weighted layers and shapes matter)."""
    target = rules.packet(node)
    if target in rules.SHAPE_OPS or rules.is_symbolic(node):
        return Kind.SHAPE
    if target in rules.WEIGHTED_OPS or target is rules.aten.embedding:
        return Kind.WEIGHTED  # embedding: a token embedding is the encoding layer of a text model
    return None
