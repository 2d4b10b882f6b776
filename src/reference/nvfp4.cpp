// CPU reference of NVFP4 quantization, dequantization and weight preparation (docs/nvfp4.md).
// Arguments were validated by src/api/nvfp4.cpp. Every formula goes through src/core/nvfp4.h,
// which the CUDA kernels share, so both produce the same bytes.
#include "reference/nvfp4.h"

#include <cstring>

#include "core/nvfp4.h"
#include "modmoe/dtype.h"
#include "reference/experts_common.h"

namespace modmoe::reference {

namespace detail {

uint8_t quantize_block_16(const uint16_t* x, float global, uint8_t* q) {
  // amax over |x| as integers: for sign-cleared floats the bit order is the value order, and a
  // NaN (bits above inf) wins, so a NaN anywhere in the block makes its scale NaN.
  uint16_t amax_bits = 0;
  for (int i = 0; i < nvfp4::kBlock; ++i) {
    const uint16_t a = static_cast<uint16_t>(x[i] & 0x7fffu);
    amax_bits = a > amax_bits ? a : amax_bits;
  }
  const uint8_t sc = nvfp4::block_scale_e4m3(bf16_bits_to_float(amax_bits), global);
  const float d = nvfp4::block_divisor(sc, global);
  for (int i = 0; i < nvfp4::kBlock / 2; ++i) {
    q[i] = nvfp4::pack_e2m1x2(nvfp4::quantize_e2m1(bf16_bits_to_float(x[2 * i]), d),
                              nvfp4::quantize_e2m1(bf16_bits_to_float(x[2 * i + 1]), d));
  }
  return sc;
}

}  // namespace detail

void tile_block_scales_128x4(const uint8_t* linear, int64_t rows, int64_t cols, int64_t ld,
                             uint8_t* tiled) {
  const int64_t bytes = nvfp4::scale_tile_padded_rows(rows) * nvfp4::scale_tile_padded_cols(cols);
  std::memset(tiled, 0, static_cast<size_t>(bytes));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      tiled[nvfp4::scale_tile_offset(r, c, cols)] = linear[r * ld + c];
    }
  }
}

namespace {

// max |x| over n bf16 values, as bf16 bits (NaN, above inf, wins).
uint16_t amax_bits_of(const uint16_t* x, int64_t n) {
  uint16_t amax_bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t a = static_cast<uint16_t>(x[i] & 0x7fffu);
    amax_bits = a > amax_bits ? a : amax_bits;
  }
  return amax_bits;
}

// Rows of a tensor of `values` values with global scales `global`: 1 (per tensor: the whole
// tensor is one "row" for the global) or one per row of `row_values` values.
bool is_per_row(const TensorView& global, int64_t values, int64_t row_values) {
  return global.numel() != 1 || values == row_values;
}

}  // namespace

void quantize_nvfp4(const TensorView& x, const TensorView& q, const TensorView& scale,
                    const TensorView& global_scale, const Nvfp4QuantizeOptions& options) {
  const int64_t n = x.numel();              // a multiple of 32 (H % 32 == 0)
  const int64_t h = x.size(-1);
  const auto* xb = x.ptr<const uint16_t>();  // [rows, H] bf16
  auto* qb = q.ptr<uint8_t>();               // [rows, H/2] E2M1x2
  auto* sb = scale.ptr<uint8_t>();           // [rows, H/16] E4M3
  auto* gb = global_scale.ptr<float>();      // [1] or [rows] fp32
  // Per tensor: one "row" of n values; per row: rows of H values, each with its own global.
  const int64_t span = is_per_row(global_scale, n, h) ? h : n;
  for (int64_t r = 0; span > 0 && r < n / span; ++r) {
    const uint16_t* xr = xb + r * span;
    float g = gb[r];
    if (!options.static_global_scale) {
      g = nvfp4::global_scale_from_amax(bf16_bits_to_float(amax_bits_of(xr, span)));
      gb[r] = g;
    }
    for (int64_t b = 0; b < span / nvfp4::kBlock; ++b) {
      const int64_t blk = r * (span / nvfp4::kBlock) + b;
      sb[blk] = detail::quantize_block_16(xr + b * nvfp4::kBlock, g, qb + blk * (nvfp4::kBlock / 2));
    }
  }
  if (n == 0 && global_scale.numel() == 1 && !options.static_global_scale) {
    gb[0] = nvfp4::global_scale_from_amax(0.0f);  // an empty tensor's amax is 0
  }
}

void dequantize_nvfp4(const TensorView& q, const TensorView& scale,
                      const TensorView& global_scale, const TensorView& out) {
  const int64_t n = out.numel();  // values: 2 * q.numel()
  const int64_t h = out.size(-1);
  const auto* qb = q.ptr<const uint8_t>();
  const auto* sb = scale.ptr<const uint8_t>();
  const auto* gb = global_scale.ptr<const float>();
  const bool per_row = is_per_row(global_scale, n, h);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = qb[i / 2];
    const uint8_t code = (i % 2) ? nvfp4::e2m1x2_second(byte) : nvfp4::e2m1x2_first(byte);
    const float v = nvfp4::dequantize(code, sb[i / nvfp4::kBlock], gb[per_row ? i / h : 0]);
    if (out.dtype == DType::BF16) {
      out.ptr<uint16_t>()[i] = float_to_bf16_bits(v);
    } else {
      out.ptr<float>()[i] = v;
    }
  }
}

void prepare_weights_nvfp4(const ExpertWeights& src, ExpertWeights& dst,
                           const PrepareWeightsOptions& options) {
  const int64_t E = src.w13.size(0), rows = src.w13.size(1);
  const int64_t row_bytes = src.w13.size(2);          // H/2 packed bytes
  const int64_t scale_row_bytes = src.w13_scale.size(2);  // H/16 e4m3 scales
  const int64_t I = src.intermediate();
  const bool interleave = options.layout == WeightLayout::GateUpInterleaved && rows == 2 * I;
  detail::copy_view(dst.w2, src.w2);
  detail::copy_view(dst.w2_scale, src.w2_scale);
  detail::copy_view(dst.w2_bias, src.w2_bias);
  detail::copy_view(dst.w13_global_scale, src.w13_global_scale);
  detail::copy_view(dst.w2_global_scale, src.w2_global_scale);
  if (!interleave) {
    detail::copy_view(dst.w13, src.w13);
    detail::copy_view(dst.w13_scale, src.w13_scale);
    detail::copy_view(dst.w13_bias, src.w13_bias);
    return;
  }
  // One permutation of w13 rows, applied to the three tensors indexed by w13 row.
  const int64_t G = options.interleave_rows;
  const bool up_first = src.order == GateUpOrder::UpGate;
  detail::gather_interleaved(src.w13.data, dst.w13.data, E, I, G, up_first, row_bytes);
  detail::gather_interleaved(src.w13_scale.data, dst.w13_scale.data, E, I, G, up_first, scale_row_bytes);
  if (src.w13_bias.defined()) {
    detail::gather_interleaved(src.w13_bias.data, dst.w13_bias.data, E, I, G, up_first, 4);
  }
}

}  // namespace modmoe::reference
