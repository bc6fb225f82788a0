"""Adaptive time steps: the stopping rule, and its consistency with the fixed-T results of the same run."""
from __future__ import annotations

import json

import pytest
import torch

import ecmt
from ecmt import cli
from ecmt.adaptive import StopRule, mean_energy, probability_margin, stop_steps
from ecmt.evaluation import Tally, evaluate, evaluate_batch

from test_cli import _evaluate_args, checkpoint, folder  # noqa: F401 (fixtures)
from tiny_models import make

SURE, UNSURE = 5.0, 0.1  # logit gaps: softmax margins 0.98 and 0.03 over 3 classes


def _logits(*classes: tuple[int, float]) -> torch.Tensor:
    """One step's running outputs ``[B, 3]``: per input, its top-1 class and logit gap."""
    out = torch.zeros(len(classes), 3)
    for i, (c, gap) in enumerate(classes):
        out[i, c] = gap
    return out


# per input: (class, gap) at steps 1..4
SEQUENCE = torch.stack([
    _logits((0, SURE), (1, SURE), (2, UNSURE), (0, UNSURE)),
    _logits((0, SURE), (2, SURE), (2, UNSURE), (0, UNSURE)),
    _logits((0, SURE), (2, SURE), (2, UNSURE), (0, SURE)),
    _logits((0, SURE), (2, SURE), (1, UNSURE), (0, SURE)),
])  # (T=4, B=4, C=3)


@pytest.mark.parametrize("patience, margin, steps, preds", [
    (1, 0.5, [2, 3, 4, 3], [0, 2, 1, 0]),  # 2 is never sure and stops at T with its last class
    (0, 0.5, [1, 1, 4, 3], [0, 1, 1, 0]),  # margin alone: the first sure step
    (2, 0.5, [3, 4, 4, 3], [0, 2, 1, 0]),  # 1: class 2 from step 2, unchanged for two steps at step 4
    (1, 0.0, [2, 3, 2, 2], [0, 2, 2, 0]),  # top-1 unchanged for one step, whatever the margin
    (4, 0.0, [4, 4, 4, 4], [0, 2, 1, 0]),  # patience T: never stops early
])
def test_hand_made_sequence_stops_where_expected(patience, margin, steps, preds):
    s, p = stop_steps(SEQUENCE, StopRule(patience, margin))
    assert s.tolist() == steps and p.tolist() == preds


def test_margin_is_between_softmax_probabilities():
    p = torch.tensor([0.6, 0.3, 0.1])
    assert torch.allclose(probability_margin(p.log()[None]), torch.tensor([0.3]))
    assert probability_margin(torch.zeros(2, 1)).tolist() == [1.0, 1.0]  # one class: always sure


def test_stricter_rules_never_stop_earlier():
    outputs = torch.randn(8, 64, 5).cumsum(0) / torch.arange(1, 9).view(-1, 1, 1)  # running means
    rules = [(k, m) for k in range(4) for m in (0.0, 0.2, 0.5, 0.9)]
    steps = {r: stop_steps(outputs, StopRule(*r))[0] for r in rules}
    for k, m in rules:
        assert steps[k, m].min() >= k + 1 and steps[k, m].max() <= 8
        for k2, m2 in rules:
            if k2 >= k and m2 >= m:
                assert (steps[k2, m2] >= steps[k, m]).all()


@pytest.mark.parametrize("bad", [dict(patience=-1), dict(margin=1.5), dict(margin=-0.1), dict(patience=1.5)])
def test_invalid_rules_are_refused(bad):
    with pytest.raises(ValueError):
        StopRule(**bad)


def test_mean_energy_weights_each_step_by_its_stops():
    assert mean_energy((2, 0, 1), {1: 0.1, 2: 0.2, 3: 0.4}) == pytest.approx((2 * 0.1 + 0.4) / 3)
    assert mean_energy((0, 0, 5), {3: 0.4}) == pytest.approx(0.4)


def test_adaptive_tallies_add_and_survive_a_tensor_sum():
    a = Tally(10, (3, 7), 8, 6, (4, 6))
    b = Tally(5, (1, 4), 5, 4, (5, 0))
    assert a + b == Tally(15, (4, 11), 13, 10, (9, 6))
    assert (a + b).adaptive_steps == 9 + 2 * 6 and (a + b).mean_steps == 21 / 15 and (a + b).adaptive_top1 == 10 / 15
    assert Tally.from_tensor(a.to_tensor() + b.to_tensor()) == a + b
    assert Tally.zero(2, adaptive=True) + a == a and Tally.from_tensor(Tally.zero(3, adaptive=True).to_tensor()).T == 3
    plain = Tally(4, (1, 2), 3)
    assert Tally.from_tensor(plain.to_tensor() * 2) == Tally(8, (2, 4), 6)
    assert (plain + a).adaptive_correct is None and (plain + a).mean_steps is None


@pytest.fixture(scope="module")
def tiny():
    model, shape = make("class_token")
    torch.manual_seed(1)
    calib = [torch.randn(16, *shape) for _ in range(2)]
    snn = ecmt.convert(model, ecmt.calibrate(model, calib), levels=4)
    x = torch.randn(24, *shape)
    y = model(x).argmax(-1)  # the ANN's classes as labels: the SNN approaches 100 %
    return model, snn, x, y


def test_adaptive_counts_come_from_the_fixed_T_simulation(tiny):
    model, snn, x, y = tiny
    T = 6
    out = ecmt.simulate(snn, x, T)  # (T, B, classes)
    for rule in (StopRule(1, 0.5), StopRule(0, 0.9), StopRule(2, 0.0)):
        tally = evaluate_batch(model, snn, x, y, T, rule)
        steps, preds = stop_steps(out, rule)
        assert tally.snn_correct == tuple(int((o.argmax(-1) == y).sum()) for o in out)
        assert tally.adaptive_stops == tuple(int((steps == t).sum()) for t in range(1, T + 1))
        assert tally.adaptive_correct == int((preds == y).sum())
        # each image is classified as by the fixed-T SNN at its own stop step
        at_stop = out[steps - 1, torch.arange(len(y))].argmax(-1)
        assert torch.equal(preds, at_stop)


def test_a_rule_that_never_stops_early_gives_the_fixed_T_result(tiny):
    model, snn, x, y = tiny
    T = 5
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    tally, _ = evaluate(model, snn, batches, T, progress=False, stop_rule=StopRule(patience=T, margin=0.0))
    assert tally.adaptive_correct == tally.snn_correct[-1] and tally.adaptive_stops == (0,) * (T - 1) + (len(y),)
    assert tally.mean_steps == T and tally.adaptive_top1 == tally.snn_top1()[T]
    first, _ = evaluate(None, snn, batches, T, progress=False, stop_rule=StopRule(patience=0, margin=0.0))
    assert first.adaptive_correct == first.snn_correct[0] and first.mean_steps == 1
    assert first.snn_correct == tally.snn_correct  # the rule does not change the simulation


def test_cli_reports_adaptive_accuracy_steps_and_energy(checkpoint, folder, tmp_path, capsys):  # noqa: F811
    js, out = tmp_path / "a.json", tmp_path / "out"
    assert cli.main(_evaluate_args(checkpoint, folder, "--adaptive", "--patience", "1", "--margin", "0.3",
                                   "--json", str(js), "--out", str(out))) == 0
    r = json.loads(js.read_text())
    a = r["adaptive"]
    assert a["patience"] == 1 and a["margin"] == 0.3 and sum(a["stops"].values()) == r["n_images"]
    assert a["stops"]["1"] == 0 and 2 <= a["mean_steps"] <= 4  # patience 1: no stop before step 2
    assert a["mean_steps"] == pytest.approx(sum(int(t) * c for t, c in a["stops"].items()) / r["n_images"])
    assert a["energy_ratio"] == pytest.approx(mean_energy(list(a["stops"].values()),
                                                          {int(t): e for t, e in r["energy_ratio"].items()}))
    assert r["energy_ratio"]["2"] <= a["energy_ratio"] <= r["energy_ratio"]["4"]
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "Adaptive (patience 1, margin 0.3)" in capsys.readouterr().out

    assert cli.main(_evaluate_args(checkpoint, folder, "--adaptive", "--patience", "4", "--json", str(js))) == 0
    r = json.loads(js.read_text())
    assert r["adaptive"]["top1"] == r["snn_top1"]["4"] and r["adaptive"]["mean_steps"] == 4
    assert r["adaptive"]["energy_ratio"] == pytest.approx(r["energy_ratio"]["4"])


@pytest.mark.parametrize("extra, message", [
    (["--patience", "2"], "--patience sets the stopping rule of --adaptive"),
    (["--adaptive", "--margin", "1.5"], "argument --margin: must be in [0, 1], got 1.5"),
    (["--adaptive", "--patience", "-1"], "argument --patience: must be at least 0, got -1"),
])
def test_bad_adaptive_options_exit_2(checkpoint, folder, capsys, extra, message):  # noqa: F811
    assert cli.main(_evaluate_args(checkpoint, folder, *extra)) == 2
    assert message in capsys.readouterr().err


def test_settled_images_leave_the_batch_with_the_same_counts(tiny):
    """With compaction the stop steps and predictions are those of the full simulation, bit for bit."""
    model, snn, x, y = tiny
    T = 8
    early = 0
    for rule in (StopRule(1, 0.5), StopRule(0, 0.0), StopRule(2, 0.9)):
        full = evaluate_batch(model, snn, x, y, T, rule)
        compact = evaluate_batch(model, snn, x, y, T, rule, compact=True)
        assert (compact.adaptive_stops, compact.adaptive_correct) == (full.adaptive_stops, full.adaptive_correct)
        assert compact.snn_correct[-1] == compact.adaptive_correct  # each image answers at its stop step
        early += sum(full.adaptive_stops[:-1])
    assert early > 0  # images stopped early, and left
