// finalize(): per token, the fp32 sum over local slots in j order of weight * row, cast once
// to bf16; non-local slots and rows past P are never read; tokens with no local slot are 0.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

using test::poison;

struct Case {
  HostTensor gemm2_out;  // [P + extra, H] bf16; rows past P poisoned
  HostTensor weights;    // [M, k] fp32; NaN on non-local slots
  HostTensor e2p;        // [M, k] int32
  int64_t M, k, H, P;
};

// A random permutation of the local slots (any bijection onto [0, P) is valid input).
Case make_case(int64_t M, int64_t k, int64_t H, double local_fraction, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Case c{{}, {}, {}, M, k, H, 0};
  c.weights.reset(DType::F32, {M, k});
  c.e2p.reset(DType::I32, {M, k});
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int64_t> local;
  for (int64_t x = 0; x < M * k; ++x) {
    if (u(rng) < local_fraction) {
      local.push_back(x);
      c.weights.data<float>()[x] = static_cast<float>(0.1 + u(rng));
    } else {
      c.e2p.data<int32_t>()[x] = -1;
      c.weights.data<float>()[x] = std::nanf("");  // must never be read
    }
  }
  c.P = static_cast<int64_t>(local.size());
  std::vector<int32_t> rows(local.size());
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int32_t>(i);
  std::shuffle(rows.begin(), rows.end(), rng);
  for (size_t i = 0; i < local.size(); ++i) c.e2p.data<int32_t>()[local[i]] = rows[i];
  c.gemm2_out.reset(DType::BF16, {c.P + 5, H});
  poison(c.gemm2_out);
  HostTensor valid(DType::BF16, {c.P, H});
  test::fill_normal(valid, rng, 1.0f);
  if (c.P) std::memcpy(c.gemm2_out.view().data, valid.view().data, valid.nbytes());
  return c;
}

// The definition, written out: fp32 accumulate in j order, one cast.
HostTensor expected(const Case& c) {
  HostTensor out(DType::BF16, {c.M, c.H});
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t h = 0; h < c.H; ++h) {
      float acc = 0.0f;
      for (int64_t j = 0; j < c.k; ++j) {
        const int32_t p = c.e2p.data<int32_t>()[m * c.k + j];
        if (p < 0) continue;
        const float w = c.weights.data<float>()[m * c.k + j];
        const float v = bf16_bits_to_float(c.gemm2_out.data<uint16_t>()[p * c.H + h]);
        acc += w * v;
      }
      out.data<uint16_t>()[m * c.H + h] = float_to_bf16_bits(acc);
    }
  }
  return out;
}

HostTensor run_finalize(const Case& c) {
  HostTensor out(DType::BF16, {c.M, c.H});
  poison(out);
  finalize(c.gemm2_out, c.weights, c.e2p, out);
  return out;
}

TEST(Finalize, MatchesDefinitionBitwise) {
  for (int64_t k : {1, 2, 6, 8}) {
    SCOPED_TRACE(::testing::Message() << "k " << k);
    const Case c = make_case(37, k, 128, 0.7, 10 + k);
    EXPECT_TRUE(test::bitwise_equal(run_finalize(c), expected(c)));
  }
}

TEST(Finalize, TokensWithoutLocalSlotsAreZero) {
  const Case c = make_case(64, 4, 64, 0.2, 20);
  const HostTensor out = run_finalize(c);
  int empty = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    bool any = false;
    for (int64_t j = 0; j < c.k; ++j) any |= c.e2p.data<int32_t>()[m * c.k + j] >= 0;
    if (any) continue;
    ++empty;
    for (int64_t h = 0; h < c.H; ++h) {
      ASSERT_EQ(out.data<uint16_t>()[m * c.H + h], 0) << "token " << m << " col " << h;
    }
  }
  EXPECT_GT(empty, 0) << "the case should contain tokens with no local slot";
}

TEST(Finalize, OrderIsJOrderNotPermutedOrder) {
  // Weights {1, a, a} with a = 2^-9 + 2^-24 on rows of ones. In j order the fp32 sum is
  // 1 + 2^-8 (two ties rounded to even), which bf16 rounds to 1. In permuted order
  // (a + a + 1) it is 1 + 2^-8 + 2^-23, which bf16 rounds up to 1 + 2^-7.
  const int64_t H = 64;
  Case c{{}, {}, {}, 1, 3, H, 3};
  c.gemm2_out.reset(DType::BF16, {3, H});
  c.weights.reset(DType::F32, {1, 3});
  c.e2p.reset(DType::I32, {1, 3});
  const int32_t e2p[] = {2, 0, 1};
  const float a = std::ldexp(1.0f, -9) + std::ldexp(1.0f, -24);
  const float w[] = {1.0f, a, a};
  std::memcpy(c.e2p.data<int32_t>(), e2p, sizeof(e2p));
  std::memcpy(c.weights.data<float>(), w, sizeof(w));
  for (int64_t i = 0; i < 3 * H; ++i) c.gemm2_out.data<uint16_t>()[i] = float_to_bf16_bits(1.0f);
  const HostTensor out = run_finalize(c);
  EXPECT_TRUE(test::bitwise_equal(out, expected(c)));
  EXPECT_EQ(out.data<uint16_t>()[0], float_to_bf16_bits(1.0f));
}

TEST(Finalize, ZeroTokens) {
  Case c{{}, {}, {}, 0, 2, 64, 0};
  c.gemm2_out.reset(DType::BF16, {1, 64});
  c.weights.reset(DType::F32, {0, 2});
  c.e2p.reset(DType::I32, {0, 2});
  EXPECT_NO_THROW(run_finalize(c));
}

TEST(Finalize, RejectsPermutedIndexPastGemm2Rows) {
  Case c = make_case(8, 2, 64, 1.0, 30);
  c.e2p.data<int32_t>()[5] = static_cast<int32_t>(c.gemm2_out.view().size(0));
  try {
    run_finalize(c);
    FAIL() << "expected modmoe::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expanded_idx_to_permuted_idx"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace modmoe
