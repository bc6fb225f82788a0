"""Calibration: the histogram percentile estimator and the thresholds it yields."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecmt
from ecmt.calibration import BUCKETS, SiteObserver, histogram_quantile

from tiny_models import make


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(1e-4, 1e4), shift=st.floats(-2, 2),
       q=st.floats(0.0, 1.0))
def test_histogram_quantile_is_within_one_percent(seed, scale, shift, q):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(20_000, generator=g) + shift) * scale
    obs = SiteObserver()
    obs(x)
    xs = x.double().sort().values
    rank = q * (len(xs) - 1)
    lo, hi = float(xs[int(rank)]), float(xs[min(int(rank) + 1, len(xs) - 1)])
    # between the two order statistics around the rank, give or take one bucket (2^-7 relative)
    tol = 2 ** -7 * max(abs(lo), abs(hi)) + 1e-30
    assert lo - tol <= obs.quantile(q) <= hi + tol


def test_memory_is_bounded_and_counts_exact():
    obs = SiteObserver()
    for _ in range(20):
        obs(torch.randn(3, 1000))
    assert obs.counts.shape == (BUCKETS,) and int(obs.counts.sum()) == 60_000


def test_result_independent_of_batching_and_order():
    model, shape = make("class_token")
    data = torch.randn(12, *shape)
    a = ecmt.calibrate(model, [data[:4], data[4:8], data[8:]])
    b = ecmt.calibrate(model, [data[6:], data[:6]])
    assert a.sites == b.sites


def test_accepts_input_target_pairs_and_max_batches():
    model, shape = make("class_token")
    data = [torch.randn(4, *shape) for _ in range(3)]
    a = ecmt.calibrate(model, [(x, torch.zeros(4)) for x in data], max_batches=2)
    b = ecmt.calibrate(model, data[:2])
    assert a.sites == b.sites


def test_percentile_controls_thresholds():
    model, shape = make("class_token")
    stats = ecmt.collect_statistics(model, [torch.randn(8, *shape)])
    lo, hi = stats.thresholds(90.0), stats.thresholds(99.9)
    site = "blocks.0.mlp.fc1.neuron"
    assert 0 < lo[site][0] < hi[site][0] and 0 < lo[site][1] < hi[site][1]
    # the softmax output is never negative: its negative side is disabled
    assert hi["blocks.0.attn.attn_neuron"][1] == 0.0


def test_degenerate_sites_never_fire_and_never_nan():
    counts = torch.zeros(BUCKETS, dtype=torch.int64)
    obs = SiteObserver()
    obs(torch.zeros(100))
    th_pos, th_neg = max(obs.quantile(0.99), 0.0), max(-obs.quantile(0.01), 0.0)
    neuron = ecmt.MTNeuron(th_pos, th_neg, 8)
    for _ in range(5):
        out = neuron(torch.zeros(10))
        assert torch.isfinite(out).all() and not out.any()
    with pytest.raises(ecmt.CalibrationError):
        histogram_quantile(counts, 0.5)


def test_empty_or_non_finite_calibration_data_is_refused():
    model, shape = make("class_token")
    with pytest.raises(ecmt.CalibrationError, match="empty"):
        ecmt.calibrate(model, [])
    bad = torch.randn(2, *shape)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ecmt.CalibrationError, match="NaN"):
        ecmt.calibrate(model, [bad])
    with pytest.raises(ecmt.CalibrationError, match="percentile"):
        ecmt.calibrate(model, [torch.randn(2, *shape)], percentile=40)
