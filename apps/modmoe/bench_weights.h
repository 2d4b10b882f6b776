// The weights of one model in one benchmark dtype, made once per model from the layer's bf16
// master weights (so every dtype runs the same model): the kernel layout on the layer's
// device, and for a quantized dtype the canonical host tensors its float64 check reads.
#pragma once

#include <vector>

#include "bench_dtype.h"
#include "layer.h"

namespace modmoe::app {

struct BenchWeights {
  BenchDtype dtype = BenchDtype::Bf16;
  ExpertWeights prepared;  // GateUpInterleaved (G = 8), on the layer's device
  ExpertWeights host;      // quantized dtypes: canonical, on the host, as a checkpoint holds them
  std::vector<Buffer> buffers;         // own `prepared`
  std::vector<Buffer> host_keep;      // own `host`

  // The canonical host weights of the listed local experts (expert j = local_experts[j]):
  // the layer's bf16 masters regenerated, or slices of `host`. For check_sampled_tokens.
  ExpertWeights subset(const Layer& layer, const std::vector<int>& local_experts,
                       std::vector<HostTensor>& keep) const;
};

// bf16: the layer's weights prepared on its device. Quantized: each expert's masters
// regenerated on the host and quantized (reference::quantize_expert_weights; experts in
// parallel on every core), prepared on the host, then copied to the layer's device.
BenchWeights make_bench_weights(const Layer& layer, BenchDtype dtype);

}  // namespace modmoe::app
