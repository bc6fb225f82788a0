"""Benchmark: wall time of adaptive stopping (settled images leave the batch) against fixed T.

The reference model (``ecmt demo``'s Fashion-MNIST ViT) on real test images, calibrated on 4
batches of the training split. In one process, interleaved per round: ``evaluate_batch`` at
fixed T (multi-step mode), and with the default stopping rule and ``compact=True`` (settled
images leave the simulation between chunks). Reported: the adaptive wall time per image
against ``mean steps x (fixed-T time per image / T)`` (the issue's goal: at most 1.3x), the
same against the faster of the two simulation modes at fixed T (``simulate`` alone, ``mode="step"``
and ``"multi"``: the adaptive run may use chunks where the fixed-T run in ``auto`` mode does not),
and that the adaptive counts equal those of the uncompacted run.

    python benchmarks/adaptive.py --batch 128 --images 1024 --T 8 --name adaptive
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import environment, timed, write
from ecmt import calibrate, convert, simulate
from ecmt.adaptive import StopRule
from ecmt.data import open_dataset
from ecmt.evaluation import evaluate_batch, images_only, loader, subset
from ecmt.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="adaptive")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bundle = load_model("fmnist-vit")
    data = open_dataset("fashion-mnist", bundle.data_config, bundle.num_classes)
    calib = images_only(loader(subset(data.calibration, 4 * a.batch, 0), a.batch))
    snn = convert(bundle.model, calibrate(bundle.model, calib), levels=8)
    batches = list(loader(subset(data.test, a.images, 0), a.batch))
    rule = StopRule()
    t0 = time.time()
    with torch.no_grad():
        for x, y in batches[:1]:  # warm-up: the fused kernels compile
            evaluate_batch(None, snn, x, y, a.T, rule)
            evaluate_batch(None, snn, x, y, a.T, rule, compact=True)
        fixed_s, adaptive_s = [], []
        by_mode: dict[str, list[float]] = {"step": [], "multi": []}  # fixed T in each simulation mode
        for r in range(a.rounds):
            fixed_s.append(timed(lambda: [evaluate_batch(None, snn, x, y, a.T) for x, y in batches]))
            for mode, times in by_mode.items():
                times.append(timed(lambda: [simulate(snn, x, a.T, mode=mode) for x, _ in batches]))
            tallies = []
            adaptive_s.append(timed(lambda: tallies.extend(evaluate_batch(None, snn, x, y, a.T, rule, compact=True)
                                                           for x, y in batches)))
            print(f"round {r + 1}/{a.rounds}: fixed T {fixed_s[-1]:.2f} s, adaptive {adaptive_s[-1]:.2f} s", flush=True)
        full = [evaluate_batch(None, snn, x, y, a.T, rule) for x, y in batches]  # uncompacted, for the counts
    n = sum(t.n for t in tallies)
    steps = sum(t.adaptive_steps for t in tallies) / n
    fixed, adaptive = statistics.median(fixed_s), statistics.median(adaptive_s)
    expected = steps * fixed / a.T  # mean steps x step time, for the whole set
    fastest = min(statistics.median(t) for t in by_mode.values())  # the faster fixed-T mode, simulation alone
    same = all((c.adaptive_stops, c.adaptive_correct) == (f.adaptive_stops, f.adaptive_correct)
               for c, f in zip(tallies, full))
    out = {
        "environment": environment(a.threads), "model": "fmnist-vit", "images": n, "batch": a.batch, "T": a.T,
        "rule": {"patience": rule.patience, "margin": rule.margin}, "rounds": a.rounds,
        "fixed_T_s": fixed_s, "adaptive_s": adaptive_s, "mean_steps": steps,
        "adaptive_top1": sum(t.adaptive_correct for t in tallies) / n,
        "fixed_T_top1": sum(t.snn_correct[-1] for t in full) / n,
        "adaptive_ms_per_image": 1e3 * adaptive / n, "fixed_T_ms_per_image": 1e3 * fixed / n,
        "ratio_adaptive_over_mean_steps_x_step_time": adaptive / expected,
        "ratio_adaptive_over_fixed_T": adaptive / fixed,
        "fixed_T_simulate_s_by_mode": by_mode,
        "ratio_adaptive_over_mean_steps_x_fastest_mode_step_time": adaptive / (steps * fastest / a.T),
        "counts_equal_uncompacted": same, "wall_s": time.time() - t0,
    }
    keys = ("mean_steps", "ratio_adaptive_over_mean_steps_x_step_time",
            "ratio_adaptive_over_mean_steps_x_fastest_mode_step_time", "ratio_adaptive_over_fixed_T",
            "counts_equal_uncompacted")
    print({k: out[k] for k in keys})
    write(a.name, out)


if __name__ == "__main__":
    main()
