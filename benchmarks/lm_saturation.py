"""Saturated MT neurons in SmolLM2 (issue 17): which sites receive T-step mean inputs beyond
their largest threshold, on the calibration sentences and on the held-out ones.

An MT neuron sends at most one spike of at most ``θ·2**(n-1)`` per step (Eq. 22-23), so an
input whose T-step mean exceeds that top threshold cannot be passed on: the excess stays in
the membrane and the site's error no longer falls as 1/T. Thresholds fitted to a few
calibration sentences (per channel: the channel's largest calibration value) can sit below
what held-out sentences bring. This script counts, per site, the elements whose T-step mean
input lies beyond the top threshold (``saturated``), and the part of the site's squared
residual membrane (``Σ_t I − Σ_t s``, Eq. 24 summed over time) that those elements hold.

    python benchmarks/lm_saturation.py results/smollm2_gpl3_tune16_nearest_pc.thresholds.json 16

The sentences are lm_tune.py's: calibration the first 8 GPL-3 prose sentences, held out the
9th to 16th (32 tokens each). One thread. Writes ``results/<thresholds name>_saturation_T<T>.json``.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

import ecmt
from ecmt import lm
from ecmt.analysis import _Residuals
from ecmt.tuning import site_type

path, T = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
m = lm.load_lm("smollm2", max_length=32)
calib, texts = lm.split_texts(lm.prose_sentences("/usr/share/common-licenses/GPL-3"), None, 8, calib_max=8)
th = ecmt.Thresholds.from_json(path.read_text())
levels = int(th.meta.get("levels", 8))  # the search records its n
snn = ecmt.convert(m.model, th, levels=levels)


class Saturation(_Residuals):
    """ecmt.analysis's sums of every neuron's inputs and spikes over a simulation, read per
    element at the end of each batch: which T-step means lie beyond the top threshold."""

    def __init__(self, snn):
        super().__init__(snn)
        self.neurons = dict(snn.neurons())
        self.keep = None  # the batch's attention mask
        self.out = defaultdict(lambda: [0, 0, 0.0, 0.0])  # elements, saturated, residual², theirs

    def _flush(self, name):
        inp, spikes = self.totals.get(name, (None, None))
        if inp is not None:
            neuron, keep = self.neurons[name], self.keep
            top = neuron.theta.float() * 2.0 ** (neuron.levels - 1)  # Eq. 19: the largest threshold per side
            sat = (inp / T > top[0]) | (inp / T < -top[1])
            r2 = (inp - spikes).double().pow(2)
            if inp.dim() >= 3 and inp.shape[:2] == keep.shape:  # [B, L, ...]: real tokens only
                mask = keep.reshape(*keep.shape, *([1] * (inp.dim() - 2))).expand_as(inp)
            else:  # the attention operands, [B, heads, ...]: every element
                mask = torch.ones_like(inp, dtype=torch.bool)
            o = self.out[name]
            o[0] += int(mask.sum())
            o[1] += int((sat & mask).sum())
            o[2] += float(r2[mask].sum())
            o[3] += float(r2[sat & mask].sum())
        super()._flush(name)


def measure(sentences):
    """Per site: elements, saturated elements, squared residual in all and in the saturated ones."""
    hooks = Saturation(snn)
    try:
        for batch in m.batches(sentences, 8):
            with torch.no_grad():
                ecmt.simulate(snn, batch, T, reduce=lambda y: y.new_zeros(()), mode="step")
            hooks.keep = batch["attention_mask"].bool()
            for name in list(hooks.totals):
                hooks._flush(name)
    finally:
        hooks.close()
    return {name: {"elements": a, "saturated": b, "saturated_fraction": b / max(a, 1),
                   "residual_share_saturated": d / c if c > 0 else 0.0} for name, (a, b, c, d) in hooks.out.items()}


record = {"thresholds": path.name, "T": T, "levels": levels}
for label, sentences in (("calibration", calib), ("held_out", texts)):
    sites = measure(sentences)
    by_type = defaultdict(lambda: [0, 0])
    for name, e in sites.items():
        by_type[site_type(name)][0] += e["elements"]
        by_type[site_type(name)][1] += e["saturated"]
    worst = sorted(sites.items(), key=lambda kv: -kv[1]["saturated_fraction"])[:10]
    record[label] = {"saturated_fraction": sum(e["saturated"] for e in sites.values())
                     / max(sum(e["elements"] for e in sites.values()), 1),
                     "by_site_type": {t: b / max(a, 1) for t, (a, b) in by_type.items()},
                     "worst_sites": dict(worst), "sites": sites}
    print(label, json.dumps({"saturated_fraction": record[label]["saturated_fraction"],
                             "by_site_type": record[label]["by_site_type"],
                             "worst": {k: (v["saturated_fraction"], v["residual_share_saturated"]) for k, v in worst}},
                            indent=1))
name = path.name.replace(".thresholds.json", "") + f"_saturation_T{T}.json"
(Path(__file__).resolve().parent / "results" / name).write_text(json.dumps(record, indent=1) + "\n")
