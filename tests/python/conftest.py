"""Shared helpers of the Python tests: seeded problems, bf16 and e4m3 through ml_dtypes, and the
float64 and same-precision references of the experts stage (docs/contract.md, "Numerics"; FP8:
docs/fp8.md).

NumPy has no bf16 or e4m3 dtype: the tests use ml_dtypes.bfloat16 and float8_e4m3fn arrays,
which modmoe reads through their uint16 / uint8 bits."""

import os

import ml_dtypes
import numpy as np
import pytest

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTING_DATA = os.path.join(REPO, "tests", "data", "routing")


def bf16(x):
    """Round to bf16 (nearest even), as a bf16 array."""
    return np.asarray(x, dtype=np.float32).astype(BF16)


def f64(x):
    return np.asarray(x).astype(np.float64)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, printed so that a failure can be replayed."""
    seed = sum(map(ord, request.node.name)) % (2**31)
    print(f"seed = {seed}")
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------


class Problem:
    """An experts problem: x [M, H], w13 [E_local, 2I (or I), H], w2 [E_local, H, I] in bf16,
    global ids [M, k] and fp32 weights [M, k]."""

    def __init__(self, rng, m=24, hidden=128, inter=64, num_experts=8, top_k=2,
                 local_offset=0, num_local=None, act="swiglu", gate_up=True):
        num_local = num_experts if num_local is None else num_local
        rows = inter if act == "relu2" else 2 * inter
        self.m, self.hidden, self.inter, self.k = m, hidden, inter, top_k
        self.num_experts, self.offset, self.num_local = num_experts, local_offset, num_local
        self.act, self.gate_up = act, gate_up
        self.x = bf16(rng.standard_normal((m, hidden)))
        self.w13 = bf16(rng.standard_normal((num_local, rows, hidden)) / np.sqrt(hidden))
        self.w2 = bf16(rng.standard_normal((num_local, hidden, inter)) / np.sqrt(inter))
        ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(m)])
        self.ids = ids.astype(np.int32)
        w = rng.uniform(0.1, 1.0, (m, top_k)).astype(np.float32)
        self.weights = (w / w.sum(1, keepdims=True)).astype(np.float32)
        self.alpha = self.beta = self.limit = None

    def gate_up_rows(self, e):
        """(gate [I, H], up [I, H]) of local expert e, float64."""
        w = f64(self.w13[e])
        i = self.inter
        return (w[:i], w[i:]) if self.gate_up else (w[i:], w[:i])


def activation(p, e, h_gate, h_up, dtype):
    """The contract's activations, in `dtype` (float64 for the reference)."""
    g, u = h_gate.astype(dtype), h_up.astype(dtype) if h_up is not None else None
    if p.act == "swiglu":
        return g / (1 + np.exp(-g)) * u
    if p.act == "geglu":
        from math import erf

        verf = np.vectorize(erf)
        return 0.5 * g * (1 + verf(g / np.sqrt(2.0)).astype(dtype)) * u
    if p.act == "relu2":
        return np.maximum(g, 0) ** 2
    if p.act == "swiglu_oai":
        alpha = p.alpha[e] if p.alpha is not None else 1.702
        beta = p.beta[e] if p.beta is not None else 1.0
        limit = p.limit[e] if p.limit is not None else 7.0
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
        return g / (1 + np.exp(-alpha * g)) * (u + beta)
    raise ValueError(p.act)


def reference(p, ids=None, weights=None, precision="f64", weight_on_input=False,
              intermediate=None):
    """out [M, H] float64: sum over local j of w_j * Expert_{id_j}(x).

    precision "f64": every step in float64 from the bf16 inputs (the oracle).
    precision "bf16": the same-precision composition PyTorch would run: bf16 GEMM outputs
    (fp32 accumulate), activation on bf16 inputs rounded to bf16, weighted sum in fp32, one
    cast. The contract bounds modmoe's error by 1.5x of this composition's.
    intermediate: a function applied to each activation vector [I] before GEMM2 (FP8:
    fp8_intermediate, the rounding of docs/fp8.md)."""
    ids = p.ids if ids is None else ids
    weights = p.weights if weights is None else weights
    low = precision == "bf16"
    dt = np.float32 if low else np.float64
    out = np.zeros((ids.shape[0], p.hidden), dtype=dt)
    for m in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j]) - p.offset
            if not 0 <= e < p.num_local:
                continue
            w = dt(weights[m, j])
            x = f64(p.x[m])
            if weight_on_input:
                x = f64(bf16(x * w)) if low else x * w
                w = dt(1.0)
            if p.act == "relu2":
                h = f64(p.w13[e]) @ x
                h = f64(bf16(h)) if low else h
                a = activation(p, e, h, None, dt)
            else:
                gate, up = p.gate_up_rows(e)
                hg, hu = gate @ x, up @ x
                if low:
                    hg, hu = f64(bf16(hg)), f64(bf16(hu))
                a = activation(p, e, hg, hu, dt)
            if low:
                a = f64(bf16(a))
            if intermediate is not None:
                a = intermediate(a)
            y = f64(p.w2[e]) @ f64(a)
            if low:
                y = f64(bf16(y))
            out[m] += w * y.astype(dt)
    return f64(bf16(out)) if low else out


def rel_l2(a, ref):
    a, ref = f64(a), f64(ref)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_within_contract(out, p, **kw):
    """modmoe's relative L2 error vs float64 is within 1.5x of the same-precision
    composition's (docs/contract.md, "Numerics")."""
    ref = reference(p, **kw)
    comp = reference(p, precision="bf16", **kw)
    err, err_comp = rel_l2(out, ref), rel_l2(comp, ref)
    print(f"rel L2 vs float64: modmoe {err:.3e}, bf16 composition {err_comp:.3e}")
    assert err <= 1.5 * err_comp + 1e-6, (err, err_comp)
    assert err < 1e-2


def first_mismatch(a, b):
    """The first differing coordinate of two arrays, for failure messages."""
    diff = np.argwhere(f64(a) != f64(b))
    return None if diff.size == 0 else tuple(int(i) for i in diff[0])


# ---------------------------------------------------------------------------------------
# FP8 (docs/fp8.md): the quantizer's formula, dequantization, the intermediate's rounding
# ---------------------------------------------------------------------------------------


def e4m3_quantize(x):
    """docs/fp8.md's quantizer, one scale over the last axis of x [..., n]: s = max(amax,
    1e-10) / 448 and q = e4m3(x / s), each one fp32 operation. Returns (q e4m3 [..., n],
    s float32 [...])."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1)
    s = np.maximum(amax, np.float32(1e-10)) / np.float32(448)
    return (x / s[..., None]).astype(E4M3), s.astype(np.float32)


def dequantize(q, scale):
    """float64 q * scale, with a scale per block of q when scale has q's rank (the blocks tile
    q), per leading index for a 1-D scale of q.shape[0] entries, else one scale."""
    q, s = f64(q), f64(scale)
    if s.ndim == q.ndim:
        for d in range(q.ndim):
            s = np.repeat(s, q.shape[d] // s.shape[d], axis=d)
    elif s.size > 1:
        s = s.reshape((-1,) + (1,) * (q.ndim - 1))
    return q * s


def fp8_intermediate(a):
    """The FP8 experts' intermediate: the activation rounded to bf16, then to e4m3 in 1x128
    groups (docs/fp8.md, "Experts"); float64 [I]."""
    q, s = e4m3_quantize(f64(bf16(a)).reshape(-1, 128))
    return dequantize(q, s[:, None]).reshape(-1)


class Fp8Problem:
    """A Problem's tensors quantized by modmoe (hidden_states, gemm1/gemm2 and their scales
    under `scheme`), and `dq`: the Problem over their float64 dequantization, whose reference()
    is FP8 experts' float64 oracle."""

    def __init__(self, p, scheme):
        import copy

        import modmoe

        self.p, self.scheme = p, scheme
        self.x, self.x_scale = modmoe.quantize_activations(p.x, scheme)
        self.w13, self.w13_scale = modmoe.quantize_weights(p.w13, scheme)
        self.w2, self.w2_scale = modmoe.quantize_weights(p.w2, scheme)
        self.dq = copy.copy(p)
        self.dq.x = dequantize(self.x, self.x_scale)
        self.dq.w13 = dequantize(self.w13, self.w13_scale)
        self.dq.w2 = dequantize(self.w2, self.w2_scale)

    def weights(self, **kw):
        """gemm1_weights, gemm2_weights and their scales as keywords of modmoe's calls."""
        return dict(gemm1_weights=self.w13, gemm2_weights=self.w2,
                    gemm1_weights_scale=self.w13_scale, gemm2_weights_scale=self.w2_scale, **kw)


# ---------------------------------------------------------------------------------------
# NVFP4 (docs/nvfp4.md): the 16 e2m1 codes, decoding, a Problem over NVFP4 weights
# ---------------------------------------------------------------------------------------

# e2m1 code -> value: 0x0..0x7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; 0x8..0xf the same negated.
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def unpack_e2m1(q):
    """uint8 [..., n/2] packed pairs -> the codes [..., n] (element 2i in the low nibble)."""
    q = np.asarray(q).view(np.uint8)
    return np.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[:-1] + (2 * q.shape[-1],))


def decode_nvfp4(q, scale, global_scale):
    """float64 e2m1 * block scale * global of packed q [..., n/2], e4m3 scale [..., n/16] and
    a global per leading index (global_scale [E] for weights [E, R, C/2]) or one ([1]). Exact:
    e2m1 * e4m3 has at most 6 significant bits, times an fp32 at most 30."""
    codes = unpack_e2m1(q)
    s = np.repeat(f64(np.asarray(scale).view(E4M3)), 16, axis=-1)
    g = f64(global_scale)
    g = g.reshape((-1,) + (1,) * (codes.ndim - 1)) if g.size > 1 else g.reshape(())
    return E2M1[codes] * s * g


class Nvfp4Problem:
    """A Problem's weights quantized by modmoe to NVFP4 (uint8 packed pairs, e4m3 block scales,
    fp32 global scale per expert), and `dq`: the Problem over their float64 decoding, whose
    reference() is the W4A16 experts' float64 oracle (the hidden states stay bf16)."""

    def __init__(self, p):
        import copy

        import modmoe

        self.p = p
        self.w13, self.w13_scale, self.w13_global = modmoe.quantize_weights(p.w13, "nvfp4")
        self.w2, self.w2_scale, self.w2_global = modmoe.quantize_weights(p.w2, "nvfp4")
        self.dq = copy.copy(p)
        self.dq.w13 = decode_nvfp4(self.w13, self.w13_scale, self.w13_global)
        self.dq.w2 = decode_nvfp4(self.w2, self.w2_scale, self.w2_global)

    def weights(self, **kw):
        """The NVFP4 weights as keywords of modmoe's calls."""
        return dict(gemm1_weights=self.w13, gemm2_weights=self.w2,
                    gemm1_weights_scale=self.w13_scale, gemm2_weights_scale=self.w2_scale,
                    output1_scale_scalar=self.w13_global, output2_scale_scalar=self.w2_global,
                    **kw)
