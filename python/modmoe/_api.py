"""FlashInfer-style calls over the C++ library (modmoe._C).

Argument names and order follow FlashInfer's ``trtllm_bf16_routed_moe`` (``experts``),
``trtllm_bf16_moe`` (``fused_moe``) and ``trtllm_gen_routing`` (``route``); README.md, "Python",
maps them side by side. What this file does besides passing arguments through: it picks
defaults, maps FlashInfer's enum values to modmoe's, and allocates the outputs that the caller
did not pass, with the caller's framework. A call that receives every output (``output=``,
``workspace=``, ...) allocates nothing.

FP8 (docs/fp8.md, "Python"): the same calls with e4m3 weights and their scales (the keywords
of FlashInfer's ``trtllm_fp8_*_moe``: ``gemm1_weights_scale``, ``gemm2_weights_scale``,
``hidden_states_scale``), or a modmoe.ExpertWeights that holds them; ``quantize_activations``
and ``quantize_weights`` make e4m3 tensors and scales from bf16 ones.

NVFP4 (docs/nvfp4.md, "Python"), W4A16: the same calls with packed e2m1 weights (uint8, two
values per byte), their e4m3 block scales (``gemm1_weights_scale`` / ``gemm2_weights_scale``,
one per 16 values along K) and per-expert fp32 global scales (``output1_scale_scalar`` /
``output2_scale_scalar``, the names of FlashInfer's ``trtllm_fp4_block_scale_*moe``); the
hidden states stay bf16. ``quantize_nvfp4`` / ``dequantize_nvfp4`` convert a tensor, and
``quantize_weights(w, 'nvfp4')`` makes checkpoint-style weights with one global per expert.
"""

import enum
import math

from . import _C

Error = _C.Error
ExpertWeights = _C.ExpertWeights


class RoutingMethodType(enum.IntEnum):
    """FlashInfer's RoutingMethodType numbers (the ones modmoe implements)."""

    Default = 0  # softmax, then top-k
    Renormalize = 1  # top-k, then softmax over the k
    DeepSeekV3 = 2  # sigmoid + bias, grouped top-k, renormalise, scale
    Llama4 = 3  # top-1, sigmoid; the weight scales the expert's input
    RenormalizeNaive = 4  # softmax, top-k, renormalise
    TopK = 5  # top-k; the weights are the raw logits


class ActivationType(enum.IntEnum):
    """FlashInfer's ActivationType numbers. modmoe runs Swiglu, Geglu, SwigluBias and Relu2."""

    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3  # silu(gate) * up; with gemm1_alpha/beta/clamp_limit: the gpt-oss form
    Geglu = 4  # gelu(gate) * up (exact erf gelu)
    SwigluBias = 5  # gpt-oss SwiGLU: alpha 1.702, beta 1, limit 7 unless given per expert
    Relu2 = 6  # relu(x)^2, not gated: gemm1 is [E_local, I, H]
    SwigluStep = 7
    GegluTanh = 8
    Identity = 9


class GateUpOrder(enum.IntEnum):
    """Which half of gemm1's 2I rows is the gate."""

    GateUp = _C.GATE_UP  # vLLM: rows [0, I) gate, [I, 2I) up
    UpGate = _C.UP_GATE  # FlashInfer / TRT-LLM: rows [0, I) up, [I, 2I) gate


class QuantScheme(enum.IntEnum):
    """The precision of the experts, held by their weights. Calls take a member or its name:
    'bf16' (or 'none'), 'fp8-tensor', 'fp8-block', 'nvfp4'. Every scale is a dequantization
    multiplier (x ~ float(e4m3) * scale; NVFP4: x ~ e2m1 * float(block scale) * global)."""

    Bf16 = _C.SCHEME_NONE  # bf16 weights and hidden states
    Fp8PerTensor = _C.SCHEME_FP8_TENSOR  # e4m3; one scale per expert / per tensor (or row)
    Fp8Block128 = _C.SCHEME_FP8_BLOCK  # e4m3; per 128x128 weight block / 1x128 hidden group
    Nvfp4 = _C.SCHEME_NVFP4  # W4A16: e2m1 weights, e4m3 per 16 values, fp32 per expert; bf16 hidden


class WeightLayout(enum.IntEnum):
    """FlashInfer's WeightLayout. modmoe reads MajorK ([E, N, K], K contiguous) only."""

    MajorK = 0
    MajorMn = 1
    BlockMajorK = 2


_GPT_OSS = (1.702, 1.0, 7.0)  # alpha, beta, limit
_PLAIN = (1.0, 0.0, math.inf)  # SwigluOai constants that make it silu(gate) * up

# activation_type -> (modmoe activation, (alpha, beta, limit)). Strings too, vLLM's among them.
_ACTIVATIONS = {
    ActivationType.Swiglu: (_C.ACT_SWIGLU, _PLAIN),
    ActivationType.Geglu: (_C.ACT_GEGLU, _PLAIN),
    ActivationType.SwigluBias: (_C.ACT_SWIGLU_OAI, _GPT_OSS),
    ActivationType.Relu2: (_C.ACT_RELU2, _PLAIN),
    "swiglu": (_C.ACT_SWIGLU, _PLAIN),
    "silu": (_C.ACT_SWIGLU, _PLAIN),  # vLLM's name for the gated silu
    "geglu": (_C.ACT_GEGLU, _PLAIN),
    "gelu": (_C.ACT_GEGLU, _PLAIN),  # vLLM's name for the gated gelu
    "swiglu_oai": (_C.ACT_SWIGLU_OAI, _GPT_OSS),
    "swigluoai": (_C.ACT_SWIGLU_OAI, _GPT_OSS),
    "relu2": (_C.ACT_RELU2, _PLAIN),
    "relu2_no_mul": (_C.ACT_RELU2, _PLAIN),
}


def _activation(activation_type, per_expert):
    """(modmoe activation, alpha, beta, limit). Per-expert gemm1_alpha/beta/clamp_limit turn
    Swiglu into its gpt-oss form, the missing ones neutral (alpha 1, beta 0, no clamp)."""
    key = activation_type.lower() if isinstance(activation_type, str) else activation_type
    try:
        kind, (alpha, beta, limit) = _ACTIVATIONS[key]
    except (KeyError, TypeError):
        raise Error(
            f"modmoe: argument 'activation_type' = {activation_type!r}: expected Swiglu (3), "
            "Geglu (4), SwigluBias (5) or Relu2 (6), or one of "
            f"{sorted(k for k in _ACTIVATIONS if isinstance(k, str))}"
        ) from None
    if per_expert and kind == _C.ACT_SWIGLU:
        kind = _C.ACT_SWIGLU_OAI
    return kind, alpha, beta, limit


def _on_host(x):
    """Whether x's values can be read without a device synchronisation."""
    device = getattr(x, "device", None)
    return device is None or getattr(device, "type", device) == "cpu"


def _gate_scale(output1_scale_scalar, output1_scale_gate_scalar):
    """Checks FlashInfer's output1_scale_gate_scalar: modmoe's NVFP4 gate and up rows share
    one global scale per expert, so it is None, output1_scale_scalar itself, or (host tensors)
    equal to it."""
    gate = output1_scale_gate_scalar
    if gate is None or gate is output1_scale_scalar:
        return
    if output1_scale_scalar is not None and _on_host(gate) and _on_host(output1_scale_scalar):
        import numpy as np

        a, b = np.asarray(gate), np.asarray(output1_scale_scalar)
        if a.shape == b.shape and np.array_equal(a, b):
            return
    raise Error("modmoe: argument 'output1_scale_gate_scalar' differs from output1_scale_scalar "
                "(or is a device tensor other than it): expected None or the same tensor; "
                "modmoe's NVFP4 gate and up rows share one global scale per expert (merge "
                "separate w1 / w3 globals when loading, docs/nvfp4.md \"Weights\")")


def _weights(gemm1_weights, gemm2_weights, gate_up_order, gemm1_weights_scale,
             gemm2_weights_scale, quant_scheme, output1_scale_scalar=None,
             output1_scale_gate_scalar=None, output2_scale_scalar=None):
    """(ExpertWeights or None, w13, w2): the weights of a call. FP8 and NVFP4 tensors and their
    scales are wrapped in an ExpertWeights (which checks them); bf16 tensors pass through."""
    if type(gemm1_weights) is ExpertWeights:
        extra = {"gemm2_weights": gemm2_weights, "gemm1_weights_scale": gemm1_weights_scale,
                 "gemm2_weights_scale": gemm2_weights_scale, "quant_scheme": quant_scheme,
                 "output1_scale_scalar": output1_scale_scalar,
                 "output1_scale_gate_scalar": output1_scale_gate_scalar,
                 "output2_scale_scalar": output2_scale_scalar}
        for name, value in extra.items():
            if value is not None:
                raise Error(f"modmoe: {name} is given with a modmoe.ExpertWeights as "
                            "gemm1_weights: expected None (the ExpertWeights holds both weights, "
                            "their scales and quant_scheme)")
        return gemm1_weights, None, None
    _gate_scale(output1_scale_scalar, output1_scale_gate_scalar)
    if (gemm1_weights_scale is None and gemm2_weights_scale is None and quant_scheme is None
            and output1_scale_scalar is None and output2_scale_scalar is None):
        return None, gemm1_weights, gemm2_weights
    weights = ExpertWeights(gemm1_weights, gemm2_weights, int(gate_up_order),
                            quant_scheme=quant_scheme, gemm1_weights_scale=gemm1_weights_scale,
                            gemm2_weights_scale=gemm2_weights_scale,
                            output1_scale_scalar=output1_scale_scalar,
                            output2_scale_scalar=output2_scale_scalar)
    return weights, None, None


def _check_layout(use_shuffled_weight, weight_layout):
    if use_shuffled_weight or (weight_layout is not None and weight_layout != WeightLayout.MajorK):
        raise Error(
            f"modmoe: use_shuffled_weight = {use_shuffled_weight!r}, weight_layout = "
            f"{weight_layout!r}: modmoe reads K-major weights, gemm1 [E_local, 2I, H] and "
            "gemm2 [E_local, H, I] (FlashInfer's MajorK, unshuffled), or the output of "
            "modmoe.prepare_weights; FlashInfer's shuffled BlockMajorK tensors are not accepted"
        )


# ---------------------------------------------------------------------------------------
# Allocation in the caller's framework (only for outputs the caller did not pass)
# ---------------------------------------------------------------------------------------

_NUMPY_NAMES = {"f32": "float32", "i32": "int32", "i64": "int64", "u8": "uint8"}
_TORCH_NAMES = {"bf16": "bfloat16", "e4m3": "float8_e4m3fn", **_NUMPY_NAMES}
# dtypes NumPy lacks: ml_dtypes' name, and the raw bits that stand for them without it.
_ML_DTYPES = {"bf16": ("bfloat16", "uint16"), "e4m3": ("float8_e4m3fn", "uint8")}


def _framework(like):
    module = type(like).__module__
    return module.partition(".")[0]


def _numpy_dtype(like, dtype):
    """NumPy's dtype for 'bf16' or 'e4m3': ml_dtypes' if installed and `like` is not raw
    bits (uint16 / uint8), else the raw bits."""
    name, raw = _ML_DTYPES[dtype]
    if str(getattr(like, "dtype", "")) not in ("uint16", "uint8"):
        try:
            import ml_dtypes

            return getattr(ml_dtypes, name)
        except ImportError:
            pass
    return raw


def _shape(x, name):
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"modmoe: argument '{name}': expected a tensor (PyTorch, NumPy, CuPy, "
                        f"JAX), got {type(x).__name__}")
    return tuple(shape)


def _empty(like, shape, dtype):
    """An uninitialised `dtype` array ('bf16', 'e4m3', 'f32', 'i32', 'i64', 'u8') of the
    framework and on the device of `like`."""
    framework = _framework(like)
    if framework == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, _TORCH_NAMES[dtype]), device=like.device)
    if framework == "numpy":
        import numpy as np

        numpy_dtype = _numpy_dtype(like, dtype) if dtype in _ML_DTYPES else _NUMPY_NAMES[dtype]
        return np.empty(shape, dtype=numpy_dtype)
    if framework == "cupy":
        import cupy

        return cupy.empty(shape, dtype=_ML_DTYPES[dtype][1] if dtype in _ML_DTYPES
                          else _NUMPY_NAMES[dtype])
    raise TypeError(
        f"modmoe cannot allocate outputs like a {type(like).__module__}.{type(like).__name__}: "
        "pass them explicitly (output=, workspace=, ...)"
    )


def _empty_like(x):
    if x is None:
        return None
    framework = _framework(x)
    if framework in ("torch", "numpy", "cupy"):
        return __import__(framework).empty_like(x)
    raise TypeError(f"modmoe cannot allocate like a {type(x).__name__}: pass out= explicitly")


def _ones(like, shape):
    """fp32 ones of the framework and device of `like`."""
    out = _empty(like, shape, "f32")
    out[...] = 1.0
    return out


# ---------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------


def route(
    routing_logits,
    routing_bias=None,
    routing_method_type=RoutingMethodType.Default,
    top_k=None,
    *,
    n_group=None,
    topk_group=None,
    routed_scaling_factor=None,
    norm_topk_prob=True,
    topk_ids=None,
    topk_weights=None,
    stream=None,
):
    """Routing: logits [T, E] fp32|bf16 -> (topk_ids [T, k] int32 global ids, topk_weights
    [T, k] fp32). Methods and numbers are FlashInfer's RoutingMethodType; n_group, topk_group
    and routed_scaling_factor are DeepSeekV3's. Mirrors FlashInfer's trtllm_gen_routing."""
    if top_k is None:
        raise TypeError("modmoe.route(): argument 'top_k' is required")
    num_tokens = _shape(routing_logits, "routing_logits")[0]
    if topk_ids is None:
        topk_ids = _empty(routing_logits, (num_tokens, top_k), "i32")
    if topk_weights is None:
        topk_weights = _empty(routing_logits, (num_tokens, top_k), "f32")
    _C.route(
        routing_logits,
        routing_bias,
        int(routing_method_type),
        top_k,
        n_group or 0,
        topk_group or 0,
        1.0 if routed_scaling_factor is None else routed_scaling_factor,
        norm_topk_prob,
        topk_ids,
        topk_weights,
        stream,
    )
    return topk_ids, topk_weights


def experts(
    topk_ids,
    hidden_states,
    gemm1_weights,
    gemm2_weights=None,
    num_experts=None,
    top_k=None,
    n_group=None,
    topk_group=None,
    intermediate_size=None,
    local_expert_offset=0,
    local_num_experts=None,
    routed_scaling_factor=None,
    routing_method_type=None,
    use_shuffled_weight=None,
    weight_layout=None,
    do_finalize=True,
    enable_pdl=None,
    tune_max_num_tokens=None,
    activation_type=ActivationType.Swiglu,
    gemm1_alpha=None,
    gemm1_beta=None,
    gemm1_clamp_limit=None,
    gemm1_lora_delta=None,
    output=None,
    *,
    workspace=None,
    stream=None,
    gate_up_order=GateUpOrder.GateUp,
    apply_router_weight_on_input=False,
    bf16_routing_weights=False,
    fp8_fast_accum=False,
    gemm2_output=None,
    expert_weights=None,
    expanded_idx_to_permuted_idx=None,
    expert_first_token_offset=None,
    gemm1_activation_output=None,
    expert_num_tokens=None,
    validate_only=False,
    hidden_states_scale=None,
    gemm1_weights_scale=None,
    gemm2_weights_scale=None,
    quant_scheme=None,
    output1_scale_scalar=None,
    output1_scale_gate_scalar=None,
    output2_scale_scalar=None,
):
    """The modular experts on already-routed (and dispatched) tokens: FlashInfer's
    trtllm_bf16_routed_moe (and, with FP8 weights, its trtllm_fp8_*_routed_moe), on modmoe's
    kernels.

    topk_ids: packed int32 [M, k] ``(id << 16) | bf16 weight bits``, or a tuple
    ``(topk_ids int32 [M, k], topk_weights fp32|bf16 [M, k])``. Ids are global; any id outside
    [local_expert_offset, local_expert_offset + local_num_experts) contributes nothing (-1
    padding, num_experts, another rank's expert). hidden_states: bf16 [M, H].
    gemm1_weights: bf16 [E_local, 2I, H] in ``gate_up_order`` (or [E_local, I, H] for Relu2)
    and gemm2_weights bf16 [E_local, H, I]; or a modmoe.ExpertWeights (from prepare_weights),
    then gemm2_weights is None.

    FP8: gemm1_weights / gemm2_weights e4m3 (float8_e4m3fn; uint8 bytes with quant_scheme
    given) with fp32 gemm1_weights_scale / gemm2_weights_scale ('fp8-tensor': [E_local] each;
    'fp8-block': [E_local, 2I/128, H/128] and [E_local, H/128, I/128]; quant_scheme None: taken
    from the scales), or an ExpertWeights holding them; hidden_states e4m3 [M, H] with
    hidden_states_scale fp32 ('fp8-block': [M, H/128], token-major; 'fp8-tensor': [1] or [M]),
    as quantize_activations() makes them. H and I are multiples of 128. CUDA tensors need the
    weights of prepare_weights(). The outputs stay bf16. fp8_fast_accum=True ('fp8-tensor'
    only, else modmoe.Error): FP8 fast accumulation (cuBLASLt's FAST_ACCUM), GEMM1 summed over
    all of H in the tensor cores' FP8 accumulator (about 14 bits kept on Hopper) and scaled
    once; faster prefill, a larger GEMM1 error against the fp32 definition (docs/fp8.md "FP8
    fast accumulation"); on the GPU where GEMM1 has more than 128 rows per expert (prefill),
    smaller calls keep the default's GEMM1. Default False: every sum in fp32, the scales every
    128 of K.

    NVFP4 (W4A16, FlashInfer's trtllm_fp4_block_scale_routed_moe names): gemm1_weights uint8
    [E_local, 2I, H/2] and gemm2_weights uint8 [E_local, H, I/2] (two e2m1 values per byte,
    low nibble first; float4_e2m1fn_x2 too), gemm1_weights_scale [E_local, 2I, H/16] and
    gemm2_weights_scale [E_local, H, I/16] e4m3 (float8_e4m3fn, or uint8 bytes), linear,
    output1_scale_scalar / output2_scale_scalar fp32 [E_local] (the global scales: dequantization
    multipliers of each GEMM's output, ModelOpt's weight_scale_2; gate and up share
    output1_scale_scalar, so output1_scale_gate_scalar is None or the same), quant_scheme
    'nvfp4' or None (taken from the e4m3 block scales); or an ExpertWeights holding them.
    hidden_states stays bf16 [M, H], no hidden_states_scale. H and I are multiples of 64.
    CUDA tensors take the weights as they are or prepared (sm_80+).

    Returns, as FlashInfer does: do_finalize -> output [M, H] bf16 (with gemm1_lora_delta:
    [output, expanded_idx_to_permuted_idx, gemm1_activation_output]); else [gemm2_output,
    expert_weights, expanded_idx_to_permuted_idx] (+ gemm1_activation_output with a delta).
    Batched input (hidden_states [E_local, max_m, H], expert_num_tokens [E_local], no top-k)
    returns gemm2_output [E_local, max_m, H].

    n_group, topk_group, routed_scaling_factor, routing_method_type, enable_pdl and
    tune_max_num_tokens are accepted for FlashInfer's signature and not used: the routing is
    done. validate_only checks every argument and launches nothing.
    """
    if type(topk_ids) is tuple or type(topk_ids) is list:
        ids, weights = topk_ids
    else:
        ids, weights = topk_ids, None
    if use_shuffled_weight or weight_layout is not None:
        _check_layout(use_shuffled_weight, weight_layout)
    prepared, w13, w2 = _weights(gemm1_weights, gemm2_weights, gate_up_order,
                                 gemm1_weights_scale, gemm2_weights_scale, quant_scheme,
                                 output1_scale_scalar, output1_scale_gate_scalar,
                                 output2_scale_scalar)
    per_expert = gemm1_alpha is not None or gemm1_beta is not None or gemm1_clamp_limit is not None
    kind, alpha, beta, limit = _activation(activation_type, per_expert)
    flags = (
        (_C.DO_FINALIZE if do_finalize else 0)
        | (_C.WEIGHT_ON_INPUT if apply_router_weight_on_input else 0)
        | (_C.BF16_ROUTING_WEIGHTS if bf16_routing_weights else 0)
        | (_C.FP8_FAST_ACCUM if fp8_fast_accum else 0)
    )
    lora = gemm1_lora_delta
    batched = expert_num_tokens is not None

    # Outputs the caller did not pass, allocated like hidden_states.
    if batched:
        if gemm2_output is None:
            gemm2_output = _empty(hidden_states, _shape(hidden_states, "hidden_states"), "bf16")
    elif do_finalize:
        if output is None:
            output = _empty(hidden_states, _shape(hidden_states, "hidden_states"), "bf16")
    if not batched and (lora is not None or not do_finalize):
        ids_shape = _shape(ids, "topk_ids")
        m, k = ids_shape[0], ids_shape[-1]
        if expanded_idx_to_permuted_idx is None:
            expanded_idx_to_permuted_idx = _empty(hidden_states, (m, k), "i32")
        if not do_finalize:
            e_local = local_num_experts
            if e_local is None:
                e_local = (prepared.num_local_experts if prepared is not None else w2.shape[0])
            if gemm2_output is None:
                gemm2_output = _empty(hidden_states, (m * k, hidden_states.shape[-1]), "bf16")
            if expert_weights is None:
                expert_weights = _empty(hidden_states, (m, k), "f32")
            if expert_first_token_offset is None:
                expert_first_token_offset = _empty(hidden_states, (e_local + 1,), "i64")
        if lora is not None and gemm1_activation_output is None:
            inter = prepared.intermediate_size if prepared is not None else w2.shape[2]
            gemm1_activation_output = _empty(hidden_states, (m * k, inter), "bf16")

    args = (
        hidden_states, hidden_states_scale, ids, weights, prepared, w13, w2, int(gate_up_order),
        -1 if num_experts is None else num_experts, local_expert_offset,
        -1 if local_num_experts is None else local_num_experts, top_k or 0,
        intermediate_size or 0, kind, alpha, beta, limit, gemm1_alpha, gemm1_beta,
        gemm1_clamp_limit, flags, lora, expert_num_tokens, output if do_finalize else None,
        gemm2_output, expert_weights, expanded_idx_to_permuted_idx, expert_first_token_offset,
        gemm1_activation_output,
    )
    if workspace is None:
        nbytes = _C.experts(*args, None, None, _C.WORKSPACE_BYTES)
        workspace = _empty(hidden_states, (nbytes,), "u8") if nbytes else None
    _C.experts(*args, workspace, stream, _C.VALIDATE if validate_only else _C.RUN)

    if batched:
        return gemm2_output
    if do_finalize:
        if lora is None:
            return output
        return [output, expanded_idx_to_permuted_idx, gemm1_activation_output]
    result = [gemm2_output, expert_weights, expanded_idx_to_permuted_idx]
    if lora is not None:
        result.append(gemm1_activation_output)
    return result


def fused_moe(
    routing_logits,
    routing_bias,
    hidden_states,
    gemm1_weights,
    gemm2_weights=None,
    num_experts=None,
    top_k=None,
    n_group=None,
    topk_group=None,
    intermediate_size=None,
    local_expert_offset=0,
    local_num_experts=None,
    routed_scaling_factor=None,
    routing_method_type=RoutingMethodType.Default,
    use_shuffled_weight=None,
    weight_layout=None,
    do_finalize=True,
    enable_pdl=None,
    tune_max_num_tokens=None,
    activation_type=ActivationType.Swiglu,
    norm_topk_prob=True,
    routing_replay_out=None,
    gemm1_alpha=None,
    gemm1_beta=None,
    gemm1_clamp_limit=None,
    output=None,
    *,
    workspace=None,
    stream=None,
    gate_up_order=GateUpOrder.GateUp,
    apply_router_weight_on_input=None,
    bf16_routing_weights=False,
    fp8_fast_accum=False,
    topk_ids=None,
    topk_weights=None,
    hidden_states_scale=None,
    gemm1_weights_scale=None,
    gemm2_weights_scale=None,
    quant_scheme=None,
    output1_scale_scalar=None,
    output1_scale_gate_scalar=None,
    output2_scale_scalar=None,
):
    """Routing followed by the experts: FlashInfer's trtllm_bf16_moe (trtllm_fp8_*_moe with
    FP8 weights, trtllm_fp4_block_scale_moe with NVFP4 ones), on modmoe's kernels. At one
    rank the output is bitwise that of route() then experts().

    routing_logits [T, E] fp32|bf16, routing_bias [E] (DeepSeekV3) or None, hidden_states
    [T, H] bf16; weights as in experts(). apply_router_weight_on_input defaults to True for
    Llama4 routing (its weight scales the expert's input), False otherwise. topk_ids /
    topk_weights ([T, k] int32 / fp32) receive the routing result when given. Returns output
    [T, H] (do_finalize=False: route() then experts(), FlashInfer's unfinalized list).

    FP8 weights (as in experts()): bf16 hidden_states are quantized with the weights' scheme
    (dynamic scales), bitwise route() -> quantize_activations() -> experts(); e4m3
    hidden_states with their hidden_states_scale run route() then experts(). fp8_fast_accum:
    as in experts() ('fp8-tensor' only).

    NVFP4 weights (W4A16, as in experts()): the bf16 hidden_states go to the experts as they
    are; the output is bitwise route() -> experts().
    """
    if top_k is None:
        raise TypeError("modmoe.fused_moe(): argument 'top_k' is required")
    if routing_replay_out is not None:
        raise Error("modmoe: not supported yet: routing_replay_out (int16); pass topk_ids= "
                    "(int32 [T, top_k]) to receive the routing result")
    if apply_router_weight_on_input is None:
        apply_router_weight_on_input = routing_method_type == RoutingMethodType.Llama4
    prepared, w13, w2 = _weights(gemm1_weights, gemm2_weights, gate_up_order,
                                 gemm1_weights_scale, gemm2_weights_scale, quant_scheme,
                                 output1_scale_scalar, output1_scale_gate_scalar,
                                 output2_scale_scalar)
    if not do_finalize or hidden_states_scale is not None:
        ids, weights = route(
            routing_logits, routing_bias, routing_method_type, top_k, n_group=n_group,
            topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
            norm_topk_prob=norm_topk_prob, topk_ids=topk_ids, topk_weights=topk_weights,
            stream=stream)
        return experts(
            (ids, weights), hidden_states, w13 if prepared is None else prepared, w2,
            num_experts, top_k, intermediate_size=intermediate_size,
            local_expert_offset=local_expert_offset, local_num_experts=local_num_experts,
            use_shuffled_weight=use_shuffled_weight,
            weight_layout=weight_layout, do_finalize=do_finalize,
            activation_type=activation_type, gemm1_alpha=gemm1_alpha, gemm1_beta=gemm1_beta,
            gemm1_clamp_limit=gemm1_clamp_limit, output=output,
            workspace=workspace if do_finalize else None, stream=stream,
            gate_up_order=gate_up_order, apply_router_weight_on_input=apply_router_weight_on_input,
            bf16_routing_weights=bf16_routing_weights, fp8_fast_accum=fp8_fast_accum,
            hidden_states_scale=hidden_states_scale)
    if use_shuffled_weight or weight_layout is not None:
        _check_layout(use_shuffled_weight, weight_layout)
    per_expert = gemm1_alpha is not None or gemm1_beta is not None or gemm1_clamp_limit is not None
    kind, alpha, beta, limit = _activation(activation_type, per_expert)
    flags = (
        _C.DO_FINALIZE
        | (_C.WEIGHT_ON_INPUT if apply_router_weight_on_input else 0)
        | (_C.BF16_ROUTING_WEIGHTS if bf16_routing_weights else 0)
        | (_C.FP8_FAST_ACCUM if fp8_fast_accum else 0)
        | (_C.NORM_TOPK_PROB if norm_topk_prob else 0)
    )
    if output is None:
        output = _empty(hidden_states, _shape(hidden_states, "hidden_states"), "bf16")
    args = (
        routing_logits, routing_bias, hidden_states, prepared, w13, w2, int(gate_up_order),
        int(routing_method_type), -1 if num_experts is None else num_experts, top_k,
        n_group or 0, topk_group or 0,
        1.0 if routed_scaling_factor is None else routed_scaling_factor, local_expert_offset,
        -1 if local_num_experts is None else local_num_experts, intermediate_size or 0, kind,
        alpha, beta, limit, gemm1_alpha, gemm1_beta, gemm1_clamp_limit, flags, output,
        topk_ids, topk_weights,
    )
    if workspace is None:
        nbytes = _C.fused_moe(*args, None, None, _C.WORKSPACE_BYTES)
        workspace = _empty(hidden_states, (nbytes,), "u8") if nbytes else None
    _C.fused_moe(*args, workspace, stream, _C.RUN)
    return output


def prepare_weights(
    gemm1_weights,
    gemm2_weights,
    *,
    gate_up_order=GateUpOrder.GateUp,
    gemm1_bias=None,
    gemm2_bias=None,
    interleave_rows=8,
    out=None,
    stream=None,
    gemm1_weights_scale=None,
    gemm2_weights_scale=None,
    quant_scheme=None,
    output1_scale_scalar=None,
    output1_scale_gate_scalar=None,
    output2_scale_scalar=None,
):
    """Turns canonical weights (gemm1 [E_local, 2I, H] in gate_up_order, gemm2 [E_local, H, I])
    into the kernels' layout, once at load time, and returns a modmoe.ExpertWeights to pass as
    gemm1_weights. FP8 weights come with their scales, as in experts(); gemm1's block scales
    move with its rows (docs/fp8.md, "Weights"). NVFP4 checkpoint weights (uint8 gemm1
    [E_local, 2I, H/2], gemm2 [E_local, H, I/2], e4m3 block scales [E_local, 2I, H/16] /
    [E_local, H, I/16], fp32 global scales output1_scale_scalar / output2_scale_scalar
    [E_local]): the packed rows, their scale rows and the bias rows move together, the rest is
    copied (docs/nvfp4.md, "Weights"). out: optional destination tensors (gemm1, gemm2[,
    gemm1_bias, gemm2_bias[, gemm1_weights_scale, gemm2_weights_scale[, output1_scale_scalar,
    output2_scale_scalar]]]) of the sources' shapes; allocated like the sources otherwise."""
    _gate_scale(output1_scale_scalar, output1_scale_gate_scalar)
    src = ExpertWeights(gemm1_weights, gemm2_weights, int(gate_up_order), gemm1_bias, gemm2_bias,
                        quant_scheme=quant_scheme, gemm1_weights_scale=gemm1_weights_scale,
                        gemm2_weights_scale=gemm2_weights_scale,
                        output1_scale_scalar=output1_scale_scalar,
                        output2_scale_scalar=output2_scale_scalar)
    if out is None:
        out = tuple(_empty_like(x) for x in (gemm1_weights, gemm2_weights, gemm1_bias, gemm2_bias,
                                             gemm1_weights_scale, gemm2_weights_scale,
                                             output1_scale_scalar, output2_scale_scalar))
    dst = tuple(out) + (None,) * (8 - len(out))
    rows = _C.prepare_weights(src, interleave_rows, *dst, stream)
    return ExpertWeights(dst[0], dst[1], int(gate_up_order), dst[2], dst[3], rows,
                         quant_scheme=src.quant_scheme, gemm1_weights_scale=dst[4],
                         gemm2_weights_scale=dst[5], output1_scale_scalar=dst[6],
                         output2_scale_scalar=dst[7])


def _scale_shape(shape, rows):
    """`rows` (a shape) followed by shape[-1] / 128, or None where `shape` is no tensor shape
    the quantizers take (they name the argument)."""
    return tuple(rows) + (shape[-1] // 128,) if len(shape) >= 2 else None


def quantize_activations(
    hidden_states,
    quant_scheme,
    *,
    out=None,
    scale=None,
    static_scale=False,
    per_row_scale=False,
    stream=None,
):
    """bf16 hidden_states [T, H] (or [E_local, max_m, H]) -> (e4m3 [T, H], fp32 scale), the
    hidden_states and hidden_states_scale of FP8 experts(); H % 128 == 0. q = e4m3(x / s) with
    s = max(amax, 1e-10) / 448 (docs/fp8.md, "Activations"):
    'fp8-block': scale [T, H/128], one per 1x128 group, token-major (FlashInfer's DeepSeek-FP8
    kernels take the transpose; modmoe keeps the per-token layout an all-to-all carries);
    'fp8-tensor': scale [1] over the tensor; per_row_scale: [T], every entry that scale (the
    per-token payload of quantize-before-dispatch); static_scale: scale [1] is the caller's
    calibrated scale, only read. out / scale: optional destinations."""
    shape = _shape(hidden_states, "hidden_states")
    if static_scale and scale is None:
        raise Error("modmoe: static_scale=True needs scale=: the calibrated fp32 [1] scale to "
                    "quantize with")
    if _C.quant_scheme(quant_scheme) == QuantScheme.Nvfp4:
        raise Error("modmoe: quantize_activations with quant_scheme 'nvfp4': expected an FP8 "
                    "scheme; NVFP4 tensors come from modmoe.quantize_nvfp4 (and the NVFP4 experts "
                    "take bf16 hidden_states as they are: W4A16)")
    block = _C.quant_scheme(quant_scheme) == QuantScheme.Fp8Block128
    if per_row_scale and block:
        raise Error("modmoe: per_row_scale=True with quant_scheme 'fp8-block': expected False "
                    "(its scales are per 1x128 group of a row already)")
    if out is None:
        out = _empty(hidden_states, shape, "e4m3")
    if scale is None:
        if block:
            scale_shape = _scale_shape(shape, shape[:-1])
        else:
            scale_shape = shape[:-1] if per_row_scale else (1,)
        scale = _empty(hidden_states, scale_shape, "f32") if scale_shape else None
    _C.quantize_activations(hidden_states, quant_scheme, out, scale, static_scale, stream)
    return out, scale


def quantize_weights(weights, quant_scheme, *, out=None, scale=None, global_scale=None,
                     stream=None):
    """bf16 expert weights [E, R, C] (gemm1 [E_local, 2I, H], gemm2 [E_local, H, I]; R, C
    multiples of 128) -> (e4m3 [E, R, C], fp32 scale) as an FP8 checkpoint stores them:
    'fp8-tensor' scale [E], one per expert; 'fp8-block' [E, R/128, C/128], one per 128x128
    block (DeepSeek-V3's weight_scale_inv). s = max(amax, 1e-10) / 448, q = e4m3(w / s).
    The results are prepare_weights' (and experts') gemm*_weights and gemm*_weights_scale.

    'nvfp4' (C a multiple of 32) -> (uint8 [E, R, C/2], e4m3 [E, R, C/16], fp32 [E]), as a
    ModelOpt NVFP4 checkpoint stores them: quantize_nvfp4 on each expert with its own dynamic
    global scale (amax / (6 * 448)). The results are gemm*_weights, gemm*_weights_scale and
    output1_scale_scalar / output2_scale_scalar. global_scale: optional fp32 [E] destination."""
    if _C.quant_scheme(quant_scheme) == QuantScheme.Nvfp4:
        return _quantize_nvfp4_weights(weights, out, scale, global_scale, stream)
    if global_scale is not None:
        raise Error("modmoe: global_scale= is given with quant_scheme "
                    f"{quant_scheme!r}: expected None (NVFP4 weights only)")
    shape = _shape(weights, "weights")
    if out is None:
        out = _empty(weights, shape, "e4m3")
    if scale is None and len(shape) == 3:
        if _C.quant_scheme(quant_scheme) == QuantScheme.Fp8Block128:
            scale_shape = _scale_shape(shape, (shape[0], shape[1] // 128))
        else:
            scale_shape = shape[:1]
        scale = _empty(weights, scale_shape, "f32")
    _C.quantize_weights(weights, quant_scheme, out, scale, stream)
    return out, scale


def _packed_shapes(shape):
    """(packed shape [.., H/2], block scale shape [.., H/16]) of an NVFP4 tensor of `shape`,
    or (None, None) where `shape` is no tensor shape the quantizer takes (it names the
    argument)."""
    if len(shape) < 2:
        return None, None
    rows, h = tuple(shape[:-1]), shape[-1]
    return rows + (h // 2,), rows + (h // 16,)


def quantize_nvfp4(
    x,
    *,
    global_scale=None,
    static_global_scale=False,
    out=None,
    scale=None,
    stream=None,
):
    """bf16 x [T, H] (or [E_local, max_m, H]), H % 32 == 0 -> (out uint8 [T, H/2], scale e4m3
    [T, H/16], global_scale fp32 [1]), NVFP4 (docs/nvfp4.md, "Quantization"): two e2m1 values
    per byte, element 2i in the low nibble; one e4m3 block scale per 16 values along H,
    token-major (FlashInfer's linear hidden_states_scale layout); x ~ e2m1 * float(scale) *
    global_scale. Dynamic (default): global_scale = max(amax, 1e-10) / (6 * 448) over the
    tensor, written. static_global_scale: global_scale [1] is the caller's (a calibrated
    input_scale or weight_scale_2), only read. FlashInfer's global_sf is the reciprocal
    (448 * 6 / amax): pass 1 / global_sf. The scale is float8_e4m3fn where the framework has it
    (PyTorch, ml_dtypes), else uint8 bytes. out / scale / global_scale: optional destinations."""
    shape = _shape(x, "x")
    if static_global_scale and global_scale is None:
        raise Error("modmoe: static_global_scale=True needs global_scale=: the calibrated fp32 "
                    "[1] dequantization scale to quantize with")
    packed, scales = _packed_shapes(shape)
    if out is None and packed is not None:
        out = _empty(x, packed, "u8")
    if scale is None and scales is not None:
        scale = _empty(x, scales, "e4m3")
    if global_scale is None:
        global_scale = _empty(x, (1,), "f32")
    _C.quantize_nvfp4(x, out, scale, global_scale, static_global_scale, stream)
    return out, scale, global_scale


def dequantize_nvfp4(q, scale, global_scale, *, out=None, out_dtype="float32", stream=None):
    """The inverse of quantize_nvfp4, for tests and debugging: q uint8 [T, H/2], scale e4m3
    [T, H/16], global_scale fp32 [1] -> out [T, H] = (e2m1 * float(scale)) * global_scale, fp32
    (out_dtype 'float32') or rounded once more to bf16 ('bfloat16')."""
    shape = _shape(q, "q")
    if out is None:
        dtypes = {"float32": "f32", "bfloat16": "bf16"}
        if out_dtype not in dtypes:
            raise Error(f"modmoe: argument 'out_dtype' = {out_dtype!r}: expected 'float32' or "
                        "'bfloat16'")
        # NOTE: NumPy has no bf16: _empty gives ml_dtypes' bfloat16 unless `like` holds raw
        # bits, and q always does (uint8), so the scale (float8_e4m3fn or bytes) decides.
        like = scale if dtypes[out_dtype] == "bf16" and _framework(q) == "numpy" else q
        out = _empty(like, tuple(shape[:-1]) + (2 * shape[-1],), dtypes[out_dtype])
    _C.dequantize_nvfp4(q, scale, global_scale, out, stream)
    return out


def _quantize_nvfp4_weights(weights, out, scale, global_scale, stream):
    """quantize_weights(weights, 'nvfp4'): quantize_nvfp4 on each expert [R, C] with its own
    dynamic global scale."""
    shape = _shape(weights, "weights")
    if len(shape) != 3:
        raise Error(f"modmoe: argument 'weights' has shape {list(shape)}: expected [E, R, C] "
                    "(gemm1 [E_local, 2I, H] or gemm2 [E_local, H, I])")
    packed, scales = _packed_shapes(shape)
    if out is None:
        out = _empty(weights, packed, "u8")
    if scale is None:
        scale = _empty(weights, scales, "e4m3")
    if global_scale is None:
        global_scale = _empty(weights, shape[:1], "f32")
    for e in range(shape[0]):
        _C.quantize_nvfp4(weights[e], out[e], scale[e], global_scale[e:e + 1], False, stream)
    return out, scale, global_scale


def experts_workspace_size(
    num_tokens,
    hidden_size,
    intermediate_size,
    top_k,
    num_experts,
    *,
    local_expert_offset=0,
    local_num_experts=None,
    activation_type=ActivationType.Swiglu,
    do_finalize=True,
    batched=False,
    quant_scheme=QuantScheme.Bf16,
):
    """Bytes of `workspace` that experts() needs for up to num_tokens tokens (batched: max_m),
    with weights of quant_scheme."""
    kind = _activation(activation_type, False)[0]
    return _C.experts_workspace_size(
        num_tokens, hidden_size, intermediate_size, top_k, num_experts, local_expert_offset,
        -1 if local_num_experts is None else local_num_experts, kind, do_finalize, batched,
        quant_scheme)


def fused_moe_workspace_size(
    num_tokens,
    hidden_size,
    intermediate_size,
    top_k,
    num_experts,
    *,
    local_expert_offset=0,
    local_num_experts=None,
    activation_type=ActivationType.Swiglu,
    routing_method_type=RoutingMethodType.Default,
    n_group=None,
    topk_group=None,
    quant_scheme=QuantScheme.Bf16,
):
    """Bytes of `workspace` that fused_moe() needs for up to num_tokens tokens, with weights of
    quant_scheme (FP8: the quantized hidden states are carved from it too)."""
    kind = _activation(activation_type, False)[0]
    return _C.fused_moe_workspace_size(
        num_tokens, hidden_size, intermediate_size, top_k, num_experts, local_expert_offset,
        -1 if local_num_experts is None else local_num_experts, kind, int(routing_method_type),
        n_group or 0, topk_group or 0, quant_scheme)
