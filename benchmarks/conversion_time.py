"""Wall time of conversion (graph capture included) on a full-size model, for each conversion path.

    python benchmarks/conversion_time.py                       # ViT-B/16 -> results/conversion_time.json
    python benchmarks/conversion_time.py --model vit_small_patch16_224 --paths graph
"""
from __future__ import annotations

import argparse
import time

import torch

import ecmt
from common import environment, load_model, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--paths", nargs="+", default=["graph", "adapter"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="conversion_time")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, x = load_model(a.model, 2)
    out = {"environment": environment(a.threads), "model": a.model, "results": {}}
    for path in a.paths:
        th = ecmt.calibrate(model, [x], path=path)  # thresholds only: not part of conversion
        t0 = time.perf_counter()
        snn = ecmt.convert(model, th, levels=8, path=path)
        seconds = time.perf_counter() - t0
        out["results"][path] = {"convert_s": seconds, "sites": len(th)}
        print(f"{a.model} {path}: convert {seconds:.2f} s ({len(th)} sites, {snn.path})", flush=True)
    write(a.name, out)


if __name__ == "__main__":
    main()
