"""modmoe: Mixture-of-Experts kernels (routing, modular BF16, FP8 and NVFP4 experts, fused MoE,
all-to-all).

Tensors arrive through DLPack (PyTorch, NumPy, CuPy, JAX) and each call runs on their device:
the CPU reference for host arrays, the CUDA kernels for GPU tensors. The calls mirror
FlashInfer's MoE API (README.md, "Python"); ``modmoe.vllm`` adapts the experts to vLLM's
modular MoE kernel. Errors raise ``modmoe.Error`` (a RuntimeError) naming the argument, its
value and what was expected.

FP8 (``QuantScheme`` 'fp8-tensor' and 'fp8-block', docs/fp8.md "Python"): the same calls take
e4m3 weights with ``gemm1_weights_scale`` / ``gemm2_weights_scale`` (or a
``modmoe.ExpertWeights`` holding them) and e4m3 ``hidden_states`` with
``hidden_states_scale``; ``quantize_weights`` and ``quantize_activations`` make them from bf16.
e4m3 tensors are float8_e4m3fn (PyTorch, ml_dtypes) or uint8 bytes under an FP8 quant_scheme.

NVFP4 (``QuantScheme`` 'nvfp4', W4A16, docs/nvfp4.md "Python"): uint8 weights holding two e2m1
values per byte with e4m3 ``gemm1_weights_scale`` / ``gemm2_weights_scale`` (one per 16 values)
and fp32 ``output1_scale_scalar`` / ``output2_scale_scalar`` (one global per expert); the hidden
states stay bf16. ``quantize_nvfp4`` / ``dequantize_nvfp4`` convert tensors, and
``quantize_weights(w, 'nvfp4')`` makes checkpoint-style weights.
"""

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on the machine
    if "libcudart" not in str(e):
        raise
    # libmodmoe.so was built with CUDA and the CUDA runtime is not on the loader's path.
    # PyTorch's wheels carry one: loading torch makes it resolvable.
    import torch  # noqa: F401

    from . import _C

from ._alltoall import AllToAll, DispatchResult
from ._api import (
    ActivationType,
    Error,
    ExpertWeights,
    GateUpOrder,
    QuantScheme,
    RoutingMethodType,
    WeightLayout,
    experts,
    experts_workspace_size,
    fused_moe,
    fused_moe_workspace_size,
    prepare_weights,
    dequantize_nvfp4,
    quantize_activations,
    quantize_nvfp4,
    quantize_weights,
    route,
)

__version__ = _C.version()


def built_with_cuda():
    """Whether this build has the CUDA backend (else only CPU tensors are accepted)."""
    return _C.built_with_cuda()


__all__ = [
    "ActivationType",
    "AllToAll",
    "DispatchResult",
    "Error",
    "ExpertWeights",
    "GateUpOrder",
    "QuantScheme",
    "RoutingMethodType",
    "WeightLayout",
    "built_with_cuda",
    "dequantize_nvfp4",
    "experts",
    "experts_workspace_size",
    "fused_moe",
    "fused_moe_workspace_size",
    "prepare_weights",
    "quantize_activations",
    "quantize_nvfp4",
    "quantize_weights",
    "route",
]
