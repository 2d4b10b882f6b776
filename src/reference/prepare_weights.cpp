// CPU reference of prepare_weights: canonical [E_local, 2I, H] (GateUp or UpGate) to the
// GateUpInterleaved layout, or a plain copy. Arguments were validated by src/api/quant.cpp,
// which also sets dst's descriptor fields.
#include <cstring>

#include "backend.h"
#include "reference/experts_common.h"

namespace modmoe::reference {
namespace detail {

void gather_interleaved(const void* src, void* dst, int64_t num_experts, int64_t half,
                        int64_t group_rows, bool up_first, int64_t row_bytes) {
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  const int64_t rows = 2 * half;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t within = r % (2 * group_rows);
      const bool is_gate = within < group_rows;
      const int64_t i =
          r / (2 * group_rows) * group_rows + (is_gate ? within : within - group_rows);
      const int64_t src_row = is_gate != up_first ? i : half + i;
      std::memcpy(d + (e * rows + r) * row_bytes, s + (e * rows + src_row) * row_bytes,
                  static_cast<size_t>(row_bytes));
    }
  }
}

void copy_view(const TensorView& dst, const TensorView& src) {
  if (src.defined() && src.nbytes() > 0) std::memcpy(dst.data, src.data, src.nbytes());
}

}  // namespace detail

void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options, Stream /*stream*/) {
  const int64_t num_local = src.num_local_experts();
  const int64_t H = src.hidden();
  const int64_t I = src.intermediate();
  const int64_t rows = src.w13.size(1);  // 2I (gated) or I (non-gated)
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;

  // w2 and w2_bias keep their layout.
  detail::copy_view(dst.w2, src.w2);
  detail::copy_view(dst.w2_bias, src.w2_bias);
  if (!interleave) {
    detail::copy_view(dst.w13, src.w13);
    detail::copy_view(dst.w13_bias, src.w13_bias);
    return;
  }
  const int64_t G = options.interleave_rows;
  const bool up_first = src.order == GateUpOrder::UpGate;
  detail::gather_interleaved(src.w13.data, dst.w13.data, num_local, I, G, up_first,
                             H * static_cast<int64_t>(sizeof(uint16_t)));
  if (src.w13_bias.defined()) {
    detail::gather_interleaved(src.w13_bias.data, dst.w13_bias.data, num_local, I, G, up_first,
                               sizeof(float));
  }
}

}  // namespace modmoe::reference
