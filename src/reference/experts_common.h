// Pieces shared by the CPU reference of the experts stage (permute.cpp, finalize.cpp,
// experts.cpp): decoding of top-k ids and weights, the local permutation and the finalize
// sum, on raw host pointers. Internal to src/reference/.
#pragma once

#include <cstdint>
#include <cstring>

#include "modmoe/dtype.h"
#include "modmoe/experts.h"

namespace modmoe::reference::detail {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The global id held by one entry of topk_ids; packed entries are (id << 16) | bf16 bits
// with a signed 16-bit id.
inline int32_t decode_id(int32_t v, bool packed) {
  return packed ? static_cast<int16_t>(static_cast<uint32_t>(v) >> 16) : v;
}

// Builds the local permutation of `num_tokens * top_k` expanded indices. Permuted rows are
// grouped by local expert in expert order; inside an expert, ascending expanded index.
//   topk_ids:         [num_tokens, top_k] int32, plain or packed
//   expert_offsets:   [E_local + 1] int64, exclusive prefix sum of the local counts (written)
//   expanded_to_perm: [num_tokens, top_k] int32, -1 where not local (written)
//   perm_to_expanded: [num_tokens * top_k] int32, -1 past P (written; may be null)
void build_permutation(const int32_t* topk_ids, bool packed, int64_t num_tokens, int top_k,
                       const ExpertMap& map, int64_t* expert_offsets, int32_t* expanded_to_perm,
                       int32_t* perm_to_expanded);

// out[m] = sum over j in order with expanded_to_perm[m, j] >= 0 of
//          weights[m, j] * float(gemm2_out[expanded_to_perm[m, j]]), fp32, cast once to bf16.
// Rows with no local expert are zero.
//   gemm2_out: [>= P, hidden] bf16; weights, expanded_to_perm: [num_tokens, top_k]
//   out:       [num_tokens, hidden] bf16
void finalize_rows(const uint16_t* gemm2_out, const float* weights,
                   const int32_t* expanded_to_perm, int64_t num_tokens, int top_k,
                   int64_t hidden, uint16_t* out);

// prepare_weights' gate/up interleave, for any element size: dst row r of each expert <- the
// canonical row it holds. Rows [0, 2*half) per expert in groups of 2G: G gate rows, then the
// matching G up rows (experts.h, WeightLayout). The gate half of src is [0, half) unless
// up_first. Rows are `row_bytes` bytes (a weight row, a bias element, a row of scales).
void gather_interleaved(const void* src, void* dst, int64_t num_experts, int64_t half,
                        int64_t group_rows, bool up_first, int64_t row_bytes);

// Copies src's bytes into dst (same size) when src is defined.
void copy_view(const TensorView& dst, const TensorView& src);

}  // namespace modmoe::reference::detail
