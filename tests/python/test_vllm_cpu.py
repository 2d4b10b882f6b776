"""modmoe.vllm.ModmoeExperts driven the way vLLM's modular kernel drives an experts class,
with the tensors an all-to-all prepare step hands it, on CPU arrays (NumPy); bf16, FP8 and
NVFP4 weights with bf16 activations (W4A16)."""

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import modmoe
import modmoe.vllm as mv
from conftest import (
    BF16,
    Fp8Problem,
    Nvfp4Problem,
    Problem,
    assert_within_contract,
    bf16,
    f64,
    first_mismatch,
    rel_l2,
    reference,
)


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


def run_rank(experts, p, w13, w2, x, ids, weights, expert_map, apply_router_weight=False,
             a1q_scale=None):
    """One rank's experts call as FusedMoEKernelModularImpl makes it (x: bf16, or e4m3 with
    a1q_scale)."""
    e_local, m, n, k, topk = experts.moe_problem_size(x, w13, w2, ids)
    ws13_shape, ws2_shape, out_shape = experts.workspace_shapes(
        m, n, k, topk, p.num_experts, e_local, None, "silu")
    dtype = experts.workspace_dtype(BF16)
    workspace13 = np.empty(ws13_shape, dtype)
    workspace2 = np.empty(ws2_shape, dtype)
    output = bf16(np.full(out_shape, np.nan))
    experts.apply(output, x, w13, w2, topk_weights=weights, topk_ids=ids, activation="silu",
                  global_num_experts=p.num_experts, expert_map=expert_map, a1q_scale=a1q_scale,
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


# ---------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------


def quant_key(static, group_shape, dtype="torch.float8_e4m3fn", scale_dtype="torch.float32",
              symmetric=True, scale2=None):
    """A stand-in for vLLM's QuantKey(dtype, ScaleDesc(scale_dtype, static, group_shape),
    scale2, symmetric); dtypes as str() names them."""
    scale = SimpleNamespace(dtype=scale_dtype, static=static, group_shape=group_shape)
    return SimpleNamespace(dtype=dtype, scale=scale, scale2=scale2, symmetric=symmetric)


TENSOR, TOKEN, BLOCK, GROUP = (-1, -1), (1, -1), (128, 128), (1, 128)
STATIC_TENSOR = quant_key(True, TENSOR)  # kFp8StaticTensorSym
DYNAMIC_TENSOR = quant_key(False, TENSOR)  # kFp8DynamicTensorSym
STATIC_BLOCK = quant_key(True, BLOCK)  # kFp8Static128BlockSym
DYNAMIC_GROUP = quant_key(False, GROUP)  # kFp8Dynamic128Sym


@pytest.mark.parametrize("weight_key,activation_key,supported", [
    (None, None, True),
    (STATIC_TENSOR, STATIC_TENSOR, True),
    (STATIC_TENSOR, DYNAMIC_TENSOR, True),
    (STATIC_BLOCK, DYNAMIC_GROUP, True),
    (STATIC_TENSOR, None, False),  # FP8 weights, bf16 activations (W8A16)
    (STATIC_BLOCK, DYNAMIC_TENSOR, False),
    (STATIC_TENSOR, quant_key(False, TOKEN), False),  # per-token activations
    (quant_key(True, (-1, 1)), DYNAMIC_TENSOR, False),  # per-channel weights
    (quant_key(True, (64, 64)), quant_key(False, (1, 64)), False),
    (quant_key(True, TENSOR, "torch.float8_e4m3fnuz"), quant_key(False, TENSOR,
                                                                "torch.float8_e4m3fnuz"), False),
    (quant_key(True, TENSOR, symmetric=False), DYNAMIC_TENSOR, False),
    (quant_key(True, TENSOR, scale2=STATIC_TENSOR.scale), DYNAMIC_TENSOR, False),
    ("fp8", None, False),
])
def test_supported_quant_schemes(weight_key, activation_key, supported):
    assert mv.ModmoeExperts._supports_quant_scheme(weight_key, activation_key) is supported


def test_supported_quant_schemes_with_vllm_keys():
    qu = pytest.importorskip("vllm.model_executor.layers.quantization.utils.quant_utils")
    supports = mv.ModmoeExperts._supports_quant_scheme
    assert supports(qu.kFp8StaticTensorSym, qu.kFp8StaticTensorSym)
    assert supports(qu.kFp8StaticTensorSym, qu.kFp8DynamicTensorSym)
    assert supports(qu.kFp8Static128BlockSym, qu.kFp8Dynamic128Sym)
    assert not supports(qu.kFp8StaticTensorSym, qu.kFp8DynamicTokenSym)
    assert not supports(qu.kFp8Static128BlockSym, None)


def quant_config(q):
    """A stand-in for vLLM's FusedMoEQuantConfig of q's FP8 weights (its scales copied: the
    adapter reorders w1_scale in place)."""
    block = [128, 128] if q.scheme == "fp8-block" else None
    return SimpleNamespace(quant_dtype="torch.float8_e4m3fn", block_shape=block,
                           per_act_token_quant=False, per_out_ch_quant=False,
                           w1_scale=q.w13_scale.copy(), w2_scale=q.w2_scale.copy())


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("ep_size", [1, 2])
def test_fp8_like_vllm(rng, scheme, ep_size):
    """Each rank: process_weights_after_loading on its slice of the weights, then apply() on
    the e4m3 rows and a1q_scale of its prepare step; bitwise modmoe.experts on the checkpoint
    weights, and the single rank within docs/fp8.md's bound of float64."""
    p = Problem(rng, m=20, hidden=256, inter=128, num_experts=8, top_k=3)
    q = Fp8Problem(p, scheme)
    e_local = p.num_experts // ep_size
    for r, (x, ids, weights, tokens, expert_map) in enumerate(
            expert_parallel_rows(p, ep_size, p.m)):
        local = slice(r * e_local, (r + 1) * e_local)
        rank_q = SimpleNamespace(scheme=scheme, w13_scale=q.w13_scale[local],
                                 w2_scale=q.w2_scale[local])
        experts = mv.ModmoeExperts(quant_config=quant_config(rank_q))
        assert not experts.expects_unquantized_inputs
        layer = SimpleNamespace(w13_weight=q.w13[local].copy(), w2_weight=q.w2[local])
        experts.process_weights_after_loading(layer)
        assert experts.interleave_rows == 8
        x_q, x_scale = modmoe.quantize_activations(x, scheme)
        out = run_rank(experts, p, layer.w13_weight, layer.w2_weight, x_q, ids, weights,
                       expert_map, a1q_scale=x_scale)
        want = modmoe.experts((ids, weights), x_q, q.w13[local], q.w2[local], p.num_experts,
                              p.k, local_expert_offset=r * e_local, local_num_experts=e_local,
                              hidden_states_scale=x_scale, gemm1_weights_scale=q.w13_scale[local],
                              gemm2_weights_scale=q.w2_scale[local])
        assert first_mismatch(out, want) is None
        assert np.all(f64(out[tokens.size:]) == 0), "padding rows must be zero"
    if ep_size == 1:
        assert rel_l2(out, reference(q.dq)) < 0.04


def test_fp8_activation_scale_forms(rng):
    """fp8-tensor: vLLM's static scale may be 0-d, a per-token one [M, 1]: read as [1], [M]."""
    p = Problem(rng, hidden=128, inter=128, num_experts=4, top_k=1)
    q = Fp8Problem(p, "fp8-tensor")
    experts = mv.ModmoeExperts(quant_config=quant_config(q))
    want = run_rank(experts, p, q.w13, q.w2, q.x, p.ids, p.weights, None, a1q_scale=q.x_scale)
    scalar = np.asarray(q.x_scale[0])
    assert scalar.ndim == 0
    got = run_rank(experts, p, q.w13, q.w2, q.x, p.ids, p.weights, None, a1q_scale=scalar)
    assert first_mismatch(want, got) is None
    column = np.full((p.m, 1), q.x_scale[0], np.float32)
    got = run_rank(experts, p, q.w13, q.w2, q.x, p.ids, p.weights, None, a1q_scale=column)
    assert first_mismatch(want, got) is None
    with pytest.raises(modmoe.Error, match=r"'a1q_scale' is None with FP8 experts "
                                           r"\(Fp8PerTensor\)"):
        run_rank(experts, p, q.w13, q.w2, q.x, p.ids, p.weights, None)


def test_fp8_fast_accum_like_vllm(rng):
    """fp8_fast_accum=True (per-tensor FP8): apply() is modmoe.experts with the keyword, bit for
    bit; refused at construction with fp8-block or bf16."""
    p = Problem(rng, m=20, hidden=256, inter=128, num_experts=8, top_k=3)
    q = Fp8Problem(p, "fp8-tensor")
    experts = mv.ModmoeExperts(quant_config=quant_config(q), fp8_fast_accum=True)
    layer = SimpleNamespace(w13_weight=q.w13.copy(), w2_weight=q.w2)
    experts.process_weights_after_loading(layer)
    out = run_rank(experts, p, layer.w13_weight, layer.w2_weight, q.x, p.ids, p.weights, None,
                   a1q_scale=q.x_scale)
    want = modmoe.experts((p.ids, p.weights), q.x, q.w13, q.w2, p.num_experts, p.k,
                          hidden_states_scale=q.x_scale, gemm1_weights_scale=q.w13_scale,
                          gemm2_weights_scale=q.w2_scale, fp8_fast_accum=True)
    assert first_mismatch(out, want) is None
    block = SimpleNamespace(scheme="fp8-block", w13_scale=q.w13_scale, w2_scale=q.w2_scale)
    with pytest.raises(modmoe.Error, match=r"fp8_fast_accum=True with quant scheme "
                                           r"Fp8Block128: expected per-tensor FP8"):
        mv.ModmoeExperts(quant_config=quant_config(block), fp8_fast_accum=True)
    with pytest.raises(modmoe.Error, match=r"fp8_fast_accum=True with quant scheme Bf16"):
        mv.ModmoeExperts(fp8_fast_accum=True)


@pytest.mark.parametrize("config,match", [
    (dict(quant_dtype="torch.float8_e4m3fn", block_shape=[64, 64]), "block_shape \\[64, 64\\]"),
    (dict(quant_dtype="torch.float8_e4m3fn", per_act_token_quant=True), "per_act_token_quant"),
    (dict(quant_dtype="torch.float8_e5m2"), "quant_dtype torch.float8_e5m2"),
    (dict(quant_dtype="mxfp4"), "quant_dtype mxfp4"),
])
def test_fp8_configs_modmoe_does_not_run(config, match):
    with pytest.raises(modmoe.Error, match=match):
        mv.ModmoeExperts(quant_config=SimpleNamespace(**config))



# ---------------------------------------------------------------------------------------
# NVFP4 weights, bf16 activations (W4A16)
# ---------------------------------------------------------------------------------------

# kNvfp4Static: packed e2m1 (vLLM's FP4_DTYPE, torch.uint8), static e4m3 scales per 1x16
# group, and a static fp32 per-tensor second scale (the global).
NVFP4_STATIC = quant_key(True, (1, 16), dtype="torch.uint8", scale_dtype="torch.float8_e4m3fn",
                         scale2=SimpleNamespace(dtype="torch.float32", static=True,
                                                group_shape=TENSOR))
NVFP4_DYNAMIC = quant_key(False, (1, 16), dtype="torch.uint8",
                          scale_dtype="torch.float8_e4m3fn", scale2=NVFP4_STATIC.scale2)


@pytest.mark.parametrize("weight_key,activation_key,supported", [
    (NVFP4_STATIC, None, True),  # W4A16
    (NVFP4_STATIC, NVFP4_DYNAMIC, False),  # W4A4: NVFP4 activations, not yet
    (quant_key(True, (1, 32), dtype="torch.uint8", scale_dtype="torch.float8_e4m3fn",
               scale2=NVFP4_STATIC.scale2), None, False),  # another group size
    (quant_key(True, (1, 16), dtype="torch.uint8", scale_dtype="torch.float8_e4m3fn"), None,
     False),  # no global scale
    (quant_key(True, (1, 32), dtype="torch.uint8", scale_dtype="torch.float8_e8m0fnu"), None,
     False),  # MXFP4
])
def test_supported_nvfp4_quant_schemes(weight_key, activation_key, supported):
    assert mv.ModmoeExperts._supports_quant_scheme(weight_key, activation_key) is supported
    if supported:
        assert mv.quant_scheme_of_keys(weight_key, activation_key) == modmoe.QuantScheme.Nvfp4


def test_supported_nvfp4_quant_schemes_with_vllm_keys():
    qu = pytest.importorskip("vllm.model_executor.layers.quantization.utils.quant_utils")
    supports = mv.ModmoeExperts._supports_quant_scheme
    assert supports(qu.kNvfp4Static, None)
    assert not supports(qu.kNvfp4Static, qu.kNvfp4Dynamic)


def nvfp4_config(q, local=slice(None)):
    """A stand-in for vLLM's nvfp4_w4a16_moe_quant_config: no activation dtype, weight dtype
    'nvfp4', block scales w1_scale / w2_scale, global scales g1_alphas / g2_alphas."""
    return SimpleNamespace(quant_dtype=None, use_nvfp4_w4a16=True, block_shape=None,
                           per_act_token_quant=False, per_out_ch_quant=False,
                           w1_scale=q.w13_scale[local], w2_scale=q.w2_scale[local],
                           g1_alphas=q.w13_global[local], g2_alphas=q.w2_global[local])


@pytest.mark.parametrize("ep_size", [1, 2])
def test_nvfp4_like_vllm(rng, ep_size):
    """Each rank: process_weights_after_loading leaves the packed weights as they are, apply()
    on the bf16 rows of its prepare step (no a1q_scale) is bitwise modmoe.experts on the
    checkpoint tensors, and the single rank is within docs/nvfp4.md's bound of float64."""
    p = Problem(rng, m=20, hidden=256, inter=128, num_experts=8, top_k=3)
    q = Nvfp4Problem(p)
    e_local = p.num_experts // ep_size
    for r, (x, ids, weights, tokens, expert_map) in enumerate(
            expert_parallel_rows(p, ep_size, p.m)):
        local = slice(r * e_local, (r + 1) * e_local)
        experts = mv.ModmoeExperts(quant_config=nvfp4_config(q, local))
        assert experts.quant_scheme == modmoe.QuantScheme.Nvfp4
        assert experts.expects_unquantized_inputs
        layer = SimpleNamespace(w13_weight=q.w13[local].copy(), w2_weight=q.w2[local])
        experts.process_weights_after_loading(layer)
        assert experts.interleave_rows == 0 and np.array_equal(layer.w13_weight, q.w13[local])
        out = run_rank(experts, p, layer.w13_weight, layer.w2_weight, x, ids, weights,
                       expert_map)
        want = modmoe.experts((ids, weights), x, q.w13[local], q.w2[local], p.num_experts,
                              p.k, local_expert_offset=r * e_local, local_num_experts=e_local,
                              gemm1_weights_scale=q.w13_scale[local],
                              gemm2_weights_scale=q.w2_scale[local],
                              output1_scale_scalar=q.w13_global[local],
                              output2_scale_scalar=q.w2_global[local])
        assert first_mismatch(out, want) is None
        assert np.all(f64(out[tokens.size:]) == 0), "padding rows must be zero"
    if ep_size == 1:
        assert rel_l2(out, reference(q.dq)) < 6e-3


def test_nvfp4_refuses_quantized_inputs_and_w4a4(rng):
    p = Problem(rng, hidden=128, inter=64, num_experts=4, top_k=1)
    q = Nvfp4Problem(p)
    experts = mv.ModmoeExperts(quant_config=nvfp4_config(q))
    with pytest.raises(modmoe.Error, match=r"'a1q_scale' is given: expected unquantized bf16"):
        run_rank(experts, p, q.w13, q.w2, p.x, p.ids, p.weights, None,
                 a1q_scale=np.ones(1, np.float32))
    with pytest.raises(modmoe.Error, match=r"quant_dtype nvfp4 \(NVFP4 activations, W4A4\): "
                                           r"not supported yet"):
        mv.ModmoeExperts(quant_config=SimpleNamespace(quant_dtype="nvfp4"))
