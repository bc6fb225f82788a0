"""Saving and loading converted SNNs.

One ``.safetensors`` file holds the state dict of ``snn.net`` (the weights, and the base
thresholds, which are buffers of the MT neurons); optionally the few ANN tensors that the SNN
does not share (conversion shares the Linear weights but EC modules keep copies of the
LayerNorms), under ``ann/<key>``, so that the ANN can be restored too; and, in its metadata
under the key ``"ecmt"``, a JSON record::

    {"format": "ecmt-snn", "ecmt_version": "0.1.0", "levels": 8, "percentile": 99.0, "rule": "eq25",
     "thresholds": {"percentile": 99.0, "rule": "eq25", "meta": {}, "sites": {site: [θ1, θ2]}},
     "spec": {...}, "ann": true}

``spec`` is the model spec of :mod:`ecmt.models` (a timm name and kwargs, or a HF config
and class); ``path`` the conversion path (``adapter``, or ``graph`` for the generic path, whose
graph is captured again on an input of the recorded shape). Loading rebuilds the architecture
from the spec, converts it with the recorded thresholds, spike rule, levels and path, and loads the state dict, so the
loaded SNN simulates bit-identically to the saved one (and the ANN computes what it did). Files written by another major version
of ecmt are refused.

Example:
    >>> save(snn, "fmnist-vit.snn.safetensors", ann=bundle.model)   # doctest: +SKIP
    >>> snn = load("fmnist-vit.snn.safetensors")         # doctest: +SKIP
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from . import __version__
from .conversion import SpikingModel, convert
from .errors import CheckpointError, ConversionError, IncompatibleFileError
from .models import ModelBundle, from_spec
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(info)})
    return path


def read_info(path: PathLike) -> dict[str, Any]:
    """The metadata record of a saved SNN, checked for format and version.

    Raises:
        CheckpointError: The file is missing or is not a safetensors file.
        IncompatibleFileError: Not an ecmt SNN file, or written by another major version.
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
    except (KeyError, TypeError, ValueError):
        raise IncompatibleFileError(f"{path} is not an ecmt SNN file (no '{METADATA_KEY}' metadata)") from None
    if fmt != FORMAT or _major(version) != _major(__version__):
        raise IncompatibleFileError(f"{path} was written by ecmt {version} (format {fmt!r}); "
                                    f"this is ecmt {__version__}: convert the model again")
    return info


def read(path: PathLike) -> SavedSNN:
    """Load a saved SNN with its model bundle (and its ANN, if it was saved).

    Raises:
        CheckpointError: Unreadable file, or weights that do not fit the rebuilt network.
        IncompatibleFileError: See :func:`read_info`.
    """
    from safetensors.torch import load_file

    info = read_info(path)
    bundle = from_spec(info["spec"])
    thresholds = Thresholds.from_json(json.dumps(info["thresholds"]))
    how = info.get("path", "adapter")
    if how not in ("adapter", "graph"):
        raise IncompatibleFileError(f"{path}: {how!r} is not a conversion path (adapter or graph)")
    snn = convert(bundle.model, thresholds, levels=int(info["levels"]), path=how)
    snn.spec = bundle.spec
    stored = load_file(str(path))
    state = {k: v for k, v in stored.items() if not k.startswith(ANN_PREFIX)}
    own = snn.net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:MAX_LISTED]) + (", ..." if len(keys) > MAX_LISTED else "")
        raise CheckpointError(f"{path}: weights do not fit the rebuilt {bundle.name} "
                              f"(missing: {listed(missing) or '-'}; unexpected: {listed(unexpected) or '-'}; "
                              f"other shape: {listed(shapes) or '-'})")
    snn.net.load_state_dict(state)  # also writes the ANN tensors the SNN shares
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

