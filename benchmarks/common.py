"""Shared helpers of the benchmarks: models, thresholds, timing, environment, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import ecmt

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("vit_small_patch16_224", "fmnist_vit")


def fusion_mode() -> str:
    """ecmt's fusion mode, or 'n/a' for versions of ecmt without :mod:`ecmt.fusion`."""
    try:
        from ecmt import fusion
    except ImportError:
        return "n/a"
    return fusion.get_mode()


def set_fusion(mode: str) -> None:
    """Set ecmt's fusion mode (a no-op for versions of ecmt without it, e.g. as a baseline)."""
    try:
        from ecmt import fusion
    except ImportError:
        return
    fusion.set_mode(mode)


def load_model(name: str, batch: int, device: str = "cpu", seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(ANN in eval mode, one input batch)`` for a benchmark model.

    ``vit_small_patch16_224`` and other timm names: random weights, 224×224 random images.
    ``fmnist_vit``: the reference model from ``src/ecmt/zoo`` (raises FileNotFoundError if it
    has not been trained yet) on random images of its input size.
    """
    torch.manual_seed(seed)
    if name == "fmnist_vit":
        from ecmt.zoo import load_reference_model
        model, config = load_reference_model("fmnist_vit")
        shape = tuple(config.get("input_size") or (model.patch_embed.proj.in_channels, *model.patch_embed.img_size))
    else:
        import timm
        model = timm.create_model(name, pretrained=False).eval()
        shape = (3, *model.patch_embed.img_size)
    x = torch.randn(batch, *shape)
    return model.to(device).eval(), x.to(device)


def convert(model: nn.Module, x: torch.Tensor, levels: int = 8, path: str = "auto") -> ecmt.SpikingModel:
    """Calibrate on the benchmark batch itself (thresholds do not affect the dense cost) and convert."""
    return ecmt.convert(model, ecmt.calibrate(model, [x], path=path), levels=levels, path=path)


TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
"""glibc settings that keep freed memory in the process instead of returning it to the OS.

By default glibc may unmap (or trim) the large blocks that tensors free, and the next step's
temporaries fault their pages in again (tens of thousands of page faults per ViT-S step were
seen). ``--tuned-malloc`` measures whether that matters; jemalloc and tcmalloc behave like
these settings.
"""


def reexec_with_tuned_malloc(enabled: bool) -> None:
    """Restart this script with :data:`TUNED_MALLOC` in the environment (glibc reads it at start)."""
    if enabled and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})


def environment(threads: int) -> dict[str, Any]:
    return {
        "malloc_env": {k: os.environ.get(k) for k in TUNED_MALLOC},
        "ecmt": str(Path(ecmt.__file__).parent),
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": threads, "ecmt_fusion": fusion_mode(),
        "load_average_at_start": list(os.getloadavg()),
    }


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()`` (synchronising CUDA if in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def write(name: str, data: dict[str, Any], out_dir: Optional[Path] = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    data.setdefault("environment", {})["load_average_at_end"] = list(os.getloadavg())
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path
