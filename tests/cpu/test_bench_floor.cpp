// The arithmetic of `modmoe bench experts` (apps/modmoe/bench_dtype.h): the --dtype names,
// the bytes and FLOPs of a cell per dtype, its floor, bounds and targets.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "bench_dtype.h"

namespace modmoe::app {
namespace {

TEST(BenchDtype, NamesRoundTripAndUnknownNamesAreRefused) {
  for (BenchDtype d : {BenchDtype::Bf16, BenchDtype::Fp8Block, BenchDtype::Fp8Tensor, BenchDtype::Nvfp4}) {
    EXPECT_EQ(parse_bench_dtype(bench_dtype_name(d)), d);
  }
  EXPECT_EQ(bench_scheme(BenchDtype::Fp8Block), QuantScheme::Fp8Block128);
  EXPECT_EQ(bench_scheme(BenchDtype::Fp8Tensor), QuantScheme::Fp8PerTensor);
  EXPECT_EQ(bench_json_name(BenchDtype::Bf16), "experts.json");
  EXPECT_EQ(bench_json_name(BenchDtype::Fp8Block), "experts_fp8_block.json");
  EXPECT_EQ(bench_json_name(BenchDtype::Fp8Tensor), "experts_fp8_tensor.json");
  EXPECT_EQ(bench_json_name(BenchDtype::Nvfp4), "experts_nvfp4.json");
  try {
    parse_bench_dtype("fp8");
    FAIL() << "'fp8' was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("option '--dtype' = 'fp8': expected one of bf16, fp8-block"),
              std::string::npos) << e.what();
  }
}

// The bf16 floors of ANCHORS.md (copy 3.03 TB/s, dense 801 TFLOP/s): mixtral T=1 233 µs
// (bytes), T=16384 14415 µs (flops).
TEST(BenchFloor, Bf16ReproducesTheAnchorFloors) {
  const CellShape decode{1, 4096, 14336, 2, 2};
  const Floor f1 = cell_floor(BenchDtype::Bf16, decode, 3030, 801);
  EXPECT_EQ(f1.bytes, 2.0 * 3 * 14336 * 4096 * 2 + 4096 * 2 * 2);
  EXPECT_STREQ(f1.kind, "bytes");
  EXPECT_NEAR(f1.us, 233, 0.5);
  const CellShape prefill{16384, 4096, 14336, 2, 8};
  const Floor f2 = cell_floor(BenchDtype::Bf16, prefill, 3030, 801);
  EXPECT_EQ(f2.flops, 2.0 * 16384 * 2 * 3 * 14336 * 4096);
  EXPECT_STREQ(f2.kind, "flops");
  EXPECT_NEAR(f2.us, 14415, 5);
}

// H = 256, I = 128, T = 2, 3 experts touched: 3 * 128 * 256 = 98304 values per expert.
TEST(BenchFloor, BytesPerDtype) {
  const CellShape c{2, 256, 128, 2, 3};
  const CellBytes bf16 = cell_bytes(BenchDtype::Bf16, c);
  EXPECT_EQ(bf16.weights, 3 * 98304 * 2.0);
  EXPECT_EQ(bf16.weight_scales, 0.0);
  EXPECT_EQ(bf16.hidden_in, 2 * 256 * 2.0);
  EXPECT_EQ(bf16.out, 2 * 256 * 2.0);

  const CellBytes block = cell_bytes(BenchDtype::Fp8Block, c);
  EXPECT_EQ(block.weights, 3 * 98304.0);
  EXPECT_EQ(block.weight_scales, 3 * 4.0 * (2 * 1 * 2 + 2 * 1));  // w13 2x2 blocks, w2 2x1
  EXPECT_EQ(block.hidden_in, 512 + 4.0 * 2 * 2);                   // 2 tokens x 2 groups
  EXPECT_EQ(block.out, 1024.0);
  EXPECT_EQ(block.total(), 294912 + 72 + 528 + 1024);
  EXPECT_EQ(block.weight_total(), 294912 + 72);

  const CellBytes tensor = cell_bytes(BenchDtype::Fp8Tensor, c);
  EXPECT_EQ(tensor.weights, 3 * 98304.0);
  EXPECT_EQ(tensor.weight_scales, 3 * 8.0);  // one scale for w13, one for w2
  EXPECT_EQ(tensor.hidden_in, 512 + 4.0);

  const CellBytes fp4 = cell_bytes(BenchDtype::Nvfp4, c);
  EXPECT_EQ(fp4.weights, 3 * 98304 * 0.5);
  EXPECT_EQ(fp4.weight_scales, 3 * (98304 / 16.0 + 8));
  EXPECT_EQ(fp4.hidden_in, 1024.0);  // W4A16: bf16 activations
}

TEST(BenchFloor, Fp8FloorUsesTheFp8DenseRate) {
  const CellShape c{16384, 7168, 2048, 8, 32};
  const Floor f = cell_floor(BenchDtype::Fp8Block, c, 3000, 1600);
  EXPECT_STREQ(f.kind, "flops");
  EXPECT_DOUBLE_EQ(f.us, cell_flops(c) / 1600e6);
  EXPECT_DOUBLE_EQ(cell_flops(c), 2.0 * 16384 * 8 * 3 * 2048 * 7168);
  const Floor small = cell_floor(BenchDtype::Fp8Block, CellShape{1, 7168, 2048, 8, 8}, 3000, 1600);
  EXPECT_STREQ(small.kind, "bytes");
  EXPECT_DOUBLE_EQ(small.us, small.bytes / 3000e3);
}

TEST(BenchFloor, RegimesBoundsAndTargets) {
  EXPECT_TRUE(is_decode(16));
  EXPECT_FALSE(is_decode(17));
  EXPECT_TRUE(is_prefill(4096));
  EXPECT_TRUE(is_large_expert(2048));
  EXPECT_FALSE(is_large_expert(768));  // qwen3
  EXPECT_EQ(check_bounds(BenchDtype::Fp8Block).rel_l2, 0.04);
  EXPECT_EQ(check_bounds(BenchDtype::Fp8Tensor).emulated, 1e-2);
  EXPECT_EQ(check_bounds(BenchDtype::Bf16).emulated, 0.0);
  const Targets t = targets(BenchDtype::Fp8Block);
  EXPECT_EQ(t.decode_copy_fraction, 0.85);
  EXPECT_EQ(t.prefill_speedup, 1.6);
  EXPECT_EQ(t.min_speedup, 1.0);
}

// --fp8-fast-accum (ExpertsOptions::fp8_fast_accum, fp8-tensor only): its own JSON file, the
// float64 bound of the default and the wider emulated bound of the error model (bench_dtype.h);
// the default fp8-tensor bounds are not loosened.
TEST(BenchFloor, Fp8FastAccumBoundsAndFile) {
  EXPECT_EQ(bench_json_name(BenchDtype::Fp8Tensor, true), "experts_fp8_tensor_fast_accum.json");
  EXPECT_NE(bench_json_name(BenchDtype::Fp8Tensor, true), bench_json_name(BenchDtype::Fp8Tensor));
  const CheckBounds fast = check_bounds(BenchDtype::Fp8Tensor, true);
  const CheckBounds def = check_bounds(BenchDtype::Fp8Tensor);
  EXPECT_EQ(fast.rel_l2, def.rel_l2);
  EXPECT_EQ(fast.emulated, 2e-2);
  EXPECT_EQ(def.emulated, 1e-2);
  for (BenchDtype d : {BenchDtype::Bf16, BenchDtype::Fp8Block, BenchDtype::Nvfp4}) {
    EXPECT_THROW(check_bounds(d, true), Error) << bench_dtype_name(d);
    EXPECT_THROW(bench_json_name(d, true), Error) << bench_dtype_name(d);
  }
}

}  // namespace
}  // namespace modmoe::app
