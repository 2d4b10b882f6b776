// The FP8 quantization pieces that "quantize before dispatch" needs (docs/fp8.md), on the CPU:
//   - a dynamic per-tensor scale written once per row ([T], the all-to-all payload form):
//     the same codes as the [1] call, every entry the tensor's scale; dequantize reads it per
//     row;
//   - quantize_weights (bf16 experts -> e4m3 + one scale per expert or per 128x128 block)
//     against the independent checkpoint quantizer of the tests (fp8_weights.h), bit for bit;
//   - bad arguments, each with the words of its message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "cpu/fp8_weights.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kFp8BlockSize;
constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kTen = QuantScheme::Fp8PerTensor;

std::vector<int64_t> shape_of(const TensorView& v) {
  return std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim);
}

// bf16 [shape] whose rows differ in magnitude (2^-4 .. 2^4), never zero.
HostTensor make_rows(const std::vector<int64_t>& shape, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  HostTensor x(DType::BF16, shape);
  test::fill_normal(x, rng, 1.0f);
  const int64_t h = shape.back();
  std::uniform_int_distribution<int> ex(-4, 4);
  for (int64_t r = 0; r < x.numel() / h; ++r) {
    const float f = std::ldexp(1.0f, ex(rng));
    for (int64_t i = r * h; i < (r + 1) * h; ++i) {
      x.data<uint16_t>()[i] = float_to_bf16_bits(bf16_bits_to_float(x.data<uint16_t>()[i]) * f);
    }
  }
  return x;
}

class Fp8PerRowScale : public ::testing::TestWithParam<std::vector<int64_t>> {};

TEST_P(Fp8PerRowScale, SameCodesAndTheTensorScaleInEveryRow) {
  const std::vector<int64_t> shape = GetParam();
  const HostTensor x = make_rows(shape, 901);
  std::vector<int64_t> rows_shape(shape.begin(), shape.end() - 1);
  HostTensor q1(DType::E4M3, shape), s1(DType::F32, {1});
  HostTensor q2(DType::E4M3, shape), s2(DType::F32, rows_shape);
  test::poison(q2);
  test::poison(s2);
  quantize_activations(x, kTen, q1, s1);
  quantize_activations(x, kTen, q2, s2);
  EXPECT_TRUE(test::bitwise_equal(q1, q2));
  for (int64_t r = 0; r < s2.numel(); ++r) ASSERT_EQ(s2.data<float>()[r], s1.data<float>()[0]) << r;

  // Dequantize reads the scale of each row: give the rows different scales.
  for (int64_t r = 0; r < s2.numel(); ++r) s2.data<float>()[r] = 0.25f * static_cast<float>(r + 1);
  HostTensor out(DType::F32, shape);
  dequantize_activations(q2, kTen, s2, out);
  const int64_t h = shape.back();
  for (int64_t i = 0; i < out.numel(); ++i) {
    ASSERT_EQ(out.data<float>()[i], fp8::e4m3_to_float(q2.data<uint8_t>()[i]) * s2.data<float>()[i / h]) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Fp8PerRowScale,
                         ::testing::Values(std::vector<int64_t>{1, 128},
                                           std::vector<int64_t>{7, 384},
                                           std::vector<int64_t>{3, 5, 256}),  // batched
                         [](const auto& info) {
                           std::string n;
                           for (int64_t d : info.param) n += (n.empty() ? "" : "x") + std::to_string(d);
                           return n;
                         });

TEST(Fp8PerRowScaleEdge, NoRows) {
  HostTensor x(DType::BF16, {0, 128}), q(DType::E4M3, {0, 128}), s(DType::F32, {0});
  EXPECT_NO_THROW(quantize_activations(x, kTen, q, s));
  HostTensor out(DType::F32, {0, 128});
  EXPECT_NO_THROW(dequantize_activations(q, kTen, s, out));
}

// ---------------------------------------------------------------------------------------
// quantize_weights
// ---------------------------------------------------------------------------------------

struct WeightCase {
  QuantScheme scheme;
  int64_t E, R, C;
};

class Fp8QuantizeWeights : public ::testing::TestWithParam<WeightCase> {};

TEST_P(Fp8QuantizeWeights, EqualsTheCheckpointQuantizer) {
  const WeightCase c = GetParam();
  std::mt19937_64 rng(test::seed(910));
  // bf16 masters whose 128x128 blocks differ in magnitude; the test quantizer sees the same
  // values as floats.
  std::vector<float> w = test::block_varied(rng, c.E, c.R, c.C, 0.05f);
  HostTensor wb(DType::BF16, {c.E, c.R, c.C});
  for (size_t i = 0; i < w.size(); ++i) {
    wb.data<uint16_t>()[i] = float_to_bf16_bits(w[i]);
    w[i] = bf16_bits_to_float(wb.data<uint16_t>()[i]);
  }
  HostTensor want_q, want_s;
  test::quantize_weights(w, c.E, c.R, c.C, c.scheme, want_q, want_s);
  HostTensor q(DType::E4M3, {c.E, c.R, c.C}), s(DType::F32, shape_of(want_s.view()));
  test::poison(q);
  test::poison(s);
  quantize_weights(wb, c.scheme, q, s);
  EXPECT_TRUE(test::bitwise_equal(q, want_q));
  EXPECT_TRUE(test::bitwise_equal(s, want_s));
}

INSTANTIATE_TEST_SUITE_P(Shapes, Fp8QuantizeWeights,
                         ::testing::Values(WeightCase{kBlk, 1, 128, 128}, WeightCase{kBlk, 3, 256, 384},
                                           WeightCase{kTen, 1, 128, 128}, WeightCase{kTen, 3, 384, 256}),
                         [](const auto& info) {
                           const WeightCase& c = info.param;
                           return std::string(c.scheme == kBlk ? "Block" : "Tensor") + "_" +
                                  std::to_string(c.E) + "x" + std::to_string(c.R) + "x" +
                                  std::to_string(c.C);
                         });

// ---------------------------------------------------------------------------------------
// Bad arguments
// ---------------------------------------------------------------------------------------

TEST(Fp8QuantEpBad, StaticScaleWithOneScalePerRow) {
  const HostTensor x = make_rows({4, 256}, 920);
  HostTensor q(DType::E4M3, {4, 256}), s(DType::F32, {4});
  QuantizeOptions o;
  o.static_scale = true;
  EXPECT_MODMOE_ERROR(quantize_activations(x, kTen, q, s, o), "'scale' has shape [4]",
                      "options.static_scale: expected [1]");
}

TEST(Fp8QuantEpBad, PerRowScaleShape) {
  const HostTensor x = make_rows({4, 256}, 921);
  HostTensor q(DType::E4M3, {4, 256}), s(DType::F32, {5});
  EXPECT_MODMOE_ERROR(quantize_activations(x, kTen, q, s), "'scale' has shape [5]",
                      "expected [1] or one scale per row of x (shape [4, 256])");
}

class Fp8QuantizeWeightsBad : public ::testing::Test {
 protected:
  HostTensor w{DType::BF16, {2, 256, 128}}, q{DType::E4M3, {2, 256, 128}};
  HostTensor sb{DType::F32, {2, 2, 1}}, st{DType::F32, {2}}, extra;
};

TEST_F(Fp8QuantizeWeightsBad, ValidCallsPass) {
  EXPECT_NO_THROW(quantize_weights(w, kBlk, q, sb));
  EXPECT_NO_THROW(quantize_weights(w, kTen, q, st));
}

TEST_F(Fp8QuantizeWeightsBad, WeightDtype) {
  extra.reset(DType::F32, {2, 256, 128});
  EXPECT_MODMOE_ERROR(quantize_weights(extra, kBlk, q, sb), "'w'", "f32", "expected bf16");
}

TEST_F(Fp8QuantizeWeightsBad, WeightRank) {
  extra.reset(DType::BF16, {256, 128});
  EXPECT_MODMOE_ERROR(quantize_weights(extra, kBlk, q, sb), "'w' has shape [256, 128]", "[E, R, C]");
}

TEST_F(Fp8QuantizeWeightsBad, NotMultipleOf128) {
  HostTensor w2(DType::BF16, {2, 192, 128}), q2(DType::E4M3, {2, 192, 128});
  EXPECT_MODMOE_ERROR(quantize_weights(w2, kTen, q2, st), "'w' has shape [2, 192, 128]",
                      "multiples of 128");
}

TEST_F(Fp8QuantizeWeightsBad, QuantizedShapeAndDtype) {
  extra.reset(DType::E4M3, {2, 128, 256});
  EXPECT_MODMOE_ERROR(quantize_weights(w, kBlk, extra, sb), "'q' has shape [2, 128, 256]",
                      "expected [2, 256, 128]");
  extra.reset(DType::BF16, {2, 256, 128});
  EXPECT_MODMOE_ERROR(quantize_weights(w, kBlk, extra, sb), "'q'", "expected e4m3");
}

TEST_F(Fp8QuantizeWeightsBad, ScaleShapes) {
  EXPECT_MODMOE_ERROR(quantize_weights(w, kBlk, q, st), "'scale' has shape [2]", "[2, 2, 1]");
  EXPECT_MODMOE_ERROR(quantize_weights(w, kTen, q, sb), "'scale' has shape [2, 2, 1]", "[2]");
}

TEST_F(Fp8QuantizeWeightsBad, Schemes) {
  EXPECT_MODMOE_ERROR(quantize_weights(w, QuantScheme::None, q, sb), "quantize_weights",
                      "'scheme' = none");
  EXPECT_MODMOE_ERROR(quantize_weights(w, QuantScheme::Mxfp8, q, sb), "not supported yet", "mxfp8");
}

TEST_F(Fp8QuantizeWeightsBad, Overlap) {
  const TensorView alias = make_view(w.view().data, DType::E4M3, {2, 256, 128});
  EXPECT_MODMOE_ERROR(quantize_weights(w, kBlk, alias, sb), "'q' overlaps 'w'");
}

}  // namespace
}  // namespace modmoe
