"""Threshold search on the 6- and 12-layer sentence encoders (issue 21): fidelity at T = 1..16 and search time.

Tunes for step T (``ecmt.tune``, default search, rule ``nearest``, n = 8 unless ``nN``, budget 20) on N
calibration sentences spread over the packaged calibration set, batches of 32, and measures the
mean cosine and the rank agreement (Spearman) of the SNN's sentence embeddings with the ANN's
on the 147 packaged held-out sentences, never tuned on. One thread.

    python benchmarks/tune_depth.py mpnet 64 4            # -> results/tune_depth_mpnet.json
    python benchmarks/tune_depth.py minilm 64 4 pc        # per-channel thresholds (_pc.json)
    python benchmarks/tune_depth.py mpnet 64 4 refits     # refits=2 on recorded inputs (_refits.json)
    python benchmarks/tune_depth.py mpnet 64 4 n10        # n = 10 levels per side (_n10.json)

The same as ``ecmt evaluate --model mpnet --tune 4 --batch-size 32 --T 16 --threads 1
--calib-texts FILE`` with FILE holding the N sentences.
"""
import json
import sys
import time
from pathlib import Path

import torch

import ecmt
from ecmt import text as tx
from ecmt.tuning import tune

torch.set_num_threads(1)
model, n_cal, T, *extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
levels = next((int(e[1:]) for e in extra if e.startswith("n") and e[1:].isdigit()), 8)
tm = tx.load_text_model(model)
cal = sorted(tx.spread(tx.packaged_texts("calibration"), n_cal), key=len)
held = sorted(tx.packaged_texts("heldout"), key=len)
t0 = time.time()
th = tune(tm.model, tm.batches(cal, 32), T=T, levels=levels, budget=20, progress=True, per_channel="pc" in extra,
          refits=2 if "refits" in extra else 0)
tune_s = time.time() - t0
snn = ecmt.convert(tm.model, th, levels=levels)
ann = tm.encode(held, 32)
emb = tm.encode_spiking(snn, held, 16, 32)
r = {"model": model, "n_cal": n_cal, "tuned_T": T, "levels": levels, "extra": extra, "tune_s": round(tune_s, 1),
     "cosine": [round(float(c), 5) for c in (emb * ann).sum(-1).mean(-1)],
     "rank_agreement": [round(float(c), 5) for c in tx.rank_agreement_by_step(emb, ann)],
     "calib_error": th.meta["relative_sq_error"], "errors": th.meta["errors"]}
print(json.dumps(r))
name = "_".join(["tune_depth", model, *extra])
(Path(__file__).resolve().parent / "results" / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
