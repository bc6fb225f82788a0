"""The ECMT rule for every kind of operation of a captured graph (the converter's op table).

Every operation of a Transformer is one of a few kinds, and each kind has one treatment:

* ``LINEAR``: linear (or affine) in the time mean, so it commutes with averaging over time
  steps and passes per-step values (or running means) through unchanged: reshapes, slices,
  concatenation, additions, scaling by a constant, average pooling, BatchNorm in eval mode,
  rotary embeddings (products with constant cos/sin), dropout;
* ``NONLINEAR``: wrapped in an n-ary Expectation Compensation module (Eq. 15): norms,
  activations, softmax, and the elementwise product or quotient of two dynamic tensors;
* ``WEIGHTED``: a Linear or convolution with constant weights: an MT neuron on its input
  (Alg. 1), the layer then sees spikes;
* ``PRODUCT``: a matrix product of two dynamic tensors: MT neurons on both operands and a
  matrix-product EC module (Eq. 16-18);
* ``ATTENTION``: fused scaled-dot-product attention, expanded into the two products and the
  softmax EC between them;
* ``SHAPE``: reads only the shape of its input, so its value is constant in time;
* ``IGNORED``: assertions without a value.

A new operation is one row here. An operation missing from the table makes conversion fail
with :class:`~ecmt.errors.UnsupportedModelError`, naming it and its module path.
"""
from __future__ import annotations

import operator
from enum import Enum
from typing import Any, Callable, Optional

import torch
from torch import fx

aten = torch.ops.aten


class Kind(Enum):
    LINEAR = "linear"
    NONLINEAR = "nonlinear"
    WEIGHTED = "weighted"
    PRODUCT = "product"
    ATTENTION = "attention"
    SHAPE = "shape"
    IGNORED = "ignored"


def _packets(*names: str) -> set:
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


LINEAR_OPS = _packets(
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "expand_as", "slice", "select", "cat",
    "concat", "stack", "split", "split_with_sizes", "unbind", "chunk", "flatten", "unflatten", "unsqueeze", "squeeze",
    "contiguous", "clone", "alias", "detach", "lift_fresh_copy", "roll", "constant_pad_nd", "pad", "index_select",
    "narrow", "movedim", "swapaxes", "flip", "repeat", "repeat_interleave", "tile", "mean", "sum", "avg_pool1d",
    "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "dropout", "native_dropout", "feature_dropout",
    "alpha_dropout", "add", "sub", "rsub", "neg", "_to_copy", "to", "type_as", "masked_fill", "tril", "triu",
    "batch_norm", "_native_batch_norm_legit_no_training", "pixel_shuffle", "pixel_unshuffle", "im2col", "diagonal",
    "_assert_tensor_metadata_passthrough", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
    "new_full", "empty_like", "gather", "index", "where", "scatter", "slice_scatter", "select_scatter",
    "copy", "view_as", "reshape_as", "unfold",
)
LINEAR_OPS |= _packets("add_", "sub_", "masked_fill_", "copy_", "clamp_", "fill_", "zero_", "t_", "transpose_",
                       "unsqueeze_", "squeeze_")
"""Linear in the time mean (``mul`` and ``div`` only with at most one dynamic factor, a dynamic
numerator; index, gather and where only with constant indices or conditions: checked by
:func:`kind_of`)."""

NONLINEAR_OPS = _packets(
    "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm", "gelu", "silu", "relu",
    "relu6", "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu",
    "softplus", "mish", "erf", "exp", "log", "log1p", "pow", "sqrt", "rsqrt", "reciprocal", "softmax", "_softmax",
    "log_softmax", "_log_softmax", "linalg_vector_norm", "norm", "clamp", "clamp_min", "clamp_max", "abs",
    "max_pool1d", "max_pool2d", "amax", "amin", "sin", "cos", "logsumexp", "var", "std", "glu", "square",
    "prelu", "logit", "erfc", "sign", "floor", "ceil", "round",
)
NONLINEAR_OPS |= {getattr(aten, p.__name__ + "_") for p in list(NONLINEAR_OPS) if hasattr(aten, p.__name__ + "_")}
"""Wrapped in Expectation Compensation (Eq. 15); in-place variants (``relu_``) run as their
functional form (:func:`functional`)."""


def functional(target: Any) -> Any:
    """The out-of-place form of an in-place ATen op (``aten.relu_.default`` -> ``aten.relu.default``)."""
    name = getattr(target, "__name__", "")
    pkt = getattr(target, "overloadpacket", None)
    if pkt is None or not pkt.__name__.endswith("_"):
        return target
    base = getattr(aten, pkt.__name__[:-1], None)
    return getattr(base, name.split(".")[-1], target) if base is not None else target

WEIGHTED_OPS = _packets("linear", "conv1d", "conv2d", "conv3d", "convolution", "addmm")
PRODUCT_OPS = _packets("matmul", "bmm", "mm")
ATTENTION_OPS = _packets("scaled_dot_product_attention")
SHAPE_OPS = _packets("sym_size", "sym_numel", "sym_stride", "size", "arange", "zeros", "ones", "full", "empty",
                     "scalar_tensor", "_local_scalar_dense")
IGNORED_OPS = _packets("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                       "sym_constrain_range", "_assert_async")


def packet(node: fx.Node) -> Any:
    """The op of a ``call_function`` node, without its overload (``aten.linear``)."""
    return getattr(node.target, "overloadpacket", node.target)


def op_name(node: fx.Node) -> str:
    """A short readable name of a node's op (``linear``, ``getitem``)."""
    target = packet(node)
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1].strip("_") or "op"


def kind_of(node: fx.Node, dynamic: Callable[[Any], bool]) -> Optional[Kind]:
    """The kind of a ``call_function`` node with at least one dynamic input, or None if unknown.

    Args:
        node: The node.
        dynamic: Whether an argument (a node or a literal) holds a time-varying value.
    """
    target = packet(node)
    if target is operator.getitem:
        return Kind.LINEAR
    if target in IGNORED_OPS:
        return Kind.IGNORED
    if target in SHAPE_OPS or is_symbolic(node):
        return Kind.SHAPE
    if target in ATTENTION_OPS:
        return Kind.ATTENTION
    if target in WEIGHTED_OPS:
        weights = node.args[2:3] if target is aten.addmm else node.args[1:3]
        if not any(dynamic(w) for w in weights) and not (target is aten.addmm and dynamic(node.args[0])):
            return Kind.WEIGHTED
        return Kind.PRODUCT if target is aten.linear else None
    if target in PRODUCT_OPS:
        return Kind.PRODUCT if dynamic(node.args[1]) else Kind.WEIGHTED  # x·W: W a constant (or analog)
    if target in (aten.mul, aten.div, aten.mul_, aten.div_):
        a, b = node.args[:2]
        if target in (aten.mul, aten.mul_):
            return Kind.NONLINEAR if dynamic(a) and dynamic(b) else Kind.LINEAR
        return Kind.LINEAR if not dynamic(b) else Kind.NONLINEAR
    if target in (aten.index, aten.gather, aten.scatter):
        idx = node.args[1:] if target is aten.index else node.args[1:3]
        return None if any(dynamic(i) for i in _flat(idx)) else Kind.LINEAR
    if target is aten.where:
        return None if dynamic(node.args[0]) else Kind.LINEAR
    if target in LINEAR_OPS:
        return Kind.LINEAR
    if target in NONLINEAR_OPS:
        return Kind.NONLINEAR
    return None


def is_symbolic(node: fx.Node) -> bool:
    """A node computing a Python number (shape arithmetic on SymInts)."""
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and not isinstance(
        val, torch.Tensor)


def _flat(x: Any) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    return [x]
