"""Every Transformer family through the generic graph path: conversion time and fidelity per T.

Small random-initialised configurations of each family (``tests/graph_families.py``, the same
ones the test suite converts), calibrated at the paper's p = 99 on their own input, converted with n = 8
levels and simulated to T = 128. Reports the relative error of the final output against the
ANN at T = 8 / 32 / 128 and the time of calibration plus conversion (capture included).

    python benchmarks/families.py                    # all families -> results/families.json
    python benchmarks/families.py --only swin eva02
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ecmt  # noqa: E402
from common import environment, write  # noqa: E402
from graph_families import FAMILIES, family_model  # noqa: E402
from ecmt.registry import main_output  # noqa: E402


def run(key: str, T: tuple[int, ...]) -> dict:
    model, x = family_model(key)
    t0 = time.perf_counter()
    th = ecmt.calibrate(model, [x], path="graph")
    snn = ecmt.convert(model, th, levels=8, path="graph")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ref = main_output(model(**x) if isinstance(x, dict) else model(x)).float()
    out = ecmt.simulate(snn, x, max(T))
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    w = mask[..., None].float() if mask is not None and ref.dim() == 3 else 1.0
    err = {t: float(((out[t - 1] - ref) * w).norm() / (ref * w).norm()) for t in T}
    return {"family": key, "model": type(model).__name__, "sites": len(th), "calibrate_convert_s": seconds,
            "relative_error": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=list(FAMILIES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="families")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for key in a.only:
        try:
            rows.append(run(key, (8, 32, 128)))
            e = rows[-1]["relative_error"]
            print(f"{key:18s} {e[8]:.4f} {e[32]:.4f} {e[128]:.4f}  {rows[-1]['calibrate_convert_s']:.1f} s", flush=True)
        except ecmt.ConversionError as e:
            rows.append({"family": key, "error": str(e)})
            print(f"{key:18s} {e}", flush=True)
    write(a.name, {"environment": environment(a.threads), "results": rows})


if __name__ == "__main__":
    main()
