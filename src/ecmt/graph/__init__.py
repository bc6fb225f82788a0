"""The generic conversion path: ECMT over a captured graph, one rule per kind of operation.

Passes, each in its own module:

1. :mod:`~ecmt.graph.capture`: the ANN's forward as an ATen graph (torch.export);
2. :mod:`~ecmt.graph.classify`: which values vary over time steps;
3. :mod:`~ecmt.graph.sites`: MT neurons, EC and matrix-product EC modules by the table of
   :mod:`~ecmt.graph.rules`;
4. :mod:`~ecmt.graph.links`: running means handed from producer to consumer.

The result is a graph module that runs one time step per call, whose stateful modules sit at
readable paths of the ANN's module tree, so calibration, energy accounting and saved files
name them as for the adapters.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import fx, nn

from .capture import Example, capture, example_input, prepare
from .classify import Time, classify
from .links import link_graph
from .sites import rewrite


def build_graph(model: nn.Module, make_site: Callable[[str], nn.Module],
                example: Optional[Example] = None) -> fx.GraphModule:
    """The spiking form of ``model`` on its captured graph, with sites made by ``make_site``.

    Raises:
        UnsupportedModelError: The graph cannot be captured, or holds ops of no known kind
            on spiking values (all named, with their module paths).
    """
    ann = prepare(model)
    gm = capture(ann, example)
    time = classify(gm)
    for node, t in time.items():
        node.meta["ecmt_time"] = t
    rewrite(gm, ann, make_site, time)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    link_graph(gm, dtype)
    return SpikingGraph(gm, gm.graph, class_name="SpikingGraph")


class SpikingGraph(fx.GraphModule):
    """A converted graph: one call is one time step.

    A plain graph module (``eval()`` and ``train()`` work, unlike export's), which takes
    keyword inputs as a batch has them (see :func:`ecmt.conversion.graph_inputs`).
    """

    def __call__(self, *args, **kwargs):
        if kwargs:
            from ..conversion import graph_inputs

            kwargs = graph_inputs(self, kwargs)
        return super().__call__(*args, **kwargs)


__all__ = ["Example", "Time", "build_graph", "capture", "classify", "example_input", "link_graph", "rewrite"]
