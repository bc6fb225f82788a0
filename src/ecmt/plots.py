"""Figures of an energy report: energy ratio against T, energy per module, firing rates.

Every function takes the dict of :func:`ecmt.energy.energy_report` (or the same dict read
back from JSON), writes one image and returns its path. Figures are drawn on the Agg canvas
directly, so importing this module never changes the global matplotlib backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from matplotlib.figure import Figure

from .energy import module_energy

PathLike = Union[str, Path]


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_energy_ratio(report: Mapping[str, Any], path: PathLike) -> Path:
    """E_SNN/E_ANN (Eq. 30) against T, paper convention and full accounting side by side.

    Example:
        >>> plot_energy_ratio(energy_report(m), "energy.png")      # doctest: +SKIP
    """
    fig = Figure(figsize=(9, 3.6))
    series = (("energy_ratio", "paper convention (MACs$_{SNN}$ = 0)"),
              ("energy_ratio_full", "full accounting (remaining MACs)"))
    for i, (key, title) in enumerate(series):
        ax = fig.add_subplot(1, 2, i + 1)
        ts = sorted(report[key], key=int)
        ax.plot([int(t) for t in ts], [report[key][t] for t in ts], marker="o")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="ANN")
        ax.set(title=title, xlabel="time steps T", ylabel="$E_{SNN}/E_{ANN}$")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_energy_breakdown(report: Mapping[str, Any], path: PathLike, T: Optional[int] = None) -> Path:
    """Energy per module type (summed over the blocks) of the ANN and of the SNN at T steps.

    Example:
        >>> plot_energy_breakdown(energy_report(m), "breakdown.png", T=4)   # doctest: +SKIP
    """
    rows = module_energy(report, T)
    names = list(rows)
    fig = Figure(figsize=(8, 0.35 * len(names) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.27
    bars = (("ann", "ANN"), ("snn", "SNN, paper convention"), ("snn_full", "SNN, full accounting"))
    for i, (key, label) in enumerate(bars):
        ax.barh([j + (i - 1) * height for j in range(len(names))], [rows[n][key] * 1e-6 for n in names],
                height=height, label=label)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="energy per sample (µJ)", title=f"energy per module, T = {T or report['steps']}")
    ax.legend()
    return _save(fig, path)


def plot_firing_rates(report: Mapping[str, Any], path: PathLike) -> Path:
    """Firing rate on each threshold level over the whole network (paper Fig. 6).

    Example:
        >>> plot_firing_rates(energy_report(m), "firing.png")        # doctest: +SKIP
    """
    levels = report["firing_rates"]["levels"]
    labels = [f"+θ₁·{2 ** k}" for k in range(len(levels["pos"]))]
    labels += [f"−θ₂·{2 ** k}" for k in range(len(levels["neg"]))]
    fig = Figure(figsize=(max(5, 0.5 * len(labels)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(labels)), [*levels["pos"], *levels["neg"]])
    ax.set_xticks(range(len(labels)), labels, rotation=60)
    ax.set(ylabel="spikes per neuron per step", title="firing rate per threshold")
    return _save(fig, path)
