"""Benchmark 1: wall time of one simulation step relative to one ANN forward pass.

In one process, interleaved and repeated: one ANN forward, then ``simulate(T)`` once per
fusion mode; the per-step time is the simulate time over T. Medians over the rounds, and the
ratio of the medians. The ANN is the unmodified timm model (fused SDPA attention, the default).

    python benchmarks/step_cost.py                                   # ViT-S/16, batch 8, T=8
    python benchmarks/step_cost.py --model fmnist_vit --batch 8 128
    python benchmarks/step_cost.py --modes auto 0 --rounds 5
    PYTHONPATH=/path/to/old/src python benchmarks/step_cost.py --name step_cost_baseline
    python benchmarks/step_cost.py --modes auto --paths adapter graph --rounds 9 --name step_cost_paths

``--paths`` times the same model converted by each conversion path (the hand-written adapter
and the generic graph of :mod:`ecmt.graph`) in the same rounds; results are keyed
``path:mode`` then. ``--sim`` times simulation modes (``step``: the whole network once per
step, ``multi``: chunks of steps through each layer, ``auto``); with more than one, keys end in
``@sim``. The ratio is the whole simulation over T ANN forwards.

    python benchmarks/step_cost.py --model fmnist_vit vit_small_patch16_224 --modes auto --sim step multi \
        --threads 1 --name step_cost_multistep
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ecmt
from common import (MODELS, convert, environment, fusion_mode, load_model, reexec_with_tuned_malloc, set_fusion,
                    summary, timed, write)


def bench(model_name: str, batch: int, T: int, rounds: int, modes: list[str], device: str,
          paths: list[str], sims: list[str]) -> dict:
    model, x = load_model(model_name, batch, device)
    snns = {p: convert(model, x, path=p) for p in paths}
    keys = [(p, m, sim, (m if paths == ["auto"] else f"{p}:{m}") + ("" if len(sims) == 1 else f"@{sim}"))
            for p in paths for m in modes for sim in sims]
    kwargs = {} if sims == ["auto"] else None  # an ecmt without simulation modes (a baseline) takes none
    first: dict[str, float] = {}

    def run(p: str, sim: str) -> None:
        ecmt.simulate(snns[p], x, T=T, **({"mode": sim} if kwargs is None else kwargs))

    with torch.no_grad():
        model(x)  # warm-up (and one-time initialisation of the kernels)
        for p, mode, sim, key in keys:  # warm-up; the first fused call compiles the step functions
            set_fusion(mode)
            first[key] = timed(lambda: run(p, sim))
        ann, step = [], {key: [] for *_, key in keys}
        for r in range(rounds):
            ann.append(timed(lambda: model(x)))
            for p, mode, sim, key in keys:
                set_fusion(mode)
                step[key].append(timed(lambda: run(p, sim)) / T)
            print(f"  {model_name} b{batch} round {r + 1}/{rounds}: ANN {ann[-1]:.3f} s, "
                  + ", ".join(f"step[{k}] {step[k][-1]:.3f} s" for k in step), flush=True)
    modes = list(step)
    set_fusion("auto")
    ann_med = statistics.median(ann)
    return {
        "model": model_name, "batch": batch, "T": T, "rounds": rounds,
        "input_shape": list(x.shape),
        "ann_forward_s": summary(ann),
        "snn_step_s": {m: summary(step[m]) for m in modes},
        "ratio_step_over_ann": {m: statistics.median(step[m]) / ann_med for m in modes},
        "ratio_per_round_median": {m: statistics.median(s / a for s, a in zip(step[m], ann)) for m in modes},
        "first_simulate_s (includes compilation)": first,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["vit_small_patch16_224"], help=f"e.g. {', '.join(MODELS)}")
    p.add_argument("--batch", nargs="+", type=int, default=[8])
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["auto", "0"],
                   help="fusion modes to time: auto (fused on large tensors), 1 (always), 0 (eager)")
    p.add_argument("--paths", nargs="+", default=["auto"], help="conversion paths: auto, adapter, graph")
    p.add_argument("--sim", nargs="+", default=["auto"], help="simulation modes: auto, step, multi")
    p.add_argument("--tuned-malloc", action="store_true", help="run with common.TUNED_MALLOC (see there)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="step_cost", help="results/<name>.json")
    a = p.parse_args()
    reexec_with_tuned_malloc(a.tuned_malloc)
    torch.set_num_threads(a.threads)
    if fusion_mode() == "n/a":  # a version of ecmt without fusion (a baseline)
        a.modes = ["n/a"]
    out = {"environment": environment(a.threads), "results": []}
    t0 = time.time()
    for name in a.model:
        for b in a.batch:
            try:
                out["results"].append(bench(name, b, a.T, a.rounds, a.modes, a.device, a.paths, a.sim))
            except FileNotFoundError as e:
                print(f"skipping {name}: {e}")
                out["results"].append({"model": name, "batch": b, "skipped": str(e)})
    out["wall_s"] = time.time() - t0
    write(a.name, out)


if __name__ == "__main__":
    main()
