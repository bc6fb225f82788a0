"""Threshold search on SmolLM2 (issue 17): perplexity and next-token agreement per T after ``ecmt.tune``.

Calibrates (tunes) on the first 8 GPL-3 prose sentences and measures the next 8 (32 tokens
each, 193 predicted tokens), as README "Measured on SmolLM2" does for the percentile rows.
One thread.

    python benchmarks/lm_tune.py 16 6 nearest pc refits   # tune for T=16, budget 6, per channel, refits=2
    python benchmarks/lm_tune.py 16 6 nearest pc          # the same without refits
    python benchmarks/lm_tune.py 16 6 nearest pc n12      # n = 12 levels per side (default 8)
    python benchmarks/lm_tune.py 16 6 nearest pc n12 h16  # top threshold >= 16x the calibration maximum
    python benchmarks/lm_tune.py 16 6 nearest pc n12 h16 e64  # the same, simulated to T = 64
    python benchmarks/lm_tune.py 16 6 nearest pc n12 h16 e32 held64 reuse  # its thresholds, 64 held-out
                                                          # sentences (the 9th-16th, 41st-96th), to T = 32
    python benchmarks/lm_tune.py 16 6 nearest pc c32      # tune on 32 sentences: the first 8 and
                                                          # the 24 after the evaluated ones

The evaluated sentences are the same 9th to 16th in every setting (``heldN``: and more).

Writes ``results/smollm2_gpl3_tune<T>_<rule>_<options>.json`` (``b<budget>`` among them unless 6) and the thresholds found, ``....thresholds.json``.
"""
import json
import re
import sys
import time
from pathlib import Path

import torch

import ecmt
from ecmt import lm

T, budget, rule, *extra = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:]


def option(prefix: str, default):
    """The number of the option ``<prefix><digits>`` (``n12``, ``h16``, ...), else ``default``."""
    found = [re.fullmatch(prefix + r"(\d+)", e) for e in extra]
    return next((type(default)(f.group(1)) for f in found if f), default)


levels, headroom, n_calib = option("n", 8), option("h", 1.0), option("c", 8)
T_eval, n_held = option("e", T), option("held", 8)  # simulated to T_eval; held-out sentences
torch.manual_seed(0)
torch.set_num_threads(1)
m = lm.load_lm("smollm2", max_length=32)
sentences = lm.prose_sentences("/usr/share/common-licenses/GPL-3")
calib, texts = lm.split_texts(sentences, None, 8, calib_max=8)
calib += sentences[16:16 + max(n_calib - 8, 0)]   # never an evaluated sentence
texts += sentences[40:40 + max(n_held - 8, 0)]    # after every calibration sentence of c32
if len(calib) < n_calib or len(texts) < n_held:
    sys.exit(f"lm_tune.py: only {len(calib)} calibration and {len(texts)} held-out sentences")
# the thresholds file of the same search (without the evaluation options): reuse it, no search
searched = [e for e in extra if not re.fullmatch(r"e\d+|held\d+|reuse", e)]
searched += [f"b{budget}"] if budget != 6 else []  # (6, the README's budget, is not named)
results = Path(__file__).resolve().parent / "results"
saved = results / ("_".join(["smollm2_gpl3_tune%d" % T, rule, *searched]) + ".thresholds.json")
t0 = time.time()
if "reuse" in extra:
    th = ecmt.Thresholds.from_json(saved.read_text())
else:
    th = ecmt.tune(m.model, m.batches(calib, 8), T=T, levels=levels, budget=budget, rule=rule,
                   per_channel="pc" in extra, progress=True, refits=2 if "refits" in extra else 0, headroom=headroom)
tune_s = time.time() - t0
r = lm.evaluate_lm(m, texts, T=T_eval, snn=ecmt.convert(m.model, th, levels=levels), energy_texts=0)
r.update(tune_s=None if "reuse" in extra else round(tune_s, 1), n_calib=len(calib), n_held_out=len(texts), tuned={k: v for k, v in th.meta.items() if k != "percentile_by_site"}, extra=extra)
print(json.dumps({k: r[k] for k in ("ann_ppl", "ppl", "agreement", "tune_s")}))
name = "_".join(["smollm2_gpl3_tune%d" % T, rule, *searched, *(e for e in extra if e not in searched)])
(results / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
if "reuse" not in extra:
    saved.write_text(th.to_json())  # for lm_saturation.py and reuse
