"""Argument errors: modmoe.Error (a RuntimeError) with the C++ message, in the Python
argument names; TypeError for objects that are no tensors."""

import numpy as np
import pytest

import modmoe
from conftest import Problem, bf16


@pytest.fixture
def p(rng):
    return Problem(rng)


def experts(p, topk=None, hidden=None, w13=None, w2=None, **kw):
    topk = (p.ids, p.weights) if topk is None else topk
    return modmoe.experts(topk, p.x if hidden is None else hidden,
                          p.w13 if w13 is None else w13, p.w2 if w2 is None else w2,
                          p.num_experts, p.k, **kw)


def test_error_is_a_runtime_error():
    assert issubclass(modmoe.Error, RuntimeError)


def test_message_names_argument_value_and_expectation(p):
    with pytest.raises(modmoe.Error) as e:
        experts(p, hidden=p.x.astype(np.float32))
    msg = str(e.value)
    assert "argument 'hidden_states' has dtype f32: expected bf16" in msg
    assert msg.startswith("modmoe: ")


def test_weight_shape_message(p):
    with pytest.raises(modmoe.Error, match=r"'gemm1_weights' has shape \[8, 64, 128\]: "
                                           r"expected \[E_local, 2I, H\]"):
        experts(p, w13=np.ascontiguousarray(p.w13[:, :64]))
    with pytest.raises(modmoe.Error, match=r"'gemm2_weights' has shape \[8, 128\]"):
        experts(p, w2=np.ascontiguousarray(p.w2[:, :, 0]))


def test_values_given_beside_tensors_are_checked(p):
    with pytest.raises(modmoe.Error, match=r"'top_k' = 3: expected the columns of topk_ids"):
        modmoe.experts((p.ids, p.weights), p.x, p.w13, p.w2, p.num_experts, 3)
    with pytest.raises(modmoe.Error, match=r"'intermediate_size' = 128: expected "
                                           r"gemm2_weights.shape\[2\] = 64"):
        experts(p, intermediate_size=128)
    with pytest.raises(modmoe.Error, match=r"expected E_local = local_num_experts = 4"):
        experts(p, local_num_experts=4)


def test_topk_weights_shape_and_dtype(p):
    with pytest.raises(modmoe.Error, match=r"'topk_weights' has shape \[24, 1\]: "
                                           r"expected \[24, 2\]"):
        experts(p, topk=(p.ids, np.ascontiguousarray(p.weights[:, :1])))
    with pytest.raises(modmoe.Error, match=r"'topk_ids' has dtype i64: expected i32"):
        experts(p, topk=(p.ids.astype(np.int64), p.weights))
    with pytest.raises(modmoe.Error, match=r"'topk_weights' has dtype f64: expected f32 or bf16"):
        experts(p, topk=(p.ids, p.weights.astype(np.float64)))


def test_non_contiguous(p):
    with pytest.raises(modmoe.Error, match=r"'topk_ids' of shape \[24, 2\] is not contiguous"):
        experts(p, topk=(np.asfortranarray(p.ids), p.weights))
    x = bf16(np.zeros((p.m, 2 * p.hidden)))[:, ::2]
    with pytest.raises(modmoe.Error, match=r"'hidden_states' of shape \[24, 128\] is not "
                                           r"contiguous"):
        experts(p, hidden=x)


def test_objects_that_are_no_tensors(p):
    with pytest.raises(TypeError, match=r"'hidden_states': expected a tensor"):
        experts(p, hidden=[[1.0] * 4])
    with pytest.raises(TypeError, match=r"'gemm2_weights': expected a tensor .* got str"):
        experts(p, w2="w2")
    with pytest.raises(TypeError, match=r"'stream': expected an int"):
        experts(p, stream="default")


def test_dtypes_modmoe_does_not_take(p):
    with pytest.raises(modmoe.Error, match=r"'topk_ids' has dtype int8: modmoe takes"):
        experts(p, topk=(p.ids.astype(np.int8), p.weights))
    with pytest.raises(modmoe.Error, match=r"'topk_weights' has dtype complex64"):
        experts(p, topk=(p.ids, p.weights.astype(np.complex64)))
    with pytest.raises(modmoe.Error, match=r"'topk_weights' has 0 dimensions"):
        experts(p, topk=(p.ids, np.float32(1.0)))


def test_activation_types(p):
    with pytest.raises(modmoe.Error, match=r"'activation_type' = <ActivationType.Silu: 2>"):
        experts(p, activation_type=modmoe.ActivationType.Silu)
    with pytest.raises(modmoe.Error, match=r"'activation_type' = 'tanh'"):
        experts(p, activation_type="tanh")
    with pytest.raises(modmoe.Error, match=r"'gemm1_alpha' is given with the activation geglu"):
        experts(p, activation_type="geglu", gemm1_alpha=np.ones(p.num_local, np.float32))


def test_flashinfer_layouts_are_refused(p):
    with pytest.raises(modmoe.Error, match=r"BlockMajorK tensors are not accepted"):
        experts(p, weight_layout=modmoe.WeightLayout.BlockMajorK)
    with pytest.raises(modmoe.Error, match=r"use_shuffled_weight = True"):
        experts(p, use_shuffled_weight=True)
    experts(p, weight_layout=modmoe.WeightLayout.MajorK, use_shuffled_weight=False)


def test_expert_weights_take_no_gemm2(p):
    w = modmoe.ExpertWeights(p.w13, p.w2)
    with pytest.raises(modmoe.Error, match=r"gemm2_weights is given with a modmoe.ExpertWeights"):
        modmoe.experts((p.ids, p.weights), p.x, w, p.w2, p.num_experts, p.k)


def test_fused_moe_errors(p):
    logits = np.zeros((p.m, p.num_experts), np.float32)
    with pytest.raises(modmoe.Error, match=r"not supported yet: routing_replay_out"):
        modmoe.fused_moe(logits, None, p.x, p.w13, p.w2, p.num_experts, p.k,
                         routing_replay_out=np.zeros((p.m, p.k), np.int16))
    with pytest.raises(modmoe.Error, match=r"'workspace' has 1 bytes: expected at least"):
        modmoe.fused_moe(logits, None, p.x, p.w13, p.w2, p.num_experts, p.k,
                         workspace=np.zeros(1, np.uint8))
    with pytest.raises(modmoe.Error, match=r"'routing_logits' has shape \[24, 4\]: "
                                           r"expected \[T, E\] = \[24, 8\]"):
        modmoe.fused_moe(np.ascontiguousarray(logits[:, :4]), None, p.x, p.w13, p.w2,
                         p.num_experts, p.k)
    with pytest.raises(TypeError, match=r"'top_k' is required"):
        modmoe.fused_moe(logits, None, p.x, p.w13, p.w2, p.num_experts)


def test_cuda_tensors_on_a_cpu_build_or_cpu_workspace():
    """A workspace on another device than the tensors is refused before any launch."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = torch.zeros(4, 64, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(4, 1, dtype=torch.int32, device="cuda")
    w = torch.ones(4, 1, dtype=torch.float32, device="cuda")
    w13 = torch.zeros(2, 128, 64, dtype=torch.bfloat16, device="cuda")
    w2 = torch.zeros(2, 64, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(modmoe.Error, match=r"'workspace' is on cpu: expected cuda:0"):
        modmoe.experts((ids, w), x, w13, w2, 2, 1, workspace=torch.zeros(1 << 20, dtype=torch.uint8))
