// Weight preparation and quantization (docs/contract.md, "Weights" and "Quantized parity").
#pragma once

#include "modmoe/experts.h"

namespace modmoe {

struct PrepareWeightsOptions {
  WeightLayout layout = WeightLayout::GateUpInterleaved;
  // G: gate/up rows per interleave group. The GEMM1 kernels need 8 | G; 8 is what they use.
  int interleave_rows = 8;
};

// A pure function of the canonical tensors, run once at load time. `dst` holds caller-
// allocated views with the shapes and dtypes of `src` (w13, w2, and the biases when `src`
// has them), on the same device; prepare_weights fills them and sets dst's other fields.
// Gated activations only need the interleave; non-gated (Relu2) weights are copied.
void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options = {}, Stream stream = nullptr);

}  // namespace modmoe
