// The outputs of one standard-format experts call with every optional output given (both
// do_finalize modes), poisoned, and a bitwise comparison of two such sets. Shared by the FP8
// and NVFP4 API tests; `Layer` is any struct with M, k, E, H and I.
#pragma once

#include <gtest/gtest.h>

#include <cstring>

#include "common/test_util.h"
#include "modmoe/experts.h"

namespace modmoe::test {

// Every output of a standard call, poisoned; num_local experts (all of L's by default).
struct StdOutputs {
  HostTensor out, g2, ew, e2p, off, act;
  template <class Layer>
  StdOutputs(const Layer& L, bool do_finalize, int num_local = 0) {
    const int64_t M = L.M, k = L.k;
    if (do_finalize) out.reset(DType::BF16, {M, L.H});
    g2.reset(DType::BF16, {M * k, L.H});
    ew.reset(DType::F32, {M, k});
    e2p.reset(DType::I32, {M, k});
    off.reset(DType::I64, {(num_local > 0 ? num_local : L.E) + 1});
    act.reset(DType::BF16, {M * k, L.I});
    for (HostTensor* t : {&out, &g2, &ew, &e2p, &off, &act}) poison(*t);
  }
  ExpertsOutputs views() const {
    ExpertsOutputs o;
    if (out.view().ndim) o.out = out;
    o.gemm2_out = g2;
    o.expert_weights = ew;
    o.expanded_idx_to_permuted_idx = e2p;
    o.expert_first_token_offset = off;
    o.gemm1_activation_output = act;
    return o;
  }
};

inline void expect_same(const StdOutputs& a, const StdOutputs& b) {
  if (a.out.view().ndim) EXPECT_TRUE(test::bitwise_equal(a.out, b.out)) << "out";
  const int64_t P = a.off.data<int64_t>()[a.off.numel() - 1];
  ASSERT_EQ(P, b.off.data<int64_t>()[b.off.numel() - 1]);
  const int64_t H = a.g2.view().shape[1], I = a.act.view().shape[1];
  EXPECT_EQ(std::memcmp(a.g2.view().data, b.g2.view().data, P * H * 2), 0) << "gemm2_out";
  EXPECT_EQ(std::memcmp(a.act.view().data, b.act.view().data, P * I * 2), 0)
      << "gemm1_activation_output";
  EXPECT_TRUE(test::bitwise_equal(a.ew, b.ew)) << "expert_weights";
  EXPECT_TRUE(test::bitwise_equal(a.e2p, b.e2p)) << "expanded_idx_to_permuted_idx";
  EXPECT_TRUE(test::bitwise_equal(a.off, b.off)) << "expert_first_token_offset";
}

}  // namespace modmoe::test
