"""Benchmark 4: where the time of a simulation step goes.

Forward pre/post hooks time every module of each component class: MT neurons, EC modules
(Eq. 15, including F), matrix-product EC modules (Eq. 16, including the matmul of the running
sums), the SpikingLinear layers less their MT neurons, and analog-input modules (patch
embedding). "other" is the step time not spent in any of them
(residual additions, reshapes of q/k/v, the attention scale, Python overhead). The same is done
for the ANN forward (Linear, attention core, LayerNorm, GELU, patch embedding). ANN forwards and
simulations are interleaved over a few rounds; each component's median is reported. An
op-level torch.profiler table of a short simulation is stored as well.

    python benchmarks/profile_components.py                    # ViT-S/16, batch 8, T=8
    python benchmarks/profile_components.py --sim multi        # the same in multi-step mode (per chunk)
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

import ecmt
from ecmt import registry
from ecmt.layers import SpikingLinear
from common import convert, environment, load_model, reexec_with_tuned_malloc, set_fusion, write


def snn_components(snn: ecmt.SpikingModel) -> dict[str, list[nn.Module]]:
    """Component groups of the SNN. ``linear`` holds whole SpikingLinear modules (a linked one
    accumulates its product itself, without calling its ``nn.Linear``); their sites are in
    ``linear_sites``, which :func:`_snn_run` subtracts from ``linear`` and adds to ``mt_neurons``."""
    groups: dict[str, list[nn.Module]] = defaultdict(list)
    linear_sites = {id(m.neuron) for m in snn.net.modules() if isinstance(m, SpikingLinear)}
    for m in snn.net.modules():
        if isinstance(m, ecmt.MTNeuron):
            groups["linear_sites" if id(m) in linear_sites else "mt_neurons"].append(m)
        elif isinstance(m, ecmt.ExpectationCompensation):
            groups["ec_modules"].append(m)
        elif isinstance(m, ecmt.MatMulEC):
            groups["matmul_ec"].append(m)
        elif isinstance(m, SpikingLinear):
            groups["linear"].append(m)
        elif registry.is_analog_input(m):
            groups["analog_input"].append(m)
    return groups


def ann_components(model: nn.Module) -> dict[str, list[nn.Module]]:
    from timm.layers import PatchEmbed
    from timm.layers.attention import Attention
    groups: dict[str, list[nn.Module]] = defaultdict(list)
    inside = {}
    for outer in model.modules():
        if isinstance(outer, (PatchEmbed, Attention)):
            inside.update({id(m): type(outer) for m in outer.modules() if m is not outer})
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            groups["analog_input"].append(m)
        elif isinstance(m, Attention):
            groups["attention"].append(m)
        elif inside.get(id(m)) is PatchEmbed:
            continue
        elif isinstance(m, nn.Linear):
            groups["attention_linear" if inside.get(id(m)) is Attention else "linear"].append(m)
        elif isinstance(m, (nn.LayerNorm, nn.GELU)):
            groups["layernorm_gelu"].append(m)
    return groups


class HookTimer:
    """Accumulates the wall time spent inside groups of modules."""

    def __init__(self, groups: dict[str, list[nn.Module]]) -> None:
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self._handles = []
        self._start: dict[int, float] = {}
        for name, mods in groups.items():
            for m in mods:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(lambda mod, a, o, name=name: self._post(name, mod)))

    def _pre(self, m, args):
        self._start[id(m)] = time.perf_counter()

    def _post(self, name, m):
        self.total[name] += time.perf_counter() - self._start.pop(id(m))
        self.calls[name] += 1

    def remove(self):
        for h in self._handles:
            h.remove()


def shares(timer: HookTimer, wall: float, nested: dict[str, str] | None = None) -> dict:
    """Seconds and share of ``wall`` per group; ``nested`` maps a group to the group it is inside."""
    nested = nested or {}
    own = dict(timer.total)
    for inner, outer in nested.items():  # report the outer group exclusive of the inner one
        if inner in own and outer in own:
            own[outer] -= own[inner]
    out = {k: {"s": v, "share": v / wall, "calls": timer.calls[k]} for k, v in own.items()}
    out["other"] = {"s": wall - sum(own.values()), "share": 1 - sum(own.values()) / wall}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--tuned-malloc", action="store_true", help="run with common.TUNED_MALLOC (see there)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["auto", "0"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-op-table", action="store_true")
    p.add_argument("--sim", default="step", choices=("step", "multi"),
                   help="simulation mode timed (the hooks make auto choose step mode)")
    p.add_argument("--name", default="profile")
    a = p.parse_args()
    reexec_with_tuned_malloc(a.tuned_malloc)
    torch.set_num_threads(a.threads)
    model, x = load_model(a.model, a.batch)
    snn = convert(model, x)
    result = {"environment": environment(a.threads), "model": a.model, "batch": a.batch, "T": a.T,
              "rounds": a.rounds}
    runs: dict[str, list[dict]] = {"ann": [], **{m: [] for m in a.modes}}
    with torch.no_grad():
        model(x)
        for mode in a.modes:  # warm-up / compilation
            set_fusion(mode)
            ecmt.simulate(snn, x, T=a.T)
        for r in range(a.rounds):  # interleaved, like the step-cost benchmark
            runs["ann"].append(_ann_run(model, x))
            for mode in a.modes:
                set_fusion(mode)
                runs[mode].append(_snn_run(snn, x, a.T, a.sim))
            print(f"round {r + 1}: ANN {runs['ann'][-1]['wall']:.3f} s, "
                  + ", ".join(f"step[{m}] {runs[m][-1]['wall']:.3f} s" for m in a.modes), flush=True)
        ann = _median_run(runs["ann"])
        result["ann"] = {"forward_s": ann["wall"], "components": ann["components"]}
        result["snn"] = {}
        for mode in a.modes:
            snn_run = _median_run(runs[mode])
            result["snn"][mode] = {"step_s": snn_run["wall"], "step_over_ann": snn_run["wall"] / ann["wall"],
                                   "components_per_step": snn_run["components"]}
            print(mode, {k: round(v["share"], 3) for k, v in snn_run["components"].items()},
                  f"step {snn_run['wall']:.3f} s", flush=True)
            if not a.no_op_table:
                from torch.profiler import ProfilerActivity, profile
                set_fusion(mode)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    ecmt.simulate(snn, x, T=2)
                rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
                result["snn"][mode]["top_ops_T2"] = [
                    {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]
        set_fusion("auto")
    print("ANN", {k: round(v["share"], 3) for k, v in result["ann"]["components"].items()},
          f"forward {result['ann']['forward_s']:.3f} s")
    write(a.name, result)


def _ann_run(model: nn.Module, x: torch.Tensor) -> dict:
    timer = HookTimer(ann_components(model))
    wall = _wall(lambda: model(x))
    timer.remove()
    comps = shares(timer, wall, {"attention_linear": "attention"})
    comps["attention_core (sdpa, reshapes)"] = comps.pop("attention")
    lin = comps.pop("attention_linear")
    comps["linear"] = {k: comps["linear"][k] + lin[k] for k in ("s", "share", "calls")}
    return {"wall": wall, "components": comps}


def _snn_run(snn: ecmt.SpikingModel, x: torch.Tensor, T: int, sim: str) -> dict:
    timer = HookTimer(snn_components(snn))
    wall = _wall(lambda: ecmt.simulate(snn, x, T=T, mode=sim)) / T  # auto: step mode, as hooks are attached
    timer.remove()
    for k in timer.total:
        timer.total[k] /= T
        timer.calls[k] //= T
    comps = shares(timer, wall, {"linear_sites": "linear"})
    sites = comps.pop("linear_sites")
    comps["mt_neurons"] = {k: comps["mt_neurons"][k] + sites[k] for k in ("s", "share", "calls")}
    return {"wall": wall, "components": comps}


def _median_run(runs: list[dict]) -> dict:
    """The per-component medians over rounds (seconds, and shares of the median wall time)."""
    wall = statistics.median(r["wall"] for r in runs)
    comps = {}
    for k in runs[0]["components"]:
        sec = statistics.median(r["components"][k]["s"] for r in runs)
        comps[k] = {"s": sec, "share": sec / wall, "calls": runs[0]["components"][k].get("calls")}
    return {"wall": wall, "components": comps, "walls": [r["wall"] for r in runs]}


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
