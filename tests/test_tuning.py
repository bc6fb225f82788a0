"""Threshold search (ecmt.tune): uses calibration data only, chooses per site, beats the default percentile."""
import inspect

import pytest
import torch

import ecmt
from ecmt import tuning
from ecmt.tuning import lone_neuron_error, output_error, site_type, tune

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
    real = tuning.output_error
    monkeypatch.setattr(tuning, "output_error", lambda *a, **k: calls.append(1) or real(*a, **k))
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
