"""NVFP4 (W4A16) GPU tests of the Python package (PyTorch + CUDA, a device the build has an
image for; skipped without them): the CUDA quantize_nvfp4 / dequantize_nvfp4 /
quantize_weights / prepare_weights bit for bit against the CPU reference, the W4A16 experts
against the CPU oracle and float64 over the decoded weights (docs/nvfp4.md's bounds),
fused_moe against its stages bitwise, the forms of the tensors (uint8 or float4_e2m1fn_x2
weights, float8_e4m3fn or uint8 scales, canonical or prepared), CUDA graph capture without
allocation, and the vLLM adapter on CUDA tensors."""

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
import modmoe  # noqa: E402
import modmoe.vllm as mv  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not modmoe.built_with_cuda():
    pytest.skip("this modmoe build has no CUDA backend", allow_module_level=True)
if not mv.ModmoeExperts._supports_current_device():
    pytest.skip("the W4A16 grouped GEMM needs an image of this device in the build",
                allow_module_level=True)

from test_gpu import make_problem, rel_l2, torch_reference  # noqa: E402

DEV = "cuda"
# docs/nvfp4.md and tests/gpu/test_gpu_nvfp4_experts.cpp: against the CPU oracle (same weights
# and bf16 rounding points, another fp32 summation order), and against float64 over the
# decoded weights (the contract's bf16 bound).
BOUND_ORACLE = 4e-3
BOUND_F64 = 6e-3


def bits(t):
    return t.contiguous().view(torch.uint8)


def decode(q, scale, global_scale):
    """float64 e2m1 * block scale * global of packed q [..., n/2], e4m3 scale [..., n/16],
    global [E] (weights [E, R, C/2]) or [1]. Exact in float64."""
    table = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                         dtype=torch.float64, device=q.device)
    q = bits(q)
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])
    s = scale.view(torch.float8_e4m3fn).double().repeat_interleave(16, dim=-1)
    g = global_scale.double()
    g = g.reshape((-1,) + (1,) * (codes.dim() - 1)) if g.numel() > 1 else g.reshape(())
    return table[codes.long()] * s * g


class Nvfp4(SimpleNamespace):
    """make_problem's bf16 weights quantized to NVFP4 by modmoe on the GPU, their prepared
    form, and `dq`: the problem over the float64 decoding (torch_reference's W4A16 oracle)."""

    @classmethod
    def make(cls, seed, **kw):
        p = make_problem(seed, **kw)
        f = cls(p=p)
        f.w13, f.w13_scale, f.w13_global = modmoe.quantize_weights(p["w13"], "nvfp4")
        f.w2, f.w2_scale, f.w2_global = modmoe.quantize_weights(p["w2"], "nvfp4")
        f.prepared = modmoe.prepare_weights(**f.weights())
        f.dq = dict(p, w13=decode(f.w13, f.w13_scale, f.w13_global),
                    w2=decode(f.w2, f.w2_scale, f.w2_global))
        return f

    def weights(self, device=DEV):
        return dict(gemm1_weights=self.w13.to(device), gemm2_weights=self.w2.to(device),
                    gemm1_weights_scale=self.w13_scale.to(device),
                    gemm2_weights_scale=self.w2_scale.to(device),
                    output1_scale_scalar=self.w13_global.to(device),
                    output2_scale_scalar=self.w2_global.to(device))

    def run(self, ids=None, weights=None, hidden=None, prepared=True, **kw):
        """experts() on the prepared weights (or the canonical tensors)."""
        p = self.p
        ids = p["ids"] if ids is None else ids
        weights = p["weights"] if weights is None else weights
        hidden = p["x"] if hidden is None else hidden
        w = dict(gemm1_weights=self.prepared, gemm2_weights=None) if prepared else self.weights()
        return modmoe.experts((ids, weights), hidden, num_experts=p["num_experts"],
                              top_k=ids.shape[1], local_expert_offset=p["offset"],
                              local_num_experts=p["num_local"], activation_type=p["act"],
                              **w, **kw)

    def cpu_oracle(self, ids=None):
        """The same call on CPU tensors, canonical weights: the CPU oracle."""
        p = self.p
        ids = p["ids"] if ids is None else ids
        return modmoe.experts((ids.cpu(), p["weights"].cpu()), p["x"].cpu(),
                              num_experts=p["num_experts"], top_k=ids.shape[1],
                              local_expert_offset=p["offset"], local_num_experts=p["num_local"],
                              activation_type=p["act"], **self.weights("cpu"))


def test_quantizers_match_the_cpu():
    p = make_problem(11, m=96, hidden=512, inter=256, num_experts=4)
    x = p["x"]
    q, s, g = modmoe.quantize_nvfp4(x)
    q_cpu, s_cpu, g_cpu = modmoe.quantize_nvfp4(x.cpu())
    assert q.dtype == torch.uint8 and q.device.type == "cuda" and q.shape == (96, 256)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (96, 32) and g.shape == (1,)
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(bits(s).cpu(), bits(s_cpu))
    assert torch.equal(g.cpu(), g_cpu)
    static = torch.tensor([2.0**-10], device=DEV)
    q, s, _ = modmoe.quantize_nvfp4(x, global_scale=static, static_global_scale=True)
    q_cpu, s_cpu, _ = modmoe.quantize_nvfp4(x.cpu(), global_scale=static.cpu(),
                                            static_global_scale=True)
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(bits(s).cpu(), bits(s_cpu))
    for out_dtype in ("float32", "bfloat16"):
        d = modmoe.dequantize_nvfp4(q, s, static, out_dtype=out_dtype)
        d_cpu = modmoe.dequantize_nvfp4(q_cpu, s_cpu, static.cpu(), out_dtype=out_dtype)
        assert d.device.type == "cuda" and torch.equal(d.cpu(), d_cpu)
    for name in ("w13", "w2"):
        gpu = modmoe.quantize_weights(p[name], "nvfp4")
        cpu = modmoe.quantize_weights(p[name].cpu(), "nvfp4")
        for a, b in zip(gpu, cpu):
            assert torch.equal(bits(a).cpu(), bits(b))


@pytest.mark.parametrize("rows", [0, 8, 16])
def test_prepare_weights_matches_the_cpu(rows):
    f = Nvfp4.make(12, m=32, hidden=256, inter=128, num_experts=4)
    gpu = modmoe.prepare_weights(**f.weights(), interleave_rows=rows)
    cpu = modmoe.prepare_weights(**f.weights("cpu"), interleave_rows=rows)
    assert gpu.interleave_rows == cpu.interleave_rows == rows
    for name in ("gemm1_weights", "gemm2_weights", "gemm1_weights_scale", "gemm2_weights_scale",
                 "output1_scale_scalar", "output2_scale_scalar"):
        a, b = getattr(gpu, name), getattr(cpu, name)
        assert a.device.type == "cuda" and torch.equal(bits(a).cpu(), bits(b)), name


@pytest.mark.parametrize("act", ["swiglu", "geglu", "relu2"])
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "canonical"])
def test_experts_vs_cpu_oracle_and_float64(act, prepared):
    f = Nvfp4.make(1, act=act, num_experts=32, num_local=8, offset=8)
    ids = f.p["ids"].clone()
    ids[-32:] = -1  # padding rows
    out = f.run(ids, prepared=prepared)
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert torch.all(out[-32:] == 0)
    vs_cpu = rel_l2(out.cpu(), f.cpu_oracle(ids))
    vs_f64 = rel_l2(out, torch_reference(f.dq, ids))
    print(f"nvfp4 {act}: rel L2 vs the CPU oracle {vs_cpu:.2e} (bound {BOUND_ORACLE}), vs "
          f"float64 over the decoded weights {vs_f64:.2e} (bound {BOUND_F64}, swiglu)")
    assert vs_cpu < BOUND_ORACLE
    if act == "swiglu":
        assert vs_f64 < BOUND_F64


def test_decode_sizes():
    """T = 1 and 16 (the decode tiles), a single local expert touched by each token."""
    for m in (1, 16):
        f = Nvfp4.make(2, m=m, hidden=2048, inter=768, num_experts=8, top_k=2)
        out = f.run()
        assert rel_l2(out.cpu(), f.cpu_oracle()) < BOUND_ORACLE


def test_fused_is_route_experts():
    f = Nvfp4.make(4)
    p = f.p
    logits = torch.randn(p["x"].shape[0], p["num_experts"], device=DEV)
    method = modmoe.RoutingMethodType.Renormalize
    ids, weights = modmoe.route(logits, None, method, 4)
    staged = f.run(ids, weights)
    fused = modmoe.fused_moe(logits, None, p["x"], f.prepared, None, 16, 4,
                             routing_method_type=method)
    assert torch.equal(staged, fused)
    fused_tensors = modmoe.fused_moe(logits, None, p["x"], num_experts=16, top_k=4,
                                     routing_method_type=method, **f.weights())
    assert torch.equal(f.run(ids, weights, prepared=False), fused_tensors)


def test_tensor_forms_are_the_same_call():
    f = Nvfp4.make(5, m=64)
    want = f.run(prepared=False)
    kw = dict(f.weights(), gemm1_weights_scale=bits(f.w13_scale),
              gemm2_weights_scale=bits(f.w2_scale))
    p = f.p
    got = modmoe.experts((p["ids"], p["weights"]), p["x"], num_experts=16, top_k=4, **kw)
    assert torch.equal(want, got)
    if hasattr(torch, "float4_e2m1fn_x2"):
        kw = dict(f.weights(), gemm1_weights=f.w13.view(torch.float4_e2m1fn_x2),
                  gemm2_weights=f.w2.view(torch.float4_e2m1fn_x2))
        got = modmoe.experts((p["ids"], p["weights"]), p["x"], num_experts=16, top_k=4, **kw)
        assert torch.equal(want, got)


def test_cuda_graph_capture_without_allocation():
    f = Nvfp4.make(7, m=128)
    m, h = f.p["x"].shape
    output = torch.empty(m, h, dtype=torch.bfloat16, device=DEV)
    workspace = torch.empty(modmoe.experts_workspace_size(m, h, 512, 4, 16, quant_scheme="nvfp4"),
                            dtype=torch.uint8, device=DEV)
    f.run(output=output, workspace=workspace)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Counted inside the capture: torch's capture_begin may allocate its generator's graph
        # state by itself, which is not the call's.
        allocated = torch.cuda.memory_allocated()
        f.run(output=output, workspace=workspace)
        after = torch.cuda.memory_allocated()
    assert after == allocated
    f.p["x"].copy_(torch.randn_like(f.p["x"]))
    output.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(output, f.run())


def test_vllm_adapter():
    """ModmoeExperts on CUDA tensors with vLLM's W4A16 quant config: the weights stay as
    loaded, apply() on the bf16 rows equals experts() on the checkpoint tensors."""
    f = Nvfp4.make(8, m=64)
    p = f.p
    config = SimpleNamespace(quant_dtype=None, use_nvfp4_w4a16=True, block_shape=None,
                             per_act_token_quant=False, per_out_ch_quant=False,
                             w1_scale=f.w13_scale, w2_scale=f.w2_scale, g1_alphas=f.w13_global,
                             g2_alphas=f.w2_global)
    layer = SimpleNamespace(w13_weight=f.w13.clone(), w2_weight=f.w2)
    experts = mv.ModmoeExperts(quant_config=config)
    assert experts.expects_unquantized_inputs
    experts.process_weights_after_loading(layer)
    assert torch.equal(layer.w13_weight, f.w13)
    m, h = p["x"].shape
    output = torch.empty(m, h, dtype=torch.bfloat16, device=DEV)
    experts.apply(output, p["x"], layer.w13_weight, layer.w2_weight, p["weights"], p["ids"],
                  "silu", 16, None, None)
    assert torch.equal(output, f.run(prepared=False))
