"""Error analysis of a sentence encoder's SNN at low T: which sites dominate the output error?

Starting from one set of thresholds (a calibration percentile, or ``ecmt.tune``), the SNN is
simulated with some of its MT sites replaced by pass-through modules, which send the ANN's
exact value at every step (an infinitely precise neuron; the EC modules then compute their
functions exactly). Three views, each against the plain SNN, at step T on held-out sentences:

* ``exact_one_type``: one site type (the same site in every layer) exact, the rest spiking;
  ``error_removed`` is the share of the plain SNN's error ``1 − cosine`` that disappears;
* ``spiking_one_type`` (with ``--alone``): only one site type spiking, the rest exact: the
  error this type causes on its own;
* ``exact_one_layer``: all sites of one layer exact.

With every site exact the SNN is the ANN (cosine 1, checked as ``all_exact``).

    python benchmarks/text_error_analysis.py --percentile 90 --T 4 --threads 1
    python benchmarks/text_error_analysis.py --tune 4 --T 4 --threads 1 --name text_error_analysis_tuned
    (``--rule`` chooses the MT spike rule: default ``nearest`` with ``--tune``, else ``eq25``)
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import ecmt
from ecmt import registry
from ecmt.text import TextModel, convert_text, load_text_model, packaged_texts
from ecmt.thresholds import Thresholds
from ecmt.tuning import site_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402


def partial_snn(model: nn.Module, thresholds: Thresholds, levels: int,
                exact: Callable[[str], bool]) -> ecmt.SpikingModel:
    """The SNN with the sites for which ``exact(name)`` holds replaced by pass-throughs."""
    net = ecmt.build_spiking(model, lambda name: nn.Identity() if exact(name)
                             else ecmt.MTNeuron(*thresholds[name], levels=levels, rule=thresholds.rule))
    return ecmt.SpikingModel(net, levels, thresholds, registry.family_of(model).output)


def cosine_at(tm: TextModel, snn: ecmt.SpikingModel, texts: list[str], ann: torch.Tensor, T: int,
              batch_size: int) -> float:
    """Mean cosine similarity of the SNN's sentence embeddings to the ANN's after step T."""
    emb = tm.encode_spiking(snn, texts, T, batch_size)[-1]
    return round(float(F.cosine_similarity(emb, ann, dim=-1).mean()), 6)


def layer_of(name: str) -> str:
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--levels", type=int, default=8)
    setting = p.add_mutually_exclusive_group()
    setting.add_argument("--percentile", type=float, default=None, help="calibration percentile (default: 99)")
    setting.add_argument("--tune", type=int, default=None, metavar="T", help="tune the thresholds for step T")
    p.add_argument("--rule", choices=ecmt.neurons.RULES, default=None,
                   help="MT spike rule (default: nearest with --tune, else eq25)")
    p.add_argument("--alone", action="store_true", help="also simulate each site type spiking alone")
    p.add_argument("--batch-size", type=int, default=128, help="as ecmt's default, for the same calibration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="text_error_analysis", help="result file name in benchmarks/results/")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    tm = load_text_model(args.model)
    snn = convert_text(tm, None, args.levels, args.percentile or 99.0, tune=args.tune, batch_size=args.batch_size,
                       rule=args.rule)
    th, levels, T = snn.thresholds, snn.levels, args.T
    texts = sorted(packaged_texts("heldout"), key=len)
    ann = tm.encode(texts, args.batch_size)

    def run(exact: Callable[[str], bool]) -> float:
        return cosine_at(tm, partial_snn(tm.model, th, levels, exact), texts, ann, T, args.batch_size)

    base = cosine_at(tm, snn, texts, ann, T, args.batch_size)
    print(f"plain SNN: cosine {base} at T = {T}", flush=True)
    types = list(dict.fromkeys(site_type(n) for n in th))
    layers = list(dict.fromkeys(layer_of(n) for n in th))

    def share(cos: float) -> float:
        return round((cos - base) / (1.0 - base), 4)

    exact_type, spiking_type, exact_layer = {}, {}, {}
    for t in types:
        cos = run(lambda n: site_type(n) == t)
        exact_type[t] = {"cosine": cos, "error_removed": share(cos)}
        print(f"{t}: exact -> {cos} ({share(cos):+.1%} of the error)", flush=True)
        if args.alone:
            cos_alone = run(lambda n: site_type(n) != t)
            spiking_type[t] = {"cosine": cos_alone, "error_alone": round(1.0 - cos_alone, 6)}
            print(f"{t}: alone spiking -> {cos_alone}", flush=True)
    for layer in layers:
        cos = run(lambda n: layer_of(n) == layer)
        exact_layer[layer] = {"cosine": cos, "error_removed": share(cos)}
        print(f"{layer}: exact -> {cos} ({share(cos):+.1%})", flush=True)
    record = {
        "model": args.model, "T": T, "levels": levels, "percentile": th.percentile, "rule": th.rule,
        "tuned": dict(th.meta) or None, "n_texts": len(texts), "cosine": base,
        "all_exact": run(lambda n: True),
        "exact_one_type": dict(sorted(exact_type.items(), key=lambda kv: -kv[1]["error_removed"])),
        "spiking_one_type": dict(sorted(spiking_type.items(), key=lambda kv: kv[1]["cosine"])) or None,
        "exact_one_layer": exact_layer,
        "seconds": round(time.perf_counter() - start, 1), "environment": environment(args.threads),
    }
    write(args.name, record)


if __name__ == "__main__":
    main()
