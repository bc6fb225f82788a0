"""Resumable evaluation: an interrupted ``ecmt evaluate --out DIR`` continued with ``--resume``
reports exactly what an uninterrupted run reports."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ecmt
from ecmt import cli, progress
from ecmt.energy import Measurement, OpCounter
from ecmt.progress import PROGRESS_FILE, SNN_FILE

sys.path.insert(0, os.path.dirname(__file__))
from test_cli import _evaluate_args, _one_thread, checkpoint, folder, tiny_snn_file  # noqa: E402,F401
from tiny_models import make  # noqa: E402


def _untimed(record: dict) -> dict:
    """``record`` without its timing fields (``seconds``, at any depth)."""
    return {k: _untimed(v) if isinstance(v, dict) else v for k, v in record.items() if k != "seconds"}


def _results(out: Path) -> tuple[dict, dict]:
    return _untimed(json.loads((out / "results.json").read_text())), json.loads((out / "energy.json").read_text())


def test_measurements_add_like_one_counter_and_survive_json():
    model, shape = make("class_token")
    snn = ecmt.convert(model, ecmt.calibrate(model, [torch.randn(4, *shape)]), levels=4)
    xs = [torch.randn(3, *shape), torch.randn(2, *shape)]
    parts = []
    for x in xs:
        with OpCounter(snn) as c:
            ecmt.simulate(snn, x, 3)
        parts.append(c.result())
    with OpCounter(snn) as both:
        for x in xs:
            ecmt.simulate(snn, x, 3)
    total = parts[0] + parts[1]
    assert total == both.result() and total.samples == (5, 5, 5)
    assert Measurement.from_dict(json.loads(json.dumps(total.to_dict()))) == total


def interrupt_after(batches: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make evaluations stop (KeyboardInterrupt) once ``batches`` are done and saved; returns the
    list of ``done`` at every save."""
    saves, save = [], progress.save_progress

    def save_then_stop(state: progress.Progress, path: Path) -> Path:
        save(state, path)
        saves.append(state.done)
        if state.done == batches:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(progress, "save_progress", save_then_stop)
    return saves


def test_interrupted_run_resumes_to_the_same_results(checkpoint, folder, tmp_path, monkeypatch):
    args = _evaluate_args(checkpoint, folder, "--energy-batches", "2")
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "cut"
    saves = interrupt_after(1, monkeypatch)  # the first batch is done; the second (also measured) is not
    assert cli.main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert saves == [0, 1] and (out / SNN_FILE).is_file() and not (out / "results.json").exists()
    assert progress.load_progress(out / PROGRESS_FILE).done == 1

    def no_calibration(*_):
        raise AssertionError("a resumed run calibrated again")

    monkeypatch.setattr(cli, "_calibrated_snn", no_calibration)
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert _results(out) == _results(tmp_path / "whole")
    assert progress.load_progress(out / PROGRESS_FILE).finished


@pytest.fixture(scope="module")
def cut(folder, tmp_path_factory) -> tuple[list[str], Path]:
    """Arguments of an SNN evaluation, and an output directory where it stopped after 1 of 5 batches."""
    tmp = tmp_path_factory.mktemp("cut")
    args = ["evaluate", "--snn", str(tiny_snn_file(tmp)), "--dataset", str(folder), "--T", "4", "--batch-size", "8"]
    assert cli.main([*args, "--out", str(tmp / "out")]) == 0
    path = tmp / "out" / PROGRESS_FILE
    progress.save_progress(dataclasses.replace(progress.load_progress(path), done=1), path)
    (tmp / "bad").mkdir()
    (tmp / "bad" / PROGRESS_FILE).write_text("{not json")
    return args, tmp


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "--resume needs --out DIR"),
    (["--resume", "--out", "{tmp}/empty"], "no progress file"),
    (["--resume", "--out", "{tmp}/bad"], "is not an ecmt progress file"),
    (["--resume", "--out", "{tmp}/out", "--T", "3"], "progress of another run (T 4 -> 3)"),
    (["--resume", "--out", "{tmp}/out", "--seed", "1"], "progress of another run (seed 0 -> 1)"),
    (["--out", "{tmp}/out"], "holds an unfinished evaluation (1 of 5 batches): add --resume"),
])
def test_resume_errors_are_one_line(cut, capsys, extra, message):
    args, tmp = cut
    assert cli.main([*args, *(a.replace("{tmp}", str(tmp)) for a in extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecmt: error: ") and err.count("\n") == 1 and message in err, err


def _done(out: Path) -> int:
    """Batches finished according to the progress file in ``out`` (0 before it exists)."""
    try:
        return json.loads((out / PROGRESS_FILE).read_text())["done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_killed_process_resumes_to_the_same_results(folder, tmp_path, capsys):
    """SIGKILL ``python -m ecmt evaluate`` after a few batches, then ``--resume`` it (in this
    process: a second interpreter would double the time, mostly spent importing)."""
    snn = tiny_snn_file(tmp_path)
    args = ["evaluate", "--snn", str(snn), "--dataset", str(folder), "--T", "24", "--batch-size", "1",
            "--limit", "12", "--energy-batches", "3", "--threads", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "killed"
    src = str(Path(ecmt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ecmt", *args, "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # generous for a busy machine; about 5 s on an idle one
    try:
        while _done(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = progress.load_progress(out / PROGRESS_FILE)
    assert 2 <= killed.done < killed.batches == 12 and not (out / "results.json").exists()

    capsys.readouterr()
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert f"resuming after {killed.done} of 12 batches" in capsys.readouterr().err
    assert _results(out) == _results(tmp_path / "whole")
