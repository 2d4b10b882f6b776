// CPU reference of the local permutation (docs/contract.md, "Stage 3"; docs/HELPERS.md,
// numerics rule 8): rows grouped by local expert, ascending expanded index inside an expert.
#include <vector>

#include "backend.h"
#include "reference/experts_common.h"

namespace modmoe::reference {

namespace detail {

void build_permutation(const int32_t* topk_ids, bool packed, int64_t num_tokens, int top_k,
                       const ExpertMap& map, int64_t* expert_offsets, int32_t* expanded_to_perm,
                       int32_t* perm_to_expanded) {
  const int num_local = map.num_local_experts;
  const int64_t num_expanded = num_tokens * top_k;

  // Pass 1: rows per local expert, then the exclusive prefix sum.
  std::vector<int64_t> cursor(static_cast<size_t>(num_local), 0);
  for (int64_t x = 0; x < num_expanded; ++x) {
    const int32_t id = decode_id(topk_ids[x], packed);
    if (map.is_local(id)) ++cursor[id - map.local_expert_offset];
  }
  expert_offsets[0] = 0;
  for (int e = 0; e < num_local; ++e) {
    expert_offsets[e + 1] = expert_offsets[e] + cursor[e];
    cursor[e] = expert_offsets[e];
  }

  // Pass 2: visiting expanded indices in ascending order gives the order inside a segment.
  for (int64_t x = 0; x < num_expanded; ++x) {
    const int32_t id = decode_id(topk_ids[x], packed);
    if (!map.is_local(id)) {
      expanded_to_perm[x] = -1;
      continue;
    }
    const int64_t p = cursor[id - map.local_expert_offset]++;
    expanded_to_perm[x] = static_cast<int32_t>(p);
    if (perm_to_expanded != nullptr) perm_to_expanded[p] = static_cast<int32_t>(x);
  }
  if (perm_to_expanded != nullptr) {
    for (int64_t p = expert_offsets[num_local]; p < num_expanded; ++p) perm_to_expanded[p] = -1;
  }
}

}  // namespace detail

size_t permute_workspace_size(int64_t /*num_tokens*/, int /*top_k*/, int /*num_local_experts*/) {
  return 0;
}

void permute(const TensorView& topk_ids, bool packed, const ExpertMap& map,
             const PermuteMetadata& out, const Workspace& /*workspace*/, Stream /*stream*/) {
  detail::build_permutation(topk_ids.ptr<const int32_t>(), packed, topk_ids.size(0),
                            static_cast<int>(topk_ids.size(1)), map,
                            out.expert_first_token_offset.ptr<int64_t>(),
                            out.expanded_idx_to_permuted_idx.ptr<int32_t>(),
                            out.permuted_idx_to_expanded_idx.ptr<int32_t>());
}

}  // namespace modmoe::reference
