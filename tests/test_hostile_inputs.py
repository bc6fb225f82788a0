"""Hostile input (issue 20): one test per class of defect, through the command line and the API.

The command line must end with exit status 2 and one line ``ecmt: error: ...`` (no traceback);
the API must raise a typed :class:`ecmt.ConversionError`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ecmt
from ecmt import cli, progress, serialization
from ecmt.data import SKIPPED, open_dataset
from ecmt.errors import (CheckpointError, DatasetError, InvalidFileError, InvalidInputError, OutputError,
                         ResumeError)
from ecmt.models import from_spec, load_model, read_state_dict
from ecmt.outputs import check_directory, check_file
from ecmt.results import write_json
from ecmt.text import read_texts

from test_cli import CLASSES, TINY, _evaluate_args, _one_thread, checkpoint, folder  # noqa: F401
from test_errors import cli_error, tiny  # noqa: F401
from test_resume import interrupt_after

SRC = Path(__file__).resolve().parents[1] / "src"


def _without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "calibration")}


# --------------------------------------------------------------------------- 1. bad images


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    Image.new("RGB", (4, 4)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


BAD_IMAGES = ("corrupt.png", "truncated.jpg", "text.jpg", "empty.png", "dangling.png", "bomb.png")


@pytest.fixture(scope="module")
def dirty_folder(folder, tmp_path_factory) -> Path:
    """The test folder plus one bad file of each kind in class n01, and a symlink loop in n00."""
    root = tmp_path_factory.mktemp("dirty") / "val"
    shutil.copytree(folder, root)
    bad = root / "n01"
    good = (folder / "n00" / "img0.png").read_bytes()
    (bad / "corrupt.png").write_bytes(good[:40] + b"\x00" * 200 + good[240:])
    buf = bad / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf)
    (bad / "truncated.jpg").write_bytes(buf.read_bytes()[:200])
    buf.unlink()
    (bad / "text.jpg").write_text("not an image\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "dangling.png").symlink_to(root / "missing.png")
    _png_claiming(bad / "bomb.png", 20000, 20000)
    (root / "n00" / "loop").symlink_to(root / "n00")  # would count n00 again and again if followed
    (root / "n00" / "up").symlink_to(root)
    return root


def test_bad_images_are_skipped_counted_and_resumed_alike(checkpoint, dirty_folder, tmp_path, capsys, monkeypatch):
    args = [*_evaluate_args(checkpoint, dirty_folder), "--energy-batches", "0"]
    assert cli.main([*args, "--json", str(tmp_path / "whole.json")]) == 0
    err = capsys.readouterr().err
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert whole["skipped"] == len(BAD_IMAGES) and whole["n_images"] == 3 * 12, whole
    for name in BAD_IMAGES:
        assert f"skipping unreadable image {dirty_folder / 'n01' / name}" in err
    assert "Traceback" not in err

    out = tmp_path / "cut"
    interrupt_after(2, monkeypatch)
    assert cli.main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _without_timing(resumed) == _without_timing(whole)

    data = open_dataset(str(dirty_folder), load_model("ecmt_test_vit", checkpoint).data_config, CLASSES)
    labels = [data.test[i][1] for i in range(len(data.test))]
    assert len(labels) == 3 * 12 + len(BAD_IMAGES) and labels.count(SKIPPED) == len(BAD_IMAGES)


# --------------------------------------------------------------------------- 2. output paths


@pytest.mark.parametrize("option, target", [
    ("--json", "a directory"), ("--out", "a file"), ("--json", "/proc/ecmt.json"), ("--out", "/proc/ecmt"),
    ("--json", "under a file"),
])
def test_unwritable_output_paths_are_refused_before_any_work(checkpoint, folder, tmp_path, capsys, option, target):
    (tmp_path / "file").write_text("x")
    path = {"a directory": str(tmp_path), "a file": str(tmp_path / "file"),
            "under a file": str(tmp_path / "file" / "r.json")}.get(target, target)
    start = time.perf_counter()
    line = cli_error(capsys, [*_evaluate_args(checkpoint, folder), option, path])  # one line: nothing else ran
    assert path in line and time.perf_counter() - start < 5
    check = check_file if option == "--json" else check_directory
    with pytest.raises(OutputError):
        check(Path(path), option)


def test_convert_output_that_is_a_directory_is_refused(checkpoint, folder, tmp_path, capsys, tiny):
    argv = ["convert", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint), "--dataset", str(folder),
            "-o", str(tmp_path)]
    assert "is a directory" in cli_error(capsys, argv)
    with pytest.raises(OutputError):
        serialization.save(tiny.snn, tmp_path)


def test_a_write_failing_at_the_end_prints_the_results(checkpoint, folder, tmp_path, capsys, monkeypatch):
    def full_disk(rows, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cli, "write_csv", full_disk)
    assert cli.main([*_evaluate_args(checkpoint, folder), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("ecmt: error: could not write") and "results.csv" in last and "stdout" in last
    assert "Traceback" not in captured.err
    assert json.loads(captured.out)["n_images"] == 3 * 12


# --------------------------------------------------------------------------- 3. and 4. SNN files


def _rewrite(src: Path, dst: Path, edit_info=None, edit_tensors=None, redigest: bool = True) -> Path:
    """Copy an SNN file with its record and tensors edited (and, if ``redigest``, a matching digest)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    info, tensors = json.loads(meta["ecmt"]), load_file(str(src))
    if edit_info:
        edit_info(info)
    if edit_tensors:
        edit_tensors(tensors)
    if redigest:
        info["digest"] = serialization.digest(info, tensors)
    save_file(tensors, str(dst), metadata={"ecmt": json.dumps(info)})
    return dst


@pytest.fixture(scope="module")
def snn_files(tiny, tmp_path_factory) -> dict[str, Path]:
    """SNN files of the tiny ViT: one with a timm spec, one with a "vit" (VisionTransformer) spec."""
    root = tmp_path_factory.mktemp("snn")
    timm_file = serialization.save(tiny.snn, root / "timm.safetensors", ann=tiny.model)
    spec = {"name": "tiny", "builder": "vit", "kwargs": {**TINY, "img_size": 16, "num_classes": CLASSES},
            "num_classes": CLASSES, "data_config": dict(tiny.bundle.spec["data_config"])}
    bundle = from_spec(spec)
    bundle.model.load_state_dict(tiny.model.state_dict())
    snn = ecmt.convert(bundle.model, tiny.stats.thresholds(99.0), levels=4)
    snn.spec = spec
    return {"timm": timm_file, "vit": serialization.save(snn, root / "vit.safetensors", ann=bundle.model)}


def _set(path: str, value):
    def edit(info):
        *parents, last = path.split(".")
        node = info
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


METADATA_CASES = [
    ("timm", "spec", KeyError), ("timm", "spec", "fmnist-vit"), ("timm", "spec.kwargs", KeyError),
    ("timm", "spec.kwargs", ["model_name"]), ("timm", "levels", KeyError), ("timm", "levels", "8"),
    ("timm", "levels", 10 ** 9), ("timm", "levels", 17), ("timm", "levels", True), ("timm", "levels", 8.5),
    ("timm", "thresholds", KeyError), ("timm", "thresholds", [1, 2]), ("timm", "thresholds.sites", {"a": [1]}),
    ("timm", "spec.data_config", KeyError), ("timm", "spec.data_config.input_size", "big"),
    ("timm", "spec.data_config.mean", [0.5]), ("timm", "spec.num_classes", "3"),
    ("timm", "spec.kwargs.model_name", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"),
    ("timm", "spec.kwargs.model_name", "vit_tiny_patch16_224/../../x"),
    ("timm", "spec.kwargs.checkpoint_path", "/etc/passwd"), ("timm", "spec.kwargs.pretrained", True),
    ("timm", "spec.kwargs.img_size", 10 ** 6), ("timm", "spec.kwargs.img_size", 4096),
    ("timm", "spec.dataset", "/etc"), ("timm", "spec.text", {"source": 5}), ("timm", "spec.builder", "pickle"),
    ("vit", "spec.kwargs.embed_dim", 10 ** 9), ("vit", "spec.kwargs.embed_dim", 16384),
    ("vit", "spec.kwargs.depth", 10 ** 6), ("vit", "spec.kwargs.depth", 256), ("vit", "spec.kwargs.img_size", 4096),
    ("vit", "spec.kwargs.num_heads", 3), ("vit", "spec.kwargs.norm_layer", "os.system"),
]


@pytest.mark.parametrize("kind, key, value", METADATA_CASES, ids=[f"{k}-{p}={v!r}"[:60] for k, p, v in METADATA_CASES])
def test_snn_metadata_outside_the_schema_is_refused(snn_files, folder, tmp_path, capsys, kind, key, value):
    path = _rewrite(snn_files[kind], tmp_path / "bad.safetensors", _set(key, value))
    start = time.perf_counter()
    with pytest.raises((InvalidFileError, CheckpointError)) as e:
        serialization.read(path)
    assert "\n" not in str(e.value) and time.perf_counter() - start < 10
    cli_error(capsys, ["evaluate", "--snn", str(path), "--dataset", str(folder), "--T", "2"])


BROKEN_TENSORS = {
    "NaN weight": lambda t: t[next(k for k in t if k.endswith("fc1.linear.weight"))].view(-1).__setitem__(0, math.nan),
    "Inf threshold": lambda t: t[next(k for k in t if k.endswith("theta"))].__setitem__(0, math.inf),
    "negative threshold": lambda t: t[next(k for k in t if k.endswith("theta"))].__setitem__(1, -1.0),
}


@pytest.mark.parametrize("case", [*BROKEN_TENSORS, "flipped bytes", "metadata edited"])
def test_broken_snn_tensors_are_refused(snn_files, folder, tmp_path, capsys, case):
    path = tmp_path / "bad.safetensors"
    if case == "flipped bytes":
        raw = bytearray(snn_files["timm"].read_bytes())
        for i in range(len(raw) - 400, len(raw)):
            raw[i] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif case == "metadata edited":  # a valid value, but not the one the digest was made over
        _rewrite(snn_files["timm"], path, _set("levels", 5), redigest=False)
    else:
        _rewrite(snn_files["timm"], path, edit_tensors=BROKEN_TENSORS[case])
    with pytest.raises(InvalidFileError, match="digest|NaN|negative"):
        serialization.read(path)
    cli_error(capsys, ["evaluate", "--snn", str(path), "--dataset", str(folder), "--T", "2"])


# --------------------------------------------------------------------------- 5. concurrent runs


def test_a_second_run_into_a_held_out_directory_is_refused(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ecmt.progress import lock_directory; f = lock_directory(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = cli_error(capsys, [*_evaluate_args(checkpoint, folder), "--out", str(out)])
        assert f"another ecmt run (pid {holder.pid})" in line
        with pytest.raises(OutputError):
            progress.lock_directory(out)
    finally:
        holder.kill()
        holder.wait()
    progress.lock_directory(out).close()  # free again once the holder is gone
    assert not list(out.glob("*.tmp"))


def test_progress_is_saved_under_unique_temporary_names(tmp_path, monkeypatch):
    temporaries = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (temporaries.append(Path(a).name), replace(a, b)))
    state = progress.Progress({"T": 1}, 1, 0, ecmt.evaluation.Tally.zero(1))
    progress.save_progress(state, tmp_path / "progress.json")
    progress.save_progress(state, tmp_path / "progress.json")
    assert len(set(temporaries)) == 2 and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- 7. arguments


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed: must be at least 0"), (["--seed", str(10 ** 24)], "--seed: must be at most"),
    (["--levels", "2000"], "--levels: must be at most 16"), (["--levels", str(10 ** 9)], "--levels: must be at most"),
    (["--levels", "200"], "--levels: must be at most 16"), (["--levels", "17"], "--levels: must be at most 16"),
])
def test_arguments_out_of_bounds(checkpoint, folder, capsys, argv, message):
    assert message in cli_error(capsys, [*_evaluate_args(checkpoint, folder), *argv])


@pytest.mark.parametrize("levels", [2000, 17, 0, True, 8.7, "8"])
def test_convert_refuses_levels_outside_1_to_16(tiny, levels):
    with pytest.raises(InvalidInputError, match=r"levels must be an integer in 1\.\.16"):
        ecmt.convert(tiny.model, tiny.stats.thresholds(99.0), levels=levels)


def test_tune_refuses_a_zero_budget(tiny):
    with pytest.raises(InvalidInputError, match="budget"):
        ecmt.tune(tiny.model, [tiny.x], T=2, levels=4, budget=0)


def test_huge_T_times_batch_is_warned(checkpoint, folder, capsys):
    argv = [*_evaluate_args(checkpoint, folder), "--T", "100000", "--batch-size", "64", "--json", "/proc/x.json"]
    assert cli.main(argv) == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("ecmt: warning: --T 100000 x --batch-size 64") and "hours" in first
    assert second.startswith("ecmt: error: ")


def test_dtype_errors_name_the_dtype(tiny):
    with pytest.raises(ecmt.CalibrationError, match="dtype uint8"):
        ecmt.collect_statistics(tiny.model, [tiny.x.to(torch.uint8)])


# --------------------------------------------------------------------------- 8. text files


@pytest.mark.parametrize("encoding, content, offset", [
    ("latin-1", "café au lait\nsecond\n".encode("latin-1"), 3),
    ("binary", bytes(range(128, 256)) * 4, 0),
    ("nul", b"one\x00two\n", 3),
])
def test_text_files_that_are_not_text_are_refused(tmp_path, capsys, encoding, content, offset):
    path = tmp_path / "texts.txt"
    path.write_bytes(content)
    for option in ("--texts", "--calib-texts"):
        argv = ["evaluate", "--model", "minilm", option, str(path)] if option == "--texts" else \
            ["convert", "--model", "minilm", option, str(path), "-o", str(tmp_path / "x.safetensors")]
        line = cli_error(capsys, argv)
        assert str(path) in line and f"offset {offset}" in line
    with pytest.raises(DatasetError, match=f"offset {offset}"):
        read_texts(path)


def test_utf16_and_utf8_bom_text_files_are_read(tmp_path):
    for encoding in ("utf-16", "utf-8-sig"):
        (tmp_path / "t.txt").write_text("héllo\nwörld\n", encoding=encoding)
        assert read_texts(tmp_path / "t.txt") == ["héllo", "wörld"]


# --------------------------------------------------------------------------- 9. checkpoints


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ecmt-pwned",))


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(2)], "it holds a list, not a dict"),
    (torch.zeros(2), "it holds a Tensor, not a dict"),
    ({"weights": [1, 2]}, "no state dict found"),
    ({"a": _Evil()}, "refused to load checkpoint"),
])
def test_checkpoints_that_hold_no_state_dict(checkpoint, folder, tmp_path, capsys, content, message):
    path = tmp_path / "ckpt.pth"
    torch.save(content, path)
    argv = [*_evaluate_args(checkpoint, folder)]
    argv[argv.index("--checkpoint") + 1] = str(path)
    line = cli_error(capsys, argv)
    assert message in line and "truncated or corrupt" not in line and "weights_only" not in line
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)
    assert not Path("/tmp/ecmt-pwned").exists()


# --------------------------------------------------------------------------- 10. progress files


def _tally_of_wrong_length(d):
    d["tally"] = d["tally"][:-2]  # 3T + 4: no layout of any version


def _done(value):
    return lambda d: d.__setitem__("done", value)


def _miscount(d):
    d["tally"][0] += 5


TAMPERED = {
    "tally length": (_tally_of_wrong_length, True), "done -1": (_done(-1), True),
    "done > batches": (_done(10 ** 6), True), "tally a string": (lambda d: d.__setitem__("tally", "many"), True),
    "no fingerprint": (lambda d: d.pop("fingerprint"), True),
    "bad measurement": (lambda d: d.__setitem__("measurement", {"samples": 1}), True),
    # consistent on their own; the resumed run finds that they do not fit the dataset
    "done != counts": (_done(3), False), "n miscounted": (_miscount, False),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_progress_is_refused(checkpoint, folder, tmp_path, capsys, monkeypatch, case):
    tamper, on_load = TAMPERED[case]
    args = [*_evaluate_args(checkpoint, folder), "--energy-batches", "0", "--out", str(tmp_path)]
    interrupt_after(1, monkeypatch)
    assert cli.main(args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    path = tmp_path / progress.PROGRESS_FILE
    d = json.loads(path.read_text())
    tamper(d)
    path.write_text(json.dumps(d))
    assert "progress" in cli_error(capsys, [*args, "--resume"])
    if on_load:
        with pytest.raises(ResumeError):
            progress.load_progress(path)


# --------------------------------------------------------------------------- 11. minor


def test_json_never_holds_nan(tmp_path):
    path = write_json({"rank_agreement": {"1": math.nan, "2": [math.inf, 0.5]}}, tmp_path / "r.json")
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"rank_agreement": {"1": None, "2": [None, 0.5]}}
