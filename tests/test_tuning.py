"""Threshold search (ecmt.tune): uses calibration data only, beats the default percentile."""
import inspect

import torch

import ecmt
from ecmt import tuning
from ecmt.tuning import output_error, site_type, tune

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
