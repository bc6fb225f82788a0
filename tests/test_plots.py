"""The figures a researcher puts in a paper (issue 19): what is drawn, not only that a file exists."""
from __future__ import annotations

import pytest
from matplotlib.ticker import MaxNLocator

from ecmt import plots


def _record(ann: float = 0.9, n: int = 1000, T: int = 8, **extra) -> dict:
    acc = {str(t): ann - 0.3 / t for t in range(1, T + 1)}
    return {"model": "vit", "dataset": "data", "ann_top1": ann, "snn_top1": acc, "n_images": n, "levels": 8,
            "percentile": 99.0, "T": T, **extra}


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_wilson_interval():
    lo, hi = plots.wilson_interval(0.9, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)
    assert plots.wilson_interval(1.0, 10)[1] == 1.0 and plots.wilson_interval(0.0, 10)[0] == 0.0


def test_accuracy_is_zoomed_with_a_band_and_wilson_intervals():
    fig = plots.accuracy_figure(plots._one_run(_record()), "t")
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    assert 90 - plots.ZOOM_POINTS - 1 < bottom < 80 and 91 < top < 95  # not 0-100
    labels = _labels(ax)
    assert "ANN ± 1 point" in labels and any("95 % Wilson, n = 1000" in s for s in labels)
    band = [p for p in ax.patches if p.get_label() == "ANN ± 1 point"][0]
    y0, y1 = sorted(band.get_path().transformed(band.get_patch_transform()).vertices[:, 1])[::3]
    assert (y0, y1) == (pytest.approx(89), pytest.approx(91))
    assert len(ax.containers) == 1  # the error bars
    below = [t for t in ax.texts if t.get_text() == "60.0"]  # T = 1 (60 %) is below the axis: marked
    assert below
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)


def test_sweep_lines_have_distinct_markers_and_styles():
    runs = [{**_record(), "label": f"n={n}", "levels": n} for n in (4, 8)]
    fig = plots.accuracy_figure({"ann_top1": 0.9, "n_images": 1000, "runs": runs}, "t")
    lines = [c.lines[0] for c in fig.axes[0].containers if c.get_label() in ("n=4", "n=8")]  # errorbar lines
    assert len(lines) == 2
    assert lines[0].get_marker() != lines[1].get_marker() and lines[0].get_linestyle() != lines[1].get_linestyle()
    assert lines[0].get_xdata()[0] != lines[1].get_xdata()[0]  # intervals side by side, not on top


def test_accuracy_against_energy_has_one_point_per_T():
    energy = {str(t): 0.1 * t for t in range(1, 9)}
    adaptive = {"top1": 0.88, "mean_steps": 2.5, "patience": 1, "margin": 0.7, "energy_ratio": 0.25}
    fig = plots.accuracy_energy_figure(plots._one_run(_record(energy_ratio=energy, adaptive=adaptive, label="SNN")),
                                       "t")
    ax = fig.axes[0]
    curve = next(line for line in ax.get_lines() if line.get_label() == "SNN")
    assert list(curve.get_xdata()) == pytest.approx([0.1 * t for t in range(1, 9)])
    assert any(label.startswith("adaptive") for label in _labels(ax))
    assert "energy ratio" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()


def _energy() -> dict:
    sites = {f"blocks.{b}.{s}": {"rate": r * (b + 1), "pos": [], "neg": []}
             for b in range(2) for s, r in (("attn.qkv.neuron", 0.2), ("mlp.fc2.neuron", 0.05))}
    return {"steps": 4, "firing_rates": {"levels": {"pos": [0.2, 0.01, 0.0001, 0.0], "neg": [0.1, 0.001, 0.0, 0.0]},
                                         "mean": 0.15, "sites": sites, "layers": {"blocks.0": 0.12, "blocks.1": 0.25}},
            "energy_ratio": {str(t): 0.1 * t for t in range(1, 5)},
            "energy_ratio_full": {str(t): 0.15 * t for t in range(1, 5)}}


def test_firing_rates_per_level_layer_and_site_type():
    fig = plots.firing_rate_figure(_energy(), title="vit, T = 4, n = 8, p = 99")
    levels, layers, types = fig.axes
    assert levels.get_yscale() == "log"  # most levels near zero
    assert [t.get_text() for t in layers.get_xticklabels()] == ["blocks.0", "blocks.1"]
    assert [t.get_text() for t in types.get_xticklabels()] == ["attn.qkv.neuron", "mlp.fc2.neuron"]
    assert [p.get_height() for p in types.patches] == pytest.approx([0.3, 0.075])  # mean over the blocks
    assert all(ax.get_xlabel() and ax.get_ylabel() == "spikes per neuron per step" for ax in fig.axes)
    assert fig._suptitle.get_text().startswith("vit, T = 4, n = 8, p = 99")


def test_energy_ratio_has_integer_ticks():
    fig = plots.energy_ratio_figure(_energy())
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_formats(tmp_path, fmt, magic):
    path = plots.plot_accuracy(_record(), tmp_path / f"a.{fmt}")
    assert path.read_bytes()[:len(magic)] == magic
