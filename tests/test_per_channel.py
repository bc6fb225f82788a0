"""Per-channel base thresholds (outlier channels of LLM activations)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecmt
from ecmt.errors import ThresholdError
from ecmt.normalization import BinarySpikingLinear, to_binary
from graph_families import family_model
from tiny_models import make


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 4.0), st.floats(0.0, 4.0)), min_size=1, max_size=6),
       st.integers(1, 6), st.sampled_from(["eq25", "nearest"]), st.integers(0, 2 ** 16))
def test_per_channel_neuron_is_one_scalar_neuron_per_channel(thetas, levels, rule, seed):
    C = len(thetas)
    xs = torch.randn(5, 3, C, generator=torch.Generator().manual_seed(seed)) * 3
    vector = ecmt.MTNeuron([a for a, _ in thetas], [b for _, b in thetas], levels, rule)
    scalars = [ecmt.MTNeuron(a, b, levels, rule) for a, b in thetas]
    for x in xs:
        out = vector(x)
        for c, n in enumerate(scalars):
            torch.testing.assert_close(out[..., c], n(x[..., c]), rtol=0, atol=0)


def test_thresholds_per_channel_validate_and_round_trip():
    th = ecmt.Thresholds({"a.neuron": ((1.0, 2.0), (0.5, 0.25)), "b": (1.0, 1.0)})
    assert th.per_channel() == ["a.neuron"]
    back = ecmt.Thresholds.from_json(th.to_json())
    assert back.sites == th.sites
    assert th.scaled({"a.neuron": 2.0})["a.neuron"] == ((2.0, 4.0), (1.0, 0.5))
    for bad in (((1.0, -2.0), (1.0, 1.0)), ((1.0, 2.0), (1.0,) * 3), ((), ())):
        with pytest.raises(ThresholdError):
            ecmt.Thresholds({"s": bad})


def _outliers():
    """A tiny Llama whose RMSNorm weights make 3 channels 30x larger than the rest."""
    model, x = family_model("LlamaForCausalLM")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[:3] *= 30
            layer.input_layernorm.weight[:3] *= 30
    return model, x


def _error(model, x, th, T):
    ref = ecmt.registry.main_output(model(**x))
    out = ecmt.simulate(ecmt.convert(model, th), x, max(T))
    w = x["attention_mask"][..., None].float()
    return [float(((out[t - 1] - ref) * w).norm() / (ref * w).norm()) for t in T]


@torch.no_grad()
def test_per_channel_calibration_helps_outlier_channels():
    model, x = _outliers()
    scalar = ecmt.calibrate(model, [x])
    per_channel = ecmt.calibrate(model, [x], per_channel=True)
    sites = per_channel.per_channel()
    assert sites and all(n.endswith(".neuron") for n in sites) and not scalar.per_channel()
    name = "model.layers.1.mlp.gate_proj.neuron"
    pos = per_channel[name][0]
    assert len(pos) == 32 and min(pos[:3]) > 5 * max(pos[3:])  # the outlier channels get their own scale
    e_scalar, e_channel = _error(model, x, scalar, (8, 32)), _error(model, x, per_channel, (8, 32))
    assert e_channel[0] < 0.8 * e_scalar[0] and e_channel[1] < 0.8 * e_scalar[1], (e_scalar, e_channel)


def test_per_channel_tune_and_save_load(tmp_path):
    from ecmt import serialization
    from ecmt.text import encoder_spec

    model, x = _outliers()
    th = ecmt.tune(model, [x], T=4, levels=8, budget=4, per_channel=True)
    assert th.per_channel() and th.meta["relative_sq_error"] <= th.meta["reference_error"]
    snn = ecmt.convert(model, th)
    snn.spec = encoder_spec(model, "tiny-llama")
    saved = serialization.read(serialization.save(snn, tmp_path / "snn.safetensors", ann=model))
    torch.testing.assert_close(ecmt.simulate(saved.snn, x, 4), ecmt.simulate(snn, x, 4), rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["eq25", "nearest"])
def test_per_channel_thresholds_fold_into_weight_columns(rule):
    """Eq. 27-29 with per-channel thresholds: binary spikes reproduce the fused SNN."""
    model, shape = make("qk_norm")
    th = ecmt.calibrate(model, [torch.randn(8, *shape)], per_channel=True)
    assert th.per_channel()
    snn = ecmt.convert(model, th, levels=8, rule=rule)
    binary = to_binary(snn)
    assert any(isinstance(m, BinarySpikingLinear) and m.neuron.per_channel for m in binary.net.modules())
    x = torch.randn(3, *shape)
    torch.testing.assert_close(ecmt.simulate(binary, x, T=12), ecmt.simulate(snn, x, T=12), rtol=1e-4, atol=1e-4)


def test_cli_convert_per_channel(tmp_path):
    from ecmt import cli, serialization

    path = tmp_path / "pc.snn.safetensors"
    assert cli.main(["convert", "--model", "fmnist-vit", "--dataset", "fashion-mnist", "--calib-batches", "1",
                     "--batch-size", "8", "--per-channel", "-o", str(path)]) == 0
    saved = serialization.read(path)
    sites = saved.snn.thresholds.per_channel()
    assert sites and all(n.endswith(".neuron") for n in sites)
    assert any(n.per_channel for _, n in saved.snn.neurons())
