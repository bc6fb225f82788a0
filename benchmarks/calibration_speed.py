"""Benchmark 3: calibration throughput relative to plain ANN inference over the same batches.

Interleaved and repeated: the ANN over all batches, then ``ecmt.collect_statistics`` over the
same batches (the spiking structure with histogram observers at every site), then the
percentile search of ``thresholds()`` (what ``ecmt.calibrate`` adds). Medians over the rounds.

    python benchmarks/calibration_speed.py                  # ViT-S/16, 4 batches of 8
"""
from __future__ import annotations

import argparse
import statistics

import torch

import ecmt
from common import environment, load_model, reexec_with_tuned_malloc, summary, timed, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tuned-malloc", action="store_true", help="run with common.TUNED_MALLOC (see there)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="calibration")
    a = p.parse_args()
    reexec_with_tuned_malloc(a.tuned_malloc)
    torch.set_num_threads(a.threads)
    model, x = load_model(a.model, a.batch)
    g = torch.Generator().manual_seed(1)
    batches = [x] + [torch.randn(x.shape, generator=g) for _ in range(a.batches - 1)]

    def ann():
        with torch.no_grad():
            for b in batches:
                model(b)

    stats_holder = {}

    def collect():
        stats_holder["stats"] = ecmt.collect_statistics(model, batches)

    ann()  # warm-up
    collect()
    t_ann, t_collect, t_thresholds = [], [], []
    for r in range(a.rounds):
        t_ann.append(timed(ann))
        t_collect.append(timed(collect))
        t_thresholds.append(timed(lambda: stats_holder["stats"].thresholds(99.0)))
        print(f"round {r + 1}: ANN {t_ann[-1]:.3f} s, statistics {t_collect[-1]:.3f} s, "
              f"thresholds {t_thresholds[-1]:.3f} s", flush=True)
    ann_med = statistics.median(t_ann)
    cal_med = statistics.median(c + t for c, t in zip(t_collect, t_thresholds))
    write(a.name, {
        "environment": environment(a.threads), "model": a.model, "batch": a.batch, "batches": a.batches,
        "sites": len(stats_holder["stats"].counts),
        "ann_inference_s": summary(t_ann), "collect_statistics_s": summary(t_collect),
        "thresholds_s": summary(t_thresholds),
        "calibrate_over_ann_time": cal_med / ann_med,
        "calibration_throughput_relative_to_ann": ann_med / cal_med,
        "per_batch_statistics_over_ann": statistics.median(t_collect) / ann_med,
    })


if __name__ == "__main__":
    main()
