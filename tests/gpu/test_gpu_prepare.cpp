// prepare_weights on the GPU: every dst tensor bitwise equal to reference::prepare_weights and
// the same descriptor, for GateUp and UpGate, with and without biases, interleaved, Canonical
// and non-gated (Relu2) weights; plus the gate_row/up_row semantics checked row by row against
// the canonical tensors, and the 4-byte and 2-byte copy paths of odd row sizes.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "common/test_util.h"
#include "gpu_test_util.h"
#include "modmoe/quant.h"

namespace modmoe {
namespace {

struct Case {
  int num_local_experts;
  int64_t hidden, intermediate;
  bool gated;
  GateUpOrder order;
  bool biases;
  WeightLayout layout;
  int interleave_rows;
};

std::string name_of(const Case& c) {
  return "E" + std::to_string(c.num_local_experts) + "_H" + std::to_string(c.hidden) + "_I" +
         std::to_string(c.intermediate) + (c.gated ? "" : "_relu2") +
         (c.order == GateUpOrder::GateUp ? "_GateUp" : "_UpGate") + (c.biases ? "_bias" : "") +
         (c.layout == WeightLayout::Canonical ? "_canonical"
                                              : "_G" + std::to_string(c.interleave_rows));
}

// Host tensors of one weight set (random, never zero) and the matching device copies.
struct Weights {
  HostTensor w13, w2, w13_bias, w2_bias;

  Weights(const Case& c, std::mt19937_64& rng, bool fill) {
    const int64_t rows = c.gated ? 2 * c.intermediate : c.intermediate;
    w13.reset(DType::BF16, {c.num_local_experts, rows, c.hidden});
    w2.reset(DType::BF16, {c.num_local_experts, c.hidden, c.intermediate});
    if (c.biases) {
      w13_bias.reset(DType::F32, {c.num_local_experts, rows});
      w2_bias.reset(DType::F32, {c.num_local_experts, c.hidden});
    }
    if (!fill) return;
    test::fill_normal(w13, rng, 1.0f);
    test::fill_normal(w2, rng, 1.0f);
    if (c.biases) {
      test::fill_normal(w13_bias, rng, 1.0f);
      test::fill_normal(w2_bias, rng, 1.0f);
    }
  }
};

ExpertWeights describe(const Case& c, const TensorView& w13, const TensorView& w2,
                       const TensorView& w13_bias, const TensorView& w2_bias) {
  ExpertWeights w;
  w.order = c.order;
  w.w13 = w13;
  w.w2 = w2;
  w.w13_bias = w13_bias;
  w.w2_bias = w2_bias;
  return w;
}

struct DeviceWeights {
  DeviceTensor w13, w2, w13_bias, w2_bias;
  explicit DeviceWeights(const Weights& h)
      : w13(DeviceTensor::from_host(h.w13)), w2(DeviceTensor::from_host(h.w2)) {
    if (h.w13_bias.view().defined()) w13_bias = DeviceTensor::from_host(h.w13_bias);
    if (h.w2_bias.view().defined()) w2_bias = DeviceTensor::from_host(h.w2_bias);
  }
  void poison() const {
    for (const DeviceTensor* t : {&w13, &w2, &w13_bias, &w2_bias}) test::poison(*t);
  }
};

void expect_same_descriptor(const ExpertWeights& a, const ExpertWeights& b) {
  EXPECT_EQ(a.scheme, b.scheme);
  EXPECT_EQ(a.layout, b.layout);
  EXPECT_EQ(a.order, b.order);
  EXPECT_EQ(a.interleave_rows, b.interleave_rows);
  EXPECT_EQ(a.w13_bias.defined(), b.w13_bias.defined());
  EXPECT_EQ(a.w2_bias.defined(), b.w2_bias.defined());
}

// Runs prepare_weights on the CPU and the GPU (through the API, or the backend directly for
// row sizes the API refuses) and compares everything.
void run_case(const Case& c, bool via_api) {
  std::mt19937_64 rng(test::seed(c.hidden * 31 + c.intermediate));
  const Weights src(c, rng, true);
  const ExpertWeights src_cpu = describe(c, src.w13, src.w2, src.w13_bias, src.w2_bias);
  PrepareWeightsOptions opt;
  opt.layout = c.layout;
  opt.interleave_rows = c.interleave_rows;

  Weights ref(c, rng, false);
  ExpertWeights dst_cpu = describe(c, ref.w13, ref.w2, ref.w13_bias, ref.w2_bias);
  if (via_api) {
    prepare_weights(src_cpu, dst_cpu, opt);
  } else {
    reference::prepare_weights(src_cpu, dst_cpu, opt, nullptr);
  }

  const DeviceWeights d_src(src);
  const DeviceWeights d_dst(ref);  // shapes only: poisoned below
  const ExpertWeights src_gpu = describe(c, d_src.w13, d_src.w2, d_src.w13_bias, d_src.w2_bias);
  ExpertWeights dst_gpu = describe(c, d_dst.w13, d_dst.w2, d_dst.w13_bias, d_dst.w2_bias);
  for (int run = 0; run < 2; ++run) {  // the second run checks run-to-run equality too
    d_dst.poison();
    if (via_api) {
      prepare_weights(src_gpu, dst_gpu, opt);
    } else {
      cuda::prepare_weights(src_gpu, dst_gpu, opt, nullptr);
    }
    test::sync();
    EXPECT_TRUE(test::bitwise_equal(d_dst.w13.to_host(), ref.w13)) << "w13, run " << run;
    EXPECT_TRUE(test::bitwise_equal(d_dst.w2.to_host(), ref.w2)) << "w2, run " << run;
    if (c.biases) {
      EXPECT_TRUE(test::bitwise_equal(d_dst.w13_bias.to_host(), ref.w13_bias)) << "w13_bias";
      EXPECT_TRUE(test::bitwise_equal(d_dst.w2_bias.to_host(), ref.w2_bias)) << "w2_bias";
    }
  }
  if (via_api) {
    expect_same_descriptor(dst_gpu, dst_cpu);
  } else {
    EXPECT_EQ(dst_gpu.interleave_rows,
              c.gated && c.layout == WeightLayout::GateUpInterleaved ? c.interleave_rows : 0);
  }

  // Independent of the reference: dst's gate_row(i) / up_row(i) hold src's.
  if (!via_api || !c.gated) return;
  const HostTensor got = d_dst.w13.to_host();
  const int64_t rows = 2 * c.intermediate, H = c.hidden;
  const size_t row_bytes = H * sizeof(uint16_t);
  for (int64_t e = 0; e < c.num_local_experts; ++e) {
    for (int64_t i = 0; i < c.intermediate; ++i) {
      const auto* s = src.w13.data<uint16_t>() + e * rows * H;
      const auto* d = got.data<uint16_t>() + e * rows * H;
      ASSERT_EQ(std::memcmp(d + dst_gpu.gate_row(i) * H, s + src_cpu.gate_row(i) * H, row_bytes), 0)
          << "expert " << e << " gate row " << i;
      ASSERT_EQ(std::memcmp(d + dst_gpu.up_row(i) * H, s + src_cpu.up_row(i) * H, row_bytes), 0)
          << "expert " << e << " up row " << i;
    }
  }
}

class GpuPrepare : public test::GpuTestWithParam<Case> {};

TEST_P(GpuPrepare, BitwiseEqualToReference) { run_case(GetParam(), true); }

constexpr auto kGU = GateUpOrder::GateUp;
constexpr auto kUG = GateUpOrder::UpGate;
constexpr auto kIL = WeightLayout::GateUpInterleaved;
constexpr auto kCan = WeightLayout::Canonical;

INSTANTIATE_TEST_SUITE_P(
    Layouts, GpuPrepare,
    ::testing::Values(Case{3, 128, 64, true, kGU, false, kIL, 8},
                      Case{3, 128, 64, true, kUG, false, kIL, 8},
                      Case{2, 192, 128, true, kGU, true, kIL, 16},
                      Case{2, 192, 128, true, kUG, true, kIL, 64},
                      Case{4, 2880, 192, true, kUG, true, kIL, 8},  // gpt-oss-like H
                      Case{2, 256, 128, true, kGU, true, kCan, 8},
                      Case{3, 128, 64, false, kGU, false, kIL, 8},  // Relu2: plain copy
                      Case{3, 128, 64, false, kGU, true, kIL, 8}),
    [](const ::testing::TestParamInfo<Case>& info) { return name_of(info.param); });

class GpuPrepareBackend : public test::GpuTestWithParam<Case> {};

// Row sizes the API refuses still copy right in the backend (4-byte and 2-byte units).
TEST_P(GpuPrepareBackend, OddRowSizes) { run_case(GetParam(), false); }

INSTANTIATE_TEST_SUITE_P(
    Units, GpuPrepareBackend,
    ::testing::Values(Case{2, 36, 16, true, kGU, true, kIL, 8},   // 72-byte rows
                      Case{2, 33, 16, true, kUG, true, kIL, 4}),  // 66-byte rows
    [](const ::testing::TestParamInfo<Case>& info) { return name_of(info.param); });

}  // namespace
}  // namespace modmoe
