// permute on the GPU: every output exactly as reference::permute gives it (plain and packed
// ids; -1 padding, num_experts and other ranks' ids dropped; M = 0 up to large M), the
// permutation invariants on their own, repeated runs and a CUDA graph replay bitwise equal.
// The one-block kernel (permute_block.cuh) runs by default up to 4096 entries, with
// MODMOE_FUSED_PERMUTE=1 up to 16384 entries and 256 local experts; past that (or with
// MODMOE_FUSED_PERMUTE=0) the chunked kernels: the cases cover both and the limits.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "common/test_util.h"
#include "gpu_test_util.h"
#include "modmoe/dtype.h"
#include "modmoe/experts.h"

namespace modmoe {
namespace {

struct Case {
  int64_t num_tokens;  // M
  int top_k;
  int num_experts;
  int ep_size, ep_rank;
  bool packed;
  bool duplicates;  // allow the same id twice in a row (routing never does; permute must cope)
};

std::string name_of(const Case& c) {
  return "M" + std::to_string(c.num_tokens) + "_k" + std::to_string(c.top_k) + "_E" +
         std::to_string(c.num_experts) + "_ep" + std::to_string(c.ep_rank) + "of" +
         std::to_string(c.ep_size) + (c.packed ? "_packed" : "") + (c.duplicates ? "_dup" : "");
}

// [M, k] ids: mostly global ids in [0, E) (distinct per row unless `duplicates`), with -1
// padding and the sentinel E sprinkled in; packed as (id << 16) | bf16(weight) on request.
HostTensor make_ids(const Case& c, std::mt19937_64& rng) {
  HostTensor ids(DType::I32, {c.num_tokens, c.top_k});
  std::uniform_int_distribution<int> expert(0, c.num_experts - 1);
  std::uniform_int_distribution<int> special(0, 19);
  std::normal_distribution<float> weight(0.0f, 1.0f);
  int32_t* out = ids.data<int32_t>();
  for (int64_t m = 0; m < c.num_tokens; ++m) {
    for (int j = 0; j < c.top_k; ++j) {
      int id;
      bool fresh;
      do {
        const int s = special(rng);
        id = s == 0 ? -1 : s == 1 ? c.num_experts : expert(rng);
        fresh = true;
        for (int i = 0; i < j && !c.duplicates; ++i) {
          const int32_t prev = c.packed ? out[m * c.top_k + i] >> 16 : out[m * c.top_k + i];
          fresh = fresh && (prev != id || id < 0 || id == c.num_experts);
        }
      } while (!fresh);
      const uint32_t bits = float_to_bf16_bits(weight(rng));
      out[m * c.top_k + j] =
          c.packed ? static_cast<int32_t>((static_cast<uint32_t>(id) << 16) | bits) : id;
    }
  }
  return ids;
}

struct Meta {
  DeviceTensor offsets;           // [E_local + 1] int64
  DeviceTensor expanded_to_perm;  // [M, k] int32
  DeviceTensor perm_to_expanded;  // [M * k] int32
  Meta(int64_t M, int k, int E_local)
      : offsets(DType::I64, {E_local + 1}),
        expanded_to_perm(DType::I32, {M, k}),
        perm_to_expanded(DType::I32, {M * k}) {}
  PermuteMetadata view() const { return {offsets, expanded_to_perm, perm_to_expanded}; }
  void poison() const {
    test::poison(offsets);
    test::poison(expanded_to_perm);
    test::poison(perm_to_expanded);
  }
};

struct HostMeta {
  HostTensor offsets, expanded_to_perm, perm_to_expanded;
};

HostMeta download(const Meta& d) {
  return {d.offsets.to_host(), d.expanded_to_perm.to_host(), d.perm_to_expanded.to_host()};
}

void expect_equal(const HostMeta& a, const HostMeta& b, const char* what) {
  EXPECT_TRUE(test::bitwise_equal(a.offsets, b.offsets)) << what << ": expert_first_token_offset";
  EXPECT_TRUE(test::bitwise_equal(a.expanded_to_perm, b.expanded_to_perm))
      << what << ": expanded_idx_to_permuted_idx";
  EXPECT_TRUE(test::bitwise_equal(a.perm_to_expanded, b.perm_to_expanded))
      << what << ": permuted_idx_to_expanded_idx";
}

// The invariants on their own (STYLE.md): unique slots, round trip, each entry inside its
// expert's segment, ascending expanded index inside a segment, -1 past P.
void check_invariants(const HostMeta& h, const HostTensor& ids, bool packed, const ExpertMap& map) {
  const int64_t n = ids.numel();
  const auto* off = h.offsets.data<int64_t>();
  const auto* e2p = h.expanded_to_perm.data<int32_t>();
  const auto* p2e = h.perm_to_expanded.data<int32_t>();
  const int64_t P = off[map.num_local_experts];
  ASSERT_EQ(off[0], 0);
  for (int e = 0; e < map.num_local_experts; ++e) ASSERT_LE(off[e], off[e + 1]);
  for (int64_t x = 0; x < n; ++x) {
    const int32_t raw = ids.data<int32_t>()[x];
    const int32_t id = packed ? raw >> 16 : raw;
    if (!map.is_local(id)) {
      ASSERT_EQ(e2p[x], -1) << "expanded " << x;
      continue;
    }
    const int e = id - map.local_expert_offset;
    ASSERT_GE(e2p[x], off[e]) << "expanded " << x;
    ASSERT_LT(e2p[x], off[e + 1]) << "expanded " << x;
    ASSERT_EQ(p2e[e2p[x]], x) << "round trip of expanded " << x;
  }
  for (int64_t p = P; p < n; ++p) ASSERT_EQ(p2e[p], -1) << "row " << p << " >= P = " << P;
  for (int e = 0; e < map.num_local_experts; ++e) {
    for (int64_t p = off[e] + 1; p < off[e + 1]; ++p) {
      ASSERT_LT(p2e[p - 1], p2e[p]) << "rows " << p - 1 << ", " << p << " of local expert " << e;
    }
  }
}

class GpuPermute : public test::GpuTestWithParam<Case> {};

void check_case(const Case& c) {
  std::mt19937_64 rng(test::seed(static_cast<uint64_t>(c.num_tokens) * 131 + c.ep_rank));
  const ExpertMap map = ExpertMap::for_rank(c.num_experts, c.ep_size, c.ep_rank);
  const HostTensor ids = make_ids(c, rng);

  HostMeta ref{HostTensor(DType::I64, {map.num_local_experts + 1}),
               HostTensor(DType::I32, {c.num_tokens, c.top_k}),
               HostTensor(DType::I32, {c.num_tokens * c.top_k})};
  permute(ids, c.packed, map, {ref.offsets, ref.expanded_to_perm, ref.perm_to_expanded});

  const DeviceTensor d_ids = DeviceTensor::from_host(ids);
  const size_t ws_bytes = permute_workspace_size(c.num_tokens, c.top_k, map.num_local_experts);
  DeviceTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
  test::poison(ws);  // the kernels must not rely on a zeroed workspace
  Meta d(c.num_tokens, c.top_k, map.num_local_experts);
  d.poison();
  permute(d_ids, c.packed, map, d.view(), {ws.view().data, ws_bytes});
  test::sync();
  const HostMeta gpu = download(d);
  expect_equal(gpu, ref, "vs reference");
  check_invariants(gpu, ids, c.packed, map);

  // Run to run.
  d.poison();
  permute(d_ids, c.packed, map, d.view(), {ws.view().data, ws_bytes});
  test::sync();
  expect_equal(download(d), gpu, "second run");

  // Captured in a CUDA graph on a side stream, then replayed twice.
  cudaStream_t stream;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  permute(d_ids, c.packed, map, d.view(), {ws.view().data, ws_bytes}, stream);
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    d.poison();
    test::poison(ws);
    test::sync();
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    expect_equal(download(d), gpu, "graph replay");
  }
  MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MODMOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The default choice, the chunked kernels (MODMOE_FUSED_PERMUTE=0) and the one-block kernel
// (MODMOE_FUSED_PERMUTE=1, taken up to 16384 entries and 256 local experts) must all give the
// reference's bits.
TEST_P(GpuPermute, MatchesReference) { check_case(GetParam()); }

TEST_P(GpuPermute, ChunkedPathMatchesReference) {
  test::ScopedEnv chunked("MODMOE_FUSED_PERMUTE", "0");
  check_case(GetParam());
}

TEST_P(GpuPermute, OneBlockPathMatchesReference) {
  test::ScopedEnv one_block("MODMOE_FUSED_PERMUTE", "1");
  check_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuPermute,
    ::testing::Values(Case{0, 8, 256, 1, 0, false, false},  // M = 0
                      Case{1, 1, 8, 1, 0, false, false}, Case{7, 2, 8, 1, 0, false, true},
                      Case{77, 6, 64, 1, 0, false, false},
                      Case{77, 6, 64, 4, 2, true, false},      // packed, other ranks' ids
                      Case{1000, 8, 256, 8, 7, false, false},  // last rank
                      Case{1000, 8, 256, 8, 0, true, true},
                      // The largest one-block sort (N = 16384, E_local = 256), and one past it.
                      Case{2048, 8, 256, 1, 0, false, true},
                      Case{2049, 8, 256, 1, 0, true, false},
                      Case{4096, 8, 256, 1, 0, false, false},  // 16 chunks
                      Case{4096, 32, 512, 2, 1, false, false},
                      Case{3000, 4, 12288, 1, 0, false, false},   // the largest E_local
                      Case{100003, 8, 384, 4, 1, true, false},    // large M, ragged chunk
                      Case{262144, 8, 256, 1, 0, false, false}),  // 2M entries, 1024 chunks
    [](const ::testing::TestParamInfo<Case>& info) { return name_of(info.param); });

class GpuPermuteEdges : public test::GpuTest {};

// Every id dropped: all offsets 0 and every map -1.
TEST_F(GpuPermuteEdges, NothingLocal) {
  const ExpertMap map = ExpertMap::for_rank(64, 4, 1);  // owns [16, 32)
  HostTensor ids(DType::I32, {33, 4});
  for (int64_t i = 0; i < ids.numel(); ++i)
    ids.data<int32_t>()[i] = (i % 3 == 0) ? -1 : 40 + i % 20;
  const DeviceTensor d_ids = DeviceTensor::from_host(ids);
  const size_t ws_bytes = permute_workspace_size(33, 4, map.num_local_experts);
  DeviceTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
  Meta d(33, 4, map.num_local_experts);
  d.poison();
  permute(d_ids, false, map, d.view(), {ws.view().data, ws_bytes});
  test::sync();
  const HostMeta h = download(d);
  for (int e = 0; e <= map.num_local_experts; ++e) EXPECT_EQ(h.offsets.data<int64_t>()[e], 0);
  for (int64_t i = 0; i < ids.numel(); ++i) {
    EXPECT_EQ(h.expanded_to_perm.data<int32_t>()[i], -1);
    EXPECT_EQ(h.perm_to_expanded.data<int32_t>()[i], -1);
  }
}

// The workspace size is a pure function of the sizes (no device needed) and grows with M.
TEST_F(GpuPermuteEdges, WorkspaceSizeIsMonotonic) {
  EXPECT_EQ(cuda::permute_workspace_size(0, 8, 256), 0u);
  size_t prev = 0;
  for (int64_t m : {1, 255, 256, 257, 4096, 100000}) {
    const size_t bytes = cuda::permute_workspace_size(m, 8, 256);
    EXPECT_GE(bytes, prev) << "M = " << m;
    prev = bytes;
  }
}

}  // namespace
}  // namespace modmoe
