"""Error analysis (ecmt.analysis): exact neurons, shares, rankings and per-block breakdowns on tiny models."""
from __future__ import annotations

import pytest
import torch

import ecmt
from ecmt import lm
from ecmt.analysis import OUTSIDE, analyze, block_of, exact_sites, output_error_of
from ecmt.tuning import site_type

from lm_tiny import CALIB, TEXTS, ByteTokenizer, tiny_lm
from test_cli import _one_thread  # noqa: F401
from tiny_models import make




def _vit(name: str = "rectangular_deeper", path: str = "auto"):
    model, shape = make(name)
    g = torch.Generator().manual_seed(3)
    calib, held = torch.randn(16, *shape, generator=g), torch.randn(12, *shape, generator=g)
    snn = ecmt.convert(model, ecmt.calibrate(model, [calib], path=path), levels=4, path=path)
    return model, snn, held


def test_exact_neuron_passes_its_input_also_when_fed_running_means():
    torch.manual_seed(0)
    xs = torch.randn(6, 5)
    plain, linked = ecmt.MTNeuron(0.1, 0.1, 3), ecmt.MTNeuron(0.1, 0.1, 3)
    plain.exact = linked.exact = True
    linked.mean_input = True
    means = xs.cumsum(0) / torch.arange(1, 7)[:, None]
    out_plain = torch.stack([plain(x) for x in xs])
    out_linked = torch.stack([linked(m) for m in means])
    assert torch.equal(out_plain, xs)
    torch.testing.assert_close(out_linked, xs, rtol=1e-5, atol=1e-6)
    plain.exact = False  # spiking again: the output is quantized to ±0.1·2**k
    assert not torch.equal(plain(xs[0]), xs[0])


@pytest.mark.parametrize("path", ["adapter", "graph"])
def test_shares_sum_to_one_and_all_exact_is_the_ann(path):
    model, snn, held = _vit(path=path)
    r = analyze(snn, output_error_of(model, [held], T=4), T=4, views=("alone", "removed"))
    names = [n for n, _ in snn.neurons()]
    assert r["all_exact_error"] < 1e-10 < r["error"]
    assert r["simulations"] == 2 + 2 * (len(r["site_types"]) + len(r["layers"]) + (r["outside"] is not None))
    assert sum(e["share"] for e in r["site_types"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(e["share"] for e in [*r["layers"], r["outside"]]) == pytest.approx(1.0, abs=1e-5)
    assert sum(e["sites"] for e in r["site_types"].values()) == len(names) == len(r["sites"])
    # one entry per block (depth 3), in depth order; the head is outside the blocks
    assert [e["block"] for e in r["layers"]] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [e["index"] for e in r["layers"]] == [0, 1, 2]
    assert r["outside"]["sites"] == sum(block_of(n) == OUTSIDE for n in names) == 1
    assert all(e["sites"] == 8 for e in r["layers"])
    assert r["additivity"]["site_types"] == pytest.approx(sum(e["alone"] for e in r["site_types"].values()) / r["error"],
                                                          rel=1e-5)
    for e in r["site_types"].values():
        assert e["removed"] == pytest.approx((r["error"] - e["error_exact"]) / r["error"], abs=1e-6)
    shares = [e["share"] for e in r["site_types"].values()]
    assert shares == sorted(shares, reverse=True)
    assert all(0 <= s["local_error"] for s in r["sites"].values())


def test_a_site_with_a_tiny_threshold_ranks_first():
    model, snn, held = _vit()
    bad = "blocks.1.mlp.fc2.neuron"
    ecmt.conversion.set_thresholds(snn, snn.thresholds.scaled({bad: 1e-3}))
    r = analyze(snn, output_error_of(model, [held], T=4), T=4, channels=3)
    assert r["worst_sites"][0]["site"] == bad and r["worst_sites"][0]["local_error"] > 0.5
    assert next(iter(r["site_types"])) == site_type(bad) == "blocks.*.mlp.fc2.neuron"
    assert max(r["layers"], key=lambda e: e["share"])["block"] == "blocks.1"
    top = r["worst_sites"][0]["top"]
    assert len(top) == 3 and r["worst_sites"][0]["channels"] == model.blocks[1].mlp.fc2.in_features  # its Linear's inputs
    assert [c["share"] for c in top] == sorted((c["share"] for c in top), reverse=True)


def test_exact_sites_restores_spiking():
    model, snn, held = _vit("class_token")
    with exact_sites(snn, lambda n: n.startswith("blocks.0")):
        flags = {n: m.exact for n, m in snn.neurons()}
    assert any(flags.values()) and not all(flags.values())
    assert all(flags[n] == n.startswith("blocks.0") for n in flags)
    assert not any(m.exact for _, m in snn.neurons())


def test_language_model_on_the_graph_path_with_per_channel_thresholds():
    m = tiny_lm("llama")
    snn = lm.convert_lm(m, CALIB, per_channel=True)
    r = analyze(snn, lm.next_token_kl(m, TEXTS, T=8), T=8)
    assert r["path"] == "graph" and r["per_channel"]
    assert r["all_exact_error"] < 1e-6 < r["error"]
    assert [e["block"] for e in r["layers"]] == ["model.layers.0", "model.layers.1"]
    assert r["outside"]["sites"] == 1 and "lm_head.neuron" in r["site_types"]
    assert sum(e["share"] for e in [*r["layers"], r["outside"]]) == pytest.approx(1.0, abs=1e-5)


def test_text_embedding_error_is_zero_for_the_ann():
    import transformers as tr

    from ecmt.text import TextModel, embedding_error

    torch.manual_seed(0)
    bert = tr.BertModel(tr.BertConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32), add_pooling_layer=False)
    tm = TextModel(ByteTokenizer(), bert.eval(), max_length=24)
    snn = ecmt.convert(bert, ecmt.calibrate(bert, tm.batches(CALIB)), levels=8)
    r = analyze(snn, embedding_error(tm, TEXTS, T=4), T=4)
    assert r["all_exact_error"] < 1e-6 < r["error"] < 1
    assert [e["index"] for e in r["layers"]] == [0, 1] and r["outside"] is None


def test_unknown_view_is_refused():
    model, snn, held = _vit("class_token")
    with pytest.raises(ecmt.InvalidInputError, match="unknown view"):
        analyze(snn, output_error_of(model, [held], T=2), T=2, views=("both",))
