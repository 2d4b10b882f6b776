// A float64 check of sampled tokens of a layer's output, straight from the canonical weights
// (no permutation, no kernel): what `modmoe demo` prints as its accuracy line.
#pragma once

#include <vector>

#include "layer.h"

namespace modmoe::app {

struct SampleCheck {
  int num_tokens = 0;     // tokens checked
  int num_experts = 0;    // distinct experts their routes touched
  double rel_l2 = 0.0;    // ||out - ref|| / ||ref|| over the sampled rows
};

// out: [T, H] bf16 (host or device); ids/weights: [T, k] routing result (host or device).
SampleCheck check_sampled_tokens(const Layer& layer, const TensorView& hidden,
                                 const TensorView& topk_ids, const TensorView& topk_weights,
                                 const TensorView& out, int max_samples);

}  // namespace modmoe::app
