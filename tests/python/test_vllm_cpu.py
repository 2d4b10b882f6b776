"""modmoe.vllm.ModmoeExperts driven the way vLLM's modular kernel drives an experts class,
with the tensors an all-to-all prepare step hands it, on CPU arrays (NumPy)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import modmoe
import modmoe.vllm as mv
from conftest import BF16, Problem, assert_within_contract, bf16, f64, rel_l2, reference


def expert_parallel_rows(p, ep_size, max_tokens):
    """What a one-sided all-to-all hands each rank, flattened as vLLM's prepare does it: rows
    [ep_size * max_tokens], the tokens that have an expert on the rank first (all from source
    rank 0 here, in token order), their k global ids unchanged (other ranks' too), then padding
    rows with ids -1. Returns per rank (x, ids, weights, token indices, vLLM expert_map)."""
    e_local = p.num_experts // ep_size
    ranks = []
    for r in range(ep_size):
        owns = (p.ids // e_local == r).any(axis=1)
        tokens = np.nonzero(owns)[0]
        assert tokens.size <= max_tokens
        rows = ep_size * max_tokens
        x = bf16(np.full((rows, p.hidden), 7.0))  # padding rows hold garbage
        ids = np.full((rows, p.k), -1, np.int32)
        weights = np.full((rows, p.k), 0.5, np.float32)
        x[:tokens.size], ids[:tokens.size], weights[:tokens.size] = (
            p.x[tokens], p.ids[tokens], p.weights[tokens])
        expert_map = np.full(p.num_experts, -1, np.int32)
        expert_map[r * e_local:(r + 1) * e_local] = np.arange(e_local)
        ranks.append((x, ids, weights, tokens, expert_map))
    return ranks


def run_rank(experts, p, w13, w2, x, ids, weights, expert_map, apply_router_weight=False):
    """One rank's experts call as FusedMoEKernelModularImpl makes it."""
    e_local, m, n, k, topk = experts.moe_problem_size(x, w13, w2, ids)
    ws13_shape, ws2_shape, out_shape = experts.workspace_shapes(
        m, n, k, topk, p.num_experts, e_local, None, "silu")
    dtype = experts.workspace_dtype(BF16)
    workspace13 = np.empty(ws13_shape, dtype)
    workspace2 = np.empty(ws2_shape, dtype)
    output = bf16(np.full(out_shape, np.nan))
    experts.apply(output, x, w13, w2, topk_weights=weights, topk_ids=ids, activation="silu",
                  global_num_experts=p.num_experts, expert_map=expert_map, a1q_scale=None,
                  a2_scale=None, workspace13=workspace13, workspace2=workspace2,
                  expert_tokens_meta=None, apply_router_weight_on_input=apply_router_weight)
    reduce = experts.finalize_weight_and_reduce_impl()
    final = bf16(np.full(out_shape, np.nan))
    assert reduce.apply(final, output, weights, ids, apply_router_weight) is final
    assert np.array_equal(f64(final), f64(output), equal_nan=True)
    return output


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_expert_parallel_like_vllm(rng, ep_size):
    p = Problem(rng, m=20, num_experts=8, top_k=3)
    e_local = p.num_experts // ep_size
    max_tokens = p.m
    combined = np.zeros((p.m, p.hidden), np.float32)
    for r, (x, ids, weights, tokens, expert_map) in enumerate(
            expert_parallel_rows(p, ep_size, max_tokens)):
        experts = mv.ModmoeExperts()
        w13 = p.w13[r * e_local:(r + 1) * e_local]
        w2 = p.w2[r * e_local:(r + 1) * e_local]
        out = run_rank(experts, p, w13, w2, x, ids, weights, expert_map)
        assert np.all(f64(out[tokens.size:]) == 0), "padding rows must be zero"
        # This rank's rows: the weighted sum over its own experts only.
        q = Problem(np.random.default_rng(0), m=tokens.size, num_experts=p.num_experts,
                    top_k=p.k, local_offset=r * e_local, num_local=e_local)
        q.x, q.w13, q.w2 = p.x[tokens], w13, w2
        q.ids, q.weights = p.ids[tokens], p.weights[tokens]
        assert_within_contract(out[:tokens.size], q)
        # combine: fp32 sum of the rows each token sent, in rank order
        combined[tokens] += out[:tokens.size].astype(np.float32)
    # Every rank's partial sum is rounded to bf16 once, so EP > 1 is not bitwise single-rank.
    full = reference(p)
    assert rel_l2(bf16(combined), full) < 1e-2


def test_expert_map_is_read_once_and_cached(rng):
    p = Problem(rng, num_experts=8, num_local=4, local_offset=4)
    expert_map = np.array([-1] * 4 + [0, 1, 2, 3], np.int32)
    experts = mv.ModmoeExperts()
    assert experts._local_range(expert_map, p.w13) == (4, 4)
    expert_map[:] = -1  # a cached map is not read again (vLLM's maps do not change)
    assert experts._local_range(expert_map, p.w13) == (4, 4)
    assert experts._local_range(None, p.w13) == (0, 4)
    assert mv.ModmoeExperts(local_expert_offset=4)._local_range(None, p.w13) == (4, 4)


@pytest.mark.parametrize("expert_map,match", [
    ([0, -1, 1, -1, 2, -1, 3, -1], "maps global expert 2 to local expert 1"),
    ([1, 0, 2, 3, -1, -1, -1, -1], "maps global expert 0 to local expert 1"),
    ([-1] * 8, "maps none of the 8 experts"),
    ([0, 1, 2, -1, -1, -1, -1, -1], "has 3 local experts: expected 4"),
])
def test_expert_maps_that_are_not_contiguous(expert_map, match):
    with pytest.raises(modmoe.Error, match=match):
        mv.local_range(np.array(expert_map, np.int32), 4)


def test_interface_properties():
    experts = mv.ModmoeExperts()
    std = mv.FusedMoEActivationFormat.Standard
    assert experts.activation_format() == std
    assert experts.activation_formats == (std, std)
    assert experts.supports_expert_map() and experts.supports_chunking()
    assert experts.expects_unquantized_inputs and not experts.is_monolithic()
    assert experts._supports_activation("silu") and experts._supports_activation("relu2_no_mul")
    assert not experts._supports_activation("swigluoai")
    assert experts._supports_quant_scheme(None, None)
    assert not experts._supports_quant_scheme("fp8", None)
    reduce = experts.finalize_weight_and_reduce_impl()
    assert type(reduce).__name__ in ("WeightAndReduceNoOp", "TopKWeightAndReduceNoOP")
    ws13, ws2, out = experts.workspace_shapes(16, 128, 64, 2, 8, 8, None, "silu")
    assert ws13 == (0,) and out == (16, 64) and (ws2 == (0,) or ws2[0] == 16)


def test_router_weight_on_input(rng):
    """Llama4: prepare already scaled the input (top_k 1); the experts apply weight 1."""
    p = Problem(rng, top_k=1)
    scaled = bf16(f64(p.x) * p.weights)
    experts = mv.ModmoeExperts()
    out = run_rank(experts, p, p.w13, p.w2, scaled, p.ids, p.weights, None,
                   apply_router_weight=True)
    q = Problem(np.random.default_rng(0), top_k=1)
    q.x, q.w13, q.w2, q.ids = scaled, p.w13, p.w2, p.ids
    q.weights = np.ones_like(p.weights)
    assert_within_contract(out, q)


def test_quantized_input_is_refused(rng):
    p = Problem(rng)
    with pytest.raises(modmoe.Error, match="'a1q_scale' is given"):
        mv.ModmoeExperts().apply(bf16(np.zeros((p.m, p.hidden))), p.x, p.w13, p.w2, p.weights,
                                 p.ids, "silu", p.num_experts, None, np.ones(1, np.float32))


def test_imports_without_vllm():
    code = ("import sys, modmoe.vllm as mv; "
            "assert ('vllm' in sys.modules) == (mv._mk is not None); "
            "print(mv.ModmoeExperts.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if importlib.util.find_spec("vllm") is None:
        assert out.stdout.strip() == "object"
