"""Benchmark 2: peak memory of simulate at several T, and the size of the state.

Every measurement runs in a fresh subprocess, so that ``ru_maxrss`` (peak resident memory)
belongs to it alone. The child builds the model and the SNN from thresholds calibrated by the
parent (so calibration's histograms are not in its peak), warms up on a 2-sample slice of the
batch (this imports and compiles what the fused path needs, on the same dynamic-shape kernels),
then records the resident memory, runs the measured call once and reads the peak:

* ``snn``: ``simulate(snn, x, T)``;
* ``ann``: one ANN forward on the same batch.

Before the call, freed heap memory is returned to the OS (``malloc_trim``) and the peak is
reset to the current resident size (``/proc/self/clear_refs``), so the peak that follows
(``VmHWM``) is the call's own; the increment ``peak - resident before`` is what the call needed.
Where the peak cannot be reset, the process-lifetime ``ru_maxrss`` is used and the result is
valid only if the call set it (``peak_set_by_call``).

The state is measured exactly: after the run, the bytes of every tensor held by a stateful
module (membrane potentials, running sums, previous EC values), counting shared storage once.
It is compared with the activations of one ANN forward, counted two ways: the outputs of every
leaf module (what a framework keeps for the backward pass, roughly) and every tensor any
operator creates during the forward (a TorchDispatchMode sees each op's outputs; the fused SDPA
kernel's internal buffers are not visible).

Each SNN run is done twice: with the default allocator (what a user sees, including glibc's
caching and fragmentation), and with ``MALLOC_MMAP_THRESHOLD_=65536``, which gives every
allocation of 64 KiB or more its own mapping, returned to the OS when freed, so that the RSS
follows the live tensors. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

    python benchmarks/memory.py                           # ViT-S/16, batch 8, T = 4, 16, 64
    python benchmarks/memory.py --T 4 64 --sim step multi --no-live --name memory_multistep

``--sim`` measures each simulation mode (``step``, ``multi``: chunks of steps, the chunk chosen
under ``--budget`` bytes, default that of ``ecmt.simulate``); the chunk used is recorded.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak` (VmHWM), else since the start."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak() -> bool:
    """Return freed heap memory to the OS and reset the peak to the current RSS (Linux >= 4.0)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def state_bytes(snn) -> dict:
    """Exact bytes of the simulation state, by kind of module, shared storage counted once."""
    from ecmt.state import stateful_modules
    seen: set[int] = set()
    kinds: dict[str, int] = {}
    for m in stateful_modules(snn.net):
        for name in m._state:
            t = getattr(m, name)
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + t.untyped_storage().nbytes()
    return {"total": sum(kinds.values()), "by_module": kinds}


def activation_bytes(model: nn.Module, x: torch.Tensor) -> dict:
    """Bytes of the tensors one ANN forward creates: leaf-module outputs, and all op outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    leaf: dict[int, int] = {}

    def hook(m, args, out):
        if isinstance(out, torch.Tensor):
            leaf.setdefault(out.untyped_storage().data_ptr(), out.untyped_storage().nbytes())

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages: dict[int, int] = {}
            self.keep: list[torch.Tensor] = []  # keep outputs alive so that addresses are unique

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in self.storages:
                        self.storages[ptr] = t.untyped_storage().nbytes()
                        self.keep.append(t)
            return out

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    count = Count()
    with torch.no_grad(), count:
        y = model(x)
    for h in handles:
        h.remove()
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    params.add(x.untyped_storage().data_ptr())
    all_ops = sum(n for p, n in count.storages.items() if p not in params)
    return {"leaf_module_outputs": sum(n for p, n in leaf.items() if p not in params),
            "all_op_outputs": all_ops, "output": y.untyped_storage().nbytes()}


def child(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    import ecmt
    from common import load_model
    torch.set_num_threads(a.threads)
    model, x = load_model(a.model, a.batch, a.device)
    th = ecmt.Thresholds.from_json(Path(a.thresholds).read_text())
    snn = ecmt.convert(model, th, levels=8)
    cuda = x.is_cuda
    T = a.T[0]
    with torch.no_grad():  # warm-up on a slice: imports, compilation, kernel selection
        if a.what == "snn":
            ecmt.simulate(snn, x[:2], T=4, mode=a.sim[0])
        else:
            model(x[:2])
        snn.reset()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, peak_before = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    else:
        reset = reset_peak()
        before, peak_before = rss_bytes(), maxrss_bytes()
    sim = None
    with torch.no_grad():
        if a.what == "snn":
            from ecmt.simulation import Simulation
            sim = Simulation(snn, x, T, mode=a.sim[0], memory=a.budget)
            out = torch.stack(list(sim))
        else:
            out = model(x)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = maxrss_bytes()
    result = {"what": a.what, "T": T if a.what == "snn" else None, "before": before, "peak": peak,
              "increment": peak - before, "peak_set_by_call": peak > peak_before,
              "peak_reset_before_call": True if cuda else reset,
              "output_bytes": out.untyped_storage().nbytes()}
    if a.what == "snn":
        result.update(state=state_bytes(snn), sim=a.sim[0], chunk=sim.chunk, budget=a.budget)
    print("RESULT " + json.dumps(result))


def run_child(args: list[str], live: bool = False) -> dict:
    """Run one measurement in a fresh process. ``live``: every allocation of 64 KiB or more
    gets its own mapping, returned to the OS when freed, so that RSS follows live memory
    (no allocator caching or fragmentation)."""
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {}))
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--T", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="memory")
    p.add_argument("--no-live", dest="live", action="store_false",
                   help="skip the runs with MALLOC_MMAP_THRESHOLD_ (RSS = live memory)")
    p.add_argument("--sim", nargs="+", default=["auto"], help="simulation modes: auto, step, multi")
    p.add_argument("--budget", type=int, default=None, help="memory budget of multi-step mode, bytes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", default="snn", help=argparse.SUPPRESS)
    p.add_argument("--thresholds", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    sys.path.insert(0, str(HERE))
    import ecmt
    from common import environment, load_model, write
    torch.set_num_threads(a.threads)
    model, x = load_model(a.model, a.batch, a.device)
    th = ecmt.calibrate(model, [x])
    acts = activation_bytes(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        th_path = Path(tmp) / "thresholds.json"
        th_path.write_text(th.to_json())
        common = ["--model", a.model, "--batch", str(a.batch), "--threads", str(a.threads),
                  "--device", a.device, "--thresholds", str(th_path)]
        ann = run_child([*common, "--what", "ann", "--T", "1"])
        print("ann", ann, flush=True)
        if a.budget is not None:
            common += ["--budget", str(a.budget)]
        snn, live = [], []
        for sim in a.sim:
            for T in a.T:
                snn.append(run_child([*common, "--what", "snn", "--T", str(T), "--sim", sim]))
                print("snn", snn[-1], flush=True)
                if a.live:
                    live.append(run_child([*common, "--what", "snn", "--T", str(T), "--sim", sim], live=True))
                    print("snn (live)", live[-1], flush=True)
    state = snn[-1]["state"]["total"]
    mib = 2 ** 20
    out = {
        "environment": environment(a.threads), "model": a.model, "batch": a.batch,
        "method": "peak RSS (VmHWM, reset before the call) in a fresh subprocess per measurement" if a.device == "cpu"
                  else "torch.cuda.max_memory_allocated in a fresh subprocess per measurement",
        "ann_forward": ann,
        "simulate": snn,
        "simulate_live_memory": live,
        "ann_activations_bytes": acts,
        "summary_MiB": {
            "simulate_peak_increment_by_T": {f"{s['sim']} T={s['T']}": s["increment"] / mib for s in snn},
            "simulate_peak_increment_by_T (live memory)": {f"{s['sim']} T={s['T']}": s["increment"] / mib
                                                          for s in live},
            "ann_forward_peak_increment": ann["increment"] / mib,
            "state": state / mib,
            "ann_activations_leaf_module_outputs": acts["leaf_module_outputs"] / mib,
            "ann_activations_all_op_outputs": acts["all_op_outputs"] / mib,
        },
        "ratios": {
            "peak_increment_T_max_over_T_min": {sim: [s for s in snn if s["sim"] == sim][-1]["increment"]
                                                / [s for s in snn if s["sim"] == sim][0]["increment"] for sim in a.sim},
            "state_over_leaf_module_outputs": state / acts["leaf_module_outputs"],
            "state_over_all_op_outputs": state / acts["all_op_outputs"],
            "state_over_ann_peak_increment": state / ann["increment"],
            "simulate_peak_increment_over_ann_peak_increment": snn[-1]["increment"] / ann["increment"],
        },
    }
    print(json.dumps(out["summary_MiB"], indent=1), json.dumps(out["ratios"], indent=1))
    write(a.name, out)


if __name__ == "__main__":
    main()
