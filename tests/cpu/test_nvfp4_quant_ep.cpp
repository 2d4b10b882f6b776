// The NVFP4 quantization pieces that "quantize before dispatch" needs (docs/nvfp4.md), on the
// CPU: quantize_nvfp4 / dequantize_nvfp4 with one global scale per row (global_scale [T] or
// [E_local, max_m], the all-to-all payload form):
//   - dynamic: every row is quantized exactly as the one-row tensor [1, H] would be (its own
//     amax, its own global), so a token's bytes do not depend on the batch it came in;
//   - static: every row with the caller's global of that row, as [1, H] with that global;
//   - dequantize reads each row's global;
//   - the edge rows (zero, NaN, inf, tiny) behave as the per-tensor table of docs/nvfp4.md says
//     for a tensor of one row;
//   - bad arguments, each with the words of its message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "core/nvfp4.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kNvfp4BlockSize;

std::vector<int64_t> with_last(std::vector<int64_t> shape, int64_t last) {
  shape.back() = last;
  return shape;
}
std::vector<int64_t> rows_shape(const std::vector<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end() - 1);
}

// bf16 [shape] whose rows differ in magnitude by factors that are not powers of two
// (0.01 .. 30), never zero.
HostTensor make_rows(const std::vector<int64_t>& shape, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  HostTensor x(DType::BF16, shape);
  test::fill_normal(x, rng, 1.0f);
  const int64_t h = shape.back();
  std::uniform_real_distribution<float> mag(-2.0f, 1.5f);
  for (int64_t r = 0; r < x.numel() / h; ++r) {
    const float f = std::pow(10.0f, mag(rng));
    for (int64_t i = r * h; i < (r + 1) * h; ++i) {
      x.data<uint16_t>()[i] = float_to_bf16_bits(bf16_bits_to_float(x.data<uint16_t>()[i]) * f);
    }
  }
  return x;
}

// Row r of a contiguous host tensor viewed as [1, cols] (cols elements of its dtype).
TensorView row_view(const HostTensor& t, int64_t r, int64_t cols) {
  return make_view(static_cast<char*>(t.view().data) + r * cols * static_cast<int64_t>(dtype_bytes(t.view().dtype)),
                   t.view().dtype, {1, cols});
}

class Nvfp4PerRowGlobal : public ::testing::TestWithParam<std::vector<int64_t>> {};

TEST_P(Nvfp4PerRowGlobal, DynamicQuantizesEveryRowAsATensorOfItsOwn) {
  const std::vector<int64_t> shape = GetParam();
  const int64_t h = shape.back();
  const HostTensor x = make_rows(shape, 1101);
  const int64_t rows = x.numel() / h;
  HostTensor q(DType::E2M1x2, with_last(shape, h / 2)), s(DType::E4M3, with_last(shape, h / kB));
  HostTensor g(DType::F32, rows_shape(shape));
  test::poison(q);
  test::poison(s);
  test::poison(g);
  quantize_nvfp4(x, q, s, g);
  for (int64_t r = 0; r < rows; ++r) {
    HostTensor q1(DType::E2M1x2, {1, h / 2}), s1(DType::E4M3, {1, h / kB}), g1(DType::F32, {1});
    quantize_nvfp4(row_view(x, r, h), q1, s1, g1);
    ASSERT_EQ(std::memcmp(row_view(q, r, h / 2).data, q1.view().data, h / 2), 0) << "codes of row " << r;
    ASSERT_EQ(std::memcmp(row_view(s, r, h / kB).data, s1.view().data, h / kB), 0) << "scales of row " << r;
    ASSERT_EQ(g.data<float>()[r], g1.data<float>()[0]) << "global of row " << r;
  }
  if (rows > 1) {  // the rows' globals differ (their magnitudes do)
    EXPECT_NE(g.data<float>()[0], g.data<float>()[1]);
  }
  // Dequantize with each row's global: each row as its one-row tensor decodes.
  for (DType dt : {DType::F32, DType::BF16}) {
    HostTensor out(dt, shape);
    test::poison(out);
    dequantize_nvfp4(q, s, g, out);
    for (int64_t r = 0; r < rows; ++r) {
      HostTensor want(dt, {1, h});
      HostTensor g1(DType::F32, {1});
      g1.data<float>()[0] = g.data<float>()[r];
      dequantize_nvfp4(row_view(q, r, h / 2), row_view(s, r, h / kB), g1, want);
      ASSERT_EQ(std::memcmp(row_view(out, r, h).data, want.view().data, want.nbytes()), 0)
          << dtype_name(dt) << " row " << r;
    }
  }
}

TEST_P(Nvfp4PerRowGlobal, StaticUsesEachRowsGlobal) {
  const std::vector<int64_t> shape = GetParam();
  const int64_t h = shape.back();
  const HostTensor x = make_rows(shape, 1102);
  const int64_t rows = x.numel() / h;
  HostTensor q(DType::E2M1x2, with_last(shape, h / 2)), s(DType::E4M3, with_last(shape, h / kB));
  HostTensor g(DType::F32, rows_shape(shape));
  // Calibrated-looking globals, some too small for their row (saturating blocks).
  for (int64_t r = 0; r < rows; ++r) g.data<float>()[r] = 1e-4f * static_cast<float>(1 + 7 * (r % 5));
  const HostTensor g_before = [&] {
    HostTensor c(DType::F32, rows_shape(shape));
    std::memcpy(c.view().data, g.view().data, g.nbytes());
    return c;
  }();
  Nvfp4QuantizeOptions opt;
  opt.static_global_scale = true;
  quantize_nvfp4(x, q, s, g, opt);
  EXPECT_TRUE(test::bitwise_equal(g, g_before)) << "a static global is only read";
  for (int64_t r = 0; r < rows; ++r) {
    HostTensor q1(DType::E2M1x2, {1, h / 2}), s1(DType::E4M3, {1, h / kB}), g1(DType::F32, {1});
    g1.data<float>()[0] = g.data<float>()[r];
    quantize_nvfp4(row_view(x, r, h), q1, s1, g1, opt);
    ASSERT_EQ(std::memcmp(row_view(q, r, h / 2).data, q1.view().data, h / 2), 0) << "codes of row " << r;
    ASSERT_EQ(std::memcmp(row_view(s, r, h / kB).data, s1.view().data, h / kB), 0) << "scales of row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Nvfp4PerRowGlobal,
                         ::testing::Values(std::vector<int64_t>{1, 32}, std::vector<int64_t>{7, 96},
                                           std::vector<int64_t>{3, 5, 64},  // batched [E, max_m, H]
                                           std::vector<int64_t>{40, 7168}),
                         [](const auto& info) {
                           std::string n;
                           for (int64_t d : info.param) n += (n.empty() ? "" : "x") + std::to_string(d);
                           return n;
                         });

// Rows that are edge cases of a one-row tensor: zero (global 1e-10/2688, everything 0), NaN
// (its block's scale NaN, global NaN), +inf (global inf), tiny (1e-6: each row's global follows
// its own amax, so its blocks keep their scales), next to an ordinary row that must not be
// touched by them (the per-tensor global would have been NaN for every row).
TEST(Nvfp4PerRowGlobalEdges, EdgeRowsStayInTheirRow) {
  const int64_t h = 64;
  HostTensor x = make_rows({5, h}, 1103);
  uint16_t* xb = x.data<uint16_t>();
  for (int64_t c = 0; c < h; ++c) xb[0 * h + c] = 0;                                     // zero row
  xb[1 * h + 17] = 0x7fc0;                                                               // NaN
  xb[2 * h + 40] = 0x7f80;                                                               // +inf
  for (int64_t c = 0; c < h; ++c) xb[3 * h + c] = float_to_bf16_bits(1e-6f * (1 + c % 3));  // tiny
  HostTensor q(DType::E2M1x2, {5, h / 2}), s(DType::E4M3, {5, h / kB}), g(DType::F32, {5});
  quantize_nvfp4(x, q, s, g);
  EXPECT_EQ(g.data<float>()[0], nvfp4::global_scale_from_amax(0.0f));
  for (int64_t c = 0; c < h / 2; ++c) EXPECT_EQ(q.data<uint8_t>()[c], 0) << c;
  EXPECT_TRUE(std::isnan(g.data<float>()[1]));
  EXPECT_TRUE(std::isinf(g.data<float>()[2]));
  EXPECT_TRUE(std::isfinite(g.data<float>()[3]) && g.data<float>()[3] > 0.0f);
  EXPECT_TRUE(std::isfinite(g.data<float>()[4]) && g.data<float>()[4] > 0.0f);
  HostTensor out(DType::F32, {5, h});
  dequantize_nvfp4(q, s, g, out);
  const float* o = out.data<float>();
  for (int64_t c = 0; c < h; ++c) {
    EXPECT_EQ(o[0 * h + c], 0.0f);
    EXPECT_TRUE(std::isfinite(o[4 * h + c])) << "the ordinary row " << c;
    // The tiny row decodes within the element bound of docs/nvfp4.md (d <= 3e-6 / 6 x 1.0625),
    // and not to zero: with a global over the tensor (amax ~30 in row 4, 1e-7 of which is
    // below the 2^-18.8 floor of docs/nvfp4.md) its blocks would have had scale 0.
    EXPECT_NEAR(o[3 * h + c], bf16_bits_to_float(xb[3 * h + c]), 0.54e-6) << c;
    EXPECT_NE(o[3 * h + c], 0.0f) << c;
  }
  // The ordinary row: the e2m1 bound |x - x_hat| <= max(d, amax_b - 6d) per block.
  for (int64_t b = 0; b < h / kB; ++b) {
    const float d = nvfp4::block_divisor(s.data<uint8_t>()[4 * (h / kB) + b], g.data<float>()[4]);
    float amax_b = 0;
    for (int64_t c = b * kB; c < (b + 1) * kB; ++c) amax_b = std::max(amax_b, std::fabs(bf16_bits_to_float(xb[4 * h + c])));
    for (int64_t c = b * kB; c < (b + 1) * kB; ++c) {
      EXPECT_LE(std::fabs(o[4 * h + c] - bf16_bits_to_float(xb[4 * h + c])), std::max(d, amax_b - 6 * d) * 1.0001f) << c;
    }
  }
}

TEST(Nvfp4PerRowGlobalEdges, NoRows) {
  HostTensor x(DType::BF16, {0, 64}), q(DType::E2M1x2, {0, 32}), s(DType::E4M3, {0, 4}), g(DType::F32, {0});
  EXPECT_NO_THROW(quantize_nvfp4(x, q, s, g));
  HostTensor out(DType::BF16, {0, 64});
  EXPECT_NO_THROW(dequantize_nvfp4(q, s, g, out));
}

TEST(Nvfp4PerRowGlobalErrors, BadGlobalShapesAndValues) {
  HostTensor x = make_rows({3, 64}, 1104);
  HostTensor q(DType::E2M1x2, {3, 32}), s(DType::E4M3, {3, 4}), out(DType::BF16, {3, 64});
  HostTensor g2(DType::F32, {2}), g31(DType::F32, {3, 1}), gbf(DType::BF16, {3});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, s, g2), "global_scale", "[2]", "[1]", "one per row", "[T] = [3]");
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, s, g31), "global_scale", "[3, 1]", "[T] = [3]");
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, s, gbf), "global_scale", "bf16");
  EXPECT_MODMOE_ERROR(dequantize_nvfp4(q, s, g2, out), "global_scale", "[2]", "one per row");
  HostTensor x3 = make_rows({2, 3, 64}, 1105);
  HostTensor q3(DType::E2M1x2, {2, 3, 32}), s3(DType::E4M3, {2, 3, 4}), g6(DType::F32, {6});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x3, q3, s3, g6), "global_scale", "[6]", "[E_local, max_m] = [2, 3]");
  // Static: every row's global must be finite and positive; the message names the row.
  HostTensor g(DType::F32, {3});
  g.data<float>()[0] = 1e-3f;
  g.data<float>()[1] = 1e-3f;
  g.data<float>()[2] = -1.0f;
  Nvfp4QuantizeOptions opt;
  opt.static_global_scale = true;
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, s, g, opt), "global_scale'[2]", "-1", "finite positive");
}

}  // namespace
}  // namespace modmoe
