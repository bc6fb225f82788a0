"""Operation counting and energy estimation (paper Sec. 5.5, Table 3, Eq. 18 and 30)."""
import json

import pytest
import torch
from timm.layers import PatchEmbed
from torch import nn

import ecmt
import ecmt.adapters  # noqa: F401  (registers PatchEmbed as an analog input)
from ecmt import ExpectationCompensation, MatMulEC, MTNeuron, SpikingModel, Thresholds
from ecmt.energy import (EnergyConfig, OpCounter, energy_ratio, energy_report, firing_rates, measure,
                         module_energy, ops_report, theoretical_ops)
from ecmt.layers import SpikingLinear
from ecmt.plots import plot_energy_breakdown, plot_energy_ratio, plot_firing_rates

from tiny_models import make

E_MAC, E_AC = 4.6, 0.9


def wrap(net: nn.Module) -> SpikingModel:
    return SpikingModel(net, levels=2, thresholds=Thresholds({}), output=lambda y: y)


def single_linear() -> SpikingModel:
    """An MT neuron (θ1 = θ2 = 1, n = 2: levels ±1, ±2) before a Linear 3 -> 4."""
    return wrap(SpikingLinear(MTNeuron(1.0, 1.0, levels=2), nn.Linear(3, 4)))


X_LINEAR = torch.tensor([[0.4, 1.0, -3.0]])
# Membranes (Eq. 21-25), input presented at every step:
#   neuron 0: 0.4 -> none | 0.8 -> +1 (v=-0.2) | 0.2 -> none
#   neuron 1: 1.0 -> +1 at every step
#   neuron 2: -3 -> -2 (v=-1) | -4 -> -2 (top level, v=-2) | -5 -> -2 (v=-3)
SPIKES_PER_STEP = [2, 3, 2]


def test_linear_fanout_acs_by_hand():
    m = measure(single_linear(), X_LINEAR, T=3)
    assert m.samples == (1, 1, 1)
    assert m.acs() == tuple(4 * s for s in SPIKES_PER_STEP) == (8, 12, 8)  # fan-out 4 per spike
    assert m.macs() == (0, 0, 0)
    assert m.ann_macs == {"": 12}  # 1 row · 3 in · 4 out
    ratio = energy_ratio(m)  # Eq. 30, cumulative
    assert ratio == pytest.approx({1: 8 * E_AC / (12 * E_MAC), 2: 20 * E_AC / (12 * E_MAC),
                                   3: 28 * E_AC / (12 * E_MAC)})
    assert energy_ratio(m, EnergyConfig(e_mac=4.6, e_ac=1.8))[3] == pytest.approx(2 * ratio[3])


def test_firing_rates_per_level_by_hand():
    m = measure(single_linear(), X_LINEAR, T=3)
    site = m.spikes["neuron"]
    assert (site.pos, site.neg, site.neuron_steps) == ((4, 0), (0, 3), 9)
    rates = firing_rates(m)
    # one approx per level list: pytest 9's approx refuses nested dictionaries
    assert set(rates["levels"]) == {"pos", "neg"}
    assert rates["levels"]["pos"] == pytest.approx([4 / 9, 0.0])
    assert rates["levels"]["neg"] == pytest.approx([0.0, 3 / 9])
    assert rates["mean"] == pytest.approx(7 / 9)
    assert rates["sites"]["neuron"]["rate"] == pytest.approx(7 / 9)


def test_batch_of_identical_inputs_doubles_counts_not_ratios():
    one = measure(single_linear(), X_LINEAR, T=3)
    two = measure(single_linear(), X_LINEAR.repeat(2, 1), T=3)
    assert two.samples == (2, 2, 2)
    assert two.acs() == tuple(2 * a for a in one.acs())
    assert two.ann_macs == {"": 24}
    assert energy_ratio(two) == pytest.approx(energy_ratio(one))


class Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mm = MatMulEC()

    def forward(self, a, b):
        return self.mm(a, b)


def test_matmul_eq18_terms_by_hand():
    """A (2 x 3) times B (3 x 2) over three steps of hand-written spikes."""
    A = [[[1., 0., 2.], [0., 0., 1.]],   # nnz 3, nonzeros per column k: 1 0 2
         [[0., 1., 0.], [1., 0., 0.]],   # nnz 2, per column: 1 1 0
         [[0., 0., 0.], [0., 0., 0.]]]   # silent
    B = [[[1., 0.], [0., 1.], [0., 0.]],     # nnz 2, nonzeros per row k: 1 1 0
         [[0., 0.], [3., 0.], [0., -1.]],    # nnz 2, per row: 0 1 1
         [[1., 1.], [1., 1.], [1., 1.]]]     # nnz 6, per row: 2 2 2
    net = Product()
    with OpCounter(net) as counter:
        for a, b in zip(A, B):
            net(torch.tensor([a]), torch.tensor([b]))
    m = counter.result()
    terms = m.terms["mm"]
    # spike x spike: sum_k nnzcol_A[k] * nnzrow_B[k]
    assert terms["ac_spike_spike"] == (1 * 1 + 0 * 1 + 2 * 0, 1 * 0 + 1 * 1 + 0 * 1, 0)
    # spike x S_B(T-1): nnz(A) * 2 columns; zero at T = 1 (S_B(0) = 0)
    assert terms["ac_spike_sum"] == (0, 2 * 2, 0 * 2)
    # S_A(T-1) x spike: nnz(B) * 2 rows; zero at T = 1
    assert terms["ac_sum_spike"] == (0, 2 * 2, 6 * 2)
    # Eq. 16 rescaling: one multiply per output element from T = 2
    assert terms["mac_rescale"] == (0, 4, 4)
    assert m.acs() == (1, 9, 12) and m.macs() == (0, 4, 4)
    assert m.ann_macs == {"mm": 2 * 3 * 2}


def test_ec_and_analog_input_macs_by_hand():
    """A patch embedding (analog, recomputed every step) followed by an EC-wrapped GELU."""
    net = wrap(nn.Sequential(PatchEmbed(img_size=8, patch_size=4, in_chans=3, embed_dim=5),
                             ExpectationCompensation(nn.GELU())))
    m = measure(net, torch.randn(1, 3, 8, 8), T=3)
    conv = 2 * 2 * 5 * (3 * 4 * 4)  # output elements · (in_channels · kernel) = 960
    assert m.terms["0"] == {"mac_analog": (conv, conv, conv)}
    gelu = 4 * 5  # 4 patches x 5 channels
    assert m.terms["1"] == {"mac_fn": (gelu,) * 3, "mac_ec": (0, 2 * gelu, 2 * gelu)}
    assert m.ann_macs == {"0": conv, "1": gelu}
    ann = conv + gelu
    assert energy_ratio(m) == {1: 0.0, 2: 0.0, 3: 0.0}  # paper convention: MACs_SNN = 0
    assert energy_ratio(m, full=True) == pytest.approx({1: 1.0, 2: (2 * ann + 2 * gelu) / ann,
                                                        3: (3 * ann + 4 * gelu) / ann})


def test_eva_giant_table3():
    r = ops_report("eva_giant_patch14_336")
    assert r["input_size"] == [3, 336, 336]
    assert r["dims"] == {"tokens": 577, "channels": 1408, "heads": 16, "head_dim": 88, "hidden": 6144,
                         "blocks": 40}
    table3 = {"norm1": 0.81, "attn.qkv": 3431.65, "attn.qk": 468.76, "attn.softmax": 5.33, "attn.av": 468.76,
              "attn.proj": 1143.88, "norm2": 0.81, "mlp.fc1": 4991.48, "mlp.act": 3.54, "mlp.fc2": 4991.48}
    block = r["blocks"]["blocks.0"]
    assert list(block) == list(table3)
    for name, millions in table3.items():
        assert abs(block[name] / 1e6 - millions) < 0.01, name
    # q·kᵀ is N²·C, not the paper's Nh·N·(C/Nh)² = 71.49 M
    assert block["attn.qk"] == 577 * 577 * 1408 == block["attn.av"]
    assert all(b == block for b in r["blocks"].values()) and len(r["blocks"]) == 40
    assert r["outside"] == {"patch_embed": 576 * 1408 * 3 * 14 * 14, "fc_norm": 1408, "head": 1408 * 1000}
    assert r["total_macs"] == 40 * sum(block.values()) + sum(r["outside"].values())


def test_img_size_changes_tokens():
    r = ops_report("vit_small_patch16_224", img_size=32)
    assert r["dims"]["tokens"] == 2 * 2 + 1
    assert r["blocks"]["blocks.0"]["attn.qk"] == 5 * 5 * 384


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model, shape = make("class_token")
    snn = ecmt.convert(model, ecmt.calibrate(model, [torch.randn(8, *shape)]), levels=4)
    return model, snn, torch.randn(1, *shape)


def test_vit_counts_are_consistent(vit):
    model, snn, x = vit
    with OpCounter(snn) as counter:
        ecmt.simulate(snn, x, T=3)
    m = counter.result()
    # ANN MACs seen during the simulation equal the meta-device count of the architecture
    assert m.ann_macs == dict(theoretical_ops(model, x).macs)
    # Linear ACs (from hooks) equal the neurons' own spike counters times the fan-out
    for name, mod in snn.net.named_modules():
        if isinstance(mod, SpikingLinear):
            s = m.spikes[f"{name}.neuron"]
            assert sum(m.terms[name]["ac_fanout"]) == (sum(s.pos) + sum(s.neg)) * mod.linear.out_features
    assert m.acs()[0] > 0 and m.terms["blocks.0.attn.qk"]["ac_spike_sum"][0] == 0
    assert m.terms["blocks.0.attn.qk"]["ac_spike_sum"][1] > 0
    # the counter is gone after exit: flags restored, nothing counted any more
    assert not any(n.record for _, n in snn.neurons())
    ecmt.simulate(snn, x, T=2)
    assert counter.result() == m


def test_vit_batch_and_sequences(vit):
    _, snn, x = vit
    one = measure(snn, x, T=3)
    two = measure(snn, torch.cat([x, x]), T=3)
    assert two.terms == {k: {t: tuple(2 * c for c in v) for t, v in ts.items()} for k, ts in one.terms.items()}
    assert energy_ratio(two, full=True) == pytest.approx(energy_ratio(one, full=True))
    with OpCounter(snn) as counter:  # two inputs of different lengths in one counter
        ecmt.simulate(snn, x, T=3)
        ecmt.simulate(snn, x, T=2)
    m = counter.result()
    assert m.samples == (2, 2, 1)
    assert m.acs() == (2 * one.acs()[0], 2 * one.acs()[1], one.acs()[2])


def test_report_is_json_and_totals_are_sums(vit, tmp_path):
    _, snn, x = vit
    m = measure(snn, x, T=3)
    r = json.loads(json.dumps(energy_report(m)))
    assert list(r["energy_ratio"]) == ["1", "2", "3"]
    assert all(r["energy_ratio_full"][t] > r["energy_ratio"][t] > 0 for t in r["energy_ratio"])
    mods = r["modules"].values()
    assert r["totals"]["ann_macs"] == sum(mod["ann_macs"] for mod in mods) == m.ann_macs_per_sample
    for key in ("snn_acs", "snn_macs"):
        assert r["totals"][key] == pytest.approx([sum(mod[key][t] for mod in mods) for t in range(3)])
    for mod in mods:
        for t in range(3):
            assert mod["snn_acs"][t] + mod["snn_macs"][t] == pytest.approx(sum(v[t] for v in mod["terms"].values()))
    rows = module_energy(r, T=2)
    assert sum(row["ann"] for row in rows.values()) == pytest.approx(r["totals"]["ann_macs"] * E_MAC)
    assert sum(row["snn"] for row in rows.values()) / (r["totals"]["ann_macs"] * E_MAC) == \
        pytest.approx(r["energy_ratio"]["2"])
    assert sum(row["snn_full"] for row in rows.values()) / (r["totals"]["ann_macs"] * E_MAC) == \
        pytest.approx(r["energy_ratio_full"]["2"])
    assert "attn.qkv" in rows and "patch_embed" in rows
    for plot in (plot_energy_ratio, plot_energy_breakdown, plot_firing_rates):
        assert plot(r, tmp_path / f"{plot.__name__}.png").stat().st_size > 1000


def test_energy_config_is_validated():
    with pytest.raises(ValueError):
        EnergyConfig(e_mac=0.0)
    with pytest.raises(ValueError):
        EnergyConfig(e_ac=-1.0)


def test_empty_measurement_is_refused():
    with OpCounter(single_linear()) as counter:
        pass
    with pytest.raises(ValueError, match="no time step"):
        energy_ratio(counter.result())


def test_ops_command_writes_table3_for_eva_giant(tmp_path, capsys):
    import json

    from ecmt.cli import main

    path = tmp_path / "ops.json"
    assert main(["ops", "--model", "eva_giant_patch14_336", "--json", str(path)]) == 0
    block = json.loads(path.read_text())["blocks"]["blocks.0"]
    assert all(isinstance(v, int) for v in block.values())
    assert [round(v / 1e6, 2) for v in block.values()] == [
        0.81, 3431.65, 468.76, 5.33, 468.76, 1143.88, 0.81, 4991.48, 3.55, 4991.48]
    assert "468.76 M" in capsys.readouterr().out
    assert main(["ops", "--model", "no_such_model"]) == 2
