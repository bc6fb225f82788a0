"""The generic graph path (ecmt.graph): every family converts by one rule per kind of op."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ecmt
from ecmt.compensation import ExpectationCompensation, MatMulEC
from ecmt.graph import SpikingGraph
from ecmt.registry import main_output
from ecmt.simulation import _step_bytes
from graph_families import FAMILIES, HF, VISION, family_model

STRUCTURE = {  # (MT neurons, EC modules, matrix-product EC modules) of each small configuration
    # ViT, 2 blocks: 8 sites a block (qkv, q, k, v, attention map, proj, fc1, fc2) and the head; EC: norm2, softmax,
    # GELU per block, norm1 of the second block and the final norm (the first norm1 sees the analog embedding)
    "vit": (17, 8, 4),
    "vit_qknorm_avg": (17, 12, 4),  # + q and k norms
    "deit": (18, 8, 4),  # + the distillation head
    "deit3": (17, 8, 4),
    "eva01": (17, 8, 4),
    "eva02": (17, 10, 4),  # SwiGLU: the gate product instead of GELU, plus the MLP's norm
    "beit": (17, 8, 4),
    "swin": (34, 17, 8),
    "cait": (30, 12, 6),
    "clip": (17, 10, 4),  # QuickGELU: x·sigmoid(1.702x) is two ops
    "siglip": (24, 11, 6),  # + the MAP head (a constant query)
    "vit_relpos": (17, 8, 4),
    "dinov2": (17, 8, 4),
    "xcit": (42, 35, 8),
    # BERT-like, 2 layers: q, k, v projections share one site; EC: softmax, 2 LayerNorms, GELU per layer, pooler tanh
    "BertModel": (17, 9, 4),
    "RobertaModel": (17, 9, 4),
    "DistilBertModel": (16, 8, 4),
    "MPNetModel": (17, 9, 4),
    "ViTModel": (17, 9, 4),
    "Dinov2Model": (16, 8, 4),
    # Llama: RMSNorm is pow, rsqrt and a product (3 EC), SwiGLU silu and a product
    "LlamaForCausalLM": (17, 18, 4),
    "GPT2LMHeadModel": (17, 12, 4),
}


def structure(snn: ecmt.SpikingModel) -> tuple[int, int, int]:
    mods = list(snn.net.modules())
    return (sum(isinstance(m, ecmt.MTNeuron) for m in mods), sum(type(m) is ExpectationCompensation for m in mods),
            sum(isinstance(m, MatMulEC) for m in mods))


def relative_error(out: torch.Tensor, ref: torch.Tensor, x) -> float:
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    w = mask[..., None].float() if mask is not None and ref.dim() == 3 else 1.0
    return float(((out - ref) * w).norm() / (ref * w).norm())


@pytest.mark.parametrize("key", FAMILIES)
def test_family_converts_and_converges(key):
    model, x = family_model(key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    th = ecmt.calibrate(model, [x], path="graph")
    snn = ecmt.convert(model, th, levels=8, path="graph")
    assert isinstance(snn.net, SpikingGraph) and snn.path == "graph"
    assert structure(snn) == STRUCTURE[key]
    assert sorted(name for name, _ in snn.neurons()) == sorted(th)
    with torch.no_grad():
        ref = main_output(model(**x) if isinstance(x, dict) else model(x)).float()
    out = ecmt.simulate(snn, x, 128)  # multi-step mode: chunks of steps through each layer
    # step mode gives the same outputs bit for bit, and so do chunks of 3 steps
    assert torch.equal(out[:10], ecmt.simulate(snn, x, 10, mode="step"))
    assert torch.equal(out[:10], ecmt.simulate(snn, x, 10, memory=3 * _step_bytes(snn, out[0], x)))
    errors = [relative_error(out[T - 1], ref, x) for T in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors
    after = model.state_dict()  # the ANN is untouched, and holds no spiking module
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, (ecmt.MTNeuron, ExpectationCompensation)) for m in model.modules())


@pytest.mark.parametrize("key", ["vit", "eva01", "BertModel"])
def test_graph_path_equals_adapter_path(key):
    """Where an adapter exists, the generic path builds the same sites and the same SNN outputs."""
    model, x = family_model(key)
    graph, adapter = ecmt.site_names(model, path="graph"), ecmt.site_names(model, path="adapter")
    if key == "BertModel":  # the adapter fuses query, key and value into one Linear; the graph shares one site
        assert len(graph) == len(adapter) and "encoder.layer.0.attention.self.query.neuron" in graph
    else:
        assert sorted(graph) == sorted(adapter)
    outs = []
    for path in ("adapter", "graph"):
        snn = ecmt.convert(model, ecmt.calibrate(model, [x], path=path), path=path)
        outs.append(ecmt.simulate(snn, x, 8))
        assert torch.equal(outs[-1], ecmt.simulate(snn, x, 8, mode="step"))  # multi-step mode on both paths
    torch.testing.assert_close(outs[0][:4], outs[1][:4], rtol=1e-4, atol=1e-4)


def test_auto_path_falls_back_to_the_graph_where_the_adapter_refuses():
    model, _ = family_model("eva02")  # rotary embeddings: the EVA adapter refuses them
    with pytest.raises(ecmt.UnsupportedModelError):
        ecmt.site_names(model, path="adapter")
    snn = ecmt.convert(model, {n: (1.0, 1.0) for n in ecmt.site_names(model)})
    assert snn.path == "graph"
    vit, _ = family_model("vit")
    assert ecmt.convert(vit, {n: (1.0, 1.0) for n in ecmt.site_names(vit)}).path == "adapter"


def test_readable_site_names():
    model, _ = family_model("LlamaForCausalLM")
    names = ecmt.site_names(model)
    # q, k and v projections read one tensor: one site, named after the first of them
    assert "model.layers.1.self_attn.q_proj.neuron" in names
    assert not any(n.startswith("model.layers.1.self_attn.k_proj") for n in names)
    assert {"model.layers.0.self_attn.q_neuron", "model.layers.0.self_attn.k_neuron", "model.layers.0.self_attn.v_neuron",
            "model.layers.0.self_attn.attn_neuron", "model.layers.0.mlp.down_proj.neuron", "lm_head.neuron"} <= set(names)


class _Sorts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(self.embed(x))  # the embedding is the analog encoding layer; fc1 spikes
        return self.fc2(torch.sort(h, dim=-1).values)


def test_unknown_op_is_named_with_its_module_path():
    with pytest.raises(ecmt.UnsupportedModelError, match=r"sort .* at <root>"):
        ecmt.site_names(_Sorts(), example=torch.randn(2, 4))


def test_n_ary_ec_is_exact_in_the_mean():
    """Eq. 15 for F(a, b) = silu(a)·b: the outputs sum to T·F(mean a, mean b) at every T."""
    ec = ExpectationCompensation(_SwiGLU(), arity=2)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    total = torch.zeros(5)
    for t in range(6):
        total += ec(a[t], b[t])
        mean = _SwiGLU()(a[: t + 1].mean(0), b[: t + 1].mean(0))
        torch.testing.assert_close(total, (t + 1) * mean, rtol=1e-5, atol=1e-5)


class _SwiGLU(nn.Module):
    def forward(self, a, b):
        return torch.nn.functional.silu(a) * b


@pytest.mark.parametrize("key", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_decoder_is_causal_at_every_step(key):
    model, x = family_model(key)
    x = {"input_ids": x["input_ids"], "attention_mask": torch.ones_like(x["input_ids"])}
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]))
    changed = dict(x, input_ids=x["input_ids"].clone())
    changed["input_ids"][:, 5:] = (changed["input_ids"][:, 5:] + 7) % 100
    a, b = ecmt.simulate(snn, x, 6), ecmt.simulate(snn, changed, 6)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=0)
    assert not torch.equal(a[:, :, 5:], b[:, :, 5:])


def test_batch_inputs_adapt_to_the_captured_signature():
    model, x = family_model("BertModel")
    snn = ecmt.convert(model, ecmt.calibrate(model, [x], path="graph"), path="graph")
    out = ecmt.simulate(snn, x, 2)
    with_types = dict(x, token_type_ids=torch.zeros_like(x["input_ids"]))
    torch.testing.assert_close(ecmt.simulate(snn, with_types, 2), out, rtol=0, atol=0)
    with pytest.raises(ecmt.InvalidInputError, match="does not take 'position_ids'"):
        ecmt.simulate(snn, dict(x, position_ids=torch.ones_like(x["input_ids"])), 1)


def test_deepcopy_and_eval():
    model, x = family_model("swin")
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]))
    twin = copy.deepcopy(snn).eval()
    torch.testing.assert_close(ecmt.simulate(twin, x, 3), ecmt.simulate(snn, x, 3), rtol=0, atol=0)


@pytest.mark.parametrize("key", ["swin", "LlamaForCausalLM"])
def test_generic_snn_saves_and_loads_bit_identically(key, tmp_path):
    from ecmt import serialization
    from ecmt.models import from_spec
    from ecmt.text import encoder_spec
    from graph_families import VISION

    if key in VISION:
        name, kwargs = VISION[key]
        spec = {"name": name, "builder": "timm", "kwargs": {"model_name": name, "num_classes": 10, **kwargs},
                "num_classes": 10, "data_config": {"input_size": [3, 56, 56]}}
        model = from_spec(spec).model
        torch.manual_seed(3)
        x = torch.randn(2, 3, 56, 56)
    else:
        model, x = family_model(key)
        spec = encoder_spec(model, "tiny-llama")
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]))
    snn.spec = spec
    path = serialization.save(snn, tmp_path / "snn.safetensors", ann=model)
    saved = serialization.read(path)
    assert saved.snn.path == "graph" and saved.info["path"] == "graph"
    torch.testing.assert_close(ecmt.simulate(saved.snn, x, 4), ecmt.simulate(snn, x, 4), rtol=0, atol=0)
    with torch.no_grad():  # the ANN comes back too
        a = main_output(saved.ann(**x) if isinstance(x, dict) else saved.ann(x))
        b = main_output(model(**x) if isinstance(x, dict) else model(x))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.act, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.embed(x))))


def test_operation_counts_on_a_graph_snn_by_hand():
    from ecmt.energy import measure

    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(4, 3)
    snn = ecmt.convert(model, ecmt.calibrate(model, [x], example=x), example=x)
    assert snn.path == "graph" and sorted(ecmt.site_names(model, example=x)) == ["fc1.neuron", "fc2.neuron"]
    spikes: dict[str, list[int]] = {"fc1": [], "fc2": []}
    for layer in spikes:
        snn.net.get_submodule(f"{layer}.neuron").register_forward_hook(
            lambda m, a, out, layer=layer: spikes[layer].append(int(torch.count_nonzero(out))))
    m = measure(snn, x, T=3)
    assert m.kinds == {"embed": "analog", "fc1": "linear", "act": "nonlinear", "fc2": "linear"}
    assert m.terms["fc1"]["ac_fanout"] == tuple(5 * n for n in spikes["fc1"])  # Eq. 28: out_features per spike
    assert m.terms["fc2"]["ac_fanout"] == tuple(2 * n for n in spikes["fc2"])
    assert m.terms["act"]["mac_fn"] == (20, 20, 20)  # F on the 4 x 5 mean input at every step
    assert m.terms["embed"]["mac_analog"] == (4 * 3 * 6,) * 3  # the encoding layer on the analog input
