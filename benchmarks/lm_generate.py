"""Greedy generation by a converted LM's SNN beside its ANN, on ten short prompts.

For each T, every prompt is continued by the SNN (with the spiking KV cache of
:mod:`ecmt.kvcache`) and by the ANN (with transformers' cache) for ``--new-tokens`` tokens;
recorded are both continuations, the identical leading tokens, whether all match, and the wall
time per token of each (alternated prompt by prompt, so machine load affects both alike). The
first ``--uncached`` prompts are generated again without caches (each token runs the whole
prefix: the cache's speed-up, and a check that it gives the same tokens), and on the first
``--energy`` prompts the energy ratio (Eq. 30) of the SNN is counted on the prompt followed by
the ANN's continuation. Calibration uses ``ecmt generate``'s default texts (the first 16 packaged
calibration sentences), none of which is a prompt. Before anything is timed, a 2-token generation
with and without caches compiles the fused kernels.

    python benchmarks/lm_generate.py --T 32 16 --threads 1
    python benchmarks/lm_generate.py --snn smollm2.snn.safetensors --T 32 --prompts 2 --new-tokens 8 \
        --uncached 2 --energy 0 --threads 1 --name smollm2_generate_cost
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ecmt import lm
from ecmt.serialization import read
from ecmt.text import energy_fields, packaged_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "My favourite breakfast is",
    "To make a cup of tea, first",
    "The three primary colours are",
    "Once upon a time, a small fox",
    "Water boils at a temperature of",
    "The best way to learn to code is",
    "In the winter, the lake near our house",
    "def add(a, b):",
    "The sun rises in the east and",
]
"""Short, varied prompts written for this benchmark."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    calib = packaged_texts("calibration")[:16]
    assert not set(calib) & set(PROMPTS)
    start = time.perf_counter()
    if args.snn:  # saved by `ecmt convert --model smollm2 --per-channel` (the same calibration)
        saved = read(args.snn)
        model, snn = lm.saved_lm(saved), saved.snn
    else:
        model = lm.load_lm(args.model)
    loaded = time.perf_counter() - start
    if not args.snn:
        snn = lm.convert_lm(model, calib, rule="eq25", per_channel=args.per_channel)
    converted = time.perf_counter() - start - loaded
    for cache in (True, False):  # warm-up: compiles the fused kernels before anything is timed
        lm.generate(model, snn, PROMPTS[-1], 2, 2, cache=cache)
    print(f"loaded in {loaded:.0f} s, calibrated and converted in {converted:.0f} s", flush=True)
    record: dict[str, Any] = {"model": args.model, "snn_file": args.snn, "new_tokens": args.new_tokens,
                              "levels": snn.levels,
                              "percentile": snn.thresholds.percentile, "rule": snn.thresholds.rule.value,
                              "per_channel": bool(snn.thresholds.per_channel()), "calibration": "packaged calibration sentences 1-16",
                              "seconds_load": round(loaded, 1), "seconds_convert": round(converted, 1),
                              "environment": environment(args.threads), "by_T": {}}
    for T in args.T:
        rows, uncached, energy = [], [], []
        for i, prompt in enumerate(PROMPTS[:args.prompts]):
            g = lm.generate(model, snn, prompt, T, args.new_tokens)
            rows.append({"prompt": prompt, "snn_text": g.snn_text, "ann_text": g.ann_text,
                         "snn_tokens": g.snn_tokens, "ann_tokens": g.ann_tokens,
                         "identical_leading": g.common_prefix, "all_match": g.snn_tokens == g.ann_tokens,
                         "snn_s_per_token": round(g.snn_seconds, 4), "ann_s_per_token": round(g.ann_seconds, 4),
                         "cost_ratio": round(g.cost_ratio, 2)})
            print(f"T={T} [{i + 1}/{args.prompts}] {g.common_prefix}/{len(g.ann_tokens)} "
                  f"{g.snn_seconds:.2f} s/token ({g.cost_ratio:.0f}x) {prompt!r} -> SNN {g.snn_text!r} | "
                  f"ANN {g.ann_text!r}", flush=True)
            if i < args.uncached:
                u = lm.generate(model, snn, prompt, T, args.new_tokens, cache=False)
                first = next((k for k, (a, b) in enumerate(zip(u.snn_tokens, g.snn_tokens)) if a != b), None)
                uncached.append({"prompt": prompt, "snn_text": u.snn_text, "snn_tokens": u.snn_tokens,
                                 "identical_leading": u.common_prefix, "same_tokens_as_cached": u.snn_tokens == g.snn_tokens,
                                 "first_token_differing_from_cached": first,
                                 "ann_same_tokens_as_cached": u.ann_tokens == g.ann_tokens,
                                 "snn_s_per_token": round(u.snn_seconds, 4), "ann_s_per_token": round(u.ann_seconds, 4),
                                 "cost_ratio": round(u.cost_ratio, 2),
                                 "cache_speedup": round(u.snn_seconds / g.snn_seconds, 2)})
                print(f"  uncached: {u.common_prefix}/{len(u.ann_tokens)}, same tokens as cached "
                      f"{u.snn_tokens == g.snn_tokens} (first difference at {first}), {u.snn_seconds:.2f} s/token "
                      f"({u.cost_ratio:.0f}x the uncached ANN) -> SNN {u.snn_text!r}", flush=True)
            if i < args.energy:
                batch = model.tokenize([prompt + g.ann_text])
                fields = energy_fields(snn, [batch], T)
                energy.append({"prompt": prompt, "tokens": int(batch["input_ids"].shape[1]),
                               "energy_ratio": fields["energy_ratio"][str(T)],
                               "firing_rate_mean": fields["firing_rates"]["mean"]})
        record["by_T"][str(T)] = {
            "prompts": rows, "all_16_match": sum(r["all_match"] for r in rows),
            "mean_identical_leading": statistics.mean(r["identical_leading"] for r in rows),
            "median_cost_ratio": statistics.median(r["cost_ratio"] for r in rows),
            "median_snn_s_per_token": statistics.median(r["snn_s_per_token"] for r in rows),
            "median_ann_s_per_token": statistics.median(r["ann_s_per_token"] for r in rows),
            "uncached": uncached, "energy": energy,
        }
        write(args.name, record)  # after each T, so a long run leaves its finished part
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--T", type=int, nargs="+", default=[32, 16])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts")
    p.add_argument("--snn", help="an SNN file of the model (no calibration)")
    p.add_argument("--uncached", type=int, default=2, help="prompts also generated without caches")
    p.add_argument("--energy", type=int, default=2, help="prompts whose energy ratio is counted")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="smollm2_generate")
    run(p.parse_args())


if __name__ == "__main__":
    main()
