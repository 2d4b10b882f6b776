// The FP8 quantization pieces of "quantize before dispatch" on the GPU against the CPU
// reference, bit for bit (docs/fp8.md): a dynamic per-tensor scale written once per row
// ([T], the all-to-all payload form; its graph capture is in test_gpu_quant), dequantize with one scale
// per row, and quantize_weights (one scale per expert, or per 128x128 block) up to DeepSeek-V3
// sizes, with NaN, inf and all-zero blocks. Outputs poisoned before each run; two runs each.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "gpu_test_util.h"
#include "quant_inputs.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kFp8BlockSize;
constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kTen = QuantScheme::Fp8PerTensor;

std::string shape_name(const std::vector<int64_t>& shape) {
  std::string n;
  for (int64_t d : shape) n += (n.empty() ? "" : "x") + std::to_string(d);
  return n;
}

using test::make_x;

std::vector<int64_t> rows_shape(const std::vector<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end() - 1);
}

class GpuPerRowScale : public test::GpuTestWithParam<std::vector<int64_t>> {};

TEST_P(GpuPerRowScale, QuantizeAndDequantizeEqualReference) {
  const std::vector<int64_t> shape = GetParam();
  const HostTensor x = make_x(shape, 940, false);
  HostTensor want_q(DType::E4M3, shape), want_s(DType::F32, rows_shape(shape));
  quantize_activations(x, kTen, want_q, want_s);
  const DeviceTensor dx = DeviceTensor::from_host(x);
  DeviceTensor dq(DType::E4M3, shape), ds(DType::F32, rows_shape(shape));
  for (int run = 0; run < 2; ++run) {
    test::poison(dq);
    test::poison(ds);
    quantize_activations(dx, kTen, dq, ds);
    test::sync();
    ASSERT_TRUE(test::bitwise_equal(dq.to_host(), want_q)) << "q, run " << run;
    ASSERT_TRUE(test::bitwise_equal(ds.to_host(), want_s)) << "scale, run " << run;
  }
  // Dequantize with a different scale per row.
  for (int64_t r = 0; r < want_s.numel(); ++r) want_s.data<float>()[r] = 0.125f * static_cast<float>(1 + r % 13);
  const DeviceTensor rs = DeviceTensor::from_host(want_s);
  for (DType dt : {DType::F32, DType::BF16}) {
    HostTensor want(dt, shape);
    dequantize_activations(want_q, kTen, want_s, want);
    DeviceTensor got(dt, shape);
    test::poison(got);
    dequantize_activations(dq, kTen, rs, got);
    test::sync();
    EXPECT_TRUE(test::bitwise_equal(got.to_host(), want)) << dtype_name(dt);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuPerRowScale,
                         ::testing::Values(std::vector<int64_t>{1, 128}, std::vector<int64_t>{300, 384},
                                           std::vector<int64_t>{3, 5, 256},  // batched
                                           std::vector<int64_t>{4096, 7168}),
                         [](const auto& info) { return shape_name(info.param); });

class GpuPerRowScaleEdge : public test::GpuTest {};

TEST_F(GpuPerRowScaleEdge, NoRows) {
  DeviceTensor dx(DType::BF16, {0, 128}), dq(DType::E4M3, {0, 128}), ds(DType::F32, {0});
  EXPECT_NO_THROW(quantize_activations(dx, kTen, dq, ds));
  test::sync();
}

// ---------------------------------------------------------------------------------------
// quantize_weights
// ---------------------------------------------------------------------------------------

struct WeightCase {
  QuantScheme scheme;
  std::vector<int64_t> shape;  // [E, R, C]
  bool edges;
};

std::string weight_case_name(const WeightCase& c) {
  return std::string(c.scheme == kBlk ? "Block_" : "Tensor_") + shape_name(c.shape) + (c.edges ? "_edges" : "");
}

void PrintTo(const WeightCase& c, std::ostream* os) { *os << weight_case_name(c); }

class GpuQuantizeWeights : public test::GpuTestWithParam<WeightCase> {};

TEST_P(GpuQuantizeWeights, BitwiseEqualToReference) {
  const WeightCase c = GetParam();
  const HostTensor w = make_x(c.shape, 960 + c.shape[1], c.edges);
  const std::vector<int64_t> s_shape =
      c.scheme == kBlk ? std::vector<int64_t>{c.shape[0], c.shape[1] / kB, c.shape[2] / kB}
                       : std::vector<int64_t>{c.shape[0]};
  HostTensor want_q(DType::E4M3, c.shape), want_s(DType::F32, s_shape);
  quantize_weights(w, c.scheme, want_q, want_s);
  const DeviceTensor dw = DeviceTensor::from_host(w);
  DeviceTensor dq(DType::E4M3, c.shape), ds(DType::F32, s_shape);
  for (int run = 0; run < 2; ++run) {
    test::poison(dq);
    test::poison(ds);
    quantize_weights(dw, c.scheme, dq, ds);
    test::sync();
    ASSERT_TRUE(test::bitwise_equal(dq.to_host(), want_q)) << "q, run " << run;
    ASSERT_TRUE(test::bitwise_equal(ds.to_host(), want_s)) << "scale, run " << run;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuQuantizeWeights,
    ::testing::Values(WeightCase{kBlk, {1, 128, 128}, false}, WeightCase{kBlk, {3, 256, 384}, true},
                      WeightCase{kBlk, {2, 4096, 7168}, false},  // DeepSeek-V3 w13
                      WeightCase{kBlk, {2, 7168, 2048}, true},   // DeepSeek-V3 w2
                      WeightCase{kTen, {1, 128, 128}, false}, WeightCase{kTen, {3, 384, 256}, true},
                      WeightCase{kTen, {2, 4096, 7168}, false}),
    [](const auto& info) { return weight_case_name(info.param); });

}  // namespace
}  // namespace modmoe
