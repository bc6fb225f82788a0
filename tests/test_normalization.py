"""Parallel parameter normalization (Eq. 27-29): binary spikes reproduce the fused SNN."""
import pytest
import torch

import ecmt
from ecmt.layers import SpikingLinear
from ecmt.normalization import BinarySpikingLinear, export_linear, to_binary

from tiny_models import make


def test_weight_copies_follow_eq27():
    model, shape = make("class_token")
    snn = ecmt.convert(model, ecmt.calibrate(model, [torch.randn(4, *shape)]), levels=3)
    layer = snn.net.blocks[0].mlp.fc1
    form = export_linear(layer)
    th1, th2 = layer.neuron.theta_pos, layer.neuron.theta_neg
    assert form.weights.shape == (6, *layer.weight.shape)
    factors = [1, 2, 4, -th2 / th1, -2 * th2 / th1, -4 * th2 / th1]
    for p, f in enumerate(factors):
        torch.testing.assert_close(form.weights[p], layer.weight * f)
    assert abs(form.eta - th2 / th1) < 1e-12 and form.scale == th1


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_binary_spike_simulation_reproduces_fused_simulation(rule):
    model, shape = make("qk_norm")
    snn = ecmt.convert(model, ecmt.calibrate(model, [torch.randn(8, *shape)]), levels=8, rule=rule)
    binary = to_binary(snn)
    n_binary = sum(isinstance(m, BinarySpikingLinear) for m in binary.net.modules())
    assert n_binary == sum(isinstance(m, SpikingLinear) for m in snn.net.modules()) > 0
    x = torch.randn(3, *shape)
    fused, bin_out = ecmt.simulate(snn, x, T=12), ecmt.simulate(binary, x, T=12)
    torch.testing.assert_close(bin_out, fused, rtol=1e-4, atol=1e-4)
