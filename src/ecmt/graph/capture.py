"""Graph capture: the ANN's forward as an ATen-level ``torch.fx`` graph (torch.export).

The graph is captured once, at conversion, with the batch dimension (and the sequence
dimension of text inputs) dynamic where the model allows it; export specialises any dimension
the model's code fixes. Every node keeps ``meta["nn_module_stack"]``, from which site and
module names are read (``blocks.3.attn.qkv``).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping, Optional

import torch
from torch import fx, nn

from ..errors import UnsupportedModelError

Example = Any
"""A model input: a tensor, or a dict of tensors (keyword arguments, as for HF models)."""


def example_input(model: nn.Module, batch: int = 2) -> Example:
    """A small input the model accepts, made from its configuration (no data needed).

    timm models: zeros of the patch embedding's (or the pretrained config's) image size. HF
    models: images of ``config.image_size`` for vision configs, else 9 tokens of id 1 with a
    full attention mask (and zero token types, for configs that have them). Pass ``example=`` to :func:`ecmt.convert` for anything else.
    """
    config = getattr(model, "config", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if config is not None and hasattr(config, "to_dict"):  # HuggingFace
        if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
            size = config.image_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            return {"pixel_values": torch.zeros(batch, config.num_channels, *size, device=device)}
        names = set(inspect.signature(model.forward).parameters)
        if not getattr(config, "type_vocab_size", None):  # GPT-2 reads given token types as token embeddings
            names.discard("token_type_ids")
        ids = torch.ones(batch, 9, dtype=torch.long, device=device)
        return {k: v for k, v in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)),
                                  ("token_type_ids", torch.zeros_like(ids))) if k in names}
    size = None
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None):
        size = tuple(embed.img_size)
    chans = 3
    proj = getattr(embed, "proj", None)
    if isinstance(proj, nn.modules.conv._ConvNd):
        chans = proj.in_channels
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if size is None and "input_size" in cfg:
        chans, *size = cfg["input_size"]
        size = tuple(size)
    if size is None:
        raise UnsupportedModelError(f"cannot tell what input {type(model).__name__} takes: pass example= "
                                    "(a tensor or a dict of tensors) to ecmt.convert / ecmt.calibrate")
    return torch.zeros(batch, chans, *size, device=device)


def signature(x: Example) -> dict[str, Any]:
    """The shapes and dtypes of an input, as JSON: ``{"shape", "dtype"}``, or a dict of them."""
    def one(t: torch.Tensor) -> dict[str, Any]:
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}

    if isinstance(x, Mapping):
        return {"kwargs": {k: one(v) for k, v in x.items() if isinstance(v, torch.Tensor)}}
    return one(x)


def from_signature(sig: Mapping[str, Any], device: torch.device) -> Example:
    """An input of the recorded shapes and dtypes (ones for integer inputs: token ids, masks)."""
    def one(d: Mapping[str, Any]) -> torch.Tensor:
        dtype = getattr(torch, str(d["dtype"]))
        make = torch.zeros if dtype.is_floating_point else torch.ones
        return make([int(n) for n in d["shape"]], dtype=dtype, device=device)

    if "kwargs" in sig:
        out = {k: one(v) for k, v in sig["kwargs"].items()}
        if "token_type_ids" in out:
            out["token_type_ids"].zero_()
        return out
    return one(sig)


def _dynamic_shapes(example: Example) -> Any:
    auto = torch.export.Dim.AUTO
    if isinstance(example, Mapping):
        return {k: ({0: auto, 1: auto} if isinstance(v, torch.Tensor) and v.dim() >= 2 and not v.is_floating_point()
                    else {0: auto}) if isinstance(v, torch.Tensor) else None for k, v in example.items()}
    return ({0: auto},)


def prepare(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, sharing its parameters and buffers (nothing is written to them).

    HF models get ``use_cache=False`` (a simulation needs no key-value cache).
    """
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    net = copy.deepcopy(model, memo).eval()
    config = getattr(net, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return net


def _two(example: Example) -> Example:
    """The example with a batch of 2: export would specialise a batch dimension of size 1."""
    def two(t: Any) -> Any:
        return t[:1].expand(2, *t.shape[1:]).clone() if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t

    return {k: two(v) for k, v in example.items()} if isinstance(example, Mapping) else two(example)


def capture(model: nn.Module, example: Optional[Example] = None) -> fx.GraphModule:
    """The forward of ``model`` (already :func:`prepare`-d) as a graph module sharing its parameters.

    Raises:
        UnsupportedModelError: torch.export cannot capture the model.
    """
    if example is None:
        example = example_input(model)
    example = _two(example)
    args, kwargs = ((), dict(example)) if isinstance(example, Mapping) else ((example,), {})
    dims = _dynamic_shapes(example)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dims if kwargs else dims, strict=False)
    except Exception as first:  # noqa: BLE001 - export raises many types; retry with static shapes
        try:
            with torch.no_grad():
                ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception:  # noqa: BLE001
            raise UnsupportedModelError(f"cannot capture the graph of {type(model).__name__} with torch.export: "
                                        f"{type(first).__name__}: {' '.join(str(first).split())[:300]}") from first
    return ep.module()
