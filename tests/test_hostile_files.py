"""Randomly mutated SNN files (issue 20): each loads to an identical SNN or is refused with one line.

Hypothesis mutates the metadata record (a value replaced by any JSON value, a key removed or
added, with or without a digest recomputed to match) and the raw bytes of the safetensors header
and data. Every load must take under 10 s and 1 GB.
"""
from __future__ import annotations

import json
import resource
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ecmt
from ecmt import serialization

from test_cli import _one_thread, checkpoint  # noqa: F401
from test_errors import tiny  # noqa: F401

SECONDS, BYTES = 10.0, 1 << 30
T = 2

HOSTILE_STRINGS = ["hf-hub:timm/vit_tiny_patch16_224", "/etc/passwd", "../../x", "eq25", "nearest", "vit", "timm",
                   "transformers", "fashion-mnist", "ecmt-snn", "", "ecmt_test_vit"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70) | st.floats()
    | st.sampled_from([0, 1, 4, 16, 17, 10 ** 9, 4096, 0.5, -1.0]) | st.text(max_size=12)
    | st.sampled_from(HOSTILE_STRINGS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> dict[str, Any]:
    path = serialization.save(tiny.snn, tmp_path_factory.mktemp("prop") / "snn.safetensors", ann=tiny.model)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["ecmt"])
    loaded = serialization.read(path)
    return {"path": path, "raw": path.read_bytes(), "info": info, "tensors": load_file(str(path)),
            "snn": ecmt.simulate(loaded.snn, tiny.x, T), "ann": loaded.ann(tiny.x)}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a JSON tree."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutated(info: dict, path: tuple, op: str, value: Any) -> dict:
    info = json.loads(json.dumps(info))
    if not path:
        return value if op == "replace" else info
    node = info
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if op == "replace":
        node[last] = value
    elif op == "delete":
        del node[last]
    elif isinstance(node[last], dict):
        node[last]["extra" if not isinstance(value, str) or not value else value] = value
    return info


def _loads_identically_or_refuses(saved: dict, tiny, data: bytes, identical: bool = True) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mutant.safetensors"
        path.write_bytes(data)
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter()
        try:
            loaded = serialization.read(path)
        except ecmt.ConversionError as e:
            assert str(e) and "\n" not in str(e), repr(e)
        else:
            snn_out = ecmt.simulate(loaded.snn, tiny.x, T)
            if identical:
                assert torch.equal(snn_out, saved["snn"]) and torch.equal(loaded.ann(tiny.x), saved["ann"])
        assert time.perf_counter() - start < SECONDS
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < BYTES


def _with_info(saved: dict, info: Any, redigest: bool) -> bytes:
    if redigest and isinstance(info, dict):
        info = {**info, "digest": serialization.digest(info, saved["tensors"])}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        save_file(saved["tensors"], str(path), metadata={"ecmt": json.dumps(info)})
        return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.sampled_from(["replace", "delete", "add"]), JSON)
def test_mutated_metadata_loads_identically_or_is_refused(saved, tiny, data, op, value):
    path = data.draw(st.sampled_from(_paths(saved["info"])))
    info = _mutated(saved["info"], path, op, value)
    # the digest covers the record: a change the digest was not recomputed for must be refused
    _loads_identically_or_refuses(saved, tiny, _with_info(saved, info, redigest=False))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.sampled_from(["replace", "delete", "add"]), JSON)
def test_mutated_metadata_with_a_matching_digest_loads_or_is_refused(saved, tiny, data, op, value):
    """With a recomputed digest only the schema stands in the way: a valid change may load (a
    different, well-formed SNN, e.g. other levels), anything else is refused with one line."""
    path = data.draw(st.sampled_from(_paths(saved["info"])))
    info = _mutated(saved["info"], path, op, value)
    _loads_identically_or_refuses(saved, tiny, _with_info(saved, info, redigest=True), identical=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.sampled_from(["header", "data"]), st.integers(1, 8))
def test_mutated_bytes_load_identically_or_are_refused(saved, tiny, data, region, count):
    raw = bytearray(saved["raw"])
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    low, high = (0, header_end - 1) if region == "header" else (header_end, len(raw) - 1)
    for _ in range(count):
        raw[data.draw(st.integers(low, high))] = data.draw(st.integers(0, 255))
    _loads_identically_or_refuses(saved, tiny, bytes(raw))


def test_an_unchanged_record_rewritten_loads_identically(saved, tiny):
    """The mutations above start from a file that loads: rewritten as they are, with or without a new digest."""
    for redigest in (False, True):
        data = _with_info(saved, saved["info"], redigest)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "same.safetensors"
            path.write_bytes(data)
            assert torch.equal(ecmt.simulate(serialization.read(path).snn, tiny.x, T), saved["snn"])


@pytest.mark.parametrize("redigest", [False, True])
def test_a_key_with_a_newline_is_named_on_one_line(saved, tiny, redigest):
    # found by the mutation tests above: a key is echoed in the error, so it must be quoted
    info = json.loads(json.dumps(saved["info"]))
    sites = info["thresholds"]["sites"]
    sites[".\n"] = None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "newline.safetensors"
        path.write_bytes(_with_info(saved, info, redigest))
        with pytest.raises(ecmt.ConversionError) as e:
            serialization.read(path)
    assert "\n" not in str(e.value)
    assert not redigest or 'sites[".\\n"]' in str(e.value)


def test_a_tensor_name_with_a_newline_is_named_on_one_line(saved):
    tensors = {**saved["tensors"], "w\nx": torch.zeros(1)}
    info = {**saved["info"], "digest": serialization.digest(saved["info"], tensors)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "name.safetensors"
        save_file(tensors, str(path), metadata={"ecmt": json.dumps(info)})
        with pytest.raises(ecmt.ConversionError) as e:
            serialization.read(path)
    assert "\n" not in str(e.value) and '"w\\nx"' in str(e.value), str(e.value)
