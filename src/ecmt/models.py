"""Loading the ANN to convert, by name: a reference model of the zoo or a timm model.

* **Reference models** (``fmnist-vit``) ship their weights and preprocessing in
  :mod:`ecmt.zoo`.
* **timm models**: any name of ``timm.list_models()`` together with a local checkpoint
  (``.safetensors``, ``.pth``/``.pt`` or ``.bin``). Nothing is downloaded. The state dict is
  found inside the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``,
  ``{"model_ema": ...}``), a ``module.`` prefix (DistributedDataParallel) is stripped, and the
  number of classes is read from the checkpoint's classifier when it differs from the
  architecture's default.

Every loaded model comes as a :class:`ModelBundle` that also carries its preprocessing and a
*spec*: a small JSON-able dict from which :func:`from_spec` rebuilds the architecture (with
untrained weights), which is how :mod:`ecmt.serialization` restores a saved SNN. Sentence
encoders (:mod:`ecmt.text`) are loaded there; their specs use the ``"transformers"`` builder.

Example:
    >>> bundle = load_model("vit_small_patch16_224", checkpoint="vit_s.safetensors")  # doctest: +SKIP
    >>> bundle.num_classes, bundle.data_config["input_size"]                          # doctest: +SKIP
    (1000, (3, 224, 224))
"""
from __future__ import annotations

import difflib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, UnsupportedModelError

PathLike = Union[str, Path]

REFERENCE_MODELS: dict[str, str] = {"fmnist-vit": "fmnist_vit"}
"""Reference model name -> file stem of its weights and config in :mod:`ecmt.zoo`."""

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "model_ema", "state_dict_ema")
"""Keys under which training scripts nest the weights, in the order they are tried."""

PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel and torch.compile, stripped when loading."""

MAX_LISTED = 5
"""How many mismatched keys an error message names."""


@dataclass(frozen=True)
class ModelBundle:
    """An ANN ready for conversion, with what is needed to feed and rebuild it.

    Attributes:
        name: The name it was loaded by (``"fmnist-vit"``, ``"vit_small_patch16_224"``).
        model: The network, float32, in eval mode.
        data_config: timm-style preprocessing: ``input_size`` (C, H, W), ``mean``, ``std``,
            and for image folders ``interpolation``, ``crop_pct``, ``crop_mode``.
        num_classes: Number of outputs of the classifier.
        spec: JSON-able description from which :func:`from_spec` rebuilds the architecture.
        dataset: The dataset a reference model was trained on (its default), else None.
    """

    name: str
    model: nn.Module
    data_config: Mapping[str, Any]
    num_classes: int
    spec: Mapping[str, Any]
    dataset: Optional[str] = None


Builder = Callable[[Mapping[str, Any]], nn.Module]
"""Builds an untrained model from the ``"kwargs"`` of a spec."""

_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, builder: Builder) -> None:
    """Make ``{"builder": name, ...}`` specs rebuildable (for model families added later)."""
    _BUILDERS[name] = builder


def _build_vit(kwargs: Mapping[str, Any]) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**kwargs)


def _build_timm(kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    kwargs = dict(kwargs)
    return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)


def _build_transformers(kwargs: Mapping[str, Any]) -> nn.Module:
    """A HuggingFace model from its config and class (specs of :func:`ecmt.text.encoder_spec`).

    The class must be one of transformers' model classes (``LlamaForCausalLM``); without one,
    the config's base model (``AutoModel``).
    """
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel

    config = dict(kwargs["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    name = kwargs.get("class")
    cls = getattr(transformers, str(name), None) if name else None
    if name and not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UnsupportedModelError(f"{name!r} is not a transformers model class")
    if cls is not None:
        config._attn_implementation = kwargs.get("attn_implementation") or "sdpa"
        model = cls(config)
    else:
        model = AutoModel.from_config(config, attn_implementation=kwargs.get("attn_implementation"))
    if not kwargs.get("pooler", True) and getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


register_builder("vit", _build_vit)
register_builder("timm", _build_timm)
register_builder("transformers", _build_transformers)


def from_spec(spec: Mapping[str, Any]) -> ModelBundle:
    """Rebuild a bundle's architecture, with untrained weights, from its ``spec``.

    Raises:
        UnsupportedModelError: The spec names a builder this version does not have.
    """
    builder = _BUILDERS.get(spec.get("builder", ""))
    if builder is None:
        raise UnsupportedModelError(f"unknown model builder {spec.get('builder')!r} in model spec; "
                                    f"known: {', '.join(sorted(_BUILDERS))}")
    model = builder(spec["kwargs"]).float().eval()
    return ModelBundle(spec["name"], model, _tuples(spec["data_config"]), int(spec["num_classes"]), spec,
                       spec.get("dataset"))


def _tuples(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A data config with its lists (as read back from JSON) turned into tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def model_names() -> list[str]:
    """Every name :func:`load_model` accepts: reference models first, then timm's."""
    import timm

    return [*REFERENCE_MODELS, *timm.list_models()]


def load_model(name: str, checkpoint: Optional[PathLike] = None) -> ModelBundle:
    """Load a model by name.

    Args:
        name: A reference model (``"fmnist-vit"``) or a timm architecture name.
        checkpoint: Weights for a timm model (required: nothing is downloaded). Not
            accepted for reference models, which ship their weights.

    Raises:
        UnsupportedModelError: Unknown name (the message suggests close names).
        CheckpointError: Missing, unreadable or mismatching weights.
    """
    if name in REFERENCE_MODELS:
        if checkpoint is not None:
            raise CheckpointError(f"{name} is a reference model with its own weights; "
                                  "--checkpoint is for timm models")
        return _load_reference(name)
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, model_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UnsupportedModelError(f"unknown model {name!r}{hint}")
    if checkpoint is None:
        raise CheckpointError(f"timm model {name} needs --checkpoint FILE (weights are never downloaded)")
    return _load_timm(name, Path(checkpoint))


def _load_reference(name: str) -> ModelBundle:
    from safetensors.torch import load_file

    from .zoo import ZOO_DIR, load_model_config

    stem = REFERENCE_MODELS[name]
    weights = ZOO_DIR / f"{stem}.safetensors"
    if not weights.is_file() or not (ZOO_DIR / f"{stem}.json").is_file():
        raise CheckpointError(f"reference model {name} is not installed ({weights} missing); "
                              "train it with: python -m ecmt.zoo.train_fmnist")
    config = load_model_config(stem)
    spec = {
        "name": name,
        "builder": "vit",
        "kwargs": config["model_kwargs"],
        "num_classes": config["num_classes"],
        "data_config": {"input_size": config["input_size"], "mean": config["mean"], "std": config["std"]},
        "dataset": config["dataset"],
    }
    bundle = from_spec(spec)
    _load_weights(bundle.model, load_file(str(weights)), weights)
    return bundle


def _load_timm(name: str, path: Path) -> ModelBundle:
    import timm
    from timm.data import resolve_data_config

    state = read_state_dict(path)
    model = timm.create_model(name, pretrained=False)
    kwargs: dict[str, Any] = {"model_name": name}
    classes = _checkpoint_classes(model, state)
    if classes is not None:
        kwargs["num_classes"] = classes
        model = timm.create_model(name, pretrained=False, num_classes=classes)
    _load_weights(model, state, path)
    data_config = dict(resolve_data_config({}, model=model))
    embed = getattr(model, "patch_embed", None)
    if hasattr(embed, "img_size") and hasattr(getattr(embed, "proj", None), "in_channels"):
        # the model's real input size, where the architecture's pretrained config says otherwise
        chans = embed.proj.in_channels
        data_config["input_size"] = (chans, *embed.img_size)
        for key in ("mean", "std"):  # per-channel values of another channel count: their average
            values = data_config[key]
            if len(values) != chans:
                data_config[key] = (sum(values) / len(values),) * chans
    spec = json.loads(json.dumps({"name": name, "builder": "timm", "kwargs": kwargs,
                                  "num_classes": model.num_classes, "data_config": data_config}))
    return ModelBundle(name, model.float().eval(), _tuples(data_config), model.num_classes, spec)


def _checkpoint_classes(model: nn.Module, state: Mapping[str, Tensor]) -> Optional[int]:
    """The checkpoint's number of classes when it differs from the model's, else None."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    key = next((k for k, p in model.named_parameters() if p is weight), None)
    if key in state and state[key].ndim == 2 and state[key].shape[0] != weight.shape[0]:
        return int(state[key].shape[0])
    return None


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """Read the weights in a checkpoint file, unwrapped and with prefixes stripped.

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no state dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: give the weights file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied; "
                              "check the file's permissions") from None
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # how torch's restricted unpickler names what it refused
        if named is None:  # a damaged pickle, not a refused one
            raise CheckpointError(f"cannot read checkpoint {path} (not a readable pickle): the file is "
                                  "truncated or corrupt; download or save it again") from None
        raise CheckpointError(f"refused to load checkpoint {path}: besides tensors it holds Python objects "
                              f"({named.group(1)}), which could run code when loaded; nothing in it was run. "
                              "Save only the weights (torch.save(model.state_dict(), ...) or safetensors)") from None
    except Exception as e:  # corrupt files raise many types (zip, safetensors errors)
        reason = " ".join(str(e).split())[:300]
        if "weights_only" in reason:  # never pass on torch's hint to unpickle without restrictions
            reason = type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}): the file is "
                              "truncated or corrupt; download or save it again") from None
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        obj = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if not isinstance(obj, Mapping) or not obj:
        held = "" if obj is None or isinstance(obj, Mapping) else f": it holds a {type(obj).__name__}, not a dict"
        raise CheckpointError(f"no state dict found in {path}{held} (looked for a dict of tensors, also under "
                              f"{', '.join(WRAPPER_KEYS)})")
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"no state dict found in {path}: its keys are not all parameter names")
    state = dict(obj)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _load_weights(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` (as float32) or raise naming the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [(f"{len(missing)} missing", missing), (f"{len(unexpected)} unexpected", unexpected),
                (f"{len(shapes)} with another shape (checkpoint vs model)", shapes)]
    found = [f"{what}: {', '.join(keys[:MAX_LISTED])}{', ...' if len(keys) > MAX_LISTED else ''}"
             for what, keys in problems if keys]
    if found:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(found)
                              + "; is it a checkpoint of this architecture?")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or Inf values in {len(bad)} tensor(s): "
                              f"{', '.join(bad[:MAX_LISTED])}{', ...' if len(bad) > MAX_LISTED else ''}; "
                              "the weights are broken: use an earlier checkpoint")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
