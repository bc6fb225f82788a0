"""Threshold search on SmolLM2 (issue 17): perplexity and next-token agreement per T after ``ecmt.tune``.

Calibrates (tunes) on the first 8 GPL-3 prose sentences and measures the next 8 (32 tokens
each, 193 predicted tokens), as README "Measured on SmolLM2" does for the percentile rows.
One thread.

    python benchmarks/lm_tune.py 16 6 nearest pc refits   # tune for T=16, budget 6, per channel, refits=2
    python benchmarks/lm_tune.py 16 6 nearest pc          # the same without refits
    python benchmarks/lm_tune.py 16 6 nearest pc n12      # n = 12 levels per side (default 8)

Writes ``results/smollm2_gpl3_tune<T>_<options>.json``.
"""
import json
import sys
import time
from pathlib import Path

import torch

import ecmt
from ecmt import lm

T, budget, rule, *extra = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:]
levels = next((int(e[1:]) for e in extra if e.startswith("n") and e[1:].isdigit()), 8)
torch.manual_seed(0)
torch.set_num_threads(1)
m = lm.load_lm("smollm2", max_length=32)
calib, texts = lm.split_texts(lm.prose_sentences("/usr/share/common-licenses/GPL-3"), None, 8, calib_max=8)
t0 = time.time()
th = ecmt.tune(m.model, m.batches(calib, 8), T=T, levels=levels, budget=budget, rule=rule, per_channel="pc" in extra,
               progress=True, refits=2 if "refits" in extra else 0)
tune_s = time.time() - t0
r = lm.evaluate_lm(m, texts, T=T, snn=ecmt.convert(m.model, th, levels=levels), energy_texts=0)
r.update(tune_s=round(tune_s, 1), tuned={k: v for k, v in th.meta.items() if k != "percentile_by_site"}, extra=extra)
print(json.dumps({k: r[k] for k in ("ann_ppl", "ppl", "agreement", "tune_s")}))
name = "_".join(["smollm2_gpl3_tune%d" % T, rule, *extra])
(Path(__file__).resolve().parent / "results" / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
