"""Bad input (issue 7): one test per case, through the command line and through the Python API.

The command line must end with exit status 2 and one line ``ecmt: error: ...`` that names the
problem and what to do, never a traceback; the API must raise a typed
:class:`ecmt.ConversionError`, never an AssertionError, a KeyError or a bare RuntimeError.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

import ecmt
from ecmt import cli, distributed, serialization, simulation
from ecmt.calibration import check_finite
from ecmt.data import open_dataset
from ecmt.errors import (CalibrationError, CheckpointError, DatasetError, IncompatibleFileError, InvalidInputError,
                         UnsupportedModelError)
from ecmt.evaluation import evaluate, loader
from ecmt.models import load_model

from test_cli import (CLASSES, TINY, _evaluate_args, _one_thread, _randomize, _write_idx,  # noqa: F401
                      checkpoint, folder)


@register_model
def ecmt_test_resnet(pretrained: bool = False, **kwargs) -> ResNet:
    """A timm-registered ResNet with a few hundred parameters: convolutions and batch norms."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}
    return ResNet(BasicBlock, [1, 1, 1, 1], channels=(4, 8, 8, 8), stem_width=4, **{"num_classes": CLASSES, **kwargs})


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the command line, which must fail with one line on stderr; return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecmt: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny(checkpoint):
    """The tiny ViT, its activation statistics and an SNN converted from them."""
    bundle = load_model("ecmt_test_vit", checkpoint)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stats = ecmt.collect_statistics(bundle.model, [x])
    snn = ecmt.convert(bundle.model, stats.thresholds(99.0), levels=4)
    snn.spec = bundle.spec
    return SimpleNamespace(bundle=bundle, model=bundle.model, x=x, stats=stats, snn=snn)


@pytest.fixture(scope="module")
def gray_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gray") / "gray.safetensors"
    save_file(_randomize(timm.create_model("ecmt_test_vit_gray")).state_dict(), str(path))
    return path


def _idx_root(root: Path, n_train: int, n_test: int) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def _gray_args(ckpt: Path, root: Path) -> list[str]:
    return ["evaluate", "--model", "ecmt_test_vit_gray", "--checkpoint", str(ckpt), "--dataset", "fashion-mnist",
            "--data-root", str(root), "--T", "2", "--batch-size", "8", "--calib-batches", "2"]


# --------------------------------------------------------------------------- checkpoints


def _write_checkpoint(kind: str, good: Path, tmp: Path) -> Path:
    """A bad checkpoint of the given kind, made from the good one."""
    pth = tmp / "tiny.pth"
    torch.save(timm.create_model("ecmt_test_vit").state_dict(), pth)
    if kind == "missing":
        return tmp / "nowhere.pth"
    if kind == "directory":
        (tmp / "ckpt.pth").mkdir()
        return tmp / "ckpt.pth"
    if kind == "unreadable":
        pth.chmod(0)
        if os.access(pth, os.R_OK):
            pytest.skip("this user (root) reads files whatever their permissions")
        return pth
    if kind.startswith("truncated"):
        src = good if kind.endswith("safetensors") else pth
        path = tmp / f"cut{src.suffix}"
        path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        return path
    if kind == "corrupt.safetensors":
        raw = bytearray(good.read_bytes())
        raw[8:48] = b"\x00" * 40  # inside the JSON header
        (tmp / "bad.safetensors").write_bytes(bytes(raw))
        return tmp / "bad.safetensors"
    if kind == "corrupt.pth":
        (tmp / "bad.pth").write_bytes(b"not a checkpoint" * 64)
        return tmp / "bad.pth"
    assert kind == "no state dict"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp / "meta.pth")
    return tmp / "meta.pth"


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found: check the path"),
    ("directory", "is a directory: give the weights file inside it"),
    ("unreadable", "permission denied; check the file's permissions"),
    ("truncated.safetensors", "truncated or corrupt; download or save it again"),
    ("truncated.pth", "truncated or corrupt; download or save it again"),
    ("corrupt.safetensors", "truncated or corrupt; download or save it again"),
    ("corrupt.pth", "truncated or corrupt; download or save it again"),
    ("no state dict", "no state dict found"),
])
def test_bad_checkpoint_file(checkpoint, folder, tmp_path, capsys, kind, message):
    path = _write_checkpoint(kind, checkpoint, tmp_path)
    err = cli_error(capsys, _evaluate_args(path, folder))
    assert str(path) in err and message in err
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_model("ecmt_test_vit", path)


def test_timm_model_without_checkpoint(folder, capsys):
    err = cli_error(capsys, ["evaluate", "--model", "ecmt_test_vit", "--dataset", str(folder)])
    assert "needs --checkpoint FILE" in err
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        load_model("ecmt_test_vit")


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found"),
    ("truncated", "cannot read SNN file"),
    ("corrupt", "cannot read SNN file"),
    ("checkpoint", "not an ecmt SNN file"),
])
def test_bad_snn_file(tiny, checkpoint, folder, tmp_path, capsys, kind, message):
    path = tmp_path / "s.safetensors"
    if kind == "checkpoint":  # a plain weights file where an SNN file is expected
        path = checkpoint
    elif kind != "missing":
        raw = serialization.save(tiny.snn, path).read_bytes()
        path.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else b"\xff" * 8 + raw[8:])
    err = cli_error(capsys, ["evaluate", "--snn", str(path), "--dataset", str(folder)])
    assert message in err
    error = IncompatibleFileError if kind == "checkpoint" else CheckpointError
    with pytest.raises(error, match=message):
        serialization.load(path)


def test_checkpoint_that_does_not_fit_lists_the_first_mismatches(folder, tmp_path, capsys):
    """Another depth and width: 12 unexpected keys and every shape differs; 5 of each are named."""
    other = VisionTransformer(**{"img_size": 16, "num_classes": CLASSES, **TINY, "depth": 2, "embed_dim": 24})
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    err = cli_error(capsys, _evaluate_args(path, folder))
    assert "does not fit VisionTransformer" in err and "is it a checkpoint of this architecture?" in err
    assert "12 unexpected: blocks.1.attn.proj.bias, " in err and "19 with another shape" in err
    assert "cls_token (1, 1, 24) vs (1, 1, 16)" in err
    assert err.count("blocks.1.") == 5 and err.count(") vs (") == 5 and err.count(", ...") == 2

    state = _randomize(timm.create_model("ecmt_test_vit")).state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    del state["norm.bias"]
    torch.save({"state_dict": state}, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"1 missing: norm\.bias.*blocks\.0\.attn\.qkv\.weight \(5, 5\)"):
        load_model("ecmt_test_vit", tmp_path / "bad.bin")


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_checkpoint_with_nan_or_inf_weights(folder, tmp_path, capsys, value):
    state = _randomize(timm.create_model("ecmt_test_vit")).state_dict()
    state["blocks.0.mlp.fc1.bias"][3] = value
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    err = cli_error(capsys, _evaluate_args(path, folder))
    assert "holds NaN or Inf values in 1 tensor(s): blocks.0.mlp.fc1.bias" in err and "earlier checkpoint" in err
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\): blocks\.0\.mlp\.fc1\.bias"):
        load_model("ecmt_test_vit", path)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name, message", [
    ("vit_smal_patch16_224", "did you mean vit_small_patch16_224"),
    ("fmnist-vti", "did you mean fmnist-vit"),
    ("no-such-architecture-at-all", "see timm.list_models()"),
])
def test_unknown_model_name_suggests_close_names(folder, capsys, name, message):
    err = cli_error(capsys, ["evaluate", "--model", name, "--checkpoint", "x.pth", "--dataset", str(folder)])
    assert f"unknown model '{name}'" in err and message in err
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(name, "x.pth")


def test_unsupported_architecture_names_its_modules_on_the_adapter_path():
    model = _randomize(timm.create_model("ecmt_test_resnet"))
    for call in (lambda: ecmt.calibrate(model, [torch.randn(1, 3, 32, 32)], path="adapter"),
                 lambda: ecmt.convert(model, {}, path="adapter"), lambda: ecmt.site_names(model, path="adapter")):
        with pytest.raises(UnsupportedModelError, match="Conv2d x13 at conv1") as e:
            call()
        assert "cannot convert ResNet: unsupported modules:" in str(e.value) and "MaxPool2d at maxpool" in str(e.value)
    th = ecmt.calibrate(model, [torch.randn(1, 3, 32, 32)])  # the generic path converts it, on the batch's shape
    assert ecmt.convert(model, th).path == "graph"


# --------------------------------------------------------------------------- datasets


def test_missing_dataset_path(checkpoint, tiny, tmp_path, capsys):
    path = tmp_path / "no" / "such" / "val"
    err = cli_error(capsys, _evaluate_args(checkpoint, path))
    assert f"unknown dataset '{path}' (no such dataset or directory)" in err and "ImageNet val layout" in err
    with pytest.raises(DatasetError, match="no such dataset or directory"):
        open_dataset(str(path), tiny.bundle.data_config, CLASSES)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="a file, not a directory"):
        open_dataset(str(tmp_path / "file.txt"), tiny.bundle.data_config, CLASSES)


@pytest.mark.parametrize("kind, message", [
    ("class directories without images", "holds no images"),
    ("no class directories", "has no class directories"),
    ("idx without test images", "fashion-mnist: the test split holds no images; check its IDX files"),
])
def test_empty_dataset(checkpoint, gray_checkpoint, tmp_path, capsys, kind, message):
    if kind.startswith("idx"):
        root = _idx_root(tmp_path, n_train=8, n_test=0)
        argv, name, classes = _gray_args(gray_checkpoint, root), "fashion-mnist", 10
        bundle = load_model("ecmt_test_vit_gray", gray_checkpoint)
    else:
        root = tmp_path / "val"
        root.mkdir()
        (root / "README.txt").write_text("no images here")
        for c in range(CLASSES if kind.startswith("class") else 0):
            (root / f"n0{c}").mkdir()
        argv, name, classes = _evaluate_args(checkpoint, root), str(root), CLASSES
        bundle = load_model("ecmt_test_vit", checkpoint)
    assert message in cli_error(capsys, argv)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        open_dataset(name, bundle.data_config, classes, root)


def test_data_that_does_not_fit_the_model(checkpoint, tiny, tmp_path, capsys):
    err = cli_error(capsys, _evaluate_args(checkpoint, "fashion-mnist"))  # RGB 16x16 model
    assert "fashion-mnist images are 1x28x28 but the model expects 3x16x16" in err
    (tmp_path / "one" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "a" / "x.png")
    err = cli_error(capsys, _evaluate_args(checkpoint, tmp_path / "one"))
    assert "has 1 class directories but the model predicts 3 classes" in err
    with pytest.raises(DatasetError, match="1x28x28 but the model expects 3x16x16"):
        open_dataset("fashion-mnist", tiny.bundle.data_config, CLASSES)
    # tensors given to the API directly: the model's own shape check becomes a typed error
    with pytest.raises(CalibrationError, match=r"calibration input of shape \(2, 3, 20, 20\).*height \(20\)"):
        ecmt.calibrate(tiny.model, [torch.randn(2, 3, 20, 20)])
    with pytest.raises(InvalidInputError, match=r"input of shape \(2, 1, 16, 16\).*channels"):
        ecmt.simulate(tiny.snn, torch.randn(2, 1, 16, 16), 2)


def test_empty_calibration_set(gray_checkpoint, tiny, tmp_path, capsys):
    err = cli_error(capsys, _gray_args(gray_checkpoint, _idx_root(tmp_path, n_train=0, n_test=10)))
    assert "the calibration set is empty: give at least one batch of inputs" in err
    for batches in ([], iter(()), ((x, y) for x, y in [])):
        with pytest.raises(CalibrationError, match="calibration set is empty"):
            ecmt.calibrate(tiny.model, batches)


# --------------------------------------------------------------------------- arguments


def _simulate(T):
    return lambda t: ecmt.simulate(t.snn, t.x, T)


ARGUMENT_CASES = [
    (["--T", "0"], "--T: must be at least 1, got 0", _simulate(0), InvalidInputError),
    (["--T", "-2"], "--T: must be at least 1, got -2", _simulate(-2), InvalidInputError),
    (["--T", "1.5"], "--T: expected an integer, got '1.5'", _simulate(1.5), InvalidInputError),
    (["--levels", "0"], "--levels: must be at least 1, got 0",
     lambda t: ecmt.convert(t.model, t.stats.thresholds(99.0), levels=0), InvalidInputError),
    (["--levels", "-1"], "--levels: must be at least 1, got -1",
     lambda t: ecmt.MTNeuron(1.0, 1.0, levels=-1), InvalidInputError),
    (["--percentile", "50"], "--percentile: must be in (50, 100], got 50",
     lambda t: t.stats.thresholds(50.0), CalibrationError),
    (["--percentile", "100.5"], "--percentile: must be in (50, 100], got 100.5",
     lambda t: ecmt.calibrate(t.model, [t.x], percentile=100.5), CalibrationError),
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0",
     lambda t: loader([t.x], 0), InvalidInputError),
    (["--batch-size", "-3"], "--batch-size: must be at least 1, got -3",
     lambda t: loader([t.x], -3), InvalidInputError),
    (["--bogus"], "unrecognized arguments: --bogus", None, None),
]


@pytest.mark.parametrize("argv, message, api, error", ARGUMENT_CASES, ids=[" ".join(c[0]) for c in ARGUMENT_CASES])
def test_argument_out_of_range(checkpoint, folder, tiny, capsys, argv, message, api, error):
    assert message in cli_error(capsys, _evaluate_args(checkpoint, folder, *argv))
    if api is not None:
        with pytest.raises(error, match=r"must be (a positive integer|in \(50, 100\]|an integer in 1\.\.16)"):
            api(tiny)


# --------------------------------------------------------------------------- values and devices


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_inputs_are_named(tiny, value):
    """The CLI's loaders cannot produce NaN pixels (see test_checkpoint_with_nan_or_inf_weights)."""
    x = tiny.x.clone()
    x[1, 2, 3, 4] = value
    where = r"holds 1 NaN or Inf value\(s\), the first at index \(1, 2, 3, 4\)"
    with pytest.raises(CalibrationError, match="calibration input " + where):
        ecmt.calibrate(tiny.model, [tiny.x, x])
    with pytest.raises(InvalidInputError, match="SNN input " + where):
        ecmt.simulate(tiny.snn, x, 3)
    with pytest.raises(InvalidInputError, match=r"input\['attention_mask'\] holds 1 NaN.*index \(0, 1\)"):
        check_finite({"input_ids": torch.ones(1, 3, dtype=torch.long),
                      "attention_mask": torch.tensor([[0.0, value, 0.0]])}, "input")
    broken = _randomize(timm.create_model("ecmt_test_vit"))
    with torch.no_grad():
        broken.blocks[0].mlp.fc1.bias[3] = value
    with pytest.raises(CalibrationError, match=r"activations hold NaN or Inf at \d+ site\(s\), first at "
                                               r"blocks\.0\.mlp\.fc2\.neuron, on finite inputs"):
        ecmt.calibrate(broken, [tiny.x])


def test_simulation_checks_its_input_once_not_at_every_step(tiny, monkeypatch):
    """The NaN check synchronises with the device: once per simulate call, outside the step loop."""
    calls = []
    monkeypatch.setattr(simulation, "check_finite", lambda *args, **kwargs: calls.append(args))
    ecmt.simulate(tiny.snn, tiny.x, 8)
    assert len(calls) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_where_none_is_available(checkpoint, folder, tiny, capsys):
    err = cli_error(capsys, _evaluate_args(checkpoint, folder, "--device", "cuda"))
    assert "CUDA is not available on this machine; use --device cpu" in err
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        evaluate(None, tiny.snn, [(tiny.x, torch.zeros(4, dtype=torch.long))], 2, device=torch.device("cuda"),
                 progress=False)
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        distributed.init("cuda")
