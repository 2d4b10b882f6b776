"""FlashInfer-style calls over the C++ library (modmoe._C).

Argument names and order follow FlashInfer's ``trtllm_bf16_routed_moe`` (``experts``),
``trtllm_bf16_moe`` (``fused_moe``) and ``trtllm_gen_routing`` (``route``); README.md, "Python",
maps them side by side. What this file does besides passing arguments through: it picks
defaults, maps FlashInfer's enum values to modmoe's, and allocates the outputs that the caller
did not pass, with the caller's framework. A call that receives every output (``output=``,
``workspace=``, ...) allocates nothing.
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
_TORCH_NAMES = {"bf16": "bfloat16", **_NUMPY_NAMES}


def _framework(like):
    module = type(like).__module__
    return module.partition(".")[0]


def _numpy_bf16(like):
    """NumPy has no bf16: ml_dtypes' bfloat16 if installed (and `like` is not raw uint16 bits)."""
    import numpy as np

    if getattr(like, "dtype", None) != np.uint16:
        try:
            import ml_dtypes

            return ml_dtypes.bfloat16
        except ImportError:
            pass
    return np.uint16


def _shape(x, name):
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"modmoe: argument '{name}': expected a tensor (PyTorch, NumPy, CuPy, "
                        f"JAX), got {type(x).__name__}")
    return tuple(shape)


def _empty(like, shape, dtype):
    """An uninitialised `dtype` array ('bf16', 'f32', 'i32', 'i64', 'u8') of the framework
    and on the device of `like`."""
    framework = _framework(like)
    if framework == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, _TORCH_NAMES[dtype]), device=like.device)
    if framework == "numpy":
        import numpy as np

        return np.empty(shape, dtype=_numpy_bf16(like) if dtype == "bf16" else _NUMPY_NAMES[dtype])
    if framework == "cupy":
        import cupy

        return cupy.empty(shape, dtype="uint16" if dtype == "bf16" else _NUMPY_NAMES[dtype])
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
    gemm2_output=None,
    expert_weights=None,
    expanded_idx_to_permuted_idx=None,
    expert_first_token_offset=None,
    gemm1_activation_output=None,
    expert_num_tokens=None,
    validate_only=False,
):
    """The modular experts on already-routed (and dispatched) tokens: FlashInfer's
    trtllm_bf16_routed_moe, on modmoe's kernels.

    topk_ids: packed int32 [M, k] ``(id << 16) | bf16 weight bits``, or a tuple
    ``(topk_ids int32 [M, k], topk_weights fp32|bf16 [M, k])``. Ids are global; any id outside
    [local_expert_offset, local_expert_offset + local_num_experts) contributes nothing (-1
    padding, num_experts, another rank's expert). hidden_states: bf16 [M, H].
    gemm1_weights: bf16 [E_local, 2I, H] in ``gate_up_order`` (or [E_local, I, H] for Relu2)
    and gemm2_weights bf16 [E_local, H, I]; or a modmoe.ExpertWeights (from prepare_weights),
    then gemm2_weights is None.

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
    if type(gemm1_weights) is ExpertWeights:
        prepared, w13, w2 = gemm1_weights, None, None
        if gemm2_weights is not None:
            raise Error("modmoe: gemm2_weights is given with a modmoe.ExpertWeights as "
                        "gemm1_weights: expected None (the ExpertWeights holds both)")
    else:
        prepared, w13, w2 = None, gemm1_weights, gemm2_weights
    per_expert = gemm1_alpha is not None or gemm1_beta is not None or gemm1_clamp_limit is not None
    kind, alpha, beta, limit = _activation(activation_type, per_expert)
    flags = (
        (_C.DO_FINALIZE if do_finalize else 0)
        | (_C.WEIGHT_ON_INPUT if apply_router_weight_on_input else 0)
        | (_C.BF16_ROUTING_WEIGHTS if bf16_routing_weights else 0)
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
        hidden_states, ids, weights, prepared, w13, w2, int(gate_up_order),
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
    topk_ids=None,
    topk_weights=None,
):
    """Routing followed by the experts: FlashInfer's trtllm_bf16_moe, on modmoe's kernels.
    At one rank the output is bitwise that of route() then experts().

    routing_logits [T, E] fp32|bf16, routing_bias [E] (DeepSeekV3) or None, hidden_states
    [T, H] bf16; weights as in experts(). apply_router_weight_on_input defaults to True for
    Llama4 routing (its weight scales the expert's input), False otherwise. topk_ids /
    topk_weights ([T, k] int32 / fp32) receive the routing result when given. Returns output
    [T, H] (do_finalize=False: route() then experts(), FlashInfer's unfinalized list).
    """
    if top_k is None:
        raise TypeError("modmoe.fused_moe(): argument 'top_k' is required")
    if routing_replay_out is not None:
        raise Error("modmoe: not supported yet: routing_replay_out (int16); pass topk_ids= "
                    "(int32 [T, top_k]) to receive the routing result")
    if apply_router_weight_on_input is None:
        apply_router_weight_on_input = routing_method_type == RoutingMethodType.Llama4
    if not do_finalize:
        ids, weights = route(
            routing_logits, routing_bias, routing_method_type, top_k, n_group=n_group,
            topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
            norm_topk_prob=norm_topk_prob, topk_ids=topk_ids, topk_weights=topk_weights,
            stream=stream)
        return experts(
            (ids, weights), hidden_states, gemm1_weights, gemm2_weights, num_experts, top_k,
            intermediate_size=intermediate_size, local_expert_offset=local_expert_offset,
            local_num_experts=local_num_experts, use_shuffled_weight=use_shuffled_weight,
            weight_layout=weight_layout, do_finalize=False, activation_type=activation_type,
            gemm1_alpha=gemm1_alpha, gemm1_beta=gemm1_beta, gemm1_clamp_limit=gemm1_clamp_limit,
            stream=stream, gate_up_order=gate_up_order,
            apply_router_weight_on_input=apply_router_weight_on_input,
            bf16_routing_weights=bf16_routing_weights)
    if use_shuffled_weight or weight_layout is not None:
        _check_layout(use_shuffled_weight, weight_layout)
    if type(gemm1_weights) is ExpertWeights:
        prepared, w13, w2 = gemm1_weights, None, None
    else:
        prepared, w13, w2 = None, gemm1_weights, gemm2_weights
    per_expert = gemm1_alpha is not None or gemm1_beta is not None or gemm1_clamp_limit is not None
    kind, alpha, beta, limit = _activation(activation_type, per_expert)
    flags = (
        _C.DO_FINALIZE
        | (_C.WEIGHT_ON_INPUT if apply_router_weight_on_input else 0)
        | (_C.BF16_ROUTING_WEIGHTS if bf16_routing_weights else 0)
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
):
    """Turns canonical weights (gemm1 [E_local, 2I, H] in gate_up_order, gemm2 [E_local, H, I])
    into the kernels' layout, once at load time, and returns a modmoe.ExpertWeights to pass as
    gemm1_weights. out: optional destination tensors (gemm1, gemm2[, gemm1_bias, gemm2_bias])
    of the sources' shapes; allocated like the sources otherwise."""
    if out is None:
        out = (_empty_like(gemm1_weights), _empty_like(gemm2_weights),
               _empty_like(gemm1_bias), _empty_like(gemm2_bias))
    dst = tuple(out) + (None,) * (4 - len(out))
    rows = _C.prepare_weights(gemm1_weights, gemm2_weights, int(gate_up_order), gemm1_bias,
                              gemm2_bias, interleave_rows, dst[0], dst[1], dst[2], dst[3], stream)
    return ExpertWeights(dst[0], dst[1], int(gate_up_order), dst[2], dst[3], rows)


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
):
    """Bytes of `workspace` that experts() needs for up to num_tokens tokens (batched: max_m)."""
    kind = _activation(activation_type, False)[0]
    return _C.experts_workspace_size(
        num_tokens, hidden_size, intermediate_size, top_k, num_experts, local_expert_offset,
        -1 if local_num_experts is None else local_num_experts, kind, do_finalize, batched)


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
):
    """Bytes of `workspace` that fused_moe() needs for up to num_tokens tokens."""
    kind = _activation(activation_type, False)[0]
    return _C.fused_moe_workspace_size(
        num_tokens, hidden_size, intermediate_size, top_k, num_experts, local_expert_offset,
        -1 if local_num_experts is None else local_num_experts, kind, int(routing_method_type),
        n_group or 0, topk_group or 0)
