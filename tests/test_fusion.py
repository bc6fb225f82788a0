"""Fused (torch.compile) and eager step functions give the same results; failures fall back."""
import os
import shutil

import pytest
import torch
from torch import nn

from ecmt import ExpectationCompensation, MatMulEC, MTNeuron, fusion
from ecmt.calibration import SiteObserver, _bucket_of
from ecmt.compensation import accumulate_mean, accumulate_pair, compensate, rescale
from ecmt.neurons import mt_step, mt_step_mean
from ecmt.fusion import Fusable
from ecmt.layers import MaskedSoftmax


STEPS = [mt_step, mt_step_mean, accumulate_mean, compensate, accumulate_pair, rescale, _bucket_of]
HAVE_COMPILER = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))


@pytest.fixture
def fused():
    """Fuse every step function, whatever the tensor size, for the duration of a test."""
    before = fusion.get_mode()
    fusion.set_mode("1")
    yield
    fusion.set_mode(before)
    if HAVE_COMPILER:  # the comparisons are only meaningful if the fused path really ran
        assert not [s.__name__ for s in STEPS if s.failed], "compilation failed, see the warnings"


def run(module, inputs, mode):
    fusion.set_mode(mode)
    module.reset()
    with torch.no_grad():
        return [module(*x) for x in inputs]


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_mt_neuron_fused_is_bit_identical(fused, rule):
    g = torch.Generator().manual_seed(0)
    neuron = MTNeuron(0.37, 0.11, levels=4, rule=rule)
    xs = [(torch.randn(3, 50, 16, generator=g) * 2,) for _ in range(4)]
    # exact level boundaries and their neighbours, on both sides
    edge = [2 ** k - 0.5 for k in range(5)] if rule == "eq25" else [0.5] + [0.75 * 2 ** k for k in range(1, 5)]
    edges = torch.tensor([0.37 * e for e in edge] + [-0.11 * e for e in edge])
    xs.append((torch.cat([edges, torch.nextafter(edges, edges * 2), torch.nextafter(edges, edges * 0)]),))
    eager, fused_out = run(neuron, xs[:4], "0"), run(neuron, xs[:4], "1")
    v_fused = neuron.v.clone()
    run(neuron, xs[:4], "0")
    assert all(torch.equal(a, b) for a, b in zip(eager, fused_out))
    assert torch.equal(neuron.v, v_fused)
    assert torch.equal(run(neuron, xs[4:], "0")[0], run(neuron, xs[4:], "1")[0])


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mt_neuron_fused_half_precision_subtracts_the_rounded_spike(fused, dtype, rule):
    g = torch.Generator().manual_seed(5)
    neuron = MTNeuron(0.37, 0.11, levels=6, rule=rule)
    xs = [(torch.randn(4, 40, 16, generator=g).to(dtype),) for _ in range(5)]
    eager, fused_out = run(neuron, xs, "0"), run(neuron, xs, "1")
    assert all(torch.equal(a, b) for a, b in zip(eager, fused_out))


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_mean_input_neuron_fused_is_bit_identical(fused, rule):
    g = torch.Generator().manual_seed(4)
    neuron = MTNeuron(0.37, 0.11, levels=6, rule=rule)
    neuron.mean_input = True
    means = [(torch.randn(4, 40, 16, generator=g), torch.bfloat16) for _ in range(5)]
    eager, fused_out = run(neuron, means, "0"), run(neuron, means, "1")
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(eager, fused_out))


def test_mt_neuron_fused_strided_input(fused):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 30, 3, 2, 8, generator=g).permute(2, 0, 3, 1, 4)  # timm's q, k, v views
    neuron = MTNeuron(0.5, 0.5, levels=8)
    eager, fused_out = run(neuron, [(qkv[1],)] * 3, "0"), run(neuron, [(qkv[1],)] * 3, "1")
    assert all(torch.equal(a, b) for a, b in zip(eager, fused_out))


def test_matmul_ec_fused_is_bit_identical(fused):
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(2, 2, 20, 8, generator=g).round(), torch.randn(2, 2, 20, 8, generator=g).mT)
              for _ in range(4)]
    eager, fused_out = run(MatMulEC(), inputs, "0"), run(MatMulEC(), inputs, "1")
    assert all(torch.equal(a, b) for a, b in zip(eager, fused_out))


@pytest.mark.parametrize("fn", [nn.LayerNorm(16), MaskedSoftmax()], ids=["layernorm", "softmax"])
def test_ec_fused_is_bit_identical(fused, fn):
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(2, 3, 10, 16, generator=g) * 3,) for _ in range(5)]
    ec = ExpectationCompensation(fn)
    eager, fused_out = run(ec, inputs, "0"), run(ec, inputs, "1")
    assert all(torch.equal(a, b) for a, b in zip(eager, fused_out))


def test_calibration_histogram_fused_is_identical(fused):
    x = torch.randn(4, 30, 16) * torch.logspace(-20, 20, 16)
    counts = []
    for mode in ("0", "1"):
        fusion.set_mode(mode)
        obs = SiteObserver()
        with torch.no_grad():
            obs(x)
            obs(x.transpose(0, 1))  # a strided input
        counts.append(obs.counts)
    assert torch.equal(*counts)


def test_compilation_failure_falls_back_to_eager(fused, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    step = Fusable(lambda a, b: a + b)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no compiler here"):
        assert torch.equal(step(torch.ones(3), torch.ones(3), numel=3), torch.full((3,), 2.0))
    assert step.failed and not step.use_fused(10 ** 9)
    with torch.no_grad(), pytest.raises(RuntimeError, match="size"):  # errors of the inputs still surface
        Fusable(lambda a, b: a + b)(torch.ones(3), torch.ones(4), numel=3)


def test_auto_mode_fuses_only_large_tensors_without_grad(fused):
    step = Fusable(lambda a: a)
    fusion.set_mode("auto")
    with torch.no_grad():
        assert not step.use_fused(fusion.MIN_NUMEL - 1) and step.use_fused(fusion.MIN_NUMEL)
    assert not step.use_fused(fusion.MIN_NUMEL)  # gradients enabled: eager
