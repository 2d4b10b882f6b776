"""FP8 (fp8-block, fp8-tensor) through the package on the CPU reference, the oracle of the FP8
kernels (docs/fp8.md): the quantizers bit for bit against the formula, the experts against
float64 over the dequantized tensors within docs/fp8.md's bounds, fused_moe against its
stages bitwise, and the forms an e4m3 tensor may take (float8_e4m3fn, uint8 bytes); and the
fp8_fast_accum keyword (fp8-tensor's GEMM1 summed over all of K, then scaled once): the
definition it selects, bit for bit, its bounds, fused_moe, and its refusal off fp8-tensor."""

import ml_dtypes
import numpy as np
import pytest

import modmoe
from conftest import (
    BF16,
    E4M3,
    Fp8Problem,
    Problem,
    bf16,
    dequantize,
    e4m3_quantize,
    f64,
    first_mismatch,
    fp8_intermediate,
    reference,
    rel_l2,
)

SCHEMES = ["fp8-block", "fp8-tensor"]
ENUMS = {"fp8-block": modmoe.QuantScheme.Fp8Block128,
         "fp8-tensor": modmoe.QuantScheme.Fp8PerTensor}

# docs/fp8.md, "Experts": relative L2 against float64 over the dequantized weights and inputs
# (the e4m3 re-quantization of the intermediate dominates), and against float64 with the
# intermediate rounded as defined (two bf16 roundings of the output).
BOUND_PLAIN = 0.04
BOUND_ROUNDED = 5e-3


def problem(rng, scheme, **kw):
    kw.setdefault("hidden", 256)
    kw.setdefault("inter", 128)
    return Fp8Problem(Problem(rng, **kw), scheme)


def run(q, topk=None, weights=None, hidden=None, hidden_scale=None, **kw):
    """modmoe.experts on q's tensors (hidden, hidden_scale and weights replaceable): the
    weights as tensors + scales, or `weights` (an ExpertWeights)."""
    p = q.p
    topk = (p.ids, p.weights) if topk is None else topk
    kw.setdefault("activation_type", p.act)
    kw.setdefault("gate_up_order", modmoe.GateUpOrder.GateUp if p.gate_up
                  else modmoe.GateUpOrder.UpGate)
    if weights is None:
        args = (q.w13, q.w2)
        kw.setdefault("gemm1_weights_scale", q.w13_scale)
        kw.setdefault("gemm2_weights_scale", q.w2_scale)
    else:
        args = (weights, None)
    return modmoe.experts(topk, q.x if hidden is None else hidden, *args, p.num_experts, p.k,
                          local_expert_offset=p.offset, local_num_experts=p.num_local,
                          hidden_states_scale=q.x_scale if hidden_scale is None else hidden_scale,
                          **kw)


def assert_within_fp8_bounds(out, q, **kw):
    plain = rel_l2(out, reference(q.dq, **kw))
    rounded = rel_l2(out, reference(q.dq, intermediate=fp8_intermediate, **kw))
    print(f"rel L2 vs float64: {plain:.4f} (bound {BOUND_PLAIN}), with the intermediate "
          f"rounded {rounded:.2e} (bound {BOUND_ROUNDED})")
    assert plain < BOUND_PLAIN and rounded < BOUND_ROUNDED, (plain, rounded)


# ---------------------------------------------------------------------------------------
# Quantizers: bit for bit against docs/fp8.md's formula
# ---------------------------------------------------------------------------------------


def assert_same_bits(got, want):
    got_bits, want_bits = np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8)
    assert first_mismatch(got_bits, want_bits) is None, first_mismatch(got_bits, want_bits)


def test_quantize_activations_block(rng):
    x = bf16(rng.standard_normal((24, 384)) * 3)
    x[5, 128:256] = 0  # an all-zero group: scale 1e-10 / 448, codes 0
    q, s = modmoe.quantize_activations(x, "fp8-block")
    assert q.dtype == E4M3 and q.shape == x.shape and s.dtype == np.float32 and s.shape == (24, 3)
    want_q, want_s = e4m3_quantize(f64(x).reshape(24, 3, 128))
    assert_same_bits(q, want_q.reshape(24, 384))
    assert np.array_equal(s, want_s)


@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_activations_tensor(rng, per_row):
    x = bf16(rng.standard_normal((24, 256)))
    q, s = modmoe.quantize_activations(x, modmoe.QuantScheme.Fp8PerTensor, per_row_scale=per_row)
    want_q, want_s = e4m3_quantize(f64(x).reshape(1, -1))
    assert_same_bits(q, want_q.reshape(x.shape))
    assert s.shape == ((24,) if per_row else (1,)) and np.all(s == want_s[0])


def test_quantize_activations_static_scale_is_read(rng):
    x = bf16(rng.standard_normal((8, 128)))
    scale = np.array([0.01], np.float32)
    out = np.empty(x.shape, np.uint8)  # uint8 bytes: e4m3 under an FP8 scheme
    q, s = modmoe.quantize_activations(x, "fp8-tensor", scale=scale, static_scale=True, out=out)
    assert q is out and s is scale and scale[0] == np.float32(0.01)
    want = np.clip(np.float32(x) / np.float32(0.01), -448, 448).astype(E4M3)
    assert_same_bits(q, want)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_weights(rng, scheme):
    w = bf16(rng.standard_normal((3, 256, 384)) * 0.1)
    q, s = modmoe.quantize_weights(w, scheme)
    assert q.dtype == E4M3 and q.shape == w.shape
    if scheme == "fp8-block":
        blocks = f64(w).reshape(3, 2, 128, 3, 128).transpose(0, 1, 3, 2, 4).reshape(3, 2, 3, -1)
        want_q, want_s = e4m3_quantize(blocks)
        want_q = want_q.reshape(3, 2, 3, 128, 128).transpose(0, 1, 3, 2, 4).reshape(w.shape)
    else:
        want_q, want_s = e4m3_quantize(f64(w).reshape(3, -1))
        want_q = want_q.reshape(w.shape)
    assert s.shape == want_s.shape and np.array_equal(s, want_s)
    assert_same_bits(q, want_q)


# ---------------------------------------------------------------------------------------
# Experts against float64
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("gate_up", [True, False], ids=["gate_up", "up_gate"])
def test_experts_vs_float64(rng, scheme, act, gate_up):
    q = problem(rng, scheme, act=act, gate_up=gate_up)
    out = run(q)
    assert out.dtype == BF16 and out.shape == (q.p.m, q.p.hidden)
    assert_within_fp8_bounds(out, q)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_expert_parallel_rows(rng, scheme):
    """Rows as an all-to-all delivers them: -1 padding, other ranks' ids, num_experts."""
    q = problem(rng, scheme, num_experts=16, num_local=4, local_offset=8, top_k=4, m=32)
    ids = q.p.ids.copy()
    ids[-6:] = -1
    ids[3, :] = [0, 1, 2, 3]
    ids[4, 1] = 16
    out = run(q, topk=(ids, q.p.weights))
    assert np.all(f64(out[-6:]) == 0) and np.all(f64(out[3]) == 0)
    assert_within_fp8_bounds(out, q, ids=ids)


def test_per_row_hidden_scale_is_the_per_tensor_one(rng):
    """fp8-tensor hidden_states_scale [M] (rows from ranks with their own scales): with every
    entry the tensor's scale, the [1] result bit for bit."""
    q = problem(rng, "fp8-tensor")
    x, per_row = modmoe.quantize_activations(q.p.x, "fp8-tensor", per_row_scale=True)
    assert per_row.shape == (q.p.m,)
    assert first_mismatch(run(q), run(q, hidden=x, hidden_scale=per_row)) is None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unfinalized_matches_finalized(rng, scheme):
    q = problem(rng, scheme, top_k=3)
    gemm2, expert_weights, e2p = run(q, do_finalize=False)
    assert gemm2.dtype == BF16 and gemm2.shape == (q.p.m * 3, q.p.hidden)
    rows = f64(gemm2)[e2p]  # [M, k, H], every id local here
    out = f64(run(q))
    acc = np.einsum("mk,mkh->mh", f64(expert_weights), rows)
    assert np.all(np.abs(acc - out) <= np.abs(out) * 2.0**-7 + 1e-30)  # one bf16 rounding


# ---------------------------------------------------------------------------------------
# The forms of the weights and of e4m3 tensors: all bitwise the same call
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_forms_are_the_same_call(rng, scheme):
    q = problem(rng, scheme)
    want = run(q)
    held = modmoe.ExpertWeights(q.w13, q.w2, gemm1_weights_scale=q.w13_scale,
                                gemm2_weights_scale=q.w2_scale)
    assert held.quant_scheme == ENUMS[scheme]  # from the scales' shape
    assert first_mismatch(want, run(q, weights=held)) is None
    # uint8 bytes with the scheme named: the same bits, a raw-bits (uint16) output
    u8 = modmoe.experts((q.p.ids, q.p.weights), q.x.view(np.uint8), q.w13.view(np.uint8),
                        q.w2.view(np.uint8), q.p.num_experts, q.p.k, hidden_states_scale=q.x_scale,
                        gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale,
                        quant_scheme=scheme)
    assert u8.dtype == np.uint16 and first_mismatch(want, u8.view(BF16)) is None


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("gate_up", [True, False], ids=["gate_up", "up_gate"])
def test_prepare_weights(rng, scheme, gate_up):
    """The prepared layout changes nothing but the layout: gemm1 rows interleaved by 8 (gate,
    up, ...), block scale row 2j = gate block j and 2j + 1 = up block j, the rest copied."""
    q = problem(rng, scheme, gate_up=gate_up, inter=256)
    order = modmoe.GateUpOrder.GateUp if gate_up else modmoe.GateUpOrder.UpGate
    w = modmoe.prepare_weights(q.w13, q.w2, gate_up_order=order, gemm1_weights_scale=q.w13_scale,
                               gemm2_weights_scale=q.w2_scale, quant_scheme=ENUMS[scheme])
    assert w.interleave_rows == 8 and w.quant_scheme == ENUMS[scheme]
    inter = q.p.inter
    gate, up = (q.w13[:, :inter], q.w13[:, inter:]) if gate_up else (q.w13[:, inter:],
                                                                      q.w13[:, :inter])
    groups = np.stack([gate.reshape(-1, inter // 8, 8, q.p.hidden),
                       up.reshape(-1, inter // 8, 8, q.p.hidden)], axis=2)
    assert_same_bits(w.gemm1_weights, groups.reshape(q.w13.shape))
    assert_same_bits(w.gemm2_weights, q.w2)
    assert np.array_equal(w.gemm2_weights_scale, q.w2_scale)
    if scheme == "fp8-block":
        s, n = q.w13_scale, inter // 128
        gate_s, up_s = (s[:, :n], s[:, n:]) if gate_up else (s[:, n:], s[:, :n])
        assert np.array_equal(w.gemm1_weights_scale,
                              np.stack([gate_s, up_s], axis=2).reshape(s.shape))
    else:
        assert np.array_equal(w.gemm1_weights_scale, q.w13_scale)
    assert first_mismatch(run(q), run(q, weights=w)) is None


# ---------------------------------------------------------------------------------------
# fused_moe against its stages
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_moe_is_route_quantize_experts(rng, scheme):
    q = problem(rng, scheme, num_experts=8, top_k=2)
    logits = rng.standard_normal((q.p.m, 8)).astype(np.float32)
    method = modmoe.RoutingMethodType.Renormalize
    ids, weights = modmoe.route(logits, None, method, 2)
    x, x_scale = modmoe.quantize_activations(q.p.x, scheme)
    want = modmoe.experts((ids, weights), x, q.w13, q.w2, 8, 2, hidden_states_scale=x_scale,
                          gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale)
    nbytes = modmoe.fused_moe_workspace_size(q.p.m, q.p.hidden, q.p.inter, 2, 8,
                                             routing_method_type=method, quant_scheme=scheme)
    got_ids = np.empty_like(ids)
    got = modmoe.fused_moe(logits, None, q.p.x, q.w13, q.w2, 8, 2, routing_method_type=method,
                           gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale,
                           workspace=np.empty(nbytes, np.uint8), topk_ids=got_ids)
    assert np.array_equal(ids, got_ids)
    assert first_mismatch(want, got) is None
    # e4m3 hidden states with their scales: route() then experts()
    prepared = modmoe.prepare_weights(q.w13, q.w2, gemm1_weights_scale=q.w13_scale,
                                      gemm2_weights_scale=q.w2_scale)
    got = modmoe.fused_moe(logits, None, x, prepared, None, 8, 2, routing_method_type=method,
                           hidden_states_scale=x_scale)
    assert first_mismatch(want, got) is None


def test_workspace_sizes_take_the_scheme():
    """fused_moe carves the quantized hidden states: fp8-block's scales [T, H/128] take more
    than fp8-tensor's [1]."""
    for scheme in SCHEMES:
        assert modmoe.experts_workspace_size(64, 256, 128, 2, 8, quant_scheme=scheme) >= 0
    block, tensor = (modmoe.fused_moe_workspace_size(64, 256, 128, 2, 8, quant_scheme=s)
                     for s in SCHEMES)
    assert block - tensor == 64 * 2 * 4 - 256


# ---------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------


@pytest.fixture
def q(rng):
    return problem(rng, "fp8-block")


def test_uint8_needs_the_scheme_named(q):
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights' has dtype u8 with "
                                           r"gemm1_weights_scale given and no quant_scheme"):
        modmoe.experts((q.p.ids, q.p.weights), q.x, q.w13.view(np.uint8), q.w2.view(np.uint8),
                       8, 2, hidden_states_scale=q.x_scale, gemm1_weights_scale=q.w13_scale,
                       gemm2_weights_scale=q.w2_scale)
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype u8 and the weights are "
                                           r"bf16: .* uint8 is read as e4m3 bits only under an "
                                           r"FP8 quant_scheme"):
        modmoe.experts((q.p.ids, q.p.weights), q.x.view(np.uint8), q.p.w13, q.p.w2, 8, 2)


def test_fp8_tensors_need_their_scales(q):
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights' has dtype e4m3 and the weights "
                                           r"are bf16: FP8 experts take FP8 weights with their "
                                           r"scales"):
        modmoe.experts((q.p.ids, q.p.weights), q.x, q.w13, q.w2, 8, 2,
                       hidden_states_scale=q.x_scale)
    with pytest.raises(modmoe.Error, match=r"'hidden_states_scale' is missing"):
        modmoe.experts((q.p.ids, q.p.weights), q.x, q.w13, q.w2, 8, 2,
                       gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale)
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype bf16 with FP8 weights "
                                           r"\(quant scheme fp8-block\): expected e4m3"):
        run(q, hidden=q.p.x)
    with pytest.raises(modmoe.Error, match=r"'hidden_states_scale' has shape \[24, 1\]: "
                                           r"expected one fp32 scale per 1x128 group"):
        run(q, hidden_scale=np.ascontiguousarray(q.x_scale[:, :1]))
    with pytest.raises(modmoe.Error, match=r"'hidden_states_scale' .* with quant scheme none"):
        modmoe.experts((q.p.ids, q.p.weights), q.p.x, q.p.w13, q.p.w2, 8, 2,
                       hidden_states_scale=q.x_scale)


def test_scale_and_scheme_mix_ups(q):
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights_scale' is given and quant_scheme "
                                           r"is bf16"):
        run(q, quant_scheme="bf16")
    with pytest.raises(modmoe.Error, match=r"'quant_scheme' = 'fp8': expected 'fp8-block'"):
        run(q, quant_scheme="fp8")
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights_scale' has shape \[8, 2\]: "
                                           r"expected \[E_local\] \(fp8-tensor"):
        modmoe.ExpertWeights(q.w13, q.w2, gemm1_weights_scale=np.ones((8, 2), np.float32),
                             gemm2_weights_scale=q.w2_scale)
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights_scale' has shape \[8\]: expected "
                                           r"\[8, 2, 2\]"):
        run(q, quant_scheme="fp8-block", gemm1_weights_scale=np.ones(8, np.float32))
    held = modmoe.ExpertWeights(q.w13, q.w2, gemm1_weights_scale=q.w13_scale,
                                gemm2_weights_scale=q.w2_scale)
    with pytest.raises(modmoe.Error, match=r"gemm1_weights_scale is given with a "
                                           r"modmoe.ExpertWeights"):
        modmoe.experts((q.p.ids, q.p.weights), q.x, held, None, 8, 2,
                       hidden_states_scale=q.x_scale, gemm1_weights_scale=q.w13_scale)


def test_fused_moe_e4m3_hidden_needs_its_scale(q):
    logits = np.zeros((q.p.m, 8), np.float32)
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype e4m3 and no "
                                           r"hidden_states_scale is given"):
        modmoe.fused_moe(logits, None, q.x, q.w13, q.w2, 8, 2, gemm1_weights_scale=q.w13_scale,
                         gemm2_weights_scale=q.w2_scale)


def test_quantizer_errors(rng):
    x = bf16(rng.standard_normal((8, 192)))
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has shape \[8, 192\]: expected H "
                                           r"\(its last dimension\) a positive multiple of 128"):
        modmoe.quantize_activations(x, "fp8-block")
    x = bf16(rng.standard_normal((8, 128)))
    with pytest.raises(modmoe.Error, match=r"'quant_scheme' = none: expected Fp8PerTensor"):
        modmoe.quantize_activations(x, "bf16")
    with pytest.raises(modmoe.Error, match=r"static_scale=True needs scale="):
        modmoe.quantize_activations(x, "fp8-tensor", static_scale=True)
    with pytest.raises(modmoe.Error, match=r"'static_scale' = true with quant scheme fp8-block"):
        modmoe.quantize_activations(x, "fp8-block", static_scale=True,
                                    scale=np.ones((8, 1), np.float32))
    with pytest.raises(modmoe.Error, match=r"'scale'\[0\] = 0 with static_scale"):
        modmoe.quantize_activations(x, "fp8-tensor", static_scale=True,
                                    scale=np.zeros(1, np.float32))
    with pytest.raises(modmoe.Error, match=r"per_row_scale=True with quant_scheme 'fp8-block'"):
        modmoe.quantize_activations(x, "fp8-block", per_row_scale=True)
    with pytest.raises(modmoe.Error, match=r"'out' has dtype f32: expected e4m3"):
        modmoe.quantize_activations(x, "fp8-block", out=np.empty(x.shape, np.float32))
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype float8_e5m2: modmoe "
                                           r"takes"):
        modmoe.quantize_activations(x.astype(ml_dtypes.float8_e5m2), "fp8-block")
    with pytest.raises(modmoe.Error, match=r"'weights' has shape \[8, 128\]: expected \[E, R, C\]"):
        modmoe.quantize_weights(x, "fp8-block")


# ---------------------------------------------------------------------------------------
# FP8 fast accumulation (fp8_fast_accum=True: fp8-tensor only, docs/fp8.md "FP8 fast
# accumulation")
# ---------------------------------------------------------------------------------------


def relu2_bf16_bits(y):
    """bf16 bits of relu(y)^2, y and the square in fp32 (the oracle's epilogue)."""
    r = np.float32(max(np.float32(y), np.float32(0)))
    return np.array([r * r], np.float32).astype(BF16).view(np.uint16)[0]


def test_fp8_fast_accum_reaches_the_gemm1_definition():
    """The keyword selects GEMM1's definition: without it, the fp32 block loop (a fused
    multiply-add per 128 of K); with it, the fp32 sum over all of K times (sx * sw). Row 0 of
    w13 has block sums 193 and 99 and the scales are not powers of two, so the two definitions
    give different bf16 activations (gemm1_activation_output, Relu2)."""
    h, inter = 256, 128
    sx, sw = np.float32(0.042420532554388046), np.float32(0.04000921547412872)
    x = np.ones((1, h), np.float32).astype(E4M3)
    w13 = np.zeros((1, inter, h), np.float32)
    w13[0, 0, :64] = 3
    w13[0, 0, 64] = 1
    w13[0, 0, 128:161] = 3
    gen = np.random.default_rng(906)
    w13[0, 1:] = gen.integers(-3, 4, (inter - 1, h))
    w2 = gen.integers(-3, 4, (1, h, inter)).astype(np.float32).astype(E4M3)
    lora = np.zeros((1, 1, inter), BF16)  # only to receive gemm1_activation_output
    s = np.float32(sx * sw)
    b0, b1 = w13[0, :, :128].sum(1), w13[0, :, 128:].sum(1)
    # fma(b1, s, b0 * s): exact in float64 (fp32 products of small integers), rounded once
    promoted = [np.float32(np.float64(b1[i]) * np.float64(s) + np.float64(np.float32(b0[i] * s)))
                for i in range(inter)]
    full = [np.float32(np.float32(b0[i] + b1[i]) * s) for i in range(inter)]
    assert relu2_bf16_bits(promoted[0]) != relu2_bf16_bits(full[0])
    for fast, want in [(False, promoted), (True, full)]:
        out, _, act = modmoe.experts(
            (np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32)), x,
            w13.astype(E4M3), w2, 1, 1, activation_type=modmoe.ActivationType.Relu2,
            hidden_states_scale=np.array([sx], np.float32),
            gemm1_weights_scale=np.array([sw], np.float32),
            gemm2_weights_scale=np.ones(1, np.float32), gemm1_lora_delta=lora,
            fp8_fast_accum=fast)
        bits = np.asarray(act).view(np.uint16).reshape(-1)
        assert [int(b) for b in bits] == [int(relu2_bf16_bits(y)) for y in want], fast


def test_fp8_fast_accum_vs_float64_and_fused(rng):
    """With the keyword: the float64 bounds of the default hold (the oracle's full-K sum is
    fp32 too), and fused_moe == route() -> quantize_activations() -> experts() with it."""
    q = problem(rng, "fp8-tensor", hidden=1024, num_experts=8, top_k=2)
    assert_within_fp8_bounds(run(q, fp8_fast_accum=True), q)
    logits = rng.standard_normal((q.p.m, 8)).astype(np.float32)
    method = modmoe.RoutingMethodType.Renormalize
    ids, weights = modmoe.route(logits, None, method, 2)
    x, x_scale = modmoe.quantize_activations(q.p.x, "fp8-tensor")
    want = modmoe.experts((ids, weights), x, q.w13, q.w2, 8, 2, hidden_states_scale=x_scale,
                          gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale,
                          fp8_fast_accum=True)
    got = modmoe.fused_moe(logits, None, q.p.x, q.w13, q.w2, 8, 2, routing_method_type=method,
                           gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale,
                           fp8_fast_accum=True)
    assert first_mismatch(want, got) is None


def test_fp8_fast_accum_other_schemes_are_refused(rng):
    q = problem(rng, "fp8-block")
    with pytest.raises(modmoe.Error, match=r"'fp8_fast_accum' = true with quant scheme "
                                           r"fp8-block: expected quant scheme fp8-tensor"):
        run(q, fp8_fast_accum=True)
    logits = np.zeros((q.p.m, 8), np.float32)
    with pytest.raises(modmoe.Error, match=r"'fp8_fast_accum' = true with quant scheme "
                                           r"fp8-block"):
        modmoe.fused_moe(logits, None, q.p.x, q.w13, q.w2, 8, 2,
                         gemm1_weights_scale=q.w13_scale, gemm2_weights_scale=q.w2_scale,
                         fp8_fast_accum=True)
    with pytest.raises(modmoe.Error, match=r"'fp8_fast_accum' = true with quant scheme none"):
        modmoe.experts((q.p.ids, q.p.weights), q.p.x, q.p.w13, q.p.w2, 8, 2,
                       fp8_fast_accum=True)
