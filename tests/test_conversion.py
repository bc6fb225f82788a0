"""Conversion of timm ViT-family models: structure, exactness of the structure, fidelity."""
import pytest
import timm
import torch
from torch import nn

import ecmt
from ecmt import ExpectationCompensation, MatMulEC, MTNeuron
from ecmt.layers import SpikingAttention, SpikingLinear

from tiny_models import CONFIGS, make


def calibrated(name):
    model, shape = make(name)
    calib = [torch.randn(8, *shape) for _ in range(3)]
    return model, shape, ecmt.calibrate(model, calib)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_structure_with_pass_through_sites_is_the_ann(name):
    """With identity sites, one step of the spiking structure computes exactly the ANN."""
    model, shape = make(name)
    x = torch.randn(4, *shape)
    net = ecmt.build_spiking(model, lambda site: nn.Identity())
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_error_falls_with_T_and_is_below_5_percent_at_64(name):
    model, shape, th = calibrated(name)
    snn = ecmt.convert(model, th, levels=8)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        ref = model(x)
    out = ecmt.simulate(snn, x, T=64)
    assert out.shape == (64, *ref.shape)
    err = [float((out[t - 1] - ref).norm() / ref.norm()) for t in (4, 16, 64)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 0.05


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_of_neurons_and_ec_modules(name):
    model, _, th = calibrated(name)
    snn = ecmt.convert(model, th, levels=8)
    depth = len(model.blocks)
    heads = 2 if name == "deit_distilled" else 1
    qk_norm = 2 if name == "qk_norm" else 0
    final_norms = 1  # timm: `norm`, or `fc_norm` when average pooling (the other is Identity)
    count = lambda t: sum(isinstance(m, t) for m in snn.net.modules())  # noqa: E731
    # per block: MT before qkv, proj, fc1, fc2 and on q, k, attention map, v (Alg. 1, lines 8-11)
    assert count(MTNeuron) == 8 * depth + heads
    assert count(SpikingLinear) == 4 * depth + heads
    assert count(MatMulEC) == 2 * depth
    # per block: LayerNorm 1 and 2, softmax, GELU (+ q/k norms); then the final norm
    assert count(ExpectationCompensation) == (4 + qk_norm) * depth + final_norms
    assert count(SpikingAttention) == depth
    assert len(th) == count(MTNeuron)
    assert not any(isinstance(m, (nn.Linear,)) and not isinstance(p, SpikingLinear)
                   for p in snn.net.modules() for m in p.children())


def test_original_model_is_untouched():
    model, shape = make("qk_norm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    x = torch.randn(2, *shape)
    ref = model(x)
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]), levels=4)
    ecmt.simulate(snn, x, T=3)
    assert [type(m) for m in model.modules()] == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model(x), ref)


def test_scaled_dot_product_attention_is_replaced():
    model, shape = make("class_token")
    assert model.blocks[0].attn.fused_attn  # timm's default path uses F.scaled_dot_product_attention
    snn = ecmt.convert(model, ecmt.calibrate(model, [torch.randn(2, *shape)]))
    assert isinstance(snn.net.blocks[0].attn, SpikingAttention)


def test_simulation_resets_state_between_inputs():
    model, shape, th = calibrated("class_token")
    snn = ecmt.convert(model, th, levels=8)
    x1, x2 = torch.randn(2, *shape), torch.randn(2, *shape)
    fresh = ecmt.simulate(snn, x2, T=5)
    ecmt.simulate(snn, x1, T=7)
    assert torch.equal(ecmt.simulate(snn, x2, T=5), fresh)


def test_same_seed_and_inputs_give_bit_identical_outputs():
    """Determinism on the CPU: two separate builds, calibrations and conversions from the same
    seed and inputs give the same thresholds and the same SNN outputs, bit for bit."""
    runs = []
    for _ in range(2):
        model, shape = make("class_token", seed=3)
        g = torch.Generator().manual_seed(1)
        calib, x = torch.randn(8, *shape, generator=g), torch.randn(4, *shape, generator=g)
        th = ecmt.calibrate(model, [calib[:4], calib[4:]])
        runs.append((th, ecmt.simulate(ecmt.convert(model, th, levels=4), x, T=6)))
    (th_a, out_a), (th_b, out_b) = runs
    assert th_a.sites == th_b.sites and torch.equal(out_a, out_b)


def test_adapter_path_names_unsupported_modules_and_the_graph_converts_them():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ecmt.UnsupportedModelError) as e:
        ecmt.convert(model, {}, levels=8, path="adapter")
    msg = str(e.value)
    assert "ResNet" in msg and "Conv2d" in msg and "BatchNorm2d" in msg
    names = ecmt.site_names(model, example=torch.randn(2, 3, 32, 32))  # convolutions, BatchNorm, max pooling
    assert "layer1.0.conv1.neuron" in names and "fc.neuron" in names and "conv1.neuron" not in names


def test_eva02_features_are_named_unsupported_by_the_adapter():
    from timm.models.eva import Eva
    model = Eva(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                use_rot_pos_emb=True, swiglu_mlp=True)
    with pytest.raises(ecmt.UnsupportedModelError) as e:
        ecmt.site_names(model, path="adapter")
    assert "rotary" in str(e.value) and "GluMlp at blocks.0.mlp" in str(e.value)


def test_missing_threshold_is_a_typed_error():
    model, shape, th = calibrated("class_token")
    partial = dict(list(th.items())[:-1])
    with pytest.raises(ecmt.ThresholdError, match="no threshold"):
        ecmt.convert(model, partial)


def test_calibration_overrides_by_pattern():
    model, shape = make("class_token")
    th = ecmt.calibrate(model, [torch.randn(4, *shape)], overrides={"*.attn_neuron": 0.0125})
    attn = {k: v for k, v in th.items() if k.endswith("attn_neuron")}
    assert len(attn) == 2 and all(v == (0.0125, 0.0125) for v in attn.values())
    assert th["blocks.0.attn.qkv.neuron"] != (0.0125, 0.0125)
    with pytest.raises(ecmt.ThresholdError):
        th.with_overrides({"no.such.site": 1.0})
