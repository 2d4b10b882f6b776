// A float64 check of sampled tokens of a layer's output, straight from the canonical weights
// (no permutation, no kernel): what `modmoe demo` prints as its accuracy line and what
// `modmoe bench experts` validates every cell with before timing it.
#pragma once

#include <functional>
#include <vector>

#include "layer.h"

namespace modmoe::app {

struct SampleCheck {
  int num_tokens = 0;     // tokens checked
  int num_experts = 0;    // distinct experts their routes touched
  double rel_l2 = 0.0;    // ||out - ref|| / ||ref|| over the sampled rows
  // With `emulate`: the same against the float64 reference that rounds the intermediate as
  // the kernels do (reference::DenseOptions::round_intermediate); -1 otherwise.
  double rel_l2_emulated = -1.0;
};

// The canonical host weights of the listed local experts, expert j of the result being
// local_experts[j]; the tensors it makes go to `keep`.
using ExpertSubset = std::function<ExpertWeights(const std::vector<int>& local_experts,
                                                 std::vector<HostTensor>& keep)>;

// in: hidden [T, H] bf16, or e4m3 with hidden_scale ([T, H/128], [T] or [1] fp32), and the
// routing result topk_ids / topk_weights [T, k]; out: [T, H] bf16. Host or device tensors.
SampleCheck check_sampled_tokens(const ExpertsInputs& in, const ExpertMap& map,
                                 const ExpertsOptions& options, const ExpertSubset& subset,
                                 const TensorView& out, int max_samples, bool emulate = false);

// The layer's bf16 weights, regenerated on the host from its seed.
SampleCheck check_sampled_tokens(const Layer& layer, const TensorView& hidden,
                                 const TensorView& topk_ids, const TensorView& topk_weights,
                                 const TensorView& out, int max_samples);

}  // namespace modmoe::app
