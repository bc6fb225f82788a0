"""Saving and loading converted SNNs.

One ``.safetensors`` file holds the state dict of ``snn.net`` (the weights, and the base
thresholds, which are buffers of the MT neurons); optionally the few ANN tensors that the SNN
does not share (conversion shares the Linear weights but EC modules keep copies of the
LayerNorms), under ``ann/<key>``, so that the ANN can be restored too; and, in its metadata
under the key ``"ecmt"``, a JSON record::

    {"format": "ecmt-snn", "ecmt_version": "0.1.0", "levels": 8, "percentile": 99.0, "rule": "eq25",
     "thresholds": {"percentile": 99.0, "rule": "eq25", "meta": {}, "sites": {site: [θ1, θ2]}},
     "spec": {...}, "ann": true, "digest": "sha256:..."}

``spec`` is the model spec of :mod:`ecmt.models` (a timm name and kwargs, or a HF config
and class); ``path`` the conversion path (``adapter``, or ``graph`` for the generic path, whose
graph is captured again on an input of the recorded shape). Loading rebuilds the architecture
from the spec, converts it with the recorded thresholds, spike rule, levels and path, and loads the state dict, so the
loaded SNN simulates bit-identically to the saved one (and the ANN computes what it did). Files written by another major version
of ecmt are refused.

Files are not trusted. Before anything is built, the record is checked against
:data:`SCHEMA` (types, bounds, known keys only; the model spec against the table of its
builder, :data:`SPEC_KINDS`), the architecture is built on the ``meta`` device and must not
hold more values than the file, and ``digest`` (SHA-256 over the record and the tensor data,
:func:`digest`) must match, so flipped bytes are found; the tensors must be finite and the
thresholds >= 0. Anything else is refused with :class:`ecmt.errors.InvalidFileError`.

Example:
    >>> save(snn, "fmnist-vit.snn.safetensors", ann=bundle.model)   # doctest: +SKIP
    >>> snn = load("fmnist-vit.snn.safetensors")         # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import __version__
from .conversion import SpikingModel, convert
from .errors import CheckpointError, ConversionError, IncompatibleFileError, InvalidFileError, OutputError
from .models import ModelBundle, from_spec
from .neurons import MAX_LEVELS, RULES
from .thresholds import Thresholds

FORMAT = "ecmt-snn"
METADATA_KEY = "ecmt"
ANN_PREFIX = "ann/"
"""Key prefix of the ANN tensors stored beside the SNN's (no module path contains a slash)."""
MAX_LISTED = 5

PathLike = Union[str, Path]


@dataclass(frozen=True)
class SavedSNN:
    """What a saved SNN file restores.

    Attributes:
        snn: The spiking network, with ``spec`` set.
        bundle: The rebuilt model bundle (preprocessing, number of classes, spec).
        ann: The ANN with its weights, if it was saved with the SNN; else None.
        info: The file's metadata record.
    """

    snn: SpikingModel
    bundle: ModelBundle
    ann: Optional[nn.Module]
    info: Mapping[str, Any]


# --------------------------------------------------------------------------- schema

Check = Callable[[Any, str], None]
"""A schema rule: raises :class:`InvalidFileError` naming ``where`` if the value does not fit."""


def _at(where: str, key: Any) -> str:
    """``where.key``; a key from the file that is not printable text (a newline, say) is quoted as
    JSON, ``where["…\\n…"]``, so that an error naming it stays one line."""
    text = str(key)
    return f"{where}.{text}" if text.isprintable() else f"{where}[{json.dumps(text)}]"


def _listed(keys: Sequence[str]) -> str:
    """The first :data:`MAX_LISTED` names (from a file: each quoted as JSON unless printable), then ``...``."""
    shown = [k if k.isprintable() else json.dumps(k) for k in keys[:MAX_LISTED]]
    return ", ".join(shown) + (", ..." if len(keys) > MAX_LISTED else "")


def _refuse(where: str, what: str, value: Any) -> None:
    shown = json.dumps(value)[:60] if _jsonable(value) else type(value).__name__
    raise InvalidFileError(f"{where}: expected {what}, got {shown}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def Int(low: int, high: int) -> Check:  # noqa: N802 - rule constructors read like types
    """An integer (not a bool) in ``low..high``."""
    def check(v: Any, where: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            _refuse(where, f"an integer in {low}..{high}", v)
    return check


def Num(low: float, high: float) -> Check:  # noqa: N802
    """A finite number (not a bool) in ``[low, high]``."""
    def check(v: Any, where: str) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and low <= v <= high):
            _refuse(where, f"a number in [{low:g}, {high:g}]", v)
    return check


def Bool(v: Any, where: str) -> None:  # noqa: N802
    if not isinstance(v, bool):
        _refuse(where, "true or false", v)


def Str(max_len: int = 256) -> Check:  # noqa: N802
    def check(v: Any, where: str) -> None:
        if not isinstance(v, str) or not v or len(v) > max_len:
            _refuse(where, f"a string of 1..{max_len} characters", v)
    return check


def Choice(*values: Any) -> Check:  # noqa: N802
    def check(v: Any, where: str) -> None:
        if not any(v == c and type(v) is type(c) for c in values):
            _refuse(where, "one of " + ", ".join(json.dumps(c) for c in values), v)
    return check


def Opt(rule: Check) -> Check:  # noqa: N802
    """``rule``, or null."""
    def check(v: Any, where: str) -> None:
        if v is not None:
            rule(v, where)
    return check


def ListOf(rule: Check, low: int, high: int) -> Check:  # noqa: N802
    """A list of ``low..high`` items, each fitting ``rule``."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, list) or not low <= len(v) <= high:
            _refuse(where, f"a list of {low}..{high} items", v)
        for i, item in enumerate(v):
            rule(item, f"{where}[{i}]")
    return check


def Either(*rules: Check) -> Check:  # noqa: N802
    """The first of ``rules`` that fits (the message is the last one's)."""
    def check(v: Any, where: str) -> None:
        for rule in rules[:-1]:
            try:
                return rule(v, where)
            except InvalidFileError:
                pass
        rules[-1](v, where)
    return check


def Record(fields: Mapping[str, Check], required: Sequence[str] = (),  # noqa: N802
           extra: Optional[Check] = None) -> Check:
    """A JSON object with the keys of ``fields`` (each fitting its rule), all of ``required``, and other
    keys only if ``extra`` is given (each value fitting it)."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            _refuse(where, "an object", v)
        missing = [k for k in required if k not in v]
        unknown = [k for k in v if k not in fields and extra is None]
        if missing or unknown:
            raise InvalidFileError(f"{where}: " + "; ".join(
                [f"missing {', '.join(map(repr, missing))}"] * bool(missing)
                + [f"unknown key(s) {', '.join(map(repr, unknown[:5]))}"] * bool(unknown)))
        for k, value in v.items():
            fields.get(k, extra)(value, _at(where, k))  # type: ignore[misc]
    return check


def Json(max_chars: int) -> Check:  # noqa: N802
    """Any JSON value of at most ``max_chars`` characters (free-form records such as a search's log)."""
    def check(v: Any, where: str) -> None:
        if not _jsonable(v) or len(json.dumps(v)) > max_chars:
            _refuse(where, f"a JSON value of at most {max_chars} characters", v)
    return check


def TimmName(v: Any, where: str) -> None:  # noqa: N802
    """An architecture of timm's registry: never a hub id (``hf-hub:...``) or a path."""
    import timm

    if not isinstance(v, str) or ":" in v or "/" in v or "\\" in v or not timm.is_model(v):
        _refuse(where, "the name of a timm architecture (no hub id, no path)", v)


SIZE = Int(1, 4096)
PAIR = Either(SIZE, ListOf(SIZE, 2, 2))
RATE = Num(0.0, 1.0)
CLASSES = Int(0, 100_000)

VIT_KWARGS: dict[str, Check] = {
    "img_size": PAIR, "patch_size": PAIR, "in_chans": Int(1, 16), "num_classes": CLASSES,
    "global_pool": Choice("", "avg", "avgmax", "max", "token", "map"), "embed_dim": Int(1, 16384),
    "depth": Int(1, 256), "num_heads": Int(1, 256), "mlp_ratio": Num(0.01, 64.0), "qkv_bias": Bool,
    "qk_norm": Bool, "proj_bias": Bool, "init_values": Opt(Num(0.0, 1e6)), "class_token": Bool,
    "pos_embed": Choice("", "none", "learn"), "no_embed_class": Bool, "reg_tokens": Int(0, 256), "pre_norm": Bool,
    "final_norm": Bool, "fc_norm": Opt(Bool), "dynamic_img_size": Bool, "dynamic_img_pad": Bool,
    "drop_rate": RATE, "pos_drop_rate": RATE, "patch_drop_rate": RATE, "proj_drop_rate": RATE,
    "attn_drop_rate": RATE, "drop_path_rate": RATE, "weight_init": Choice("", "jax", "jax_nlhb", "moco"),
}
"""Arguments of timm's ``VisionTransformer`` a file may give (the ``"vit"`` builder), with bounds."""

COUNTS = Either(Int(1, 256), ListOf(Int(1, 256), 1, 16))
TIMM_KWARGS: dict[str, Check] = {
    "model_name": TimmName, "num_classes": CLASSES, "img_size": PAIR, "in_chans": Int(1, 16),
    "patch_size": PAIR, "depth": Int(1, 256), "depths": ListOf(Int(0, 256), 1, 16), "depth_token_only": Int(0, 64),
    "embed_dim": Either(Int(1, 16384), ListOf(Int(1, 16384), 1, 16)), "num_heads": COUNTS,
    "window_size": PAIR, "mlp_ratio": Num(0.01, 64.0), "qk_norm": Bool, "class_token": Bool,
    "global_pool": Choice("", "avg", "avgmax", "max", "token", "map"), "reg_tokens": Int(0, 256),
}
"""Arguments of ``timm.create_model`` a file may give (the ``"timm"`` builder); never ``pretrained``,
``checkpoint_path``, ``pretrained_cfg_overlay`` or anything else that reads a file or the network."""

HF_CONFIG_BOUNDS: dict[str, Check] = {
    "model_type": Choice("bert", "roberta", "distilbert", "xlm-roberta", "camembert", "electra", "mpnet", "vit",
                         "dinov2", "llama", "qwen2", "mistral", "gpt2"),
    "num_key_value_heads": Int(1, 256), "n_embd": Int(1, 16384), "n_layer": Int(1, 256), "n_head": Int(1, 256),
    "n_positions": Int(1, 65536), "n_inner": Opt(Int(1, 65536)), "image_size": Int(1, 4096), "patch_size": Int(1, 4096),
    "hidden_size": Int(1, 16384), "num_hidden_layers": Int(1, 256), "num_attention_heads": Int(1, 256),
    "intermediate_size": Int(1, 65536), "vocab_size": Int(1, 1_000_000), "max_position_embeddings": Int(1, 65536),
    "type_vocab_size": Int(0, 1024), "dim": Int(1, 16384), "n_layers": Int(1, 256), "n_heads": Int(1, 256),
    "hidden_dim": Int(1, 65536),
}
"""HuggingFace config entries that size the model, with bounds; other entries may be any small JSON value."""


def HFConfig(v: Any, where: str) -> None:  # noqa: N802
    """A HuggingFace config dict: known model type, bounded sizes, no more than 64 KB of JSON."""
    Json(65536)(v, where)
    if not isinstance(v, dict) or "model_type" not in v:
        _refuse(where, "a HuggingFace config object with a model_type", v)
    for key, rule in HF_CONFIG_BOUNDS.items():
        if key in v:
            rule(v[key], _at(where, key))


SPEC_KINDS: dict[str, dict[str, Check]] = {
    "vit": VIT_KWARGS,
    "timm": TIMM_KWARGS,
    "transformers": {"config": HFConfig, "attn_implementation": Opt(Choice("eager", "sdpa")), "pooler": Bool,
                     "class": Opt(Str(128))},
}
"""Model spec builder -> the ``"kwargs"`` it may take. A new kind of spec is one entry here (and its
builder in :func:`ecmt.models.register_builder`); ``"model_name"`` and ``"config"`` are required where
present in the table."""

REQUIRED_KWARGS = ("model_name", "config")

DATA_CONFIG: dict[str, Check] = {
    "input_size": ListOf(SIZE, 3, 3), "mean": ListOf(Num(-1e3, 1e3), 1, 16), "std": ListOf(Num(1e-6, 1e3), 1, 16),
    "interpolation": Choice("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random"),
    "crop_pct": Num(0.01, 1.0), "crop_mode": Choice("center", "squash", "border"),
}

TEXT_HEAD: dict[str, Check] = {
    "source": Str(4096), "pooling": Choice("mean", "cls"), "normalize": Bool, "max_length": Int(1, 65536),
}
LM_HEAD: dict[str, Check] = {"source": Str(4096), "max_length": Int(1, 65536)}
"""A causal LM's record (:func:`ecmt.lm.lm_spec`): where its tokenizer is found, and its length limit."""


def _spec(v: Any, where: str) -> None:
    from .data import DATASETS

    Record({"name": Str(), "builder": Choice(*SPEC_KINDS), "kwargs": Json(1 << 20), "num_classes": CLASSES,
            "data_config": Record(DATA_CONFIG), "dataset": Opt(Choice(*DATASETS)), "text": Record(TEXT_HEAD),
            "lm": Record(LM_HEAD, required=tuple(LM_HEAD))},
           required=("name", "builder", "kwargs", "num_classes", "data_config"))(v, where)
    table = SPEC_KINDS[v["builder"]]
    Record(table, required=[k for k in REQUIRED_KWARGS if k in table])(v["kwargs"], f"{where}.kwargs")
    channels = v["data_config"].get("input_size", [None])[0]
    for key in ("mean", "std"):
        if channels is not None and key in v["data_config"] and len(v["data_config"][key]) != channels:
            _refuse(f"{where}.data_config.{key}", f"{channels} values (one per input channel)", v["data_config"][key])


THRESHOLD = Num(0.0, 1e30)
THRESHOLD_PAIR = ListOf(Either(THRESHOLD, ListOf(THRESHOLD, 1, 65536)), 2, 2)
"""``[θ1, θ2]``: numbers, or lists of one number per channel (per-channel thresholds)."""

MAX_EXAMPLE = 1 << 24
"""Elements of the example input a file may ask for (graph capture allocates it)."""


def _example(v: Any, where: str) -> None:
    """The signature of the calibration input (:func:`ecmt.graph.capture.signature`), with bounded sizes."""
    tensor = Record({"shape": ListOf(Int(1, 65536), 0, 8),
                     "dtype": Choice("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")},
                    required=("shape", "dtype"))
    if isinstance(v, dict) and "kwargs" in v:
        Record({"kwargs": Json(1 << 14)}, required=("kwargs",))(v, where)
        if not isinstance(v["kwargs"], dict) or len(v["kwargs"]) > 16:
            _refuse(f"{where}.kwargs", "an object of at most 16 inputs", v["kwargs"])
        items = list(v["kwargs"].items())
    else:
        items = [("", v)]
    for key, t in items:
        tensor(t, _at(where, key) if key else where)
        if math.prod(t["shape"]) > MAX_EXAMPLE:
            _refuse(_at(where, key) if key else where, f"at most {MAX_EXAMPLE} elements", t["shape"])


def _sites(v: Any, where: str) -> None:
    if not isinstance(v, dict) or not 1 <= len(v) <= 1_000_000:
        _refuse(where, "an object of 1..1000000 sites", v)
    for name, pair in v.items():
        Str(1024)(name, f"{where} key")
        THRESHOLD_PAIR(pair, _at(where, name))


PERCENTILE = Opt(Num(0.0, 100.0))

SCHEMA: Check = Record({
    "format": Choice(FORMAT), "ecmt_version": Str(32), "levels": Int(1, MAX_LEVELS), "percentile": PERCENTILE,
    "rule": Choice(*RULES), "ann": Bool, "digest": Str(80), "spec": _spec,
    "thresholds": Record({"percentile": PERCENTILE, "rule": Choice(*RULES), "meta": Json(1 << 20), "sites": _sites,
                          "example": Opt(_example)}, required=("sites",)),
    "path": Choice("adapter", "graph"),
}, required=("format", "ecmt_version", "levels", "rule", "ann", "digest", "spec", "thresholds"))
"""The metadata record of an SNN file. Extend :data:`SPEC_KINDS` (or the tables it names) for new models."""


def digest(info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the record (without ``digest``, as canonical JSON) and every tensor's name, dtype,
    shape and bytes, in key order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in info.items() if k != "digest"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _major(version: str) -> str:
    return version.split(".")[0]


def save(snn: SpikingModel, path: PathLike, ann: Optional[nn.Module] = None) -> Path:
    """Write ``snn`` to ``path`` (a ``.safetensors`` file).

    Args:
        snn: The converted network; ``snn.spec`` must be set.
        path: The file to write.
        ann: The ANN ``snn`` was converted from: its tensors that the SNN does not share are
            saved too, so that :func:`read` restores it (for ANN-vs-SNN comparisons).

    Raises:
        OutputError: The file cannot be written.
        ConversionError: ``snn.spec`` is None: the SNN was converted from a model built by
            hand, so the file could not be loaded again (convert a model from
            :func:`ecmt.models.load_model` and set ``snn.spec = bundle.spec``).
    """
    from safetensors.torch import save_file

    if snn.spec is None:
        raise ConversionError("cannot save an SNN without a model spec (snn.spec is None); "
                              "convert a model from ecmt.models.load_model and set snn.spec = bundle.spec")
    info = {
        "format": FORMAT,
        "ecmt_version": __version__,
        "levels": snn.levels,
        "percentile": snn.thresholds.percentile,
        "rule": snn.thresholds.rule.value,
        "thresholds": json.loads(snn.thresholds.to_json()),
        "spec": dict(snn.spec),
        "path": getattr(snn, "path", "adapter"),
        "ann": ann is not None,
    }
    net = snn.net.state_dict()
    state = dict(net)
    if ann is not None:
        shared = {t.data_ptr() for t in net.values()}
        state.update({ANN_PREFIX + k: t for k, t in ann.state_dict().items() if t.data_ptr() not in shared})
    # clone: safetensors refuses tensors that share memory (tied weights)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    info["digest"] = digest(info, state)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={METADATA_KEY: json.dumps(info)})
    except Exception as e:  # OSError, or safetensors' own error type for I/O errors
        raise OutputError(f"cannot write the SNN file {path}: {' '.join(str(e).split())}") from None
    return path


def read_info(path: PathLike) -> dict[str, Any]:
    """The metadata record of a saved SNN, checked for format and version and against :data:`SCHEMA`.

    Raises:
        CheckpointError: The file is missing or is not a safetensors file.
        IncompatibleFileError: Not an ecmt SNN file, or written by another major version.
        InvalidFileError: The record does not fit the schema.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SNN file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read SNN file {path}: {e}") from None
    try:
        info = json.loads(meta[METADATA_KEY])
        fmt, version = info["format"], str(info["ecmt_version"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise IncompatibleFileError(f"{path} is not an ecmt SNN file (no '{METADATA_KEY}' metadata)") from None
    if fmt != FORMAT or _major(version) != _major(__version__):
        raise IncompatibleFileError(f"{path} was written by ecmt {version} (format {fmt!r}); "
                                    f"this is ecmt {__version__}: convert the model again")
    if "digest" not in info:
        raise IncompatibleFileError(f"{path} was written before SNN files held a digest of their data; "
                                    "convert the model again")
    try:
        SCHEMA(info, "metadata")
    except InvalidFileError as e:
        raise InvalidFileError(f"SNN file {path} is refused: {e}; convert the model again") from None
    return info


def _build(spec: Mapping[str, Any], path: Path, device: Optional[str] = None) -> ModelBundle:
    """:func:`from_spec`, any failure of the builder on the file's arguments reported as InvalidFileError."""
    try:
        if device is None:
            return from_spec(spec)
        with torch.device(device):
            return from_spec(spec)
    except ConversionError:
        raise
    except Exception as e:  # builders reject argument combinations in many ways (asserts, TypeErrors)
        raise InvalidFileError(f"SNN file {path} is refused: its model spec does not build "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _check_size(spec: Mapping[str, Any], path: Path) -> None:
    """Refuse a spec whose model holds more values than the file: built on ``meta``, nothing is allocated."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    model = _build(spec, path, "meta").model
    saved = model.state_dict().keys()  # tied weights (GPT-2's lm_head and wte) are one tensor, counted once
    needed = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers() if n in saved)
    if needed > stored:
        raise InvalidFileError(f"SNN file {path} is refused: its model spec describes {needed:,} weights "
                               f"but the file holds {stored:,} values")


def _check_data(info: Mapping[str, Any], stored: Mapping[str, Tensor], path: Path) -> None:
    """The digest matches, and every floating-point tensor is finite."""
    if digest(info, stored) != info["digest"]:
        raise InvalidFileError(f"SNN file {path} is corrupt: its data do not match the digest in its metadata "
                               "(changed or damaged bytes); convert the model again or restore the file")
    bad = [k for k, v in stored.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InvalidFileError(f"SNN file {path} holds NaN or Inf values in {len(bad)} tensor(s): "
                               f"{_listed(bad)}")


def read(path: PathLike) -> SavedSNN:
    """Load a saved SNN with its model bundle (and its ANN, if it was saved).

    Raises:
        CheckpointError: Unreadable file, or weights that do not fit the rebuilt network.
        IncompatibleFileError: See :func:`read_info`.
        InvalidFileError: Metadata outside the schema, a model larger than the file, data that do not
            match the digest, NaN/Inf values or negative thresholds.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = read_info(path)
    _check_size(info["spec"], path)
    try:
        stored = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(f"cannot read SNN file {path}: {' '.join(str(e).split())}") from None
    _check_data(info, stored, path)
    bundle = _build(info["spec"], path)
    thresholds = Thresholds.from_json(json.dumps(info["thresholds"]))
    how = info.get("path", "adapter")
    if how not in ("adapter", "graph"):
        raise IncompatibleFileError(f"{path}: {how!r} is not a conversion path (adapter or graph)")
    snn = convert(bundle.model, thresholds, levels=info["levels"], path=how)
    snn.spec = bundle.spec
    state = {k: v for k, v in stored.items() if not k.startswith(ANN_PREFIX)}
    own = snn.net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt {bundle.name} "
                              f"(missing: {_listed(missing) or '-'}; unexpected: {_listed(unexpected) or '-'}; "
                              f"other shape: {_listed(shapes) or '-'})")
    snn.net.load_state_dict(state)  # also writes the ANN tensors the SNN shares
    bad = [name for name, n in snn.neurons()
           if bool((n.theta < 0).any()) or not bool(torch.isfinite(n.theta * 2.0 ** (n.levels - 1)).all())]
    if bad:
        raise InvalidFileError(f"SNN file {path} holds negative or overflowing thresholds at {len(bad)} site(s): "
                               f"{', '.join(bad[:MAX_LISTED])}")
    ann = None
    if info.get("ann"):
        ann = bundle.model
        rest = {k[len(ANN_PREFIX):]: v for k, v in stored.items() if k.startswith(ANN_PREFIX)}
        shared = {t.data_ptr() for t in snn.net.state_dict().values()}
        lost = [k for k, t in ann.state_dict().items() if k not in rest and t.data_ptr() not in shared]
        try:
            unexpected = ann.load_state_dict(rest, strict=False).unexpected_keys
        except RuntimeError:  # shape mismatches
            unexpected = ["(other shapes)"]
        if lost or unexpected:
            raise CheckpointError(f"{path}: the saved ANN does not fit the rebuilt {bundle.name}")
    return SavedSNN(snn, bundle, ann, info)


def load(path: PathLike) -> SpikingModel:
    """Load a saved SNN; ``snn.spec`` is set, so it can be saved again."""
    return read(path).snn

