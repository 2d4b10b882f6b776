"""modmoe: Mixture-of-Experts kernels (routing, modular BF16 experts, fused MoE, all-to-all).

Tensors arrive through DLPack (PyTorch, NumPy, CuPy, JAX) and each call runs on their device:
the CPU reference for host arrays, the CUDA kernels for GPU tensors. The calls mirror
FlashInfer's MoE API (README.md, "Python"); ``modmoe.vllm`` adapts the experts to vLLM's
modular MoE kernel. Errors raise ``modmoe.Error`` (a RuntimeError) naming the argument, its
value and what was expected.
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
    RoutingMethodType,
    WeightLayout,
    experts,
    experts_workspace_size,
    fused_moe,
    fused_moe_workspace_size,
    prepare_weights,
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
    "RoutingMethodType",
    "WeightLayout",
    "built_with_cuda",
    "experts",
    "experts_workspace_size",
    "fused_moe",
    "fused_moe_workspace_size",
    "prepare_weights",
    "route",
]
