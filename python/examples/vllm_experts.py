"""modmoe's experts in vLLM's modular MoE kernel.

vLLM builds a MoE layer's kernel from a prepare/finalize (quantize + all-to-all dispatch,
then combine) and an experts object; modmoe.vllm.ModmoeExperts is such an experts object
(vLLM's FusedMoEExpertsModular interface, Standard format in and out). Two ways to use it,
with the names of vLLM as of mid-2026 (check them against your version):

1. Before the weights are processed: set the class the quant method instantiates,
       layer.quant_method.experts_cls = ModmoeExperts
   vLLM then builds FusedMoEKernel(prepare_finalize, ModmoeExperts(moe_config=...,
   quant_config=...)) in process_weights_after_loading.
2. After loading: rebuild the kernel around the prepare/finalize vLLM chose, as
   use_modmoe_experts(model) below does (e.g. from a vLLM plugin, entry-point group
   "vllm.general_plugins", or right after LLM(...) builds the model).

The weights must stay in vLLM's canonical layout (w13 [E_local, 2I, H] gate rows first,
w2 [E_local, H, I], bf16): backends that reshuffle them for FlashInfer's TRT-LLM kernels at
load time hand over 4-D tensors, which modmoe refuses with an error. Under expert parallelism,
modmoe reads vLLM's expert_map as a contiguous local range (EPLB placements are refused).

Without vLLM, main() drives ModmoeExperts the way vLLM's kernel does on two expert-parallel
ranks (rows as the all-to-all delivers them, -1 padding, other ranks' ids), combines the two
ranks' outputs and checks them against a single-rank modmoe.experts call.

    python python/examples/vllm_experts.py
"""

import numpy as np

import modmoe
from modmoe.vllm import ModmoeExperts


def use_modmoe_experts(model):
    """Puts ModmoeExperts into every modular MoE layer of a loaded vLLM model; returns how
    many layers it changed. Keeps each layer's prepare/finalize (its all-to-all)."""
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel

    changed = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        prepare_finalize = getattr(kernel, "prepare_finalize", None)
        if prepare_finalize is None or getattr(method, "moe", None) is None:
            continue
        experts = ModmoeExperts(moe_config=method.moe,
                                quant_config=getattr(method, "moe_quant_config", None))
        method.moe_kernel = FusedMoEKernel(prepare_finalize, experts)
        changed += 1
    return changed


def rank_rows(ids, x, weights, rank, ep_size, num_experts, max_tokens):
    """What rank `rank` receives from a one-sided all-to-all, flattened: the tokens with an
    expert on the rank (in token order), then padding rows with ids -1."""
    per_rank = num_experts // ep_size
    tokens = np.nonzero((ids // per_rank == rank).any(axis=1))[0]
    rows = ep_size * max_tokens
    rx = np.zeros((rows, x.shape[1]), x.dtype)
    rids = np.full((rows, ids.shape[1]), -1, np.int32)
    rw = np.zeros((rows, ids.shape[1]), np.float32)
    rx[:tokens.size], rids[:tokens.size], rw[:tokens.size] = x[tokens], ids[tokens], weights[tokens]
    expert_map = np.full(num_experts, -1, np.int32)
    expert_map[rank * per_rank:(rank + 1) * per_rank] = np.arange(per_rank, dtype=np.int32)
    return rx, rids, rw, tokens, expert_map


def main():
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    tokens, num_experts, top_k, hidden, inter, ep_size = 12, 8, 2, 128, 64, 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, hidden)).astype(bf16)
    w13 = (rng.standard_normal((num_experts, 2 * inter, hidden)) / 11).astype(bf16)
    w2 = (rng.standard_normal((num_experts, hidden, inter)) / 8).astype(bf16)
    ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(tokens)]).astype(np.int32)
    weights = rng.uniform(0.2, 1.0, (tokens, top_k)).astype(np.float32)

    combined = np.zeros((tokens, hidden), np.float32)
    per_rank = num_experts // ep_size
    for rank in range(ep_size):
        rx, rids, rw, sent, expert_map = rank_rows(ids, x, weights, rank, ep_size, num_experts,
                                                   tokens)
        experts = ModmoeExperts()
        w13_r, w2_r = w13[rank * per_rank:(rank + 1) * per_rank], w2[rank * per_rank:(rank + 1) * per_rank]
        # What vLLM's FusedMoEKernelModularImpl does, step by step.
        e_local, m, n, k, topk = experts.moe_problem_size(rx, w13_r, w2_r, rids)
        ws13, ws2, out_shape = experts.workspace_shapes(m, n, k, topk, num_experts, e_local,
                                                        None, "silu")
        workspace13, workspace2 = np.empty(ws13, bf16), np.empty(ws2, bf16)
        output = np.empty(out_shape, bf16)
        experts.apply(output, rx, w13_r, w2_r, topk_weights=rw, topk_ids=rids,
                      activation="silu", global_num_experts=num_experts, expert_map=expert_map,
                      a1q_scale=None, a2_scale=None, workspace13=workspace13,
                      workspace2=workspace2, expert_tokens_meta=None,
                      apply_router_weight_on_input=False)
        experts.finalize_weight_and_reduce_impl().apply(output, output, rw, rids, False)
        # The combine: per token, the fp32 sum of the rows it sent, in rank order.
        combined[sent] += output[:sent.size].astype(np.float32)

    single = modmoe.experts((ids, weights), x, w13, w2, num_experts, top_k).astype(np.float64)
    err = np.linalg.norm(combined.astype(bf16).astype(np.float64) - single) / np.linalg.norm(single)
    print(f"vllm_experts: {ep_size} ranks combined vs one rank: rel L2 {err:.2e}")
    assert err < 1e-2
    print("vllm_experts: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
