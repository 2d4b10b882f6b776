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

// Validation of a W4A16 experts call (NVFP4 weights, bf16 hidden), shared by modmoe::experts
// (through make_experts_desc), modmoe::fused_moe and the CPU oracle reference::experts_nvfp4.
// Throws modmoe::Error naming the first bad argument. Returns the desc with desc.scheme = Nvfp4
// (validated: ExpertsDesc::validate() accepts Nvfp4).
ExpertsDesc check_nvfp4_experts(const ExpertsInputs& in, const ExpertWeights& weights,
                                const ExpertMap& map, const ExpertsOptions& options,
                                const ExpertsOutputs& out);

// What NVFP4 experts on a CUDA device need before the backend runs: a build with the CUDA
// backend (else the "no CUDA backend" error naming `function`). The W4A16 kernel reads every
// weight layout; the device, alignment and workspace are checked by cuda::experts / the API.
void check_nvfp4_experts_device(const Device& dev, const char* function);

}  // namespace modmoe::api
