"""modmoe.route on the golden routing data (tests/data/routing, see its README.md): ids exact,
weights within 1e-6 relative, on the CPU reference through the binding."""

import json
import os

import numpy as np
import pytest

import modmoe
from conftest import BF16, ROUTING_DATA

FILES = sorted(f for f in os.listdir(ROUTING_DATA) if f.endswith(".json"))


def cases():
    for name in FILES:
        with open(os.path.join(ROUTING_DATA, name)) as f:
            data = json.load(f)
        for case in data["cases"]:
            yield pytest.param(data["method"], case, id=f"m{data['method']}-{case['label']}")
            if case["logits_dtype"] == "bf16":
                yield pytest.param(data["method"], dict(case, as_bf16=True),
                                   id=f"m{data['method']}-{case['label']}-bf16-tensors")


def sort_rows(ids, weights):
    """Each row by descending weight, ties toward the lower id (the files' row order)."""
    order = np.lexsort((ids, -weights), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def test_golden_files_present():
    assert len(FILES) == 6, FILES


@pytest.mark.parametrize("method,case", list(cases()))
def test_route_matches_golden(method, case):
    dtype = BF16 if case.get("as_bf16") else np.float32
    logits = np.asarray(case["logits"], dtype=np.float32).astype(dtype)
    bias = None if case["bias"] is None else np.asarray(case["bias"], np.float32).astype(dtype)
    ids, weights = modmoe.route(
        logits, bias, method, case["k"], n_group=case["n_group"], topk_group=case["topk_group"],
        routed_scaling_factor=case["routed_scaling_factor"])
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    assert ids.shape == (case["T"], case["k"])
    got_ids, got_w = sort_rows(ids, weights)
    want_ids = np.asarray(case["topk_ids"], np.int32)
    want_w = np.asarray(case["topk_weights"], np.float32)
    bad = np.argwhere(got_ids != want_ids)
    assert bad.size == 0, f"first id mismatch at {tuple(bad[0])}: {got_ids[tuple(bad[0])]} " \
                          f"vs {want_ids[tuple(bad[0])]}"
    tol = 1e-6 * np.abs(want_w)
    bad = np.argwhere(np.abs(got_w - want_w) > tol)
    assert bad.size == 0, f"first weight mismatch at {tuple(bad[0])}: {got_w[tuple(bad[0])]!r} " \
                          f"vs {want_w[tuple(bad[0])]!r}"


def test_route_into_given_outputs():
    logits = np.linspace(-1, 1, 4 * 8, dtype=np.float32).reshape(4, 8)
    ids = np.full((4, 2), -7, np.int32)
    weights = np.full((4, 2), np.nan, np.float32)
    got_ids, got_w = modmoe.route(logits, None, modmoe.RoutingMethodType.Renormalize, 2,
                                  topk_ids=ids, topk_weights=weights)
    assert got_ids is ids and got_w is weights
    assert (ids[:, 0] == 7).all() and (ids[:, 1] == 6).all()
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)


def test_route_errors_name_python_arguments():
    logits = np.zeros((4, 8), np.float32)
    with pytest.raises(modmoe.Error, match="'top_k' = 9"):
        modmoe.route(logits, None, 0, 9)
    with pytest.raises(modmoe.Error, match="'routing_bias'.*only DeepSeekV3"):
        modmoe.route(logits, np.zeros(8, np.float32), 1, 2)
    with pytest.raises(modmoe.Error, match="'n_group' = 2"):
        modmoe.route(logits, None, 1, 2, n_group=2, topk_group=1)
    with pytest.raises(modmoe.Error, match="'routing_logits' has shape \\[32\\]"):
        modmoe.route(logits.reshape(-1), None, 0, 2)
    with pytest.raises(TypeError, match="'top_k' is required"):
        modmoe.route(logits, None, 0)
