"""GPU check (CUDA): step mode against multi-step mode for ViT-S/16 and ViT-B/16, ratios to the ANN.

Not part of the benchmarks run on CPU; prepared for a machine with a CUDA GPU (at most about
10 minutes on an H100/H200, much of it compiling the fused scans with Triton). Writes
``$OUT/gpu_check.json`` if ``$OUT`` is set, else ``benchmarks/results/gpu_check.json`` (or
``--out FILE``), after every model, so a run cut short still leaves its results.

    python benchmarks/gpu_check.py                 # needs torch with CUDA, timm; ecmt from src/
    python benchmarks/gpu_check.py --device cpu --tiny --batches 2 --rounds 1 --out /tmp/g.json
                                                   # dry run of the script on a CPU (tests/test_benchmarks.py)

For each model (random weights with unit-gain initialisation, so that every site matters), in fp32:

* cost at T = 8, batch 8 and 64: T ANN forwards, the whole simulation in step mode, in multi-step
  mode and (``--graphs``) step mode with one step compiled by ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs); interleaved rounds, medians, each as a ratio to T ANN forwards; peak memory of
  each (``torch.cuda.max_memory_allocated`` above what was allocated before);
* agreement: multi-step against step mode on the GPU (bit-identical on CPU; GEMM algorithms may
  differ with the number of rows on a GPU) and both against the CPU simulation of the first two
  images (relative L2 error, argmax agreement);
* fidelity at T = 16 (batch 8): relative L2 error of the fp32 and the bf16 SNN against the fp32
  ANN; the bf16 check passes if ``err_bf16 <= err_fp32 + max(0.02, 2 * err(ANN bf16 vs ANN fp32))``;
* the fraction of MT-neuron outputs that differ between fused and eager on a random tensor
  (Triton may contract ``m * inv + 0.5`` into an FMA, which moves level boundaries by one rounding).
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
from typing import Optional

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
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def peak(fn) -> Optional[float]:
    """MiB allocated at the peak of ``fn()`` above what was allocated before (CUDA; None on CPU)."""
    if DEV != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def graphed_step_mode(snn: ecmt.SpikingModel):
    """A simulation in step mode whose steps 2..T run ``torch.compile(mode="reduce-overhead")``
    (CUDA graphs): the first step allocates the state, which the captured graph then updates."""
    compiled = torch.compile(snn, mode="reduce-overhead", dynamic=False)

    def run(x: torch.Tensor, T: int) -> torch.Tensor:
        snn.reset()
        total = snn(x).float()
        for _ in range(T - 1):
            total += compiled(x).float()
        return total / T

    return run


def cost(model, snn, x, T: int, rounds: int, graphs: bool) -> dict:
    runs = {"step": lambda: ecmt.simulate(snn, x, T, mode="step"),
            "multi": lambda: ecmt.simulate(snn, x, T, mode="multi")}
    if graphs:
        graphed = graphed_step_mode(snn)
        runs["step_cuda_graphs"] = lambda: graphed(x, T)
    res: dict = {"errors": {}}
    with torch.no_grad():
        ann_T = lambda: [model(x) for _ in range(T)]  # noqa: E731
        first = {}
        for name, fn in list(runs.items()):  # warm-up: compilation, kernel selection
            try:
                first[name] = timed(fn)
                fn()
            except Exception as e:  # noqa: BLE001 - report and go on (CUDA graphs may not capture)
                res["errors"][name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                del runs[name]
        ann_T()
        times = {k: [] for k in ["ann_T", *runs]}
        for _ in range(rounds):
            times["ann_T"].append(timed(ann_T))
            for name, fn in runs.items():
                times[name].append(timed(fn))
        res["first_call_s"] = first
        res["median_s"] = {k: statistics.median(v) for k, v in times.items()}
        res["ratio_to_T_ann_forwards"] = {k: res["median_s"][k] / res["median_s"]["ann_T"] for k in runs}
        res["peak_MiB"] = {"ann_T": peak(ann_T), **{k: peak(fn) for k, fn in runs.items()}}
        step, multi = ecmt.simulate(snn, x, T, mode="step"), ecmt.simulate(snn, x, T, mode="multi")
        res["multi_vs_step"] = {"bit_identical": bool(torch.equal(step, multi)), "rel": rel(multi[-1], step[-1]),
                                "argmax_agreement": float((multi[-1].argmax(-1) == step[-1].argmax(-1)).float().mean())}
        if "step_cuda_graphs" in runs:
            res["cuda_graphs_vs_step_rel"] = rel(runs["step_cuda_graphs"](), step[-1])
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


def make_model(name: str, tiny: bool) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(depth=1, img_size=32) if tiny else {}
    return unit_gain(timm.create_model(name, pretrained=False, **kwargs)).eval()


def check_model(name: str, batches: list[int], rounds: int, T: int, tiny: bool, graphs: bool) -> dict:
    cpu_model = make_model(name, tiny)
    size = cpu_model.patch_embed.img_size
    model = copy.deepcopy(cpu_model).to(DEV)
    res: dict = {"model": name, "tiny": tiny, "T": T}
    x8 = torch.randn(batches[0], 3, *size, device=DEV)
    th = ecmt.calibrate(model, [x8])
    snn = ecmt.convert(model, th, levels=8)
    with torch.no_grad():  # agreement with the CPU simulation of the first two images
        cpu_snn = ecmt.convert(cpu_model, th, levels=8)
        cpu = ecmt.simulate(cpu_snn, x8[:2].cpu(), T, mode="step")[-1]
        dev = {m: ecmt.simulate(snn, x8[:2], T, mode=m)[-1].cpu() for m in ("step", "multi")}
    res["agreement_with_cpu"] = {m: {"rel": rel(d, cpu), "argmax_agreement": float((d.argmax(-1) == cpu.argmax(-1))
                                                                                    .float().mean())}
                                 for m, d in dev.items()}
    res["fidelity_T16"] = fidelity(model, th, x8)
    print(name, "agreement", json.dumps(res["agreement_with_cpu"]), "fidelity", json.dumps(res["fidelity_T16"]),
          flush=True)
    res["cost"] = {}
    for batch in batches:
        x = torch.randn(batch, 3, *size, device=DEV)
        res["cost"][f"batch{batch}"] = cost(model, snn, x, T, rounds, graphs)
        print(name, f"batch{batch}", json.dumps(res["cost"][f"batch{batch}"]), flush=True)
    return res


def fidelity(model: nn.Module, th, x: torch.Tensor) -> dict:
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    snn32, snn16 = ecmt.convert(model, th, levels=8), ecmt.convert(model16, th, levels=8)
    with torch.no_grad():
        ann32, ann16 = model(x), model16(x.bfloat16())
        out32 = ecmt.simulate(snn32, x, T=16)[-1]
        out16 = ecmt.simulate(snn16, x.bfloat16(), T=16)[-1]
    e32, e16, eann = rel(out32, ann32), rel(out16, ann32), rel(ann16, ann32)
    tol = e32 + max(0.02, 2 * eann)
    return {"err_snn_fp32_vs_ann_fp32": e32, "err_snn_bf16_vs_ann_fp32": e16,
            "err_ann_bf16_vs_ann_fp32": eann, "tolerance_for_bf16": tol, "bf16_ok": e16 <= tol,
            "argmax_agreement_snn_fp32_vs_ann": float((out32.argmax(-1) == ann32.argmax(-1)).float().mean())}


def main() -> None:
    global DEV
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64], help="the first is used for fidelity")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="one block at 32x32 pixels (a dry run of the script)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also time step mode with CUDA graphs (default: on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default: $OUT or results/gpu_check.json)")
    a = p.parse_args()
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: this check needs a CUDA GPU (or --device cpu for a dry run)")
    graphs = DEV == "cuda" if a.graphs is None else a.graphs
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
              "timm": timm.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "results": [],
              "errors": []}
    path = a.out or OUT / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # on CPU fused and eager are bit-identical by construction (tests/test_fusion.py)
        if DEV == "cuda":
            report["neuron_fused_vs_eager"] = neuron_agreement()
    except Exception:  # noqa: BLE001 - report and go on
        report["errors"].append(traceback.format_exc())
    for name in a.models:
        try:
            report["results"].append(check_model(name, a.batches, a.rounds, a.T, a.tiny, graphs))
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
