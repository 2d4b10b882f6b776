"""modmoe.experts / fused_moe / prepare_weights through the binding on the CPU reference,
against the float64 reference of conftest.py within the contract's bound."""

import numpy as np
import pytest

import modmoe
from conftest import BF16, Problem, assert_within_contract, bf16, f64, first_mismatch, reference


def call(p, topk=None, **kw):
    topk = (p.ids, p.weights) if topk is None else topk
    kw.setdefault("activation_type", p.act)
    kw.setdefault("gate_up_order", modmoe.GateUpOrder.GateUp if p.gate_up
                  else modmoe.GateUpOrder.UpGate)
    return modmoe.experts(topk, p.x, p.w13, p.w2, p.num_experts, p.k,
                          local_expert_offset=p.offset, local_num_experts=p.num_local, **kw)


def pack(ids, weights):
    """FlashInfer's packed top-k: (id << 16) | bf16 bits of the weight."""
    bits = bf16(weights).view(np.uint16).astype(np.int32)
    return ((ids.astype(np.int32) << 16) | bits).astype(np.int32)


@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("gate_up", [True, False], ids=["gate_up", "up_gate"])
def test_experts_vs_float64(rng, act, gate_up):
    p = Problem(rng, act=act, gate_up=gate_up)
    out = call(p)
    assert out.dtype == BF16 and out.shape == (p.m, p.hidden)
    assert_within_contract(out, p)


def test_flashinfer_activation_numbers(rng):
    p = Problem(rng)
    by_name = call(p)
    by_number = call(p, activation_type=modmoe.ActivationType.Swiglu)
    by_int = call(p, activation_type=3)
    assert np.array_equal(f64(by_name), f64(by_number)) and np.array_equal(f64(by_name), f64(by_int))


def test_swiglu_oai_per_expert(rng):
    p = Problem(rng, act="swiglu_oai")
    p.alpha = rng.uniform(1.0, 2.0, p.num_local).astype(np.float32)
    p.beta = rng.uniform(0.5, 1.5, p.num_local).astype(np.float32)
    p.limit = rng.uniform(0.5, 2.0, p.num_local).astype(np.float32)
    out = call(p, activation_type=modmoe.ActivationType.SwigluBias, gemm1_alpha=p.alpha,
               gemm1_beta=p.beta, gemm1_clamp_limit=p.limit)
    assert_within_contract(out, p)


def test_swiglu_with_only_clamp_limit_is_plain_elsewhere(rng):
    """Swiglu + gemm1_clamp_limit: FlashInfer's gpt-oss form with alpha 1 and beta 0."""
    p = Problem(rng)
    big = np.full(p.num_local, 1e30, np.float32)
    out = call(p, activation_type=modmoe.ActivationType.Swiglu, gemm1_clamp_limit=big)
    assert_within_contract(out, p)


@pytest.mark.parametrize("form", ["fp32", "bf16", "packed"])
def test_weight_forms(rng, form):
    p = Problem(rng)
    if form == "fp32":
        out = call(p)
        want_weights = p.weights
    elif form == "bf16":
        out = call(p, topk=(p.ids, bf16(p.weights)))
        want_weights = f64(bf16(p.weights))
    else:
        out = call(p, topk=pack(p.ids, p.weights))
        want_weights = f64(bf16(p.weights))
    assert_within_contract(out, p, weights=want_weights)
    if form != "fp32":
        # The same weights as fp32 with bf16_routing_weights: bitwise the same.
        same = call(p, bf16_routing_weights=True)
        assert first_mismatch(out, same) is None


def test_expert_parallel_rows(rng):
    """Rows as an all-to-all delivers them: -1 padding, other ranks' ids, num_experts."""
    p = Problem(rng, num_experts=16, num_local=4, local_offset=8, top_k=4, m=32)
    ids = p.ids.copy()
    ids[-6:] = -1  # padding rows
    ids[3, :] = [0, 1, 2, 3]  # only other ranks' experts
    ids[4, 1] = 16  # num_experts: the two-sided sentinel
    out = call(p, topk=(ids, p.weights))
    assert np.all(f64(out[-6:]) == 0) and np.all(f64(out[3]) == 0)
    assert_within_contract(out, p, ids=ids)


def test_unfinalized_matches_finalize(rng):
    p = Problem(rng, num_experts=8, num_local=4, local_offset=4, top_k=3)
    gemm2, expert_weights, e2p = call(p, do_finalize=False)
    offsets = np.empty(p.num_local + 1, np.int64)
    call(p, do_finalize=False, expert_first_token_offset=offsets)
    local = (p.ids >= p.offset) & (p.ids < p.offset + p.num_local)
    assert np.array_equal(e2p >= 0, local)
    rows = e2p[local]
    assert len(np.unique(rows)) == rows.size and offsets[-1] == rows.size
    assert np.all(np.diff(offsets) >= 0)
    # finalize: fp32 sum in j order of w_j * row, one cast
    acc = np.zeros((p.m, p.hidden), np.float32)
    for j in range(p.k):
        rows_j = np.where(e2p[:, j] >= 0, e2p[:, j], 0)
        term = expert_weights[:, j:j + 1] * gemm2[rows_j].astype(np.float32)
        acc += np.where(e2p[:, j:j + 1] >= 0, term, np.float32(0))
    out = call(p)
    ulp = np.abs(f64(out)) * 2.0**-7 + 1e-30
    assert np.all(np.abs(f64(bf16(acc)) - f64(out)) <= ulp), first_mismatch(bf16(acc), out)


def test_prepare_weights_changes_nothing_but_layout(rng):
    p = Problem(rng)
    want = call(p)
    w = modmoe.prepare_weights(p.w13, p.w2)
    assert isinstance(w, modmoe.ExpertWeights) and w.interleave_rows == 8
    assert w.num_local_experts == p.num_local and w.intermediate_size == p.inter
    got = modmoe.experts((p.ids, p.weights), p.x, w, None, p.num_experts, p.k)
    assert first_mismatch(want, got) is None
    # The canonical tensors in an ExpertWeights: the same again.
    canonical = modmoe.ExpertWeights(p.w13, p.w2)
    got = modmoe.experts((p.ids, p.weights), p.x, canonical, None, p.num_experts, p.k)
    assert first_mismatch(want, got) is None


def test_up_gate_is_the_swapped_gate_up(rng):
    p = Problem(rng)
    want = call(p)
    i = p.inter
    swapped = np.ascontiguousarray(np.concatenate([p.w13[:, i:], p.w13[:, :i]], axis=1))
    got = modmoe.experts((p.ids, p.weights), p.x, swapped, p.w2, p.num_experts, p.k,
                         gate_up_order=modmoe.GateUpOrder.UpGate)
    assert first_mismatch(want, got) is None


def test_fused_moe_is_route_then_experts(rng):
    p = Problem(rng, num_experts=8, top_k=2)
    logits = rng.standard_normal((p.m, p.num_experts)).astype(np.float32)
    ids, weights = modmoe.route(logits, None, modmoe.RoutingMethodType.Renormalize, p.k)
    want = modmoe.experts((ids, weights), p.x, p.w13, p.w2, p.num_experts, p.k)
    got_ids = np.empty_like(ids)
    got = modmoe.fused_moe(logits, None, p.x, p.w13, p.w2, p.num_experts, p.k,
                           routing_method_type=modmoe.RoutingMethodType.Renormalize,
                           topk_ids=got_ids)
    assert np.array_equal(ids, got_ids)
    assert first_mismatch(want, got) is None
    unfinalized = modmoe.fused_moe(logits, None, p.x, p.w13, p.w2, p.num_experts, p.k,
                                   routing_method_type=1, do_finalize=False)
    assert isinstance(unfinalized, list) and len(unfinalized) == 3


def test_llama4_weight_on_input(rng):
    p = Problem(rng, top_k=1)
    logits = rng.standard_normal((p.m, p.num_experts)).astype(np.float32)
    out = modmoe.fused_moe(logits, None, p.x, p.w13, p.w2, p.num_experts, 1,
                           routing_method_type=modmoe.RoutingMethodType.Llama4)
    ids, weights = modmoe.route(logits, None, modmoe.RoutingMethodType.Llama4, 1)
    assert_within_contract(out, p, ids=ids, weights=weights, weight_on_input=True)


def test_lora_delta_returns(rng):
    p = Problem(rng)
    delta = bf16(rng.standard_normal((p.m, p.k, 2 * p.inter)) * 0.1)
    out, e2p, act_out = call(p, gemm1_lora_delta=delta)
    assert out.shape == (p.m, p.hidden) and e2p.shape == (p.m, p.k)
    assert act_out.shape == (p.m * p.k, p.inter)
    zero = bf16(np.zeros((p.m, p.k, 2 * p.inter)))
    assert first_mismatch(call(p, gemm1_lora_delta=zero)[0], call(p)) is None
    assert first_mismatch(out, call(p)) is not None
    gemm2, expert_weights, e2p2, act2 = call(p, gemm1_lora_delta=delta, do_finalize=False)
    assert np.array_equal(e2p, e2p2) and first_mismatch(act_out, act2) is None


def test_batched_format(rng):
    p = Problem(rng, num_experts=4, top_k=1)
    max_m = 8
    hidden = bf16(rng.standard_normal((p.num_local, max_m, p.hidden)))
    counts = np.array([8, 3, 0, 5], np.int32)
    out = modmoe.experts(None, hidden, p.w13, p.w2, p.num_experts, do_finalize=False,
                         expert_num_tokens=counts)
    assert out.shape == (p.num_local, max_m, p.hidden)
    for e in range(p.num_local):
        assert np.all(f64(out[e, counts[e]:]) == 0)
        if counts[e]:
            q = Problem(np.random.default_rng(0), m=counts[e], num_experts=4, top_k=1)
            q.x, q.w13, q.w2 = hidden[e, :counts[e]], p.w13, p.w2
            q.ids = np.full((counts[e], 1), e, np.int32)
            q.weights = np.ones((counts[e], 1), np.float32)
            assert_within_contract(out[e, :counts[e]], q)


def test_given_outputs_are_used_and_returned(rng):
    p = Problem(rng)
    output = bf16(np.full((p.m, p.hidden), np.nan))
    nbytes = modmoe.experts_workspace_size(p.m, p.hidden, p.inter, p.k, p.num_experts)
    assert isinstance(nbytes, int) and nbytes >= 0
    workspace = np.empty(max(nbytes, 1), np.uint8)
    got = call(p, output=output, workspace=workspace)
    assert got is output and not np.isnan(f64(output)).any()


def test_validate_only_launches_nothing(rng):
    p = Problem(rng)
    output = bf16(np.full((p.m, p.hidden), np.nan))
    assert call(p, output=output, validate_only=True) is output
    assert np.isnan(f64(output)).all()


def test_uint16_bits_are_bf16(rng):
    p = Problem(rng)
    want = call(p)
    got = modmoe.experts((p.ids, p.weights), p.x.view(np.uint16), p.w13.view(np.uint16),
                         p.w2.view(np.uint16), p.num_experts, p.k)
    assert got.dtype == np.uint16
    assert first_mismatch(want, got.view(BF16)) is None


def test_fused_moe_deepseek_v3(rng):
    p = Problem(rng, num_experts=16, top_k=4)
    logits = rng.standard_normal((p.m, p.num_experts)).astype(np.float32)
    bias = (rng.standard_normal(p.num_experts) * 0.1).astype(np.float32)
    kw = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ids, weights = modmoe.route(logits, bias, 2, p.k, **kw)
    out = modmoe.fused_moe(logits, bias, p.x, p.w13, p.w2, p.num_experts, p.k,
                           routing_method_type=2, **kw)
    assert_within_contract(out, p, ids=ids, weights=weights)


def test_fused_moe_workspace_size(rng):
    n = modmoe.fused_moe_workspace_size(16, 128, 64, 2, 8)
    assert n >= modmoe.experts_workspace_size(16, 128, 64, 2, 8)
