// finalize on the GPU: bitwise equal to reference::finalize (fp32 sum in j order, one cast),
// with non-local slots, tokens with no local expert (zero rows), negative weights, the
// 16-byte path and the one-element path, and repeated runs bitwise equal.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "common/test_util.h"
#include "gpu_test_util.h"
#include "modmoe/experts.h"

namespace modmoe {
namespace {

struct Case {
  int64_t num_tokens;  // M
  int top_k;
  int64_t hidden;  // H
  int num_experts;
  int ep_size;
};

std::string name_of(const Case& c) {
  return "M" + std::to_string(c.num_tokens) + "_k" + std::to_string(c.top_k) + "_H" +
         std::to_string(c.hidden) + "_E" + std::to_string(c.num_experts) + "_ep" +
         std::to_string(c.ep_size);
}

struct Problem {
  HostTensor gemm2_out;         // [M*k, H] bf16 (rows >= P unused, still random)
  HostTensor expert_weights;    // [M, k] fp32
  HostTensor expanded_to_perm;  // [M, k] int32, -1 = not local
};

// Rank 0 of ep_size owns [0, E / ep_size); ids are drawn from all E and -1, so some slots and
// every fifth token's slots are not local.
Problem make_problem(const Case& c, std::mt19937_64& rng) {
  const ExpertMap map = ExpertMap::for_rank(c.num_experts, c.ep_size, 0);
  const int64_t M = c.num_tokens, k = c.top_k;
  HostTensor ids(DType::I32, {M, k});
  std::uniform_int_distribution<int> expert(0, c.num_experts - 1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < k; ++j) {
      ids.data<int32_t>()[m * k + j] = m % 5 == 3 ? -1 : expert(rng);
    }
  }
  Problem p{HostTensor(DType::BF16, {M * k, c.hidden}), HostTensor(DType::F32, {M, k}),
            HostTensor(DType::I32, {M, k})};
  HostTensor offsets(DType::I64, {map.num_local_experts + 1});
  HostTensor p2e(DType::I32, {M * k});
  reference::permute(ids, false, map, {offsets, p.expanded_to_perm, p2e}, {}, nullptr);
  test::fill_normal(p.gemm2_out, rng, 1.0f);
  test::fill_normal(p.expert_weights, rng, 0.5f);  // signed weights: cancellation too
  return p;
}

HostTensor finalize_gpu(const Problem& p, const Case& c, bool via_api) {
  const DeviceTensor g2 = DeviceTensor::from_host(p.gemm2_out);
  const DeviceTensor w = DeviceTensor::from_host(p.expert_weights);
  const DeviceTensor e2p = DeviceTensor::from_host(p.expanded_to_perm);
  DeviceTensor out(DType::BF16, {c.num_tokens, c.hidden});
  test::poison(out);
  if (via_api) {
    finalize(g2, w, e2p, out);
  } else {
    cuda::finalize(g2, w, e2p, out, nullptr);
  }
  test::sync();
  return out.to_host();
}

class GpuFinalize : public test::GpuTestWithParam<Case> {};

TEST_P(GpuFinalize, BitwiseEqualToReference) {
  const Case c = GetParam();
  std::mt19937_64 rng(test::seed(static_cast<uint64_t>(c.num_tokens * 7 + c.hidden)));
  const Problem p = make_problem(c, rng);
  HostTensor ref(DType::BF16, {c.num_tokens, c.hidden});
  reference::finalize(p.gemm2_out, p.expert_weights, p.expanded_to_perm, ref, nullptr);

  // The API takes 16-byte aligned rows; other H go to the backend directly (one-element path).
  const bool via_api = c.hidden % 8 == 0;
  const HostTensor gpu = finalize_gpu(p, c, via_api);
  EXPECT_TRUE(test::bitwise_equal(gpu, ref));
  EXPECT_TRUE(test::bitwise_equal(finalize_gpu(p, c, via_api), gpu)) << "run to run";

  // Tokens with no local expert are exact zeros.
  for (int64_t m = 3; m < c.num_tokens; m += 5) {
    for (int64_t h = 0; h < c.hidden; ++h) {
      ASSERT_EQ(gpu.data<uint16_t>()[m * c.hidden + h], 0u) << "token " << m << " col " << h;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuFinalize,
                         ::testing::Values(Case{1, 1, 64, 8, 1}, Case{7, 2, 8, 8, 2},
                                           Case{77, 6, 2880, 64, 4},     // gpt-oss H
                                           Case{1000, 8, 7168, 256, 8},  // DeepSeek-V3 H
                                           Case{4096, 8, 4096, 128, 1},
                                           Case{300, 32, 2048, 512, 2},  // k = 32
                                           Case{33, 4, 36, 16, 1},       // H % 8 != 0
                                           Case{20, 3, 2056, 16, 2}),    // ragged last chunk
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return name_of(info.param);
                         });

class GpuFinalizeEdges : public test::GpuTest {};

TEST_F(GpuFinalizeEdges, ZeroTokens) {
  DeviceTensor g2(DType::BF16, {4, 64}), w(DType::F32, {0, 2}), e2p(DType::I32, {0, 2});
  DeviceTensor out(DType::BF16, {0, 64});
  finalize(g2, w, e2p, out);
  test::sync();
}

}  // namespace
}  // namespace modmoe
