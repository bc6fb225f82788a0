"""The ``ecmt`` command line, model loading, datasets and SNN files, on tiny random models."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

import ecmt
from ecmt import cli, serialization
from ecmt.errors import CheckpointError, IncompatibleFileError
from ecmt.evaluation import Tally
from ecmt.models import from_spec, load_model, read_state_dict

TINY = dict(patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and are then immune to CPU contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@register_model
def ecmt_test_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A timm-registered ViT small enough for tests: 16x16 RGB images, 3 classes by default."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}
    return VisionTransformer(**{"img_size": 16, "num_classes": CLASSES, **TINY, **kwargs})


@register_model
def ecmt_test_vit_gray(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The same for 1x28x28 images and 10 classes (Fashion-MNIST layout)."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}
    return VisionTransformer(**{"img_size": 28, "in_chans": 1, "num_classes": 10, **TINY, "patch_size": 7,
                                **kwargs})


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Unit-gain weights, so that a random model's classes and every site vary with the input."""
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.ndim > 1 else 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(_randomize(timm.create_model("ecmt_test_vit")).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageNet-val-style folder: 3 class directories of 12 small PNGs each."""
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"n0{c}").mkdir()
        for i in range(12):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-dependent colour
            Image.fromarray(pixels).save(root / f"n0{c}" / f"img{i}.png")
    return root


def _evaluate_args(checkpoint: Path, folder: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint), "--dataset", str(folder),
            "--T", "4", "--batch-size", "8", "--calib-batches", "2", *extra]


def test_evaluate_writes_json_csv_and_plots(checkpoint, folder, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert cli.main(_evaluate_args(checkpoint, folder, "--json", str(js), "--out", str(out))) == 0
    r = json.loads(js.read_text())
    assert r["T"] == 4 and r["levels"] == 8 and r["percentile"] == 99.0 and r["n_images"] == 3 * 12
    assert set(r["snn_top1"]) == {"1", "2", "3", "4"}
    assert 0 <= r["ann_top1"] <= 1 and all(0 <= v <= 1 for v in r["snn_top1"].values())
    assert r["calibration"].items() >= {"source": "evaluation set", "images": 16, "batches": 2}.items()
    assert set(r["energy_ratio"]) == {"1", "2", "3", "4"} and r["energy_ratio"]["4"] > r["energy_ratio"]["1"] > 0
    assert len(r["firing_rates"]["levels"]["pos"]) == 8
    assert json.loads((out / "results.json").read_text())["snn_top1"] == r["snn_top1"]
    assert (out / "results.csv").read_text().splitlines()[0] == "t,snn_top1,ann_top1,snn_top5,ann_top5,energy_ratio,energy_ratio_full"
    for png in ("accuracy.png", "firing_rates.png", "energy_ratio.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "Acc. (%)" in table and "Energy ratio" in table and "T=4" in table and "ecmt_test_vit" in table


def test_limit_and_seed_are_deterministic(checkpoint, folder, tmp_path):
    runs = []
    for i, seed in enumerate((1, 1, 2)):
        js = tmp_path / f"{i}.json"
        assert cli.main(_evaluate_args(checkpoint, folder, "--limit", "10", "--seed", str(seed),
                                       "--energy-batches", "0", "--json", str(js))) == 0
        runs.append(json.loads(js.read_text()))
    assert runs[0]["n_images"] == 10 and "energy_ratio" not in runs[0]
    assert runs[0]["snn_top1"] == runs[1]["snn_top1"] and runs[0]["ann_top1"] == runs[1]["ann_top1"]
    assert runs[0]["snn_top1"] != runs[2]["snn_top1"] or runs[0]["ann_top1"] != runs[2]["ann_top1"]


def test_saved_snn_reloads_bit_identical(checkpoint, tmp_path):
    bundle = load_model("ecmt_test_vit", checkpoint)
    x = torch.randn(6, 3, 16, 16)
    snn = ecmt.convert(bundle.model, ecmt.calibrate(bundle.model, [x], percentile=99.5), levels=5, rule="nearest")
    snn.spec = bundle.spec
    saved = serialization.read(serialization.save(snn, tmp_path / "s.safetensors", ann=bundle.model))
    assert saved.snn.levels == 5 and saved.snn.thresholds.percentile == 99.5 and saved.snn.spec == bundle.spec
    assert saved.info["rule"] == "nearest" and {n.rule for _, n in saved.snn.neurons()} == {"nearest"}
    assert saved.info["ecmt_version"] == ecmt.__version__ and saved.info["levels"] == 5
    assert torch.equal(ecmt.simulate(snn, x, 6), ecmt.simulate(saved.snn, x, 6))
    assert saved.ann is not None and torch.equal(saved.ann(x), bundle.model(x))
    assert serialization.read(serialization.save(snn, tmp_path / "no_ann.safetensors")).ann is None


def test_cli_convert_then_evaluate_snn_file(checkpoint, folder, tmp_path, capsys):
    f, direct, loaded = tmp_path / "snn.safetensors", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--levels", "6", "--percentile", "99.9", "--rule", "nearest"]
    assert cli.main(["convert", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint), "--dataset",
                     str(folder), "--batch-size", "8", "--calib-batches", "2", *common, "-o", str(f)]) == 0
    assert cli.main(_evaluate_args(checkpoint, folder, *common, "--json", str(direct))) == 0
    assert cli.main(["evaluate", "--snn", str(f), "--dataset", str(folder), "--T", "4", "--batch-size", "8",
                     "--json", str(loaded)]) == 0
    a, b = json.loads(direct.read_text()), json.loads(loaded.read_text())
    assert (b["levels"], b["percentile"], b["rule"], b["snn_file"]) == (6, 99.9, "nearest", str(f))
    assert a["snn_top1"] == b["snn_top1"] and a["ann_top1"] == b["ann_top1"]
    capsys.readouterr()
    assert cli.main(["evaluate", "--snn", str(f), "--dataset", str(folder), "--rule", "eq25"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rule are fixed by the --snn file" in err[0]


def test_incompatible_version_is_refused(checkpoint, folder, tmp_path, capsys):
    bundle = load_model("ecmt_test_vit", checkpoint)
    snn = ecmt.convert(bundle.model, ecmt.calibrate(bundle.model, [torch.randn(2, 3, 16, 16)]))
    snn.spec = bundle.spec
    path = serialization.save(snn, tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        info = json.loads(fh.metadata()["ecmt"])
    save_file(load_file(str(path)), str(path), metadata={"ecmt": json.dumps({**info, "ecmt_version": "99.0.0"})})
    with pytest.raises(IncompatibleFileError, match="99.0.0"):
        serialization.load(path)
    assert cli.main(["evaluate", "--snn", str(path), "--dataset", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by ecmt 99.0.0" in err and "convert the model again" in err
    save_file(load_file(str(path)), str(path))  # no metadata at all
    with pytest.raises(IncompatibleFileError, match="not an ecmt SNN file"):
        serialization.load(path)


def test_checkpoint_wrappers_prefix_and_class_count(tmp_path):
    model = _randomize(timm.create_model("ecmt_test_vit", num_classes=7))
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    bundle = load_model("ecmt_test_vit", path)
    assert bundle.num_classes == 7 and bundle.spec["kwargs"] == {"model_name": "ecmt_test_vit", "num_classes": 7}
    assert tuple(bundle.data_config["input_size"]) == (3, 16, 16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(bundle.model(x), model(x))
    assert from_spec(bundle.spec).num_classes == 7
    assert read_state_dict(path).keys() == model.state_dict().keys()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_dataset_calibrates_on_train_split(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 24), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ckpt = tmp_path / "gray.safetensors"
    save_file(_randomize(timm.create_model("ecmt_test_vit_gray")).state_dict(), str(ckpt))
    js = tmp_path / "r.json"
    assert cli.main(["evaluate", "--model", "ecmt_test_vit_gray", "--checkpoint", str(ckpt), "--dataset",
                     "fashion-mnist", "--data-root", str(tmp_path), "--T", "2", "--batch-size", "8",
                     "--calib-batches", "2", "--energy-batches", "0", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["n_images"] == 20
    assert r["calibration"].items() >= {"source": "train split", "images": 16, "batches": 2}.items()


def test_sweep_reuses_one_calibration(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint), "--dataset", str(folder),
                     "--levels", "2", "4", "--percentiles", "99", "99.9", "--T", "3", "--limit", "12",
                     "--batch-size", "12", "--calib-batches", "1", "--out", str(out)]) == 0
    r = json.loads((out / "sweep.json").read_text())
    assert [(run["levels"], run["percentile"]) for run in r["runs"]] == [(2, 99), (2, 99.9), (4, 99), (4, 99.9)]
    assert all(set(run["snn_top1"]) == {"1", "2", "3"} for run in r["runs"]) and r["n_images"] == 12
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 4 * 3
    assert "n=4 p=99.9" in capsys.readouterr().out


def test_debug_shows_the_exception(checkpoint, folder):
    with pytest.raises(CheckpointError):
        cli.main(["evaluate", "--model", "ecmt_test_vit", "--checkpoint", "/nonexistent.pth", "--debug"])


def tiny_snn_file(tmp_path: Path) -> Path:
    """A converted tiny ViT, saved with its ANN, whose spec needs no test code to rebuild."""
    spec = {"name": "tiny-vit", "builder": "vit", "num_classes": CLASSES,
            "kwargs": {"img_size": 16, "num_classes": CLASSES, **TINY},
            "data_config": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3,
                            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}}
    bundle = from_spec(spec)
    _randomize(bundle.model)
    snn = ecmt.convert(bundle.model, ecmt.calibrate(bundle.model, [torch.randn(4, 3, 16, 16)]), levels=4)
    snn.spec = bundle.spec
    return serialization.save(snn, tmp_path / "tiny.safetensors", ann=bundle.model)


def test_real_process_evaluates_a_saved_snn(folder, tmp_path):
    """``python -m ecmt`` in a fresh interpreter, on an SNN file whose spec needs no test code."""
    path = tiny_snn_file(tmp_path)
    js = tmp_path / "r.json"
    src = str(Path(ecmt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ecmt", "evaluate", "--snn", str(path), "--dataset", str(folder),
                           "--T", "3", "--json", str(js)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads(js.read_text())
    assert r["model"] == "tiny-vit" and r["levels"] == 4 and r["n_images"] == 36 and set(r["snn_top1"]) == {"1", "2", "3"}
    assert r["ann_top1"] is not None
    assert "Acc. (%)" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "ecmt", "evaluate", "--snn", str(path), "--T", "-1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "ecmt: error: argument --T: must be at least 1, got -1"


def test_tallies_add_and_survive_a_tensor_sum():
    a, b = Tally(10, (3, 7), 8), Tally(5, (1, 4), 5)
    assert a + b == Tally(15, (4, 11), 13) and (a + b).snn_top1() == {1: 4 / 15, 2: 11 / 15}
    assert Tally.from_tensor(a.to_tensor() + b.to_tensor()) == a + b
    no_ann = Tally(4, (1, 2))
    assert Tally.from_tensor(no_ann.to_tensor() * 2) == Tally(8, (2, 4)) and (no_ann + a).ann_top1 is None


def test_tune_replaces_the_percentile_and_is_recorded(checkpoint, folder, tmp_path, capsys):
    js = tmp_path / "tuned.json"
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune", "2", "--json", str(js), "--energy-batches", "0")) == 0
    r = json.loads(js.read_text())
    tuned = r["calibration"]["tuned"]
    assert r["percentile"] is None and tuned["tuned_T"] == 2 and tuned["simulations"] <= 20
    assert r["rule"] == "nearest"  # the default rule of --tune
    assert set(tuned["percentile_by_site_type"]) >= {"blocks.*.attn.qkv.neuron", "head.neuron"}
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("ecmt: tuning for T = 2: simulation ")]
    assert len(lines) == tuned["simulations"]  # stderr is no terminal here: one progress line per simulation
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune", "2", "--percentile", "99")) == 2
    assert "--tune" in capsys.readouterr().err


def test_tune_budget_bounds_the_search(checkpoint, folder, tmp_path, capsys):
    js = tmp_path / "tuned.json"
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune", "2", "--tune-budget", "2", "--json", str(js),
                                   "--energy-batches", "0")) == 0
    tuned = json.loads(js.read_text())["calibration"]["tuned"]
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("ecmt: tuning for T = 2: simulation ")]
    assert 1 <= tuned["simulations"] <= 2 and len(lines) == tuned["simulations"]
    assert all(" of at most 2, " in line for line in lines)
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune-budget", "2")) == 2  # no --tune
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ecmt: error: --tune-budget sets the budget of --tune: add --tune"]
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune", "2", "--tune-budget", "0")) == 2
    assert "--tune-budget" in capsys.readouterr().err


def test_tune_headroom_reaches_the_search(checkpoint, folder, tmp_path, capsys):
    js = tmp_path / "tuned.json"
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune", "2", "--tune-budget", "2", "--tune-headroom", "4",
                                   "--levels", "10", "--json", str(js), "--energy-batches", "0")) == 0
    assert json.loads(js.read_text())["calibration"]["tuned"]["headroom"] == 4.0
    capsys.readouterr()
    assert cli.main(_evaluate_args(checkpoint, folder, "--tune-headroom", "4")) == 2  # no --tune
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ecmt: error: --tune-headroom sets the headroom of --tune: add --tune"]
    for bad in ("0.5", "nan", "x"):
        assert cli.main(_evaluate_args(checkpoint, folder, "--tune", "2", "--tune-headroom", bad)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--tune-headroom" in err[0], err


def _analyze_args(checkpoint: Path, folder: Path, *extra: str) -> list[str]:
    return ["analyze", "--model", "ecmt_test_vit", "--checkpoint", str(checkpoint), "--dataset", str(folder),
            "--T", "3", "--batch-size", "8", "--calib-batches", "2", *extra]


def test_analyze_writes_json_and_plot_on_images_it_did_not_calibrate_on(checkpoint, folder, tmp_path, capsys):
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    assert cli.main(_analyze_args(checkpoint, folder, "--exact", "--channels", "2", "--json", str(js),
                                  "--plot", str(png))) == 0
    r = json.loads(js.read_text())
    assert r["n_inputs"] == 3 * 12 - 16  # the folder's 16 calibration images are left out
    assert r["task"] == "image" and r["T"] == 3 and r["views"] == ["alone", "removed"] and r["percentile"] == 99.0
    assert [e["block"] for e in r["layers"]] == ["blocks.0"] and r["outside"]["sites"] == 1  # depth 1, the head
    assert r["simulations"] == 2 + 2 * (len(r["site_types"]) + 2)
    assert r["all_exact_error"] < 1e-10 < r["error"]
    assert sum(e["share"] for e in r["site_types"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(len(s["top"]) == 2 for s in r["worst_sites"])
    assert {"model", "metric", "calibration", "sites", "additivity", "seconds", "ecmt_version"} <= set(r)
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "share of the error" in out and "by block: 0:" in out and "worst Linear input" in out


def test_analyze_takes_a_thresholds_file(checkpoint, folder, tmp_path):
    bundle = load_model("ecmt_test_vit", checkpoint)
    th = ecmt.calibrate(bundle.model, [torch.randn(8, 3, 16, 16)], percentile=95.0)
    (tmp_path / "th.json").write_text(th.to_json())
    js = tmp_path / "a.json"
    assert cli.main(_analyze_args(checkpoint, folder, "--thresholds", str(tmp_path / "th.json"), "--limit", "5",
                                  "--json", str(js))) == 0
    r = json.loads(js.read_text())
    assert r["percentile"] == 95.0 and r["n_inputs"] == 5 and r["calibration"] is None


@pytest.mark.parametrize("extra, message", [
    (["--plot", "out.txt"], "--plot out.txt: the file must end in"),
    (["--thresholds", "missing.json"], "cannot read --thresholds missing.json"),
    (["--thresholds", "bad.json"], "is not a thresholds file"),
    (["--thresholds", "other.json"], "no threshold for"),
    (["--thresholds", "bad.json", "--percentile", "90"], "--percentile: --thresholds gives the thresholds"),
    (["--tune", "--percentile", "90"], "--tune chooses the percentiles itself"),
    (["--max-tokens", "8"], "--max-tokens: these options are for text models"),
    (["--T", "0"], "--T: must be at least 1"),
])
def test_analyze_refuses_bad_input_in_one_line(checkpoint, folder, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(ecmt.Thresholds({"nowhere.neuron": (1.0, 1.0)}).to_json())
    assert cli.main(_analyze_args(checkpoint, folder, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ecmt: error: ") and message in err[0], err
