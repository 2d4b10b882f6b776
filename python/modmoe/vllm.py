"""modmoe's experts behind vLLM's modular MoE interface (``FusedMoEExpertsModular``).

``ModmoeExperts`` takes what a vLLM prepare step hands the experts: Standard-format rows
``hidden_states [M, H]`` bf16 (after an all-to-all, ``M = ep_size * max_tokens`` with padding
rows), ``topk_ids [M, k]`` int32 global ids (-1 on padding rows, other ranks' experts among
them) and ``topk_weights [M, k]``. It writes ``output [M, H]`` weighted and reduced over this
rank's experts, so its ``finalize_weight_and_reduce_impl()`` is a no-op and the finalize step
only combines (vLLM's ``TopKWeightAndReduceNoOP``).

vLLM's ``expert_map`` ([E] int32, global id -> local id or -1) becomes modmoe's contiguous
local range; a map that is not contiguous is rejected with an error.

FP8 (``_supports_quant_scheme``): vLLM's Fp8 MoE with per-tensor weight scales and static or
dynamic per-tensor activation scales, and block-quantized W8A8 (128x128 weight blocks, dynamic
1x128 activation groups: DeepSeek-V3). The scheme comes from the quant_config; vLLM's prepare
step quantizes the hidden states (``expects_unquantized_inputs`` is False), ``apply`` receives
e4m3 rows with ``a1q_scale`` and reads the weight scales from the quant_config.
``process_weights_after_loading`` reorders w13 in place into the layout the FP8 GPU kernels
read. bf16 behaves as before.

NVFP4 weights with bf16 activations (W4A16; ModelOpt's NVFP4 weight scheme, vLLM's
``(kNvfp4Static, None)`` keys and ``nvfp4_w4a16_moe_quant_config``): ``apply`` receives the bf16
rows (``expects_unquantized_inputs`` is True, no ``a1q_scale``), w1 / w2 uint8 packed e2m1
pairs as the checkpoint stores them, and reads from the quant_config the linear e4m3 block
scales (``w1_scale`` / ``w2_scale``) and the per-expert fp32 global scales (``g1_alphas`` /
``g2_alphas``: with bf16 activations they are ModelOpt's ``weight_scale_2``, w1's for w13).
The weights stay as they are (the W4A16 kernel reads the checkpoint layout). The block scales
must be linear: the 128x4 swizzle some vLLM NVFP4 backends apply at load time is not read
(docs/nvfp4.md, "Python"). W4A4 (NVFP4 activations) is not supported yet.

vLLM is optional: this module imports without it (the class then derives from ``object``, and
tests drive it the way vLLM does). Where vLLM imports, the class derives from vLLM's
``FusedMoEExpertsModular`` and returns vLLM's own enum and no-op objects. See
python/examples/vllm_experts.py for how to put it in a vLLM kernel.
"""

import enum
import importlib.util

from . import _C, _api
from ._api import Error, GateUpOrder, QuantScheme


def _import_vllm():
    """vLLM's modular-kernel module and no-op reducer, or (None, None) without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return None, None
    try:
        from vllm.model_executor.layers.fused_moe import modular_kernel
        from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
            TopKWeightAndReduceNoOP,
        )
    except Exception:  # an incompatible vLLM: work as without it
        return None, None
    return modular_kernel, TopKWeightAndReduceNoOP


_mk, _VllmNoOp = _import_vllm()

if _mk is not None:
    FusedMoEActivationFormat = _mk.FusedMoEActivationFormat
    _Base = _mk.FusedMoEExpertsModular
else:

    class FusedMoEActivationFormat(enum.Enum):
        """vLLM's enum of the same name (its values), for use without vLLM."""

        Standard = "standard"
        BatchedExperts = "batched_experts"

    _Base = object


class WeightAndReduceNoOp:
    """No-op finalize: the experts already applied the top-k weights and reduced (vLLM's
    TopKWeightAndReduceNoOP, for use without vLLM)."""

    def apply(self, output, fused_expert_output, topk_weights, topk_ids,
              apply_router_weight_on_input):
        if output is None or output is fused_expert_output:
            return fused_expert_output
        output[...] = fused_expert_output
        return output

    def __eq__(self, other):
        return isinstance(other, WeightAndReduceNoOp)

    def __hash__(self):
        return hash(WeightAndReduceNoOp)

    def __repr__(self):
        return "WeightAndReduceNoOp()"


# vLLM activations that modmoe runs with vLLM's weight layout (w13 = [gate; up] halves).
# NOTE: SWIGLUOAI is left out: vLLM stores gpt-oss's w13 with gate and up rows alternating,
# a layout modmoe does not read.
_VLLM_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu", "relu2_no_mul": "relu2"}


def _activation_name(activation):
    name = getattr(activation, "name", None) or getattr(activation, "value", None) or activation
    name = str(name).lower()
    if name not in _VLLM_ACTIVATIONS:
        raise Error(f"modmoe: vLLM activation {activation!r}: expected one of "
                    f"{sorted(_VLLM_ACTIVATIONS)}")
    return _VLLM_ACTIVATIONS[name]


# vLLM's (weight_key, activation_key) pairs that modmoe runs. A vLLM QuantKey is
# (dtype, scale=ScaleDesc(dtype, static, group_shape), scale2, symmetric); the pairs below are of
# symmetric float8_e4m3fn keys with fp32 scales and no second scale, keyed by (static, group
# shape), GroupShape(-1, -1) being per tensor.
_FP8_KEYS = {
    # kFp8StaticTensorSym weights x kFp8StaticTensorSym / kFp8DynamicTensorSym activations
    ((True, (-1, -1)), (True, (-1, -1))): QuantScheme.Fp8PerTensor,
    ((True, (-1, -1)), (False, (-1, -1))): QuantScheme.Fp8PerTensor,
    # kFp8Static128BlockSym weights x kFp8Dynamic128Sym activations
    ((True, (128, 128)), (False, (1, 128))): QuantScheme.Fp8Block128,
}


def _fp8_key(key):
    """(static, group shape) of a vLLM QuantKey as _FP8_KEYS has them, or None."""
    scale = getattr(key, "scale", None)
    if (scale is None or getattr(key, "scale2", None) is not None
            or not getattr(key, "symmetric", False)
            or not str(getattr(key, "dtype", "")).endswith("float8_e4m3fn")
            or not str(getattr(scale, "dtype", "")).endswith("float32")):
        return None
    return bool(scale.static), tuple(scale.group_shape)


def _is_nvfp4_weight_key(key):
    """Whether a vLLM QuantKey is kNvfp4Static: packed e2m1 (FP4_DTYPE, uint8) with static
    float8_e4m3fn scales per 1x16 group and a static fp32 per-tensor second scale (the
    global)."""
    scale, scale2 = getattr(key, "scale", None), getattr(key, "scale2", None)
    return (scale is not None and scale2 is not None and getattr(key, "symmetric", False)
            and str(getattr(key, "dtype", "")).endswith("uint8")
            and str(getattr(scale, "dtype", "")).endswith("float8_e4m3fn")
            and bool(getattr(scale, "static", False))
            and tuple(getattr(scale, "group_shape", ())) == (1, 16)
            and str(getattr(scale2, "dtype", "")).endswith("float32")
            and bool(getattr(scale2, "static", False))
            and tuple(getattr(scale2, "group_shape", ())) == (-1, -1))


def quant_scheme_of_keys(weight_key, activation_key):
    """modmoe's QuantScheme for vLLM's (weight_key, activation_key): Bf16 for (None, None), an
    FP8 scheme for the pairs of _FP8_KEYS, Nvfp4 for (kNvfp4Static, None) (W4A16), None where
    modmoe does not run the pair (W4A4: NVFP4 activations, not supported yet)."""
    if weight_key is None and activation_key is None:
        return QuantScheme.Bf16
    if activation_key is None and _is_nvfp4_weight_key(weight_key):
        return QuantScheme.Nvfp4
    return _FP8_KEYS.get((_fp8_key(weight_key), _fp8_key(activation_key)))


def quant_scheme_of_config(quant_config):
    """modmoe's QuantScheme for vLLM's FusedMoEQuantConfig: quant_dtype None is bf16, or NVFP4
    W4A16 where use_nvfp4_w4a16 is True (nvfp4_w4a16_moe_quant_config: weight dtype 'nvfp4',
    unquantized activations); float8_e4m3fn is 'fp8-block' with block_shape [128, 128],
    'fp8-tensor' without."""
    dtype = getattr(quant_config, "quant_dtype", None)
    if dtype is None:
        if getattr(quant_config, "use_nvfp4_w4a16", False):
            return QuantScheme.Nvfp4
        return QuantScheme.Bf16
    if str(dtype) == "nvfp4":
        raise Error("modmoe: quant_config has quant_dtype nvfp4 (NVFP4 activations, W4A4): not "
                    "supported yet; modmoe runs NVFP4 weights with bf16 activations (W4A16, "
                    "nvfp4_w4a16_moe_quant_config)")
    block = getattr(quant_config, "block_shape", None)
    per_token = getattr(quant_config, "per_act_token_quant", False)
    per_channel = getattr(quant_config, "per_out_ch_quant", False)
    if str(dtype).endswith("float8_e4m3fn") and not per_token and not per_channel:
        if block is None:
            return QuantScheme.Fp8PerTensor
        if list(block) == [128, 128]:
            return QuantScheme.Fp8Block128
    raise Error(f"modmoe: quant_config has quant_dtype {dtype}, block_shape {block}, "
                f"per_act_token_quant {per_token}, per_out_ch_quant {per_channel}: expected "
                "bf16 (quant_dtype None), or float8_e4m3fn with per-tensor scales (no block_shape) "
                "or 128x128 blocks (block_shape [128, 128])")


def local_range(expert_map, num_local_experts=None):
    """(local_expert_offset, local_num_experts) of a vLLM expert_map: [E] ints, global id ->
    local id or -1. modmoe needs the local experts contiguous and in order: global
    [offset, offset + n) -> local [0, n). Reads the map on the host (once per map: the
    adapter caches it)."""
    if hasattr(expert_map, "cpu"):
        expert_map = expert_map.cpu()
    values = expert_map.tolist()
    local = [(g, l) for g, l in enumerate(values) if l >= 0]
    if not local:
        raise Error(f"modmoe: argument 'expert_map' maps none of the {len(values)} experts to "
                    "this rank: expected at least one local expert")
    offset = local[0][0]
    for i, (g, l) in enumerate(local):
        if g != offset + i or l != i:
            raise Error(
                f"modmoe: argument 'expert_map' maps global expert {g} to local expert {l}: "
                f"expected a contiguous map, global [{offset}, {offset + len(local)}) -> local "
                f"[0, {len(local)}) in order, with -1 elsewhere (modmoe splits experts "
                "contiguously over the ranks; a strided or permuted placement is not "
                "supported)")
    if num_local_experts is not None and len(local) != num_local_experts:
        raise Error(f"modmoe: argument 'expert_map' has {len(local)} local experts: expected "
                    f"{num_local_experts}, the experts of w1")
    return offset, len(local)


class ModmoeExperts(_Base):
    """vLLM modular experts (Standard format in and out) on modmoe's kernels.

    moe_config / quant_config: vLLM's FusedMoEConfig / FusedMoEQuantConfig (optional without
    vLLM). local_expert_offset: the first global expert of this rank when apply() gets no
    expert_map (default: moe_config's ep_rank * local experts, else 0). gate_up_order: the
    half of w1's rows that holds the gate (vLLM: GateUp). bf16_routing_weights: round the
    fp32 routing weights to bf16 first, as FlashInfer's packed BF16 kernels do.

    FP8: quant_config gives the scheme (quant_scheme_of_config) and the weight scales
    (w1_scale, w2_scale). interleave_rows: the interleave of FP8 weights that are in
    prepare_weights' layout already (0: the checkpoint's; process_weights_after_loading sets
    it). fp8_fast_accum: FP8 fast accumulation of GEMM1 (per-tensor FP8 only; docs/fp8.md
    "FP8 fast accumulation"), refused here for any other scheme.

    NVFP4 (W4A16): quant_config gives the block scales (w1_scale, w2_scale: e4m3, linear) and
    the global scales (g1_alphas, g2_alphas: fp32 [E_local]); w1 / w2 are uint8 packed pairs.
    """

    def __init__(self, moe_config=None, quant_config=None, *, local_expert_offset=None,
                 gate_up_order=GateUpOrder.GateUp, bf16_routing_weights=False,
                 interleave_rows=0, fp8_fast_accum=False):
        if _mk is not None and moe_config is not None:
            super().__init__(moe_config, quant_config)
        else:
            self.moe_config = moe_config
            self.quant_config = quant_config
        self.local_expert_offset = local_expert_offset
        self.gate_up_order = gate_up_order
        self.bf16_routing_weights = bf16_routing_weights
        self.quant_scheme = quant_scheme_of_config(quant_config)
        if fp8_fast_accum and self.quant_scheme != QuantScheme.Fp8PerTensor:
            raise Error(f"modmoe: fp8_fast_accum=True with quant scheme {self.quant_scheme.name}: "
                        "expected per-tensor FP8 (quant_dtype float8_e4m3fn, no block_shape); FP8 "
                        "fast accumulation is an fp8-tensor mode")
        self.fp8_fast_accum = fp8_fast_accum
        self.interleave_rows = interleave_rows
        self._ranges = {}  # id(expert_map) -> (expert_map, (offset, count))
        self._unit_weights = None  # ones [>= M, k] fp32, for apply_router_weight_on_input

    # ---- formats and capabilities, as vLLM's backend selection asks for them ----

    @staticmethod
    def activation_format():
        return FusedMoEActivationFormat.Standard

    @property
    def activation_formats(self):  # the older vLLM spelling: (input, output)
        return (FusedMoEActivationFormat.Standard, FusedMoEActivationFormat.Standard)

    @staticmethod
    def is_monolithic():
        return False

    @staticmethod
    def _supports_current_device():
        try:
            import torch
        except ImportError:
            return False
        if not (_C.built_with_cuda() and torch.cuda.is_available()):
            return False
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}a" in _C.compiled_architectures()

    @staticmethod
    def _supports_no_act_and_mul():
        return True  # relu2

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key):
        return quant_scheme_of_keys(weight_key, activation_key) is not None

    @staticmethod
    def _supports_activation(activation):
        try:
            _activation_name(activation)
        except Error:
            return False
        return True

    @staticmethod
    def _supports_parallel_config(moe_parallel_config):
        # EPLB rewrites expert_map into placements that are not contiguous.
        return not getattr(moe_parallel_config, "enable_eplb", False)

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key):
        return True  # routing happened before the experts

    @staticmethod
    def _supports_router_logits_dtype(router_logits_dtype, routing_method):
        return True

    @staticmethod
    def _supports_shape(hidden_dim):
        return hidden_dim % 64 == 0

    @staticmethod
    def _supports_batch_invariance():
        return False

    @staticmethod
    def supports_lora():
        return False

    def supports_expert_map(self):
        return True

    def supports_chunking(self):
        return True

    def supports_packed_ue8m0_act_scales(self):
        return False

    @property
    def expects_unquantized_inputs(self):
        # FP8: vLLM's prepare quantizes; NVFP4 W4A16 takes the bf16 rows.
        return self.quant_scheme in (QuantScheme.Bf16, QuantScheme.Nvfp4)

    # ---- sizes ----

    def moe_problem_size(self, a1, w1, w2, topk_ids):
        """(E_local, M, N, K, top_k), N = w1.shape[1] (2I gated, I for relu2)."""
        return w1.shape[0], a1.shape[0], w1.shape[1], a1.shape[-1], topk_ids.shape[1]

    def workspace_dtype(self, act_dtype):
        return act_dtype

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts,
                         expert_tokens_meta, activation):
        """workspace13 is unused: vLLM may alias it with the output. modmoe's scratch is
        workspace2, [M, cols] of the activation dtype (bf16, 2 bytes)."""
        act = _activation_name(activation)
        inter = N if act == "relu2" else N // 2
        nbytes = _api.experts_workspace_size(
            M, K, inter, topk, max(global_num_experts, local_num_experts),
            local_num_experts=local_num_experts, activation_type=act,
            quant_scheme=self.quant_scheme)
        ws2 = (M, -(-nbytes // (2 * M))) if nbytes and M else (0,)
        return (0,), ws2, (M, K)

    def finalize_weight_and_reduce_impl(self):
        return _VllmNoOp() if _VllmNoOp is not None else WeightAndReduceNoOp()

    # ---- weights ----

    def process_weights_after_loading(self, layer):
        """FP8: reorders layer.w13_weight and its scales (quant_config.w1_scale) in place, one
        expert at a time, into prepare_weights' layout (the gate/up interleave of 8 rows that
        the FP8 GPU kernels read; block scale rows move with their rows), once; later apply()
        calls read them so. bf16 and NVFP4 weights stay as they are (the W4A16 kernel reads the
        checkpoint layout, and its block scales would have to move with the rows)."""
        if self.quant_scheme in (QuantScheme.Bf16, QuantScheme.Nvfp4) or self.interleave_rows:
            return
        w13, w2 = layer.w13_weight, layer.w2_weight
        w13_scale, w2_scale = self.quant_config.w1_scale, self.quant_config.w2_scale
        for e in range(w13.shape[0]):
            one = slice(e, e + 1)
            prepared = _api.prepare_weights(
                w13[one], w2[one], gate_up_order=self.gate_up_order,
                gemm1_weights_scale=w13_scale[one], gemm2_weights_scale=w2_scale[one],
                quant_scheme=self.quant_scheme)
            w13[one] = prepared.gemm1_weights
            w13_scale[one] = prepared.gemm1_weights_scale
        self.interleave_rows = prepared.interleave_rows

    def _weights(self, w1, w2):
        """(gemm1_weights, gemm2_weights) of experts(): bf16 tensors as they are; FP8 and NVFP4
        ones in an ExpertWeights with the quant_config's scales."""
        if self.quant_scheme == QuantScheme.Bf16:
            return w1, w2
        if self.quant_scheme == QuantScheme.Nvfp4:
            config = self.quant_config
            weights = _api.ExpertWeights(
                w1, w2, int(self.gate_up_order), quant_scheme=QuantScheme.Nvfp4,
                gemm1_weights_scale=config.w1_scale, gemm2_weights_scale=config.w2_scale,
                output1_scale_scalar=config.g1_alphas, output2_scale_scalar=config.g2_alphas)
            return weights, None
        weights = _api.ExpertWeights(
            w1, w2, int(self.gate_up_order), None, None, self.interleave_rows,
            quant_scheme=self.quant_scheme, gemm1_weights_scale=self.quant_config.w1_scale,
            gemm2_weights_scale=self.quant_config.w2_scale)
        return weights, None

    def _hidden_scale(self, a1q_scale):
        """a1q_scale as experts() takes it: None (bf16), [M, H/128] (fp8-block), [1] or [M]
        (fp8-tensor: vLLM may hand a 0-d static scale, or [M, 1])."""
        if self.quant_scheme in (QuantScheme.Bf16, QuantScheme.Nvfp4):
            if a1q_scale is not None:
                raise Error("modmoe: argument 'a1q_scale' is given: expected unquantized bf16 "
                            "activations (expects_unquantized_inputs is True)")
            return None
        if a1q_scale is None:
            raise Error(f"modmoe: argument 'a1q_scale' is None with FP8 experts "
                        f"({QuantScheme(self.quant_scheme).name}): expected the scales of the "
                        "e4m3 hidden_states, which vLLM's prepare step makes "
                        "(expects_unquantized_inputs is False)")
        if self.quant_scheme == QuantScheme.Fp8PerTensor and len(a1q_scale.shape) != 1:
            return a1q_scale.reshape(-1)
        return a1q_scale

    # ---- the compute ----

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale=None, workspace13=None,
              workspace2=None, expert_tokens_meta=None, apply_router_weight_on_input=False):
        """output [M, H] = sum over this rank's experts j of w_j * Expert_j(hidden_states).
        With apply_router_weight_on_input the prepare step already scaled the input (top_k 1),
        so the experts apply weight 1. FP8: hidden_states e4m3 with a1q_scale; a2_scale is
        not used (modmoe re-quantizes the intermediate with dynamic 1x128 groups,
        docs/fp8.md)."""
        hidden_scale = self._hidden_scale(a1q_scale)
        offset, count = self._local_range(expert_map, w1)
        weights = self._ones_like(topk_weights) if apply_router_weight_on_input else topk_weights
        if workspace2 is not None and workspace2.shape[0] == 0:
            workspace2 = None
        gemm1, gemm2 = self._weights(w1, w2)
        _api.experts(
            (topk_ids, weights), hidden_states, gemm1, gemm2, global_num_experts,
            topk_ids.shape[1], local_expert_offset=offset, local_num_experts=count,
            activation_type=_activation_name(activation), output=output, workspace=workspace2,
            gate_up_order=self.gate_up_order, bf16_routing_weights=self.bf16_routing_weights,
            fp8_fast_accum=self.fp8_fast_accum, hidden_states_scale=hidden_scale)

    def _local_range(self, expert_map, w1):
        num_local = w1.shape[0]
        if expert_map is None:
            offset = self.local_expert_offset
            if offset is None:
                config = self.moe_config
                parallel = getattr(config, "moe_parallel_config", None)
                offset = getattr(parallel, "ep_rank", 0) * num_local if parallel else 0
            return offset, num_local
        cached = self._ranges.get(id(expert_map))
        if cached is not None and cached[0] is expert_map:
            return cached[1]
        result = local_range(expert_map, num_local)
        self._ranges[id(expert_map)] = (expert_map, result)
        return result

    def _ones_like(self, topk_weights):
        m, k = topk_weights.shape
        ones = self._unit_weights
        if (ones is None or ones.shape[0] < m or ones.shape[1] != k
                or _api._framework(ones) != _api._framework(topk_weights)
                or getattr(ones, "device", None) != getattr(topk_weights, "device", None)):
            ones = _api._ones(topk_weights, (max(m, 1), k))
            self._unit_weights = ones
        return ones[:m]
