"""Multi-step simulation: chunks of steps through each layer give the outputs of step mode, bit for bit."""
from __future__ import annotations

import pytest
import torch

import ecmt
from ecmt import fusion, simulation
from ecmt.compensation import ExpectationCompensation, MatMulEC, compensate_scan, mean_scan, rescale_scan, sum_scan
from ecmt.energy import OpCounter
from ecmt.errors import InvalidInputError
from ecmt.layers import MaskedSoftmax, SpikingLinear, linear_scan
from ecmt.neurons import mt_scan, mt_scan_mean
from ecmt.normalization import to_binary
from ecmt.simulation import Simulation, parse_memory, supports_multi_step
from ecmt.state import reset_net, set_steps, stateful_modules
from graph_families import family_model
from tiny_models import make

SCANS = [mt_scan, mt_scan_mean, mean_scan, sum_scan, compensate_scan, rescale_scan, linear_scan]


def test_long_simulation_runs_in_chunks_under_the_budget():
    model, x = family_model("Dinov2Model")
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]), levels=4)
    ref = ecmt.simulate(snn, x, 24, mode="step")
    sim = Simulation(snn, x, 1024, mode="multi", memory=1 << 20)
    out = []
    for t, y in enumerate(sim, start=1):  # the first chunks only: every chunk is alike
        out.append(y)
        if t == 24:
            break
    assert 8 <= sim.chunk < 100  # chunks of a few dozen steps, not 1023
    assert torch.equal(torch.stack(out), ref)


def _chunk(module, inputs, steps):
    """``module`` on a first step, then on the other steps as chunks of ``steps``."""
    reset_net(module)
    outs = [module(*inputs[0])]
    for j in range(1, len(inputs), steps):
        part = inputs[j:j + steps]
        set_steps(stateful_modules(module), len(part))
        args = [torch.cat([p[i] for p in part]) if isinstance(a, torch.Tensor) else a for i, a in enumerate(part[0])]
        outs += list(module(*args).chunk(len(part)))
        set_steps(stateful_modules(module), 1)
    return outs


@pytest.mark.parametrize("mode", ["0", "1"], ids=["eager", "fused"])
def test_modules_chunked_equal_step_by_step(mode):
    """Every multi-step module, eager and fused (compiled), against its one-step forward in eager mode."""
    g = torch.Generator().manual_seed(0)
    neuron = ecmt.MTNeuron([0.37, 0.2, 0.5], [0.11, 0.3, 0.2], levels=4)  # per channel
    linked = ecmt.MTNeuron(0.37, 0.11, levels=4, rule="nearest")
    linked.mean_input = True
    linear = SpikingLinear(ecmt.MTNeuron(0.3, 0.3, levels=4), torch.nn.Linear(3, 5))
    linear.mean_output = True
    cases = [
        (neuron, [(torch.randn(2, 20, 3, generator=g) * 2,) for _ in range(11)]),
        (linked, [(torch.randn(2, 20, 6, generator=g), torch.float32) for _ in range(11)]),
        (ExpectationCompensation(torch.nn.LayerNorm(6)), [(torch.randn(2, 20, 6, generator=g),) for _ in range(11)]),
        (ExpectationCompensation(MaskedSoftmax()), [(torch.randn(2, 2, 5, 5, generator=g),) for _ in range(11)]),
        (MatMulEC(), [(torch.randn(2, 2, 5, 4, generator=g).round(), torch.randn(2, 2, 5, 4, generator=g).mT)
                      for _ in range(11)]),
        (linear, [(torch.randn(4, 20, 3, generator=g),) for _ in range(11)]),
    ]
    before = fusion.get_mode()
    try:
        for module, inputs in cases if mode == "0" else cases[:2] + cases[4:5]:  # fused: the neurons and MatMulEC
            fusion.set_mode("0")
            with torch.no_grad():
                ref = _chunk(module, inputs, 1)
                fusion.set_mode(mode)
                for steps in (3, 10) if mode == "0" else (4,):  # fused: one compiled variant of each scan
                    got = _chunk(module, inputs, steps)
                    assert all(torch.equal(a, b) for a, b in zip(ref, got)), (type(module).__name__, steps)
    finally:
        fusion.set_mode(before)
    assert not [s.__name__ for s in SCANS if s.failed]  # the fused path really ran


def test_chunk_that_does_not_fit_the_state_is_refused():
    neuron = ecmt.MTNeuron(0.5, 0.5, levels=4)
    neuron(torch.randn(2, 3))
    set_steps([neuron], 2)
    with pytest.raises(RuntimeError, match="does not fit the state"):
        neuron(torch.randn(6, 3))


@pytest.fixture(scope="module")
def tiny():
    model, shape = make("class_token")
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    return ecmt.convert(model, ecmt.calibrate(model, [x]), levels=4), x


def test_auto_mode_falls_back_to_step_mode(tiny, monkeypatch):
    snn, x = tiny
    assert snn.path == "adapter" and supports_multi_step(snn)
    assert Simulation(snn, x, 8).multi and not Simulation(snn, x, 2).multi  # T = 2: a chunk of 1 step
    with OpCounter(snn):  # hooks count per step
        assert not Simulation(snn, x, 8).multi
    handle = next(n for _, n in snn.neurons()).register_forward_hook(lambda *args: None)
    assert not Simulation(snn, x, 8).multi  # a hook on one module (ecmt.analysis) expects single steps
    handle.remove()
    ref = ecmt.simulate(snn, x, 6, mode="step")
    monkeypatch.setattr(simulation, "AUTO_STATE_LIMIT", 0)  # every state counts as large: one step at a time
    big = Simulation(snn, x, 6)
    assert torch.equal(torch.stack(list(big)), ref) and not big.multi and big.chunk == 1 and big.compacts
    binary = to_binary(snn)  # its Linear layers take binary spikes, one step a call
    assert not Simulation(binary, x, 8).multi
    with pytest.raises(InvalidInputError, match="multi-step mode is not available.*BinarySpikingLinear"):
        Simulation(binary, x, 8, mode="multi")
    with pytest.raises(InvalidInputError, match="unknown simulation mode"):
        ecmt.simulate(snn, x, 4, mode="fast")


def test_inputs_leave_the_batch_and_the_others_are_unchanged(tiny):
    snn, x = tiny
    ref = ecmt.simulate(snn, x, 9, mode="step")
    sim = Simulation(snn, x, 9, growing=True)
    assert sim.compacts
    rows = []
    for t, out in enumerate(sim, start=1):
        assert torch.equal(out, ref[t - 1][sim.rows])
        rows.append(len(sim.rows))
        if t == 2:
            sim.keep(torch.tensor([True, False, True, True]))
        if t == 4:
            sim.keep(torch.tensor([False, True, True]))
    assert rows == [4, 4, 3, 3, 2, 2, 2, 2, 2] and sim.rows.tolist() == [2, 3]


def test_a_batch_that_shrinks_under_the_state_limit_switches_to_chunks(tiny, monkeypatch):
    snn, x = tiny
    ref = ecmt.simulate(snn, x, 9, mode="step")
    snn.reset()
    snn(x)
    full = simulation._largest_state(snn)  # bytes of the largest state tensor of 4 inputs
    monkeypatch.setattr(simulation, "AUTO_STATE_LIMIT", full // 2)  # 2 inputs fit under it, 3 do not
    sim = Simulation(snn, x, 9, growing=True)
    modes = []
    for t, out in enumerate(sim, start=1):
        assert torch.equal(out, ref[t - 1][sim.rows])
        modes.append((len(sim.rows), sim.multi))
        if t == 2:
            sim.keep(torch.tensor([True, False, True, True]))
        if t == 3:
            sim.keep(torch.tensor([False, True, True]))
    assert modes[1:3] == [(4, False), (3, False)]  # one step at a time while the state is large (decided after step 1)
    assert modes[3:] == [(2, True)] * 6 and sim.chunk > 1  # then chunks of steps: 4-5, 6-9 (growing)
    assert sim.rows.tolist() == [2, 3]


def test_parse_memory():
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5GiB") == 3 << 29 and parse_memory("4096") == 4096
    for bad in ("0", "lots", "-1G"):
        with pytest.raises(InvalidInputError, match="memory must be a size"):
            parse_memory(bad)
