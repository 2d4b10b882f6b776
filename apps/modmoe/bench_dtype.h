// The dtypes of `modmoe bench experts` and the pure arithmetic of one cell: the bytes it must
// move, its FLOPs, its floor, its accuracy bound and the targets. Header-only so that a
// CPU unit test (tests/cpu/test_bench_floor.cpp) checks it without the GPU parts of the app.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "modmoe/error.h"
#include "modmoe/quant.h"

namespace modmoe::app {

enum class BenchDtype { Bf16, Fp8Block, Fp8Tensor, Nvfp4 };

inline BenchDtype parse_bench_dtype(const std::string& name) {
  if (name == "bf16") return BenchDtype::Bf16;
  if (name == "fp8-block") return BenchDtype::Fp8Block;
  if (name == "fp8-tensor") return BenchDtype::Fp8Tensor;
  if (name == "nvfp4") return BenchDtype::Nvfp4;
  MODMOE_FAIL("option '--dtype' = '", name, "': expected one of bf16, fp8-block (e4m3, 128x128 "
              "weight blocks, 1x128 activation groups), fp8-tensor (e4m3, one scale per expert "
              "and per tensor), nvfp4 (W4A16)");
}

inline const char* bench_dtype_name(BenchDtype d) {
  switch (d) {
    case BenchDtype::Bf16: return "bf16";
    case BenchDtype::Fp8Block: return "fp8-block";
    case BenchDtype::Fp8Tensor: return "fp8-tensor";
    case BenchDtype::Nvfp4: return "nvfp4";
  }
  return "?";
}

inline QuantScheme bench_scheme(BenchDtype d) {
  switch (d) {
    case BenchDtype::Bf16: return QuantScheme::None;
    case BenchDtype::Fp8Block: return QuantScheme::Fp8Block128;
    case BenchDtype::Fp8Tensor: return QuantScheme::Fp8PerTensor;
    case BenchDtype::Nvfp4: return QuantScheme::Nvfp4;
  }
  return QuantScheme::None;
}

inline bool is_fp8(BenchDtype d) { return d == BenchDtype::Fp8Block || d == BenchDtype::Fp8Tensor; }

// bench/results/<gpu>/<this>. NOTE: one file per FP8 scheme, so that the two runs of
// bench/gpu_fp8_run.sh do not overwrite each other; and one for fp8-tensor with
// --fp8-fast-accum (ExpertsOptions::fp8_fast_accum), so that an A/B of the two modes keeps both.
inline std::string bench_json_name(BenchDtype d, bool fp8_fast_accum = false) {
  MODMOE_CHECK(!fp8_fast_accum || d == BenchDtype::Fp8Tensor, "bench_json_name: fp8_fast_accum "
               "with --dtype ", bench_dtype_name(d), ": expected fp8-tensor");
  if (fp8_fast_accum) return "experts_fp8_tensor_fast_accum.json";
  switch (d) {
    case BenchDtype::Bf16: return "experts.json";
    case BenchDtype::Fp8Block: return "experts_fp8_block.json";
    case BenchDtype::Fp8Tensor: return "experts_fp8_tensor.json";
    case BenchDtype::Nvfp4: return "experts_nvfp4.json";
  }
  return "experts.json";
}

// One cell of the grid: SwiGLU experts (w13 [2I, H], w2 [H, I]).
struct CellShape {
  int64_t tokens = 0, hidden = 0, intermediate = 0;
  int top_k = 0;
  double experts_touched = 0;  // distinct experts the routing picks, averaged over the inputs
};

// The bytes a cell must move at the least: every touched expert's weights and their scales
// once, the hidden states in, the bf16 output out.
//   bf16:       weights 2 B per value; hidden 2 B per value
//   fp8-block:  weights 1 B + 4 B per 128x128 block; hidden 1 B + 4 B per 1x128 group
//   fp8-tensor: weights 1 B + 4 B per expert and matrix; hidden 1 B + 4 B per tensor
//   nvfp4:      weights 0.5 B + 1 B (e4m3) per 16 values + 4 B global per expert and matrix;
//               hidden bf16 (W4A16)
struct CellBytes {
  double weights = 0, weight_scales = 0, hidden_in = 0, out = 0;
  double weight_total() const { return weights + weight_scales; }
  double total() const { return weights + weight_scales + hidden_in + out; }
};

inline CellBytes cell_bytes(BenchDtype d, const CellShape& c) {
  const double values = 3.0 * static_cast<double>(c.intermediate) * c.hidden;  // per expert
  const double act = static_cast<double>(c.tokens) * c.hidden;                 // hidden values
  const double kB = static_cast<double>(kFp8BlockSize);
  CellBytes b;
  b.out = 2.0 * act;
  switch (d) {
    case BenchDtype::Bf16:
      b.weights = 2.0 * values;
      b.hidden_in = 2.0 * act;
      break;
    case BenchDtype::Fp8Block:
      b.weights = values;
      b.weight_scales = 4.0 * values / (kB * kB);
      b.hidden_in = act + 4.0 * act / kB;
      break;
    case BenchDtype::Fp8Tensor:
      b.weights = values;
      b.weight_scales = 4.0 * 2;
      b.hidden_in = act + (c.tokens > 0 ? 4.0 : 0.0);
      break;
    case BenchDtype::Nvfp4:
      b.weights = 0.5 * values;
      b.weight_scales = values / kNvfp4BlockSize + 4.0 * 2;
      b.hidden_in = 2.0 * act;
      break;
  }
  b.weights *= c.experts_touched;
  b.weight_scales *= c.experts_touched;
  return b;
}

inline double cell_flops(const CellShape& c) {
  return 2.0 * static_cast<double>(c.tokens) * c.top_k * 3.0 * static_cast<double>(c.intermediate) * c.hidden;
}

// The larger of the two times no kernel beats: the bytes at the copy rate and the FLOPs at the
// dense rate of the dtype's MMA (bf16 for bf16 and W4A16, FP8 for FP8), both measured in the
// same run.
struct Floor {
  double bytes = 0, flops = 0, bytes_us = 0, flops_us = 0, us = 0;
  const char* kind = "bytes";
};

inline Floor cell_floor(BenchDtype d, const CellShape& c, double copy_GBps, double dense_TFLOPs) {
  Floor f;
  f.bytes = cell_bytes(d, c).total();
  f.flops = cell_flops(c);
  f.bytes_us = f.bytes / (copy_GBps * 1e3);
  f.flops_us = f.flops / (dense_TFLOPs * 1e6);
  f.us = std::max(f.bytes_us, f.flops_us);
  f.kind = f.bytes_us >= f.flops_us ? "bytes" : "flops";
  return f;
}

// The regimes of docs/perf_notes_experts.md: decode T <= 16, prefill T >= 4096; "large
// experts" are those of ANCHORS.md's targets (mixtral, deepseek, gpt-oss), not qwen3's 768.
inline bool is_decode(int64_t tokens) { return tokens <= 16; }
inline bool is_prefill(int64_t tokens) { return tokens >= 4096; }
inline bool is_large_expert(int64_t intermediate) { return intermediate >= 2048; }

// The sampled float64 check (bench_cell.cpp) passes when rel_l2 <= bound and, for FP8, when
// rel_l2 against the float64 reference that rounds the intermediate as the kernels do
// (bf16, then e4m3 in 1x128 groups) <= emulated_bound. docs/fp8.md measures 0.016-0.028 and
// 0.0020-0.0030 for those two on the CPU oracle; the bf16 pipeline (and W4A16 on its decoded
// weights) stands at about 3e-3. The emulated bound is 1e-2, not 5e-3: on the GPU, GEMM1 sums
// in another order than the float64 reference, so a bf16 intermediate now and then sits an ulp
// away and its e4m3 code one step (2^-3 relative) away; test_gpu_fp8_experts measures the GPU
// against the CPU oracle at 1.7e-3 to 6e-3 on random inputs (H100), and 4 sampled tokens are a
// noisy estimate. The first H100 run with 5e-3 flagged 8 of 18 cells per dtype.
//
// FP8 fast accumulation (--fp8-fast-accum, fp8-tensor only; docs/fp8.md "FP8 fast
// accumulation"): the float64 bound stays 0.04 (the accuracy bound proper: measured 0.0245 in
// both modes on an H200). The emulated bound is 2e-2, from the error model of that section:
// a GEMM1 error of relative size d moves an e4m3 code of the intermediate (relative step
// q ~ 2^-3) with probability ~ d / q, by one step, so the emulated error grows as sqrt(d q).
// The default bound (1e-2) is that model at d = 8.5e-4 (the promoted GPU GEMM1 at H = 4096,
// rand_tensor_deep_k); the fast GEMM1 measured d = 3.2e-3 there, so 1e-2 * sqrt(3.2e-3 /
// 8.5e-4) = 1.9e-2 -> 2e-2. Measured on an H200 with the fast mode: 0.012 to 0.016 (default
// mode ~0.0046). The float64 reference is the same for both modes: in float64 one multiply of
// the full-K sum and the per-block sum of scaled parts agree to ~1e-16.
struct CheckBounds {
  double rel_l2 = 1e-2;
  double emulated = 0;  // 0: no emulated check
};

inline CheckBounds check_bounds(BenchDtype d, bool fp8_fast_accum = false) {
  MODMOE_CHECK(!fp8_fast_accum || d == BenchDtype::Fp8Tensor, "check_bounds: fp8_fast_accum "
               "with --dtype ", bench_dtype_name(d), ": expected fp8-tensor");
  if (fp8_fast_accum) return CheckBounds{0.04, 2e-2};
  return is_fp8(d) ? CheckBounds{0.04, 1e-2} : CheckBounds{1e-2, 0};
}

// The targets for a quantized dtype, each measured against the same run's bf16:
//   decode cells: at least `decode_copy_fraction` of the copy ceiling on the quantized weight
//   bytes (values and scales: CellBytes::weight_total), and `decode_speedup` x bf16 where set;
//   prefill cells of large experts: at least `prefill_speedup` x bf16;
//   every cell: at least `min_speedup` x bf16.
struct Targets {
  double decode_copy_fraction = 0, decode_speedup = 0, prefill_speedup = 0, min_speedup = 0;
};

inline Targets targets(BenchDtype d) {
  if (is_fp8(d)) return {0.85, 0.0, 1.6, 1.0};
  if (d == BenchDtype::Nvfp4) return {0.75, 2.5, 1.0, 1.0};  // docs/nvfp4.md, "Hopper plan"
  return {};
}

}  // namespace modmoe::app
