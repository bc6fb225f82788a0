"""Expectation links (running means handed from producer to consumer) against Eq. 15-16 as written."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import ecmt
from ecmt import ExpectationCompensation, MatMulEC, MTNeuron
from ecmt.calibration import SiteObserver
from ecmt.conversion import build_spiking
from ecmt.energy import measure
from ecmt.layers import MaskedSoftmax, SpikingLinear, link, unlink
from tiny_models import CONFIGS, make


@settings(max_examples=40, deadline=None)
@given(th1=st.floats(0.05, 5.0), th2=st.floats(0.05, 5.0), n=st.integers(1, 8), T=st.integers(1, 24),
       seed=st.integers(0, 10_000), rule=st.sampled_from(["eq25", "nearest"]))
def test_mean_input_neuron_fires_like_the_step_neuron(th1, th2, n, T, seed, rule):
    """Fed the running mean of its inputs, an MT neuron emits the spikes it emits when fed the inputs."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, 256, generator=g) * 2 * max(th1, th2)
    step, mean = MTNeuron(th1, th2, n, rule), MTNeuron(th1, th2, n, rule)
    mean.mean_input = True
    s, total, flips = torch.zeros(256), torch.zeros(256), 0
    for t in range(1, T + 1):
        s += xs[t - 1]
        a, b = step(xs[t - 1]), mean(s / t)
        flips += int((a != b).sum())
        total += b
        # Eq. 21 + 24 summed over time: the membrane left is the inputs minus the spikes
        torch.testing.assert_close(mean.v, -total, rtol=0, atol=0)
    # float rounding of s / t may move a membrane across a level boundary, very rarely
    assert flips <= 1


def test_mean_input_neuron_emits_spikes_in_the_requested_dtype():
    neuron = MTNeuron(0.5, 0.5, 4)
    neuron.mean_input = True
    out = neuron(torch.tensor([0.3, 1.7, -2.2]), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.5, 1.0, -2.0]
    assert neuron.v.dtype == torch.float32


@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_matmul_mean_output_is_the_running_mean_of_eq16(T):
    g = torch.Generator().manual_seed(T)
    a, b = torch.randn(T, 2, 7, 5, generator=g).round(), torch.randn(T, 2, 5, 3, generator=g).round()
    step, mean = MatMulEC(), MatMulEC()
    mean.mean_output = True
    outs = [step(a[t], b[t]) for t in range(T)]
    means = [mean(a[t], b[t]) for t in range(T)]
    for t in range(1, T + 1):
        torch.testing.assert_close(means[t - 1], sum(outs[:t]) / t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means[-1], a.sum(0) @ b.sum(0) / T ** 2, rtol=1e-6, atol=1e-6)  # Theorem 4.2


def test_ec_mean_output_and_mean_input():
    """EC hands over F(S(T)/T) (Theorem 4.1); a linked EC applies F to the mean it is given."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(6, 3, 8, generator=g)
    producer, consumer = ExpectationCompensation(nn.GELU()), ExpectationCompensation(nn.LayerNorm(8))
    assert link(producer, consumer)
    ref_producer, ref_consumer = ExpectationCompensation(nn.GELU()), ExpectationCompensation(nn.LayerNorm(8))
    for t in range(1, 7):
        mean = producer(xs[t - 1])
        torch.testing.assert_close(mean, nn.GELU()(xs[:t].mean(0)), rtol=1e-6, atol=1e-6)
        out = consumer(mean)  # the consumer's own output is per step again (Eq. 15)
        torch.testing.assert_close(out, ref_consumer(ref_producer(xs[t - 1])), rtol=1e-4, atol=1e-4)
    assert producer.prev is None and consumer.s is None  # no Eq. 15 terms kept for the link


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_mean_output_is_the_running_mean_of_its_outputs(dtype):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 4).to(dtype)
    neuron, ref_neuron = MTNeuron(0.3, 0.3, 4), MTNeuron(0.3, 0.3, 4)
    layer, ref = SpikingLinear(neuron, lin), SpikingLinear(ref_neuron, lin)
    assert link(layer, MTNeuron(1.0, 1.0, 2)) and layer.mean_output
    xs = torch.randn(5, 2, 3, 6, generator=g).to(dtype)
    total = torch.zeros(2, 3, 4)
    for t in range(1, 6):
        mean = layer(xs[t - 1])
        total += ref(xs[t - 1]).float()
        assert mean.shape == (2, 3, 4) and mean.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(mean, total / t, rtol=tol, atol=tol)


def test_link_refuses_modules_without_the_protocol():
    ec, obs = ExpectationCompensation(nn.GELU()), SiteObserver()
    assert not link(ec, obs)
    assert not ec.mean_output
    assert not link(nn.Identity(), MTNeuron(1.0, 1.0, 2))
    neuron = MTNeuron(1.0, 1.0, 2)
    assert link(MatMulEC(), nn.Identity(), ExpectationCompensation(MaskedSoftmax()), neuron) and neuron.mean_input


def test_conversion_links_attention_and_mlp_but_calibration_does_not():
    model, shape = make("class_token")
    snn = ecmt.convert(model, ecmt.calibrate(model, [torch.randn(2, *shape)]), levels=8)
    consumers = {name for name, m in snn.net.named_modules() if getattr(m, "mean_input", False)}
    producers = {name for name, m in snn.net.named_modules() if getattr(m, "mean_output", False)}
    assert consumers == {f"blocks.{i}.{s}" for i in range(2) for s in (
        "attn.qkv.neuron", "attn.softmax", "attn.attn_neuron", "attn.proj.neuron", "mlp.fc1.neuron", "mlp.act",
        "mlp.fc2.neuron")}
    assert producers == {f"blocks.{i}.{s}" for i in range(2) for s in (
        "norm1", "attn.qk", "attn.softmax", "attn.av", "norm2", "mlp.fc1", "mlp.act")}
    assert not snn.net.norm.mean_output  # the final norm feeds pooling and the head: left per step
    observed = build_spiking(model, lambda name: SiteObserver())
    assert not any(getattr(m, "mean_input", False) or getattr(m, "mean_output", False) for m in observed.modules())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_linked_network_matches_unlinked(name):
    """Bit-identical at T = 1 (nothing is rounded differently); then the same error against the ANN."""
    model, shape = make(name)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]), levels=8)
    plain = copy.deepcopy(snn)
    unlink(plain.net)
    assert not any(getattr(m, "mean_input", False) for m in plain.modules())
    a, b = ecmt.simulate(snn, x, 32), ecmt.simulate(plain, x, 32)
    assert torch.equal(a[0], b[0])
    ref = model(x).detach()
    err_a, err_b = ((a[-1] - ref).norm() / ref.norm()).item(), ((b[-1] - ref).norm() / ref.norm()).item()
    assert err_a < 0.15 and abs(err_a - err_b) < 0.2 * err_b


def test_operation_counts_do_not_depend_on_the_links():
    """The energy accounting counts Eq. 15-18, whatever the modules exchange (same spikes at T = 1)."""
    model, shape = make("avg_pool")
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]), levels=8)
    plain = copy.deepcopy(snn)
    unlink(plain.net)
    a, b = measure(snn, x, 1), measure(plain, x, 1)
    assert a.terms == b.terms and a.ann_macs == b.ann_macs
    assert all(a.terms[f"blocks.{i}.mlp.fc1"]["ac_fanout"][0] > 0 for i in range(2))
