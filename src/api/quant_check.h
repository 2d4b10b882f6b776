// Validation of an FP8 experts call (docs/fp8.md, "Experts"), shared by modmoe::experts,
// modmoe::fused_moe and the CPU oracle reference::experts_fp8. Internal.
#pragma once

#include "modmoe/experts.h"

namespace modmoe::api {

inline bool is_fp8(QuantScheme s) {
  return s == QuantScheme::Fp8PerTensor || s == QuantScheme::Fp8Block128;
}

// Throws modmoe::Error naming the first bad argument. Returns the desc of the call with
// desc.scheme set to the FP8 scheme (validated: ExpertsDesc::validate() accepts FP8).
ExpertsDesc check_fp8_experts(const ExpertsInputs& in, const ExpertWeights& weights,
                              const ExpertMap& map, const ExpertsOptions& options,
                              const ExpertsOutputs& out);

// What the GPU path of FP8 experts needs beyond check_fp8_experts, checked before anything
// runs (nothing for CPU tensors): gated w13 in the layout of prepare_weights
// (GateUpInterleaved, interleave_rows = 8). Throws "not supported yet: FP8 experts on the GPU:
// ..." naming `function`, the scheme and the device. (The device must also be sm_90: checked
// by cuda::experts, which can query it.)
void check_fp8_experts_device(QuantScheme scheme, const ExpertWeights& weights,
                              const Activation activation, const Device& dev,
                              const char* function);

}  // namespace modmoe::api
