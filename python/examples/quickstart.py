"""modmoe from Python: route, run the experts, compare with fused_moe.

Runs on a GPU with PyTorch (CUDA tensors, CUDA kernels) and otherwise on the CPU reference
with NumPy arrays (bf16 through ml_dtypes). tests/python/test_examples.py runs it.

    python python/examples/quickstart.py
"""

import numpy as np

import modmoe


def arrays():
    """(framework name, a function making a bf16 tensor from a float32 NumPy array, and one
    keeping the dtype), on the GPU where there is one."""
    try:
        import torch

        if torch.cuda.is_available() and modmoe.built_with_cuda():
            return ("torch", lambda a: torch.from_numpy(a).cuda().to(torch.bfloat16),
                    lambda a: torch.from_numpy(a).cuda())
    except ImportError:
        pass
    import ml_dtypes

    return "numpy", lambda a: a.astype(ml_dtypes.bfloat16), lambda a: a


def main():
    name, bf16, same = arrays()
    tokens, num_experts, top_k, hidden, inter = 16, 8, 2, 256, 128
    rng = np.random.default_rng(0)
    logits = same(rng.standard_normal((tokens, num_experts)).astype(np.float32))
    x = bf16(rng.standard_normal((tokens, hidden)).astype(np.float32))
    w13 = bf16((rng.standard_normal((num_experts, 2 * inter, hidden)) / 16).astype(np.float32))
    w2 = bf16((rng.standard_normal((num_experts, hidden, inter)) / 11).astype(np.float32))

    # Stage 1: routing (Mixtral: top-2 of the logits, softmax over the two).
    topk_ids, topk_weights = modmoe.route(logits, None, modmoe.RoutingMethodType.Renormalize,
                                          top_k)
    # Stage 3: the experts on the routed tokens. gemm1 rows: gate first (vLLM's order).
    out = modmoe.experts((topk_ids, topk_weights), x, w13, w2, num_experts, top_k)
    # The same in one call, FlashInfer trtllm_bf16_moe style: bitwise equal.
    fused = modmoe.fused_moe(logits, None, x, w13, w2, num_experts, top_k,
                             routing_method_type=modmoe.RoutingMethodType.Renormalize)
    if name == "torch":
        equal = bool((out == fused).all())
    else:
        equal = np.array_equal(out.view(np.uint16), fused.view(np.uint16))
    # Bad input is an error naming the argument, never a silent no-op.
    try:
        modmoe.experts((topk_ids, topk_weights), x, w13, w2, num_experts, top_k + 1)
    except modmoe.Error as e:
        print(f"rejected: {str(e)[:72]}...")
    print(f"quickstart ({name}): out {tuple(out.shape)}, fused == staged: {equal}")
    assert equal
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
