// CPU reference of finalize (docs/HELPERS.md, numerics rule 4): per token, the fp32 sum over
// its local slots in j order of weight * row, cast once to bf16.
#include <algorithm>
#include <vector>

#include "backend.h"
#include "reference/experts_common.h"

namespace modmoe::reference {

namespace detail {

void finalize_rows(const uint16_t* gemm2_out, const float* weights,
                   const int32_t* expanded_to_perm, int64_t num_tokens, int top_k,
                   int64_t hidden, uint16_t* out) {
  std::vector<float> acc(static_cast<size_t>(hidden));
  for (int64_t m = 0; m < num_tokens; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int j = 0; j < top_k; ++j) {
      const int32_t p = expanded_to_perm[m * top_k + j];
      if (p < 0) continue;
      const float w = weights[m * top_k + j];
      const uint16_t* row = gemm2_out + static_cast<int64_t>(p) * hidden;
      for (int64_t h = 0; h < hidden; ++h) acc[h] += w * bf16_to_float(row[h]);
    }
    uint16_t* dst = out + m * hidden;
    for (int64_t h = 0; h < hidden; ++h) dst[h] = float_to_bf16_bits(acc[h]);
  }
}

}  // namespace detail

void finalize(const TensorView& gemm2_out, const TensorView& expert_weights,
              const TensorView& expanded_idx_to_permuted_idx, const TensorView& out,
              Stream /*stream*/) {
  detail::finalize_rows(gemm2_out.ptr<const uint16_t>(), expert_weights.ptr<const float>(),
                        expanded_idx_to_permuted_idx.ptr<const int32_t>(), out.size(0),
                        static_cast<int>(expanded_idx_to_permuted_idx.size(1)), out.size(1),
                        out.ptr<uint16_t>());
}

}  // namespace modmoe::reference
