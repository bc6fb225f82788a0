"""MT neuron (Eq. 19-25): properties of its spikes and of its rate code."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecmt
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


def reference_nearest(v: float, th1: float, th2: float, n: int) -> float:
    """The ``nearest`` rule by brute force: the value of {0, θ1·2^k, −θ2·2^k} nearest to v."""
    candidates = [0.0] + [th1 * 2 ** k for k in range(n)] + [-th2 * 2 ** k for k in range(n)]
    return min(candidates, key=lambda c: (abs(v - c), -abs(c)))  # ties: the larger spike


def near_boundary(x: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Values within float32 rounding of a level boundary, which may round either way."""
    out = torch.zeros_like(x, dtype=torch.bool)
    for edge in edges:
        out |= (x.abs() - edge).abs() <= 1e-5 * max(edge, 1.0)
    return out


thresholds = st.floats(0.01, 10.0)


@settings(max_examples=60, deadline=None)
@given(th1=thresholds, th2=thresholds, n=st.integers(1, 10),
       v=st.lists(st.floats(-3000, 3000), min_size=1, max_size=50))
def test_single_step_matches_eq25(th1, th2, n, v):
    x = torch.tensor(v, dtype=torch.float32)
    out = MTNeuron(th1, th2, n)(x)
    ref = torch.tensor([reference_mth(float(a), th1, th2, n) for a in x])
    keep = ~near_boundary(x, [th * (2 ** k - 0.5) for th in (th1, th2) for k in range(n + 1)])
    assert torch.equal(out[keep], ref[keep].to(out.dtype))


@settings(max_examples=60, deadline=None)
@given(th1=thresholds, th2=thresholds, n=st.integers(1, 10),
       v=st.lists(st.floats(-3000, 3000), min_size=1, max_size=50))
def test_nearest_rule_spikes_on_the_nearest_threshold(th1, th2, n, v):
    x = torch.tensor(v, dtype=torch.float32)
    out = MTNeuron(th1, th2, n, rule="nearest")(x)
    ref = torch.tensor([reference_nearest(float(a), th1, th2, n) for a in x])
    edges = [th * e for th in (th1, th2) for e in [0.5] + [0.75 * 2 ** k for k in range(1, n)]]
    keep = ~near_boundary(x, edges)
    assert torch.equal(out[keep], ref[keep].to(out.dtype))
    # Eq. 25 and nearest share the zero band and agree below 1.5 θ
    eq25 = MTNeuron(th1, th2, n)(x)
    low = (x < 1.5 * th1) & (x >= -1.5 * th2) & keep
    assert torch.equal(out[low], eq25[low])


@settings(max_examples=40, deadline=None)
@given(th1=thresholds, th2=thresholds, n=st.integers(1, 8), steps=st.integers(1, 20),
       seed=st.integers(0, 10_000), rule=st.sampled_from(["eq25", "nearest"]))
def test_one_spike_per_step_on_a_threshold(th1, th2, n, steps, seed, rule):
    g = torch.Generator().manual_seed(seed)
    neuron = MTNeuron(th1, th2, n, rule=rule)
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


@pytest.mark.parametrize("value", [0.013, 0.37, 1.0, 5.3, -0.8, -17.0, 60.0])
def test_nearest_rule_halves_the_error_bound_of_the_rate(value):
    neuron = MTNeuron(0.5, 0.25, 8, rule="nearest")
    x = torch.full((1,), value)
    total = torch.zeros(1)
    theta = 0.5 if value > 0 else 0.25
    for t in range(1, 257):
        m = float(neuron.v[0]) + value if neuron.v is not None else value
        total += neuron(x)
        # below the top level the residual is at most max(θ/2, |m|/3) ...
        assert abs(float(neuron.v[0])) <= max(theta / 2, abs(m) / 3) * (1 + 1e-6)
        # ... so the membrane stays within max(θ/2, |I|/2): half of Eq. 25's bound
        assert abs(float(total / t) - value) <= max(abs(value) / 2, theta / 2) / t + 1e-5


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_disabled_side_never_fires_and_never_nans(rule):
    neuron = MTNeuron(0.0, 0.3, 8, rule=rule)
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


def test_unknown_rule_is_refused():
    with pytest.raises(ecmt.InvalidInputError, match="spike rule 'round'"):
        MTNeuron(1.0, 1.0, 4, rule="round")
    with pytest.raises(ecmt.ThresholdError, match="spike rule"):
        ecmt.Thresholds({"a": (1.0, 1.0)}, rule="round")


def test_thresholds_carry_their_rule_into_conversion_and_json():
    from tiny_models import make

    model, shape = make("class_token")
    th = ecmt.calibrate(model, [torch.randn(4, *shape)])
    assert th.rule == "eq25" and ecmt.Thresholds.from_json(th.to_json()).rule == "eq25"
    near = th.with_rule("nearest")
    assert ecmt.Thresholds.from_json(near.to_json()) == near and dict(near) == dict(th)
    assert {n.rule for _, n in ecmt.convert(model, near).neurons()} == {"nearest"}
    snn = ecmt.convert(model, th, rule=ecmt.SpikeRule.nearest)  # an explicit rule wins, and is recorded
    assert snn.thresholds.rule is ecmt.SpikeRule.nearest and {n.rule for _, n in snn.neurons()} == {"nearest"}
    assert {n.rule for _, n in ecmt.convert(model, th).neurons()} == {"eq25"}


def test_reset_clears_membrane():
    neuron = MTNeuron(1.0, 1.0, 2)
    neuron(torch.tensor([0.4]))
    neuron.reset()
    assert neuron(torch.tensor([0.4])).item() == 0.0  # 0.4 < θ/2 only if the membrane was reset
