// CPU reference of prepare_weights: canonical [E_local, 2I, H] (GateUp or UpGate) to the
// GateUpInterleaved layout, or a plain copy. Arguments were validated by src/api/quant.cpp,
// which also sets dst's descriptor fields.
#include <cstring>

#include "backend.h"

namespace modmoe::reference {

void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options, Stream /*stream*/) {
  const int64_t num_local = src.num_local_experts();
  const int64_t H = src.hidden();
  const int64_t I = src.intermediate();
  const int64_t rows = src.w13.size(1);  // 2I (gated) or I (non-gated)
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;

  // w2 and w2_bias keep their layout.
  std::memcpy(dst.w2.data, src.w2.data, src.w2.nbytes());
  if (src.w2_bias.defined()) std::memcpy(dst.w2_bias.data, src.w2_bias.data, src.w2_bias.nbytes());

  if (!interleave) {
    std::memcpy(dst.w13.data, src.w13.data, src.w13.nbytes());
    if (src.w13_bias.defined()) {
      std::memcpy(dst.w13_bias.data, src.w13_bias.data, src.w13_bias.nbytes());
    }
    return;
  }

  // dst row r of an expert: group g = r / 2G; the first G rows of a group are gate rows
  // [g*G, (g+1)*G), the next G the matching up rows (experts.h, WeightLayout).
  const int64_t G = options.interleave_rows;
  const bool gate_first = src.order == GateUpOrder::GateUp;
  const auto* s13 = src.w13.ptr<const uint16_t>();
  auto* d13 = dst.w13.ptr<uint16_t>();
  const float* sb = src.w13_bias.defined() ? src.w13_bias.ptr<const float>() : nullptr;
  float* db = src.w13_bias.defined() ? dst.w13_bias.ptr<float>() : nullptr;
  for (int64_t e = 0; e < num_local; ++e) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / (2 * G);
      const int64_t within = r % (2 * G);
      const bool is_gate = within < G;
      const int64_t i = g * G + (is_gate ? within : within - G);  // intermediate column
      const int64_t src_row = (is_gate == gate_first) ? i : I + i;
      std::memcpy(d13 + (e * rows + r) * H, s13 + (e * rows + src_row) * H,
                  static_cast<size_t>(H) * sizeof(uint16_t));
      if (sb) db[e * rows + r] = sb[e * rows + src_row];
    }
  }
}

}  // namespace modmoe::reference
