// Validation of an FP8 experts call (docs/fp8.md, "Experts"), shared by the CPU oracle
// reference::experts_fp8 and, once the FP8 grouped GEMM lands, by modmoe::experts. Internal.
#pragma once

#include "modmoe/experts.h"

namespace modmoe::api {

// Throws modmoe::Error naming the first bad argument. Returns the desc of the call with
// desc.scheme set to the FP8 scheme (ExpertsDesc::validate() still refuses FP8 today).
ExpertsDesc check_fp8_experts(const ExpertsInputs& in, const ExpertWeights& weights,
                              const ExpertMap& map, const ExpertsOptions& options,
                              const ExpertsOutputs& out);

}  // namespace modmoe::api
