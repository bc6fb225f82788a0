"""Threshold search (ecmt.tune): uses calibration data only, chooses per site, beats the default percentile."""
import inspect

import pytest
import torch

import ecmt
from ecmt import tuning
from ecmt.tuning import (fit_factor, lone_neuron_error, output_error, recorded_inputs, sample_sites, site_type,
                         tune)

from tiny_models import make


def test_site_types_group_blocks():
    assert site_type("blocks.11.attn.qkv.neuron") == "blocks.*.attn.qkv.neuron"
    assert site_type("encoder.layer.3.attention.self.q_neuron") == "encoder.layer.*.attention.self.q_neuron"
    assert site_type("head.neuron") == "head.neuron"


def test_tune_takes_only_calibration_batches_and_respects_its_budget(monkeypatch):
    params = list(inspect.signature(tune).parameters)
    assert params[:2] == ["model", "batches"] and not any("test" in p for p in params)
    model, shape = make("class_token")
    seen = []

    def batches():
        for _ in range(2):
            x = torch.randn(8, *shape)
            seen.append(x)
            yield x

    calls = []
    for simulation in ("output_error", "recorded_inputs"):  # every SNN simulation of the search
        real = getattr(tuning, simulation)
        monkeypatch.setattr(tuning, simulation, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    th = tune(model, batches(), T=2, levels=8, budget=7)
    assert len(seen) == 2 and len(calls) == th.meta["simulations"] <= 7
    assert set(th) == set(ecmt.calibrate(model, seen))


def test_tuned_thresholds_beat_the_default_on_held_out_inputs():
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape) for _ in range(2)]
    th = tune(model, calib, T=4, levels=8, budget=8)
    held_out = [torch.randn(16, *shape) for _ in range(2)]
    with torch.no_grad():
        refs = [model(x) for x in held_out]
    tuned = output_error(model, th, held_out, refs, T=4, levels=8)
    default = output_error(model, ecmt.calibrate(model, calib, percentile=99.0), held_out, refs, T=4, levels=8)
    assert tuned < 0.7 * default


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_lone_neuron_error_is_that_of_a_simulated_mt_neuron(rule):
    values = torch.tensor([0.05, 0.3, 0.74, 1.0, 2.6, 40.0, 300.0], dtype=torch.float64)
    counts = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    thetas = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    got = lone_neuron_error(values, counts, thetas, T=4, levels=4, rule=rule)
    for theta, err in zip(thetas.tolist(), got.tolist()):
        neuron = ecmt.MTNeuron(theta, theta, levels=4, rule=rule)
        mean = sum(neuron(values.float()) for _ in range(4)) / 4
        assert err == pytest.approx(float((counts * (mean.double() - values) ** 2).sum()), rel=1e-5)


def test_per_site_search_lowers_the_calibration_error_below_the_defaults():
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape) for _ in range(2)]
    with torch.no_grad():
        refs = [model(x) for x in calib]
    th = tune(model, calib, T=4, levels=8, budget=8)
    paper = ecmt.calibrate(model, calib, percentile=99.0)
    default = output_error(model, paper, calib, refs, T=4, levels=8)
    tuned = output_error(model, th, calib, refs, T=4, levels=8)
    assert th.rule == "nearest"  # the default rule of the search
    assert th.meta["reference_error"] == pytest.approx(output_error(model, paper.with_rule("nearest"), calib,
                                                                    refs, T=4, levels=8))
    assert th.meta["relative_sq_error"] == pytest.approx(tuned)
    assert tuned < 0.5 * default and th.meta["simulations"] == len(th.meta["errors"]) == 8
    # per site, not per site type: the same site in the two blocks sits at different percentiles
    p = th.meta["percentile_by_site"]
    suffixes = [name[len("blocks.0."):] for name in p if name.startswith("blocks.0.")]
    assert any(abs(p[f"blocks.0.{s}"] - p[f"blocks.1.{s}"]) > 1 for s in suffixes)


def test_the_search_can_tune_for_the_papers_neuron():
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape) for _ in range(2)]
    with torch.no_grad():
        refs = [model(x) for x in calib]
    th = tune(model, calib, T=4, levels=8, budget=6, rule="eq25")
    assert th.rule == "eq25"
    assert {n.rule for _, n in ecmt.convert(model, th).neurons()} == {"eq25"}
    paper = output_error(model, ecmt.calibrate(model, calib, percentile=99.0), calib, refs, T=4, levels=8)
    assert th.meta["reference_error"] == pytest.approx(paper) and th.meta["relative_sq_error"] < paper
    with pytest.raises(ecmt.InvalidInputError, match="spike rule"):
        tune(model, calib, T=4, rule="floor")


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_fit_factor_picks_the_factor_of_least_error_of_a_simulated_neuron(rule):
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(4, 50, generator=g) * 2 + 0.5  # (T, K): a fluctuating input per position
    target = seq.mean(0)  # what the neuron's T-step mean should reproduce
    theta = torch.stack([torch.rand(50, generator=g) + 0.2, torch.rand(50, generator=g) + 0.2])
    factors = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0])
    errors = []
    for f in factors.tolist():
        neuron = ecmt.MTNeuron((theta[0] * f).tolist(), (theta[1] * f).tolist(), levels=3, rule=rule)
        mean = sum(neuron(x) for x in seq) / 4
        errors.append(float(((mean - target) ** 2).sum()))
    best = factors[torch.tensor(errors).argmin()]
    assert fit_factor(seq, theta, 3, ecmt.neurons.SpikeRule(rule), factors) == float(best)
    assert fit_factor(torch.zeros(4, 50), theta, 3, ecmt.neurons.SpikeRule(rule), factors) == 1.0  # idle: kept
    assert len(set(errors)) > 1  # the factors differ: the choice is not vacuous


def test_recorded_inputs_leave_the_simulation_unchanged_and_see_the_analog_input_exactly():
    model, shape = make("class_token")
    calib = [torch.randn(8, *shape) for _ in range(2)]
    th = ecmt.calibrate(model, calib)
    with torch.no_grad():
        refs = [model(x) for x in calib]
    samplers = sample_sites(model, calib, 300, example=None, path="auto")
    snn = ecmt.convert(model, th)
    err, seqs = recorded_inputs(snn, samplers, calib, refs, T=3)
    assert err == pytest.approx(output_error(model, th, calib, refs, T=3, levels=8))
    assert set(seqs) == set(th) and all(s.shape == (3, 300) for s in seqs.values())
    # the first site sees a function of the constant analog input: the same increment at every step
    first, last = ecmt.site_names(model)[0], ecmt.site_names(model)[-1]
    assert all(torch.allclose(step, seqs[first][0], rtol=1e-5, atol=1e-5) for step in seqs[first])
    assert seqs[first].abs().sum() > 0
    # behind spiking sites the input fluctuates from step to step
    assert not torch.allclose(seqs[last][1], seqs[last][0], rtol=1e-3, atol=1e-3)


def test_refits_start_from_the_lone_neuron_thresholds_and_keep_the_best():
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape) for _ in range(2)]
    with torch.no_grad():
        refs = [model(x) for x in calib]
    th = tune(model, calib, T=4, levels=8, budget=6, refits=2)
    errs = th.meta["refit_errors"]
    assert 1 <= len(errs) <= 2 and th.meta["errors"][1:1 + len(errs)] == errs
    start = tuning.lone_neuron_thresholds(tuning.collect_statistics(model, calib), 4, 8, rule="nearest")
    assert errs[0] == pytest.approx(output_error(model, start.with_rule("nearest"), calib, refs, T=4, levels=8))
    assert th.meta["relative_sq_error"] == min(th.meta["errors"]) and len(th.meta["errors"]) <= 6
    for bad in ({"refits": -1}, {"samples": 0}, {"samples": 1 << 20}):
        with pytest.raises(ecmt.InvalidInputError, match=next(iter(bad))):
            tune(model, calib, T=4, **bad)


def test_the_search_simulates_the_levels_it_is_asked_for():
    # issue 21 meets its goals with n = 10: the search must tune for that neuron, not the paper's n = 8
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape) for _ in range(2)]
    with torch.no_grad():
        refs = [model(x) for x in calib]
    th = tune(model, calib, T=4, levels=10, budget=4)
    paper = ecmt.calibrate(model, calib, percentile=99.0).with_rule("nearest")
    assert th.meta["levels"] == 10
    assert th.meta["reference_error"] == pytest.approx(output_error(model, paper, calib, refs, T=4, levels=10))
    assert th.meta["relative_sq_error"] == pytest.approx(output_error(model, th, calib, refs, T=4, levels=10))
    assert th.meta["relative_sq_error"] != pytest.approx(output_error(model, th, calib, refs, T=4, levels=8))
    assert {n.levels for _, n in ecmt.convert(model, th, levels=10).neurons()} == {10}


def test_calibrate_or_tune_forwards_the_search_options_and_refuses_others():
    model, shape = make("class_token")
    batches = [torch.randn(8, *shape)]
    th = tuning.calibrate_or_tune(model, batches, tune_for=2, tune_options={"budget": 2})
    assert th.meta["tuned_T"] == 2 and 1 <= th.meta["simulations"] <= 2
    with pytest.raises(ecmt.InvalidInputError, match="not an option of the threshold search here: T, speed"):
        tuning.calibrate_or_tune(model, batches, tune_for=2, tune_options={"speed": 1, "T": 3})
    with pytest.raises(ecmt.InvalidInputError, match=r"tune options \(budget\) need a threshold search"):
        tuning.calibrate_or_tune(model, batches, tune_options={"budget": 2})


def _site_inputs(snn, batches):
    """The input of every MT neuron on ``batches`` with every site exact: the ANN's activations."""
    from ecmt.analysis import exact_sites
    seen = {}

    def keep(name):
        return lambda neuron, args, out: seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [n.register_forward_hook(keep(name)) for name, n in snn.neurons()]
    try:
        with exact_sites(snn, lambda n: True), torch.no_grad():
            for x in batches:
                ecmt.simulate(snn, x, 1)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("per_channel", [False, True])
def test_headroom_keeps_every_top_threshold_above_the_calibration_maxima(per_channel):
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape) for _ in range(2)]
    h, levels = 4.0, 10
    th = tune(model, calib, T=4, levels=levels, budget=6, headroom=h, per_channel=per_channel)
    assert th.meta["headroom"] == h and th.meta["simulations"] == 6
    snn = ecmt.convert(model, th, levels=levels)
    inputs = _site_inputs(snn, calib)
    assert inputs and (not per_channel or any(n.per_channel for _, n in snn.neurons()))
    for name, neuron in snn.neurons():
        x = inputs[name]
        dims = (0,) if neuron.per_channel else None
        for side, values in ((0, x.clamp_min(0)), (1, (-x).clamp_min(0))):
            largest = values.amax(*([dims] if dims else []))
            top = neuron.theta[side] * 2.0 ** (levels - 1)  # Eq. 19: the largest threshold
            # a disabled side (θ = 0) has no values of its sign; the histogram's buckets are
            # 2**-8 wide (relative), so the calibration maximum is known to 1 %
            ok = (top >= 0.99 * h * largest) | (neuron.theta[side] == 0)
            assert bool(ok.all()), name
    th1 = tune(model, calib, T=4, levels=levels, budget=6, per_channel=per_channel)
    assert th1.meta["headroom"] == 1.0 and th1.sites != th.sites


def test_headroom_passes_on_held_out_inputs_beyond_the_calibration_range():
    # per channel, few calibration inputs: held-out inputs 3x larger saturate neurons whose top
    # threshold sits at the calibration maximum; their error stops falling with T
    torch.manual_seed(0)
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape)]
    held_out = [3 * torch.randn(16, *shape)]
    with torch.no_grad():
        refs = [model(x) for x in held_out]
    errors = {}
    for h in (1.0, 8.0):
        th = tune(model, calib, T=16, levels=12, budget=4, per_channel=True, headroom=h)
        errors[h] = [output_error(model, th, held_out, refs, T=T, levels=12) for T in (16, 64)]
    assert errors[8.0][1] < 0.5 * errors[1.0][1]
    assert errors[8.0][1] < 0.5 * errors[8.0][0]  # with headroom the error falls with T


@pytest.mark.parametrize("bad", [0.5, float("nan"), True, "2"])
def test_headroom_must_be_a_number_of_at_least_one(bad):
    model, shape = make("class_token")
    with pytest.raises(ecmt.InvalidInputError, match="headroom must be a number >= 1"):
        tune(model, [torch.randn(4, *shape)], T=2, headroom=bad)


def test_the_search_spends_no_simulation_on_thresholds_raised_to_the_floor_it_has_measured(monkeypatch):
    model, shape = make("class_token")
    calib = [torch.randn(16, *shape)]
    simulated = []
    real = tuning.output_error
    monkeypatch.setattr(tuning, "output_error", lambda m, th, *a, **k: simulated.append(th.sites) or real(m, th, *a, **k))
    th = tune(model, calib, T=4, levels=8, budget=12, headroom=64.0)  # the floor binds at most sites
    assert len(simulated) == th.meta["simulations"] == len(th.meta["errors"])
    assert all(a != b for i, a in enumerate(simulated) for b in simulated[:i])
