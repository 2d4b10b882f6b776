// permute(): the invariants of the local permutation (unique slots, round trip, each row in
// its expert's segment, ascending expanded index inside a segment, non-local ids dropped).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

using test::poison;

struct PermuteResult {
  HostTensor offsets, e2p, p2e;
};

PermuteResult run_permute(const HostTensor& ids, bool packed, const ExpertMap& map) {
  const int64_t M = ids.view().size(0), k = ids.view().size(1);
  PermuteResult r;
  r.offsets.reset(DType::I64, {map.num_local_experts + 1});
  r.e2p.reset(DType::I32, {M, k});
  r.p2e.reset(DType::I32, {M * k});
  poison(r.offsets);
  poison(r.e2p);
  poison(r.p2e);
  permute(ids, packed, map, {r.offsets, r.e2p, r.p2e});
  return r;
}

// Random ids: distinct real experts per row, some slots replaced by -1, num_experts, or
// left pointing at other ranks' experts.
HostTensor random_ids(int64_t M, int k, int E, std::mt19937_64& rng, double junk) {
  HostTensor ids(DType::I32, {M, k});
  std::vector<int> perm(static_cast<size_t>(E));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) {
      int id = perm[j];
      if (u(rng) < junk) id = (rng() % 2) ? -1 : E;
      ids.data<int32_t>()[m * k + j] = id;
    }
  }
  return ids;
}

void check_invariants(const HostTensor& ids, const ExpertMap& map, const PermuteResult& r) {
  const int64_t M = ids.view().size(0), k = ids.view().size(1), n = M * k;
  const int num_local = map.num_local_experts;
  const auto* off = r.offsets.data<int64_t>();
  const auto* e2p = r.e2p.data<int32_t>();
  const auto* p2e = r.p2e.data<int32_t>();
  const auto* id = ids.data<int32_t>();

  int64_t num_local_slots = 0;
  for (int64_t x = 0; x < n; ++x) num_local_slots += map.is_local(id[x]);
  ASSERT_EQ(off[0], 0);
  for (int e = 0; e < num_local; ++e) ASSERT_LE(off[e], off[e + 1]) << "expert " << e;
  const int64_t P = off[num_local];
  ASSERT_EQ(P, num_local_slots) << "P counts exactly the local slots";

  std::vector<int> hits(static_cast<size_t>(P), 0);
  for (int64_t x = 0; x < n; ++x) {
    if (!map.is_local(id[x])) {
      ASSERT_EQ(e2p[x], -1) << "non-local slot " << x << " (id " << id[x] << ") must be -1";
      continue;
    }
    const int32_t p = e2p[x];
    ASSERT_GE(p, 0) << "slot " << x;
    ASSERT_LT(p, P) << "slot " << x;
    ++hits[p];
    const int e = id[x] - map.local_expert_offset;
    ASSERT_GE(p, off[e]) << "slot " << x << " outside the segment of local expert " << e;
    ASSERT_LT(p, off[e + 1]) << "slot " << x << " outside the segment of local expert " << e;
    ASSERT_EQ(p2e[p], x) << "round trip expanded -> permuted -> expanded at " << x;
  }
  for (int64_t p = 0; p < P; ++p) {
    ASSERT_EQ(hits[p], 1) << "permuted row " << p << " must be used exactly once";
    ASSERT_EQ(e2p[p2e[p]], p) << "round trip permuted -> expanded -> permuted at " << p;
  }
  for (int64_t p = P; p < n; ++p) ASSERT_EQ(p2e[p], -1) << "row past P at " << p;
  for (int e = 0; e < num_local; ++e) {
    for (int64_t p = off[e] + 1; p < off[e + 1]; ++p) {
      ASSERT_LT(p2e[p - 1], p2e[p]) << "inside expert " << e << ": ascending expanded index";
    }
  }
}

TEST(Permute, InvariantsSingleRank) {
  std::mt19937_64 rng(test::seed(1));
  const ExpertMap map = ExpertMap::single(16);
  const HostTensor ids = random_ids(100, 4, 16, rng, 0.1);
  check_invariants(ids, map, run_permute(ids, false, map));
}

TEST(Permute, InvariantsEveryRank) {
  std::mt19937_64 rng(test::seed(2));
  const int E = 32, ep = 4;
  const HostTensor ids = random_ids(64, 6, E, rng, 0.15);
  int64_t total = 0;
  for (int r = 0; r < ep; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    const ExpertMap map = ExpertMap::for_rank(E, ep, r);
    const PermuteResult res = run_permute(ids, false, map);
    check_invariants(ids, map, res);
    total += res.offsets.data<int64_t>()[map.num_local_experts];
  }
  int64_t real = 0;
  for (int64_t x = 0; x < ids.numel(); ++x) {
    real += ids.data<int32_t>()[x] >= 0 && ids.data<int32_t>()[x] < E;
  }
  EXPECT_EQ(total, real) << "every real slot lands on exactly one rank";
}

TEST(Permute, DuplicateIdsInARow) {
  // Not produced by routing, but legal input: each slot gets its own row.
  HostTensor ids(DType::I32, {3, 3});
  const int32_t v[] = {2, 2, 1, 0, 2, 2, 3, 3, 3};
  std::memcpy(ids.data<int32_t>(), v, sizeof(v));
  const ExpertMap map = ExpertMap::single(4);
  const PermuteResult r = run_permute(ids, false, map);
  check_invariants(ids, map, r);
  const int64_t want_offsets[] = {0, 1, 2, 6, 9};
  for (int e = 0; e <= 4; ++e) EXPECT_EQ(r.offsets.data<int64_t>()[e], want_offsets[e]);
  // Expert 2 holds expanded 0, 1, 4, 5 in that order.
  const int32_t want_p2e[] = {3, 2, 0, 1, 4, 5, 6, 7, 8};
  for (int p = 0; p < 9; ++p) EXPECT_EQ(r.p2e.data<int32_t>()[p], want_p2e[p]) << "row " << p;
}

TEST(Permute, PackedEqualsUnpacked) {
  std::mt19937_64 rng(test::seed(3));
  const int E = 12;
  const HostTensor ids = random_ids(50, 3, E, rng, 0.2);
  HostTensor packed(DType::I32, {50, 3});
  for (int64_t x = 0; x < ids.numel(); ++x) {
    const uint32_t id = static_cast<uint32_t>(ids.data<int32_t>()[x]);
    packed.data<int32_t>()[x] = static_cast<int32_t>((id << 16) | 0x3F80u);  // weight 1.0
  }
  for (int r = 0; r < 3; ++r) {
    const ExpertMap map = ExpertMap::for_rank(E, 3, r);
    const PermuteResult a = run_permute(ids, false, map);
    const PermuteResult b = run_permute(packed, true, map);
    EXPECT_TRUE(test::bitwise_equal(a.offsets, b.offsets));
    EXPECT_TRUE(test::bitwise_equal(a.e2p, b.e2p));
    EXPECT_TRUE(test::bitwise_equal(a.p2e, b.p2e));
  }
}

TEST(Permute, NothingLocal) {
  HostTensor ids(DType::I32, {4, 2});
  const int32_t v[] = {-1, 8, 0, 1, 8, -1, 1, 0};  // rank 1 of 2 owns 4..7: none present
  std::memcpy(ids.data<int32_t>(), v, sizeof(v));
  const ExpertMap map = ExpertMap::for_rank(8, 2, 1);
  const PermuteResult r = run_permute(ids, false, map);
  check_invariants(ids, map, r);
  for (int e = 0; e <= 4; ++e) EXPECT_EQ(r.offsets.data<int64_t>()[e], 0);
}

TEST(Permute, ZeroTokens) {
  HostTensor ids(DType::I32, {0, 2});
  const ExpertMap map = ExpertMap::single(4);
  const PermuteResult r = run_permute(ids, false, map);
  for (int e = 0; e <= 4; ++e) EXPECT_EQ(r.offsets.data<int64_t>()[e], 0);
}

TEST(Permute, WorkspaceSizeIsZeroOnCpu) {
#ifndef MODMOE_WITH_CUDA
  EXPECT_EQ(permute_workspace_size(1024, 8, 32), 0u);
#else
  EXPECT_GE(permute_workspace_size(1024, 8, 32), 0u);
#endif
}

}  // namespace
}  // namespace modmoe
