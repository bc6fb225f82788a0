"""Calibration: the histogram percentile estimator and the thresholds it yields."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecmt
from ecmt.calibration import BUCKETS, SiteObserver, base_thresholds, histogram_quantile

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


DEGENERATE = {
    "all zero": torch.zeros(400),
    "all positive": torch.rand(400) + 0.5,
    "all negative": -(torch.rand(400) + 0.5),
    "one positive value": torch.full((400,), 2.0),
    "tiny negatives": torch.full((400,), -1e-30),
}


@pytest.mark.parametrize("values", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_degenerate_sites_get_finite_thresholds_and_never_fire_on_a_dead_side(values):
    """A side with no activations of its sign gets θ = 0 and never fires, even when driven."""
    obs = SiteObserver()
    obs(values)
    stats = ecmt.ActivationStats({"site": obs.counts})
    drive = torch.cat([values, -values, torch.linspace(-5, 5, 41)])  # both signs, also the dead one
    for p in (50.5, 99.0, 100.0):
        th1, th2 = stats.thresholds(p)["site"]
        assert 0 <= th1 < float("inf") and 0 <= th2 < float("inf")
        assert (th1 > 0) == bool((values > 0).any()) and (th2 > 0) == bool((values < 0).any())
        neuron = ecmt.MTNeuron(th1, th2, 8)
        for _ in range(10):
            out = neuron(drive)
            assert torch.isfinite(out).all() and torch.isfinite(neuron.v).all()
            assert (th1 > 0 or not (out > 0).any()) and (th2 > 0 or not (out < 0).any())
    with pytest.raises(ecmt.CalibrationError, match="no activations"):
        histogram_quantile(torch.zeros(BUCKETS, dtype=torch.int64), 0.5)


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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), n_pos=st.integers(0, 400), n_neg=st.integers(0, 4000), n_zero=st.integers(0, 400),
       scale=st.floats(1e-3, 1e3), p=st.floats(50.5, 100.0))
def test_a_side_is_disabled_only_when_it_has_no_values(seed, n_pos, n_neg, n_zero, scale, p):
    """θ1 > 0 iff positive values exist, θ2 > 0 iff negative ones do, at any percentile; where
    the plain percentile has the right sign it is used unchanged (Algorithm 1, step 1)."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.rand(n_pos, generator=g) + 0.01) * scale
    neg = -(torch.rand(n_neg, generator=g) + 0.01) * scale / 10  # mostly small negatives, as after a GELU
    x = torch.cat([pos, neg, torch.zeros(n_zero)])
    if x.numel() == 0:
        return
    obs = SiteObserver()
    obs(x)
    q = p / 100
    th1, th2 = base_thresholds(obs.counts, q)
    assert (th1 > 0) == (n_pos > 0) and (th2 > 0) == (n_neg > 0)
    tol = 1 + 2 ** -7
    assert th1 <= (float(pos.max()) * tol if n_pos else 0.0) and th2 <= (float(-neg.min()) * tol if n_neg else 0.0)
    if obs.quantile(q) > 1e-30:  # the data's magnitudes are above 1e-7: anything smaller is zero
        assert th1 == obs.quantile(q)
    if obs.quantile(1 - q) < -1e-30:
        assert th2 == -obs.quantile(1 - q)


def test_gelu_site_keeps_its_positive_side_at_low_percentiles():
    """After a GELU most values are small negatives: at p = 60 θ1 comes from the positive values."""
    x = torch.nn.functional.gelu(torch.randn(100_000) - 1.0)
    obs = SiteObserver()
    obs(x)
    assert obs.quantile(0.6) < 0
    th1, th2 = base_thresholds(obs.counts, 0.6)
    assert th1 == pytest.approx(float(x[x > 0].quantile(0.6)), rel=0.01)
    assert th2 == pytest.approx(-obs.quantile(0.4))


def test_padded_tokens_are_left_out_of_text_statistics():
    """A padded text batch gives the histograms of its sentences calibrated one by one, unpadded:
    padded positions (and, in the attention map, padded keys) count nowhere."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(5, 99, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    padded = ecmt.collect_statistics(model, [{"input_ids": ids * mask, "attention_mask": mask}])
    alone = ecmt.collect_statistics(model, [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}
                                            for i, n in enumerate(mask.sum(1).tolist())])
    assert padded.counts.keys() == alone.counts.keys()
    for site, counts in padded.counts.items():
        assert int(counts.sum()) == int(alone.counts[site].sum()), site
        # the same values up to float rounding, which may move one across a bucket edge
        assert int((counts - alone.counts[site]).abs().sum()) <= 0.01 * int(counts.sum()), site
    tokens, heads = int(mask.sum()), config.num_attention_heads
    attention_maps = padded.counts["encoder.layer.0.attention.self.attn_neuron"]
    assert int(attention_maps.sum()) == heads * int((mask.sum(1) ** 2).sum())
    assert int(padded.counts["encoder.layer.0.intermediate.dense.neuron"].sum()) == tokens * config.hidden_size
    assert int(padded.counts["pooler.dense.neuron"].sum()) == 3 * config.hidden_size  # one vector per sentence
