"""Parallel parameter normalization for MT neurons (paper Sec. 4.3.3, Eq. 26-29).

The fused simulation lets an MT neuron send the value ``λ_p`` of its spike to the next Linear.
On neuromorphic hardware neurons exchange binary spikes instead: each connection is split into
2n parallel channels, one per threshold, and the threshold values are folded into 2n copies of
the weights (Eq. 27). The neuron itself then works in units of its base threshold, with
thresholds ``1·2^k`` and ``−η·2^k`` (Eq. 29).

:func:`export_linear` produces that form for one layer; :func:`to_binary` rebuilds a whole SNN
on it, which shows (and the tests check) that binary spikes and the weight copies alone
reproduce the fused simulation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .conversion import SpikingModel
from .layers import SpikingLinear, fire
from .neurons import MTNeuron
from .state import Stateful


@dataclass(frozen=True)
class NormalizedLinear:
    """One Linear in parallel-normalized form.

    Attributes:
        weights: ``[2n, out, in]``; channel p holds ``W·λ_p/λ_1`` (Eq. 27), positive
            thresholds first, where λ_p are the presynaptic neuron's thresholds (Eq. 19).
        bias: The Linear's bias, unchanged.
        eta: ``θ2/θ1``; the normalized neuron has base thresholds ``(1, η)`` (Eq. 29).
        scale: ``λ_1 = θ1``. The neuron's input is divided by it and the layer's output
            multiplied by it; on hardware both fold into the neighbouring layers' weights (the
            ``1/λ_1^l`` of Eq. 27). With per-channel thresholds, ``eta`` and ``scale`` are
            vectors over the input channels, and θ1 of each channel is folded into its weight
            column instead (``weights`` holds ``W·λ_p``): ``out_scale`` is then 1.
        out_scale: The factor the layer's output is multiplied by (``scale``, or 1 per channel).
    """

    weights: Tensor
    bias: Optional[Tensor]
    eta: Union[float, Tensor]
    scale: Union[float, Tensor]
    out_scale: float


def export_linear(layer: SpikingLinear) -> NormalizedLinear:
    """Eq. 27-29 for one :class:`SpikingLinear` whose site is an :class:`MTNeuron`."""
    neuron = layer.neuron
    bias = None if layer.bias is None else layer.bias.detach()
    lam = neuron.thresholds().to(layer.weight)  # λ_1..λ_2n, Eq. 19
    if neuron.per_channel:  # θ per input channel: each column gets its own copies, θ1 folded in
        th = neuron.theta.to(layer.weight)
        theta1 = torch.where(th[0] > 0, th[0], th[1]).clamp_min(1e-30)  # (C,)
        weights = layer.weight.detach()[None] * lam[:, None, :]  # Eq. 27 per column: [2n, out, in]
        return NormalizedLinear(weights, bias, th[1] / theta1, theta1, 1.0)
    theta1 = neuron.theta_pos if neuron.theta_pos > 0 else neuron.theta_neg
    weights = layer.weight.detach()[None] * (lam / theta1)[:, None, None]  # Eq. 27
    return NormalizedLinear(weights, bias, neuron.theta_neg / theta1, theta1, theta1)


class BinarySpikingLinear(Stateful):
    """A Linear driven only by binary spikes on 2n channels (Eq. 28).

    The normalized MT neuron (thresholds ``(1, η)``) decides which channel fires; the layer
    sums the weight copies of the channels that fired.
    """

    _state = {"t": 0, "acc": None}

    def __init__(self, layer: SpikingLinear) -> None:
        super().__init__()
        self.mean_output = layer.mean_output
        form = export_linear(layer)
        self.n = layer.neuron.levels
        self.register_buffer("weights", form.weights)
        self.bias = form.bias
        self.scale, self.out_scale = form.scale, form.out_scale
        if layer.neuron.per_channel:
            pos = (layer.neuron.theta[0] > 0).float()
            self.neuron = MTNeuron(pos.tolist(), form.eta.tolist(), self.n, layer.neuron.rule)  # Eq. 29
        else:
            self.neuron = MTNeuron(1.0 if layer.neuron.theta_pos > 0 else 0.0, form.eta, self.n,
                                   layer.neuron.rule)  # Eq. 29
        self.neuron.mean_input = layer.neuron.mean_input  # linked to its producer (a linear map of x)
        unit = self.neuron.thresholds()
        self.register_buffer("unit", unit.T.contiguous() if unit.dim() == 2 else unit)  # (in, 2n) or (2n,)

    def forward(self, x: Tensor) -> Tensor:
        value = fire(self.neuron, x / self.scale, self.weights.dtype)  # one of {0, 2^k, −η·2^k}
        spikes = (value[..., None] == self.unit) & (value[..., None] != 0)  # (..., in, 2n) binary
        out = torch.einsum("...ip,poi->...o", spikes.to(self.weights.dtype), self.weights)  # Eq. 28
        out = out * self.out_scale
        if self.mean_output:  # linked to its consumer: the running mean of the outputs, as SpikingLinear
            self.t += 1
            self.acc = out.float() if self.acc is None else self.acc.add_(out)
            out = self.acc / self.t
        return out if self.bias is None else out + self.bias


def to_binary(snn: SpikingModel) -> SpikingModel:
    """A copy of ``snn`` whose Linear layers receive binary spikes only (for verification).

    Memory grows 2n-fold in the Linear weights, so use it on small models.
    """
    out = copy.deepcopy(snn)
    for name, m in list(out.net.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, SpikingLinear) and isinstance(getattr(child, "neuron", None), MTNeuron) and child.fires:
                setattr(m, child_name, BinarySpikingLinear(child))
    return SpikingModel(out.net, snn.levels, snn.thresholds, snn._output)
