"""MT neuron (Eq. 19-25): properties of its spikes and of its rate code."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ecmt import MTNeuron


def reference_mth(v: float, th1: float, th2: float, n: int) -> float:
    """Eq. 25 written as the paper's piecewise function, one comparison at a time."""
    pos = [th1 * 2 ** k for k in range(n)]
    neg = [-th2 * 2 ** k for k in range(n)]
    if th1 > 0 and v >= th1 / 2:
        for k in reversed(range(n)):
            if v >= pos[k] - th1 / 2:
                return pos[k]
    if th2 > 0 and v < -th2 / 2:
        for k in reversed(range(n)):
            if v <= neg[k] + th2 / 2:
                return neg[k]
    return 0.0


thresholds = st.floats(0.01, 10.0)


@settings(max_examples=60, deadline=None)
@given(th1=thresholds, th2=thresholds, n=st.integers(1, 10),
       v=st.lists(st.floats(-3000, 3000), min_size=1, max_size=50))
def test_single_step_matches_eq25(th1, th2, n, v):
    x = torch.tensor(v, dtype=torch.float32)
    out = MTNeuron(th1, th2, n)(x)
    ref = torch.tensor([reference_mth(float(a), th1, th2, n) for a in x])
    # Values exactly on a boundary between two levels may round either way in float32.
    boundary = torch.zeros_like(x, dtype=torch.bool)
    for th in (th1, th2):
        for k in range(n + 1):
            edge = th * (2 ** k - 0.5)
            boundary |= (x.abs() - edge).abs() <= 1e-5 * max(edge, 1.0)
    assert torch.equal(out[~boundary], ref[~boundary].to(out.dtype))


@settings(max_examples=40, deadline=None)
@given(th1=thresholds, th2=thresholds, n=st.integers(1, 8), steps=st.integers(1, 20),
       seed=st.integers(0, 10_000))
def test_one_spike_per_step_on_a_threshold(th1, th2, n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    neuron = MTNeuron(th1, th2, n)
    allowed = torch.cat([torch.zeros(1), neuron.thresholds()])
    for _ in range(steps):
        out = neuron(torch.randn(64, generator=g) * 3 * max(th1, th2))
        # each output is one value of {0, θ1·2^k, −θ2·2^k}: at most one spike per neuron per step
        diff = (out[:, None] - allowed[None, :]).abs().min(dim=1).values
        assert torch.all(diff <= 1e-6 * allowed.abs().max())


def test_soft_reset_keeps_the_residual():
    neuron = MTNeuron(1.0, 1.0, 4)
    x = torch.tensor([2.7, -0.2, 100.0])
    out = neuron(x)
    torch.testing.assert_close(neuron.v, x - out)  # Eq. 24


@pytest.mark.parametrize("value", [0.013, 0.37, 1.0, 5.3, -0.8, -17.0])
def test_constant_input_rate_converges_as_one_over_t(value):
    neuron = MTNeuron(0.5, 0.25, 8)
    x = torch.full((1,), value)
    total = torch.zeros(1)
    theta = 0.5 if value > 0 else 0.25
    for t in range(1, 257):
        total += neuron(x)
        # Firing on the largest reachable level leaves -θ/2 <= v < (v_prev + I)/2, so the
        # membrane stays within max(|I|, θ/2) and the mean's error is v(T)/T = O(1/T) (Eq. 8).
        assert abs(float(total / t) - value) <= max(abs(value), theta / 2) / t + 1e-5


def test_disabled_side_never_fires_and_never_nans():
    neuron = MTNeuron(0.0, 0.3, 8)
    for _ in range(10):
        out = neuron(torch.tensor([5.0, -1.0, 0.0]))
        assert torch.isfinite(out).all()
        assert out[0] == 0 and out[2] == 0
    assert torch.isfinite(neuron.v).all()


def test_spike_counts_per_level():
    neuron = MTNeuron(1.0, 1.0, 3)
    neuron.record = True
    neuron(torch.tensor([1.0, 2.0, 2.1, 4.0, 100.0, -1.0, 0.1]))
    assert neuron.spike_counts.tolist() == [[1, 2, 2], [1, 0, 0]]
    assert int(neuron.neuron_steps) == 7


def test_reset_clears_membrane():
    neuron = MTNeuron(1.0, 1.0, 2)
    neuron(torch.tensor([0.4]))
    neuron.reset()
    assert neuron(torch.tensor([0.4])).item() == 0.0  # 0.4 < θ/2 only if the membrane was reset
