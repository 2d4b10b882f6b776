// An independent float64 dense reference of the experts stage, for tests and the `modmoe`
// command: computed per (token, slot) straight from the canonical weights, with no
// permutation, no shared code with the CPU backend (its own activation formulas) and no
// rounding except where asked. Both the CPU reference and the CUDA kernels are compared to
// it with a relative L2 error (docs/contract.md, "Numerics").
#pragma once

#include <vector>

#include "modmoe/experts.h"

namespace modmoe::reference {

struct DenseOptions {
  // true: round to bf16 where the kernels do before the GEMM2 input (the activation output,
  // and the router-weighted input under apply_router_weight_on_input), and with FP8 weights
  // re-quantize the activation to e4m3 in 1x128 groups as the FP8 kernels do (docs/fp8.md).
  // false: pure float64.
  bool round_intermediate = false;
  // Also return the pure float64 result in `out_unrounded` (useful with round_intermediate).
  bool keep_unrounded = false;
  // Standard format: also return the unweighted output of every (token, slot) in `per_slot`.
  bool per_slot = false;
};

struct DenseResult {
  // Standard: [M, H], out[m] = sum over local j of w_j * Expert_{id_j}(x_m), rows with no
  // local expert 0. Batched: [E_local, max_m, H] unweighted, rows past the count 0.
  std::vector<double> out;
  std::vector<double> out_unrounded;  // same shape, pure float64; with keep_unrounded only
  std::vector<double> per_slot;       // [M, k, H] unweighted, 0 where not local; per_slot only
};

// Takes the arguments of modmoe::experts (weights in the Canonical layout, GateUp or UpGate;
// host tensors). Quantized weights (Fp8PerTensor, Fp8Block128, Nvfp4) and e4m3 hidden (with
// hidden_scale) are read as their dequantized values, which are exact in float64. The options' do_finalize is ignored: `out` is always the finalized sum.
// bf16_routing_weights and apply_router_weight_on_input are part of the problem and are
// always honoured. Throws modmoe::Error on weights in another layout or device tensors.
DenseResult dense_moe_f64(const ExpertsInputs& in, const ExpertWeights& weights,
                          const ExpertMap& map, const ExpertsOptions& options,
                          const DenseOptions& dense = {});

}  // namespace modmoe::reference
