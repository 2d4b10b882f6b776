"""NVFP4 (W4A16) through the package on the CPU reference, the oracle of the W4A16 kernel
(docs/nvfp4.md): the quantizer bit for bit against the formula, the experts against float64
over the decoded weights within docs/nvfp4.md's bounds, bitwise against the bf16 experts where
the globals are powers of two, fused_moe against its stages bitwise, the forms the tensors may
take (float8_e4m3fn or uint8 scales, tensors or an ExpertWeights, prepared or not), one caller
that swaps bf16, FP8 and NVFP4 weights, and the argument errors."""

import numpy as np
import pytest

import modmoe
from conftest import (
    BF16,
    E2M1,
    E4M3,
    Fp8Problem,
    Nvfp4Problem,
    Problem,
    bf16,
    decode_nvfp4,
    f64,
    first_mismatch,
    fp8_intermediate,
    reference,
    rel_l2,
    unpack_e2m1,
)

# docs/nvfp4.md, "Experts": relative L2 against float64 over the decoded weights (the weights
# are the same numbers on both sides: only the bf16 pipeline's roundings are left), and with
# the activation rounded to bf16 in the float64 computation too (the output's two roundings).
BOUND_PLAIN = 6e-3
BOUND_ROUNDED = 4e-3


def problem(rng, **kw):
    kw.setdefault("hidden", 256)
    kw.setdefault("inter", 128)
    return Nvfp4Problem(Problem(rng, **kw))


def order(p):
    return modmoe.GateUpOrder.GateUp if p.gate_up else modmoe.GateUpOrder.UpGate


def run(q, topk=None, weights=None, hidden=None, **kw):
    """modmoe.experts on q's weights (tensors + scales, or `weights`: an ExpertWeights)."""
    p = q.p
    topk = (p.ids, p.weights) if topk is None else topk
    kw.setdefault("activation_type", p.act)
    kw.setdefault("gate_up_order", order(p))
    if weights is None:
        for key, value in q.weights().items():
            kw.setdefault(key, value)
    else:
        kw["gemm1_weights"], kw["gemm2_weights"] = weights, None
    return modmoe.experts(topk, p.x if hidden is None else hidden, num_experts=p.num_experts,
                          top_k=p.k, local_expert_offset=p.offset, local_num_experts=p.num_local,
                          **kw)


def assert_within_nvfp4_bounds(out, q, **kw):
    plain = rel_l2(out, reference(q.dq, **kw))
    rounded = rel_l2(out, reference(q.dq, intermediate=lambda a: f64(bf16(a)), **kw))
    print(f"rel L2 vs float64 over the decoded weights: {plain:.2e} (bound {BOUND_PLAIN}), with "
          f"the activation rounded to bf16 {rounded:.2e} (bound {BOUND_ROUNDED})")
    assert plain < BOUND_PLAIN and rounded < BOUND_ROUNDED, (plain, rounded)


# ---------------------------------------------------------------------------------------
# The quantizer: bit for bit against docs/nvfp4.md's formula
# ---------------------------------------------------------------------------------------


def e2m1_rn(v):
    """The e2m1 code nearest to each float32 of v, ties to the even code, saturating at 6;
    the sign kept (-0 and negatives that round to zero give 0x8)."""
    a = np.abs(v)[..., None]
    dist = np.abs(a - E2M1[:8])
    tie = dist == dist.min(axis=-1, keepdims=True)
    even = (np.arange(8) % 2) == 0
    code = np.argmax(2 * tie + (tie & even), axis=-1).astype(np.uint8)
    return code | np.where(np.signbit(v), np.uint8(8), np.uint8(0))


def nvfp4_formula(x, global_scale=None):
    """docs/nvfp4.md's quantizer on x [R, H] (float32 values of bf16): (packed uint8 [R, H/2],
    e4m3 scales [R, H/16], global float32). Dynamic global unless one is given."""
    x = np.asarray(x, np.float32)
    if global_scale is None:
        amax = np.abs(x).max()
        global_scale = np.maximum(amax, np.float32(1e-10)) / np.float32(2688)
    g = np.float32(global_scale)
    blocks = x.reshape(x.shape[0], -1, 16)
    amax_b = np.abs(blocks).max(axis=-1)
    s = np.minimum((amax_b / np.float32(6)) / g, np.float32(448)).astype(E4M3)
    d = s.astype(np.float32) * g
    safe = np.where(d == 0, np.float32(1), d)[..., None]
    codes = np.where(d[..., None] == 0, np.uint8(0), e2m1_rn(blocks / safe))
    codes = codes.reshape(x.shape)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, s, g


def test_quantize_nvfp4_is_the_formula(rng):
    x = bf16(rng.standard_normal((24, 256)) * 3)
    x[3, 32:48] = 0  # an all-zero block: scale 0, codes 0
    x[5, 64:80] *= 1e-4  # small blocks: e4m3 subnormal scales
    x[7, :16] = bf16([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -5, 7, -7, 0, 1, 2, 3, 6])
    q, s, g = modmoe.quantize_nvfp4(x)
    assert q.dtype == np.uint8 and q.shape == (24, 128)
    assert s.dtype == E4M3 and s.shape == (24, 16)
    assert g.dtype == np.float32 and g.shape == (1,)
    want_q, want_s, want_g = nvfp4_formula(f64(x))
    assert g[0] == want_g
    assert first_mismatch(s.view(np.uint8), want_s.view(np.uint8)) is None
    assert first_mismatch(q, want_q) is None
    assert np.all(s.view(np.uint8)[3, 2] == 0) and np.all(q[3, 16:24] == 0)


def test_quantize_nvfp4_batched_and_static_global(rng):
    x = bf16(rng.standard_normal((3, 8, 64)))
    q, s, g = modmoe.quantize_nvfp4(x)
    assert q.shape == (3, 8, 32) and s.shape == (3, 8, 4)
    want_q, want_s, _ = nvfp4_formula(f64(x).reshape(24, 64))
    assert first_mismatch(q.reshape(24, 32), want_q) is None
    # static: the caller's global, only read; values past 6 * 448 * global saturate to +-6
    global_scale = np.array([2.0**-12], np.float32)
    out, scale = np.empty((3, 8, 32), np.uint8), np.empty((3, 8, 4), np.uint8)
    q, s, g = modmoe.quantize_nvfp4(x, global_scale=global_scale, static_global_scale=True,
                                   out=out, scale=scale)
    assert q is out and s is scale and g is global_scale and g[0] == np.float32(2.0**-12)
    want_q, want_s, _ = nvfp4_formula(f64(x).reshape(24, 64), global_scale[0])
    assert first_mismatch(q.reshape(24, 32), want_q) is None
    assert np.all(s.reshape(24, 4) == want_s.view(np.uint8)) and np.any(s == 0x7E)


def test_dequantize_nvfp4(rng):
    x = bf16(rng.standard_normal((16, 128)))
    q, s, g = modmoe.quantize_nvfp4(x)
    out = modmoe.dequantize_nvfp4(q, s, g)
    assert out.dtype == np.float32 and out.shape == x.shape
    want = (E2M1[unpack_e2m1(q)] * np.repeat(f64(s), 16, axis=-1)).astype(np.float32) * g[0]
    assert np.array_equal(out, want)  # (e2m1 * scale) exact, then one fp32 multiply
    exact = decode_nvfp4(q, s, g)  # float64, exact: the fp32 result is one rounding of it
    assert np.all(np.abs(f64(out) - exact) <= np.abs(exact) * 2.0**-24)
    half = modmoe.dequantize_nvfp4(q, s.view(np.uint8), g, out_dtype="bfloat16")
    assert half.dtype == np.uint16  # raw bits where the scale is: NumPy has no bf16
    assert np.array_equal(f64(half.view(BF16)), f64(bf16(out)))
    # the e2m1 grid's own error: about 0.10 relative RMS on N(0, 1) data
    err = np.linalg.norm(out - f64(x)) / np.linalg.norm(f64(x))
    assert 0.05 < err < 0.15, err


def test_quantize_weights_nvfp4_one_global_per_expert(rng):
    w = bf16(rng.standard_normal((3, 64, 128)) * [[[0.01]], [[1.0]], [[100.0]]])
    q, s, g = modmoe.quantize_weights(w, modmoe.QuantScheme.Nvfp4)
    assert q.shape == (3, 64, 64) and s.shape == (3, 64, 8) and g.shape == (3,)
    for e in range(3):
        want_q, want_s, want_g = nvfp4_formula(f64(w[e]))
        assert g[e] == want_g
        assert first_mismatch(q[e], want_q) is None
        assert first_mismatch(s[e].view(np.uint8), want_s.view(np.uint8)) is None


# ---------------------------------------------------------------------------------------
# Experts against float64 over the decoded weights
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("gate_up", [True, False], ids=["gate_up", "up_gate"])
def test_experts_vs_float64(rng, act, gate_up):
    q = problem(rng, act=act, gate_up=gate_up)
    out = run(q)
    assert out.dtype == BF16 and out.shape == (q.p.m, q.p.hidden)
    assert_within_nvfp4_bounds(out, q)


def test_expert_parallel_rows(rng):
    """Rows as an all-to-all delivers them: -1 padding, other ranks' ids, num_experts."""
    q = problem(rng, num_experts=16, num_local=4, local_offset=8, top_k=4, m=32)
    ids = q.p.ids.copy()
    ids[-6:] = -1
    ids[3, :] = [0, 1, 2, 3]
    ids[4, 1] = 16
    out = run(q, topk=(ids, q.p.weights))
    assert np.all(f64(out[-6:]) == 0) and np.all(f64(out[3]) == 0)
    assert_within_nvfp4_bounds(out, q, ids=ids)


def test_power_of_two_globals_are_the_bf16_experts(rng):
    """With power-of-two globals, e2m1 * scale * global is exact in bf16 and the global
    multiplies the fp32 sum exactly: the NVFP4 experts equal the bf16 experts on the decoded
    weights, bit for bit (docs/nvfp4.md, "Experts")."""
    q = problem(rng)
    for name in ("w13_global", "w2_global"):
        g = getattr(q, name)
        setattr(q, name, (2.0 ** np.round(np.log2(g))).astype(np.float32))
    w13 = decode_nvfp4(q.w13, q.w13_scale, q.w13_global)
    w2 = decode_nvfp4(q.w2, q.w2_scale, q.w2_global)
    assert np.array_equal(f64(bf16(w13)), w13) and np.array_equal(f64(bf16(w2)), w2)
    want = modmoe.experts((q.p.ids, q.p.weights), q.p.x, bf16(w13), bf16(w2), 8, 2)
    assert first_mismatch(want, run(q)) is None


def test_unfinalized_matches_finalized(rng):
    q = problem(rng, top_k=3)
    gemm2, expert_weights, e2p = run(q, do_finalize=False)
    assert gemm2.dtype == BF16 and gemm2.shape == (q.p.m * 3, q.p.hidden)
    rows = f64(gemm2)[e2p]  # [M, k, H], every id local here
    out = f64(run(q))
    acc = np.einsum("mk,mkh->mh", f64(expert_weights), rows)
    assert np.all(np.abs(acc - out) <= np.abs(out) * 2.0**-7 + 1e-30)  # one bf16 rounding


def test_lora_delta_and_intermediate_size(rng):
    """gemm1_activation_output is [M * k, I] with I in values (2 * the packed gemm2 columns)."""
    q = problem(rng)
    delta = bf16(rng.standard_normal((q.p.m, q.p.k, 2 * q.p.inter)) * 0.1)
    out, e2p, act = run(q, gemm1_lora_delta=delta, intermediate_size=q.p.inter)
    assert act.shape == (q.p.m * q.p.k, q.p.inter) and e2p.shape == (q.p.m, q.p.k)
    prepared = modmoe.prepare_weights(**q.weights())
    assert prepared.intermediate_size == q.p.inter and prepared.hidden_size == q.p.hidden
    out2, _, act2 = run(q, weights=prepared, gemm1_lora_delta=delta)
    assert first_mismatch(out, out2) is None and first_mismatch(act, act2) is None


# ---------------------------------------------------------------------------------------
# The forms of the weights: all bitwise the same call
# ---------------------------------------------------------------------------------------


def test_weight_forms_are_the_same_call(rng):
    q = problem(rng)
    want = run(q)
    held = modmoe.ExpertWeights(q.w13, q.w2, **{k: v for k, v in q.weights().items()
                                                  if k.endswith(("scale", "scalar"))})
    assert held.quant_scheme == modmoe.QuantScheme.Nvfp4  # from the e4m3 block scales
    assert held.intermediate_size == q.p.inter and held.output1_scale_scalar is q.w13_global
    assert "quant_scheme=nvfp4" in repr(held)
    assert first_mismatch(want, run(q, weights=held)) is None
    for scheme in ("nvfp4", modmoe.QuantScheme.Nvfp4):
        assert first_mismatch(want, run(q, quant_scheme=scheme)) is None
    # uint8 bytes for the block scales: the scheme comes from the global scales
    raw = run(q, gemm1_weights_scale=q.w13_scale.view(np.uint8),
              gemm2_weights_scale=q.w2_scale.view(np.uint8))
    assert first_mismatch(want, raw) is None
    # FlashInfer's output1_scale_gate_scalar: the same globals, as the same or an equal array
    for gate in (q.w13_global, q.w13_global.copy()):
        assert first_mismatch(want, run(q, output1_scale_gate_scalar=gate)) is None


@pytest.mark.parametrize("gate_up", [True, False], ids=["gate_up", "up_gate"])
@pytest.mark.parametrize("rows", [8, 32])
def test_prepare_weights(rng, gate_up, rows):
    """The prepared layout changes nothing but the layout: gemm1's packed rows, their scale
    rows and the bias rows interleaved by `rows` (gate, up, ...), the rest copied."""
    q = problem(rng, gate_up=gate_up)
    p, inter = q.p, q.p.inter
    bias1 = rng.standard_normal((p.num_local, 2 * inter)).astype(np.float32)
    bias2 = rng.standard_normal((p.num_local, p.hidden)).astype(np.float32)
    w = modmoe.prepare_weights(**q.weights(), gate_up_order=order(p), gemm1_bias=bias1,
                               gemm2_bias=bias2, interleave_rows=rows)
    assert w.interleave_rows == rows and w.quant_scheme == modmoe.QuantScheme.Nvfp4

    def interleaved(t):
        gate, up = (t[:, :inter], t[:, inter:]) if gate_up else (t[:, inter:], t[:, :inter])
        tail = t.shape[2:]
        return np.stack([gate.reshape((-1, inter // rows, rows) + tail),
                         up.reshape((-1, inter // rows, rows) + tail)], axis=2).reshape(t.shape)

    assert first_mismatch(w.gemm1_weights, interleaved(q.w13)) is None
    assert first_mismatch(w.gemm1_weights_scale.view(np.uint8),
                          interleaved(q.w13_scale.view(np.uint8))) is None
    assert np.array_equal(w.gemm1_bias, interleaved(bias1))
    assert np.array_equal(w.gemm2_weights, q.w2) and np.array_equal(w.gemm2_bias, bias2)
    assert np.array_equal(w.gemm2_weights_scale.view(np.uint8), q.w2_scale.view(np.uint8))
    assert np.array_equal(w.output1_scale_scalar, q.w13_global)
    assert np.array_equal(w.output2_scale_scalar, q.w2_global)
    no_bias = modmoe.prepare_weights(**q.weights(), gate_up_order=order(p), interleave_rows=rows)
    assert first_mismatch(run(q), run(q, weights=no_bias)) is None


def test_prepare_weights_into_out(rng):
    q = problem(rng)
    out = tuple(np.empty_like(x) for x in (q.w13, q.w2)) + (None, None) + tuple(
        np.empty(x.shape, np.uint8) for x in (q.w13_scale, q.w2_scale)) + tuple(
        np.full_like(x, np.nan) for x in (q.w13_global, q.w2_global))
    w = modmoe.prepare_weights(**q.weights(), out=out)
    assert w.gemm1_weights is out[0] and w.gemm1_weights_scale is out[4]
    assert w.output2_scale_scalar is out[7] and np.array_equal(out[7], q.w2_global)
    assert first_mismatch(run(q), run(q, weights=w)) is None


# ---------------------------------------------------------------------------------------
# fused_moe against its stages; one caller for bf16, FP8 and NVFP4
# ---------------------------------------------------------------------------------------


def test_fused_moe_is_route_experts(rng):
    q = problem(rng, num_experts=8, top_k=2)
    logits = rng.standard_normal((q.p.m, 8)).astype(np.float32)
    method = modmoe.RoutingMethodType.Renormalize
    ids, weights = modmoe.route(logits, None, method, 2)
    want = modmoe.experts((ids, weights), q.p.x, num_experts=8, top_k=2, **q.weights())
    nbytes = modmoe.fused_moe_workspace_size(q.p.m, q.p.hidden, q.p.inter, 2, 8,
                                             routing_method_type=method, quant_scheme="nvfp4")
    got_ids = np.empty_like(ids)
    got = modmoe.fused_moe(logits, None, q.p.x, num_experts=8, top_k=2,
                           routing_method_type=method, workspace=np.empty(nbytes, np.uint8),
                           topk_ids=got_ids, **q.weights())
    assert np.array_equal(ids, got_ids)
    assert first_mismatch(want, got) is None
    prepared = modmoe.prepare_weights(**q.weights())
    got = modmoe.fused_moe(logits, None, q.p.x, prepared, None, 8, 2, routing_method_type=method)
    assert first_mismatch(want, got) is None


def test_workspace_sizes_take_the_scheme():
    """NVFP4 (W4A16) carves no quantized copy of the hidden states."""
    assert modmoe.experts_workspace_size(64, 256, 128, 2, 8, quant_scheme="nvfp4") >= 0
    fused = modmoe.fused_moe_workspace_size(64, 256, 128, 2, 8, quant_scheme="nvfp4")
    experts = modmoe.experts_workspace_size(64, 256, 128, 2, 8, quant_scheme="nvfp4")
    assert fused == 2 * 64 * 2 * 4 + experts  # topk ids and weights, each 512 bytes


def layer(x, logits, weights):
    """A model's MoE layer: the call does not change with the precision of the weights."""
    return modmoe.fused_moe(logits, None, x, num_experts=8, top_k=2,
                            routing_method_type=modmoe.RoutingMethodType.Renormalize, **weights)


def test_one_caller_for_bf16_fp8_and_nvfp4(rng):
    p = Problem(rng, hidden=256, inter=128)
    logits = rng.standard_normal((p.m, 8)).astype(np.float32)
    ids, weights = modmoe.route(logits, None, modmoe.RoutingMethodType.Renormalize, 2)
    f8, f4 = Fp8Problem(p, "fp8-block"), Nvfp4Problem(p)
    runs = {
        "bf16": (dict(gemm1_weights=p.w13, gemm2_weights=p.w2), p, {}, 1e-2),
        "fp8-block": (f8.weights(), f8.dq, dict(intermediate=fp8_intermediate), 5e-3),
        "nvfp4": (f4.weights(), f4.dq, {}, BOUND_PLAIN),
    }
    for name, (kw, oracle, ref_kw, bound) in runs.items():
        out = layer(p.x, logits, kw)
        # the FP8 oracle over its dequantized hidden states (the fused call quantizes them)
        err = rel_l2(out, reference(oracle, ids=ids, weights=weights, **ref_kw))
        undecoded = rel_l2(out, reference(p, ids=ids, weights=weights))
        print(f"{name}: rel L2 vs float64 over its own weights {err:.2e} (bound {bound}), "
              f"vs the bf16 masters {undecoded:.3f}")
        assert err < bound, (name, err)
        assert undecoded < 0.25, (name, undecoded)  # NVFP4: the e2m1 grid's error, ~0.16


# ---------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------


@pytest.fixture
def q(rng):
    return problem(rng)


def test_nvfp4_hidden_states_are_bf16(q):
    x8, x_scale = modmoe.quantize_activations(q.p.x, "fp8-block")
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype e4m3 with NVFP4 weights "
                                           r"\(quant scheme nvfp4\): expected bf16 \(W4A16"):
        run(q, hidden=x8)
    x4, _, _ = modmoe.quantize_nvfp4(q.p.x)
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype u8 with NVFP4 weights .* "
                                           r"W4A4, are not supported yet"):
        run(q, hidden=x4)
    with pytest.raises(modmoe.Error, match=r"'hidden_states_scale' of shape \[24, 2\] is given: "
                                           r"expected it undefined with bf16 hidden"):
        run(q, hidden_states_scale=x_scale)
    logits = np.zeros((q.p.m, 8), np.float32)
    with pytest.raises(modmoe.Error, match=r"'hidden_states' has dtype u8 with NVFP4 weights"):
        modmoe.fused_moe(logits, None, x4, num_experts=8, top_k=2, **q.weights())


def test_missing_scales(q):
    kw = q.weights()
    with pytest.raises(modmoe.Error, match=r"'output1_scale_scalar' is missing: expected a "
                                           r"tensor"):
        run(q, output1_scale_scalar=None, output2_scale_scalar=None)
    with pytest.raises(modmoe.Error, match=r"'output2_scale_scalar' is missing"):
        run(q, output2_scale_scalar=None)
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights_scale' is missing"):
        run(q, gemm1_weights_scale=None)
    with pytest.raises(modmoe.Error, match=r"'gemm2_weights_scale' is missing"):
        modmoe.prepare_weights(**dict(kw, gemm2_weights_scale=None))
    # packed weights alone: read as bf16, and the message says what NVFP4 needs
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights' has dtype u8 and the weights are "
                                           r"bf16: .* NVFP4 experts packed uint8 weights with "
                                           r"their e4m3 block scales and fp32 global scales"):
        modmoe.experts((q.p.ids, q.p.weights), q.p.x, q.w13, q.w2, 8, 2)


def test_wrong_dtypes(q):
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights' has dtype bf16 with quant_scheme "
                                           r"nvfp4: expected uint8 \(or float4_e2m1fn_x2\)"):
        run(q, gemm1_weights=q.p.w13)
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights_scale' has dtype f32: expected e4m3"):
        run(q, gemm1_weights_scale=q.w13_scale.astype(np.float32))
    with pytest.raises(modmoe.Error, match=r"'output2_scale_scalar' has dtype f64: expected f32"):
        run(q, output2_scale_scalar=q.w2_global.astype(np.float64))
    with pytest.raises(modmoe.Error, match=r"'output1_scale_scalar' is given and quant_scheme is "
                                           r"fp8-block: expected None"):
        f8 = Fp8Problem(q.p, "fp8-block")
        modmoe.ExpertWeights(f8.w13, f8.w2, gemm1_weights_scale=f8.w13_scale,
                             gemm2_weights_scale=f8.w2_scale, output1_scale_scalar=q.w13_global)
    with pytest.raises(modmoe.Error, match=r"'quant_scheme' = 'fp4': expected .*'nvfp4' "
                                           r"\(QuantScheme.Nvfp4\)"):
        run(q, quant_scheme="fp4")


def test_wrong_shapes_and_values(q):
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights_scale' has shape \[8, 256, 8\]: "
                                           r"expected \[E_local, w13 rows, H/16\]"):
        run(q, gemm1_weights_scale=np.ascontiguousarray(q.w13_scale[:, :, :8]))
    with pytest.raises(modmoe.Error, match=r"'output1_scale_scalar' has shape \[8, 2\]: expected "
                                           r"\[E_local\]"):
        run(q, output1_scale_scalar=np.stack([q.w13_global] * 2, axis=1))
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights' has shape \[8, 256, 64\]: expected "
                                           r"\[E_local, 2I, H/2\]"):
        run(q, gemm1_weights=np.ascontiguousarray(q.w13[:, :, :64]))
    bad = q.w13_global.copy()
    bad[3] = 0
    with pytest.raises(modmoe.Error, match=r"'output1_scale_scalar'\[3\] = 0: expected a finite "
                                           r"positive dequantization scale"):
        run(q, output1_scale_scalar=bad)
    with pytest.raises(modmoe.Error, match=r"'intermediate_size' = 64: expected 2 \* "
                                           r"gemm2_weights.shape\[2\] = 128"):
        run(q, intermediate_size=64)
    with pytest.raises(modmoe.Error, match=r"'output1_scale_gate_scalar' differs from "
                                           r"output1_scale_scalar"):
        run(q, output1_scale_gate_scalar=q.w13_global * 2)
    held = modmoe.prepare_weights(**q.weights())
    with pytest.raises(modmoe.Error, match=r"output1_scale_scalar is given with a "
                                           r"modmoe.ExpertWeights"):
        run(q, weights=held, output1_scale_scalar=q.w13_global)


def test_per_row_globals_equal_rows_quantized_alone(rng):
    # A global_scale of [T] (quantize before dispatch, docs/nvfp4.md): each row is quantized as
    # a tensor of its own, so its bytes and global equal those of the row alone.
    x = bf16(rng.standard_normal((8, 64)) * np.logspace(-2, 2, 8)[:, None])
    q, s, g = modmoe.quantize_nvfp4(x, global_scale=np.full(8, np.nan, np.float32))
    assert g.shape == (8,)
    for t in range(8):
        qt, st, gt = modmoe.quantize_nvfp4(x[t:t + 1])
        assert np.array_equal(q[t], qt[0]) and np.array_equal(s[t].view(np.uint8), st[0].view(np.uint8))
        assert g[t].tobytes() == gt[0].tobytes()
    back = modmoe.dequantize_nvfp4(q, s, g)
    for t in range(8):
        assert np.array_equal(back[t], modmoe.dequantize_nvfp4(q[t:t + 1], s[t:t + 1], g[t:t + 1])[0])


def test_quantizer_errors(rng):
    x = bf16(rng.standard_normal((8, 48)))
    with pytest.raises(modmoe.Error, match=r"'hidden_states' = 48 \(x.size\(-1\)\): expected a "
                                           r"positive multiple of 32"):
        modmoe.quantize_nvfp4(x)
    x = bf16(rng.standard_normal((8, 64)))
    with pytest.raises(modmoe.Error, match=r"'x' has dtype f32: expected bf16"):
        modmoe.quantize_nvfp4(f64(x).astype(np.float32))
    with pytest.raises(modmoe.Error, match=r"static_global_scale=True needs global_scale="):
        modmoe.quantize_nvfp4(x, static_global_scale=True)
    with pytest.raises(modmoe.Error, match=r"'global_scale'\[0\] = 0 with "
                                           r"static_global_scale: expected a finite positive"):
        modmoe.quantize_nvfp4(x, global_scale=np.zeros(1, np.float32), static_global_scale=True)
    with pytest.raises(modmoe.Error, match=r"'scale' has shape \[8, 2\]: expected \[T, H/16\]"):
        modmoe.quantize_nvfp4(x, scale=np.empty((8, 2), np.uint8))
    with pytest.raises(modmoe.Error, match=r"'global_scale' has shape \[3\]: expected \[1\] \(one "
                                           r"fp32 global per tensor\) or one per row, \[T\] = \[8\]"):
        modmoe.quantize_nvfp4(x, global_scale=np.empty(3, np.float32))
    with pytest.raises(modmoe.Error, match=r"'out_dtype' = 'float16'"):
        q, s, g = modmoe.quantize_nvfp4(x)
        modmoe.dequantize_nvfp4(q, s, g, out_dtype="float16")
    with pytest.raises(modmoe.Error, match=r"quantize_activations with quant_scheme 'nvfp4': "
                                           r"expected an FP8 scheme; NVFP4 tensors come from "
                                           r"modmoe.quantize_nvfp4"):
        modmoe.quantize_activations(x, "nvfp4")
    with pytest.raises(modmoe.Error, match=r"'weights' has shape \[8, 64\]: expected \[E, R, C\]"):
        modmoe.quantize_weights(x, "nvfp4")
    with pytest.raises(modmoe.Error, match=r"global_scale= is given with quant_scheme "
                                           r"'fp8-block'"):
        modmoe.quantize_weights(x, "fp8-block", global_scale=np.empty(1, np.float32))


def test_torch_cpu_tensors(rng):
    """PyTorch CPU tensors: float8_e4m3fn scales, uint8 or float4_e2m1fn_x2 weights."""
    torch = pytest.importorskip("torch")
    q = problem(rng)
    want = run(q)
    t = {k: torch.from_numpy(np.ascontiguousarray(v.view(np.uint8) if v.dtype == E4M3 else v))
         for k, v in q.weights().items()}
    for k in ("gemm1_weights_scale", "gemm2_weights_scale"):
        t[k] = t[k].view(torch.float8_e4m3fn)
    x = torch.from_numpy(np.ascontiguousarray(q.p.x).view(np.int16)).view(torch.bfloat16)
    topk = (torch.from_numpy(q.p.ids), torch.from_numpy(q.p.weights))
    out = modmoe.experts(topk, x, num_experts=8, top_k=2, **t)
    assert first_mismatch(f64(want), out.float().numpy()) is None
    tq, ts, tg = modmoe.quantize_nvfp4(x)
    assert tq.dtype == torch.uint8 and ts.dtype == torch.float8_e4m3fn
    if hasattr(torch, "float4_e2m1fn_x2"):
        t = dict(t, gemm1_weights=t["gemm1_weights"].view(torch.float4_e2m1fn_x2),
                 gemm2_weights=t["gemm2_weights"].view(torch.float4_e2m1fn_x2))
        out = modmoe.experts(topk, x, num_experts=8, top_k=2, **t)
        assert first_mismatch(f64(want), out.float().numpy()) is None

