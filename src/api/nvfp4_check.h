// NVFP4 pieces of the public API that other files of src/ call (docs/nvfp4.md). Internal.
#pragma once

#include "modmoe/experts.h"
#include "modmoe/quant.h"

namespace modmoe::api {

// prepare_weights with src.scheme = Nvfp4: validates src, options and dst (throws
// modmoe::Error naming the first bad argument), sets dst's descriptor, runs the CPU reference.
// Called by modmoe::prepare_weights (src/api/quant.cpp).
void prepare_weights_nvfp4(const ExpertWeights& src, ExpertWeights& dst,
                           const PrepareWeightsOptions& options, Stream stream);

// Validation of a W4A16 experts call (NVFP4 weights, bf16 hidden), shared by the CPU oracle
// reference::experts_nvfp4 and, once the NVFP4 GEMM lands, by modmoe::experts. Returns the
// desc with desc.scheme = Nvfp4 (ExpertsDesc::validate() still refuses it today).
ExpertsDesc check_nvfp4_experts(const ExpertsInputs& in, const ExpertWeights& weights,
                                const ExpertMap& map, const ExpertsOptions& options,
                                const ExpertsOutputs& out);

}  // namespace modmoe::api
