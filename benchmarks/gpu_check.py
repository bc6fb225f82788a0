"""GPU check (CUDA): step cost of ViT-S/16 and ViT-B/16 in fp32 and bf16, bf16 fidelity at T=16.

Not part of the test suite; prepared for a machine with a CUDA GPU (about 3-5 minutes on an
H200, most of it compiling the fused step functions with Triton). Writes
``$OUT/gpu_check.json`` if ``$OUT`` is set, else ``benchmarks/results/gpu_check.json``, after
every model, so a run cut short still leaves its results.

    python benchmarks/gpu_check.py                 # needs torch with CUDA, timm; ecmt from src/
    python benchmarks/gpu_check.py --device cpu --models vit_tiny_patch16_224 --batches 2 --rounds 1
                                                   # dry run of the script on a CPU

For each model (random weights with unit-gain initialisation, so that every site matters):

* step cost: one ANN forward vs one step of ``simulate`` over T=8, interleaved, 10 rounds,
  medians, for fp32 and bf16, fused (default) and eager (``ECMT_COMPILE=0``), batch 8 and 64;
* fidelity at T=16 (batch 8): relative L2 error of the SNN output against the fp32 ANN, for the
  fp32 and the bf16 SNN. The bf16 check passes if
  ``err_bf16 <= err_fp32 + max(0.02, 2 * err(ANN bf16 vs ANN fp32))``;
* fused vs eager on the GPU: relative difference of the fp32 SNN outputs at T=16, and the
  fraction of MT-neuron outputs that differ on a random tensor (Triton may contract
  ``m * inv + 0.5`` into an FMA, which moves level boundaries by one rounding);
* ViT-S only: CUDA peak memory of simulate at T = 4, 16, 64 (must not grow with T).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import timm  # noqa: E402
from torch import nn  # noqa: E402

import ecmt  # noqa: E402
from ecmt import fusion  # noqa: E402
from ecmt.neurons import mt_step  # noqa: E402

DEV = "cuda"  # --device cpu for a dry run of the script itself
OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"


def unit_gain(model: nn.Module) -> nn.Module:
    """Weights of order one everywhere (as in tests/tiny_models.py); timm's init is near-constant."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for n, p in model.named_parameters():
            if any(k in n for k in ("cls_token", "pos_embed")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def step_cost(model, snn, x, rounds: int, T=8) -> dict:
    res = {}
    with torch.no_grad():
        for mode in ("auto", "0"):
            fusion.set_mode(mode)
            t_first = timed(lambda: ecmt.simulate(snn, x, T=T))  # compiles on the first fused call
            model(x)
            ann, step = [], []
            for _ in range(rounds):
                ann.append(timed(lambda: model(x)))
                step.append(timed(lambda: ecmt.simulate(snn, x, T=T)) / T)
            res["fused" if mode == "auto" else "eager"] = {
                "ann_forward_ms": statistics.median(ann) * 1e3, "snn_step_ms": statistics.median(step) * 1e3,
                "ratio": statistics.median(step) / statistics.median(ann), "first_simulate_s": t_first}
    fusion.set_mode("auto")
    return res


def neuron_agreement() -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(8, 197, 384, device=DEV, generator=g) * 2
    th = torch.tensor([0.37, -0.11, 1 / 0.37, -1 / 0.11], device=DEV)
    args = (x.view(-1), th[0], th[1], th[2], th[3], 128.0)
    with torch.no_grad():  # each call integrates x into fresh zero membranes
        fusion.set_mode("1")
        fused = mt_step(torch.zeros_like(x).view(-1), *args, numel=x.numel())
        fusion.set_mode("auto")
        eager = mt_step.eager(torch.zeros_like(x).view(-1), *args)
    return {"differing_fraction": float((fused != eager).float().mean()), "elements": x.numel(),
            "fused_failed": mt_step.failed}


def cuda_memory(model, snn, x) -> dict:
    out = {}
    with torch.no_grad():
        ecmt.simulate(snn, x, T=2)
        for T in (4, 16, 64):
            snn.reset()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            ecmt.simulate(snn, x, T=T)
            torch.cuda.synchronize()
            out[T] = {"peak_increment_MiB": (torch.cuda.max_memory_allocated() - before) / 2 ** 20}
    return out


def check_model(name: str, batches: list[int], rounds: int) -> dict:
    torch.manual_seed(0)
    model = unit_gain(timm.create_model(name, pretrained=False)).eval().to(DEV)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    res: dict = {"model": name}
    x8 = torch.randn(batches[0], 3, 224, 224, device=DEV)
    th = ecmt.calibrate(model, [x8])
    snn32, snn16 = ecmt.convert(model, th, levels=8), ecmt.convert(model16, th, levels=8)
    with torch.no_grad():
        ann32, ann16 = model(x8), model16(x8.bfloat16())
        out32 = ecmt.simulate(snn32, x8, T=16)[-1]
        out16 = ecmt.simulate(snn16, x8.bfloat16(), T=16)[-1]
        fusion.set_mode("0")
        out32_eager = ecmt.simulate(snn32, x8, T=16)[-1]
        fusion.set_mode("auto")
    e32, e16, eann = rel(out32, ann32), rel(out16, ann32), rel(ann16, ann32)
    tol = e32 + max(0.02, 2 * eann)
    res["fidelity_T16"] = {
        "err_snn_fp32_vs_ann_fp32": e32, "err_snn_bf16_vs_ann_fp32": e16, "err_snn_bf16_vs_ann_bf16": rel(out16, ann16),
        "err_ann_bf16_vs_ann_fp32": eann, "snn_bf16_vs_snn_fp32": rel(out16, out32),
        "tolerance_for_bf16": tol, "bf16_ok": e16 <= tol,
        "fused_vs_eager_fp32_rel_diff": rel(out32, out32_eager),
        "argmax_agreement_snn_fp32_vs_ann": float((out32.argmax(-1) == ann32.argmax(-1)).float().mean()),
        "argmax_agreement_snn_bf16_vs_ann": float((out16.argmax(-1) == ann32.argmax(-1)).float().mean()),
    }
    print(name, json.dumps(res["fidelity_T16"]), flush=True)
    res["step_cost"] = {}
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device=DEV)
        for dtype, m, snn in (("fp32", model, snn32), ("bf16", model16, snn16)):
            xx = x.to(torch.bfloat16) if dtype == "bf16" else x
            key = f"batch{batch}_{dtype}"
            res["step_cost"][key] = step_cost(m, snn, xx, rounds)
            print(name, key, json.dumps(res["step_cost"][key]), flush=True)
    if name == "vit_small_patch16_224" and DEV == "cuda":
        res["cuda_memory_fp32_batch8"] = cuda_memory(model, snn32, x8)
        print(name, "memory", json.dumps(res["cuda_memory_fp32_batch8"]), flush=True)
    return res


def main() -> None:
    global DEV
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64], help="the first is used for fidelity")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    DEV = a.device
    assert DEV != "cuda" or torch.cuda.is_available(), "this check needs a CUDA GPU"
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
              "timm": timm.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "results": [],
              "errors": []}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "gpu_check.json"
    try:
        report["neuron_fused_vs_eager"] = neuron_agreement()
    except Exception:  # noqa: BLE001 - report and go on
        report["errors"].append(traceback.format_exc())
    for name in a.models:
        try:
            report["results"].append(check_model(name, a.batches, a.rounds))
        except Exception:  # noqa: BLE001 - report and go on
            report["errors"].append(traceback.format_exc())
            print(report["errors"][-1], flush=True)
        report["wall_s"] = time.time() - t0
        path.write_text(json.dumps(report, indent=2) + "\n")
    report["all_bf16_ok"] = all(r["fidelity_T16"]["bf16_ok"] for r in report["results"]) and not report["errors"]
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}; bf16 fidelity ok: {report['all_bf16_ok']}; {report['wall_s']:.0f} s")
    sys.exit(0 if report["all_bf16_ok"] else 1)


if __name__ == "__main__":
    main()
