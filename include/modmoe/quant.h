// Weight preparation and quantization (docs/contract.md, "Weights" and "Quantized parity").
#pragma once

#include "modmoe/experts.h"

namespace modmoe {

struct PrepareWeightsOptions {
  WeightLayout layout = WeightLayout::GateUpInterleaved;
  // G: gate/up rows per interleave group. The GEMM1 kernels need 8 | G; 8 is what they use.
  int interleave_rows = 8;
};

// A pure function of the canonical tensors, run once at load time. `dst` holds caller-
// allocated views with the shapes and dtypes of `src` (w13, w2, and the biases when `src`
// has them), on the same device; prepare_weights fills them and sets dst's other fields.
// Gated activations only need the interleave; non-gated (Relu2) weights are copied.
void prepare_weights(const ExpertWeights& src, ExpertWeights& dst,
                     const PrepareWeightsOptions& options = {}, Stream stream = nullptr);

}  // namespace modmoe

// ---------------------------------------------------------------------------------------
// FP8 (e4m3fn) quantization: Fp8PerTensor and Fp8Block128. Every formula is in docs/fp8.md;
// the CPU reference and the CUDA kernels produce the same bytes and scales.
// ---------------------------------------------------------------------------------------

namespace modmoe {

// Elements per scale block of Fp8Block128: 1x128 groups of activations (along H), 128x128
// blocks of weights. H and I must be multiples of it under both FP8 schemes.
inline constexpr int64_t kFp8BlockSize = 128;

struct QuantizeOptions {
  // Fp8PerTensor only. false (dynamic): scale[0] = max(amax(x), 1e-10) / 448 is computed on
  // the tensors' device (no host synchronisation) and written. true (static): scale[0] is the
  // caller's (a checkpoint's calibrated input scale) and is only read.
  bool static_scale = false;
};

// Quantizes activations to e4m3: q = e4m3_satfinite(x / s), x / s one IEEE fp32 division,
// with s the scale of x's group. Dynamic scales are s = max(amax, 1e-10) / 448 over the group.
//   x:     [T, H] (or batched [E_local, max_m, H]) bf16, contiguous, H % 128 == 0
//   q:     x's shape, e4m3
//   scale: fp32 dequantization scales (x ~ float(q) * s):
//          Fp8PerTensor: [1]; or, dynamic only, one per row (x's shape without H: [T], or
//                        [E_local, max_m]), every entry the tensor's scale: the per-token
//                        form that an all-to-all payload carries, and that the experts stage
//                        accepts for rows that came from ranks with their own scales;
//          Fp8Block128:  x's shape with H replaced by H/128, token-major ([T, H/128]), one per
//                        1x128 group of a row. NOTE: FlashInfer's DeepSeek-FP8 kernels take the
//                        transpose [H/128, T]; modmoe keeps the token-major layout, which is
//                        what a per-token all-to-all payload needs.
// Runs on the tensors' device; graph-capturable, no allocation, no host synchronisation.
void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options = {},
                          Stream stream = nullptr);

// The inverse, for tests and debugging: out = float(q) * s (one fp32 multiply), written as
// fp32, or rounded once to bf16. q, scale: as in quantize_activations (per tensor: [1] or one
// per row); out: q's shape.
void dequantize_activations(const TensorView& q, QuantScheme scheme, const TensorView& scale,
                            const TensorView& out, Stream stream = nullptr);

// Quantizes bf16 expert weights (a bf16 checkpoint's, or synthetic masters) to FP8 as an FP8
// checkpoint stores them, with the formulas of quantize_activations: per block of weights,
// s = max(amax, 1e-10) / 448 and q = e4m3_satfinite(w / s).
//   w:     [E, R, C] bf16, dense, R and C multiples of 128 (w13 [E, 2I, H], w2 [E, H, I])
//   q:     w's shape, e4m3
//   scale: fp32, Fp8PerTensor [E] (one per expert); Fp8Block128 [E, R/128, C/128] (one per
//          128x128 block, DeepSeek-V3's weight_scale_inv)
// q and scale are what prepare_weights takes as src (w13 + w13_scale, w2 + w2_scale). Runs
// on the tensors' device; no allocation, no host synchronisation.
void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale, Stream stream = nullptr);

// FP8 weights (prepare_weights with src.scheme = Fp8PerTensor or Fp8Block128) take the
// tensors as a checkpoint stores them; every scale is a dequantization multiplier
// (w ~ float(q) * s: DeepSeek's `weight_scale_inv`, vLLM's per-tensor `weight_scale`):
//   w13 [E_local, 2I (or I), H] e4m3, w2 [E_local, H, I] e4m3, biases fp32 as for bf16;
//   Fp8PerTensor: w13_scale [E_local], w2_scale [E_local] fp32 (one per expert; gate and up
//                 share it);
//   Fp8Block128:  w13_scale [E_local, 2I/128 (or I/128), H/128], w2_scale [E_local, H/128,
//                 I/128] fp32, one per 128x128 block (DeepSeek-V3).
// The prepared (GateUpInterleaved) layout interleaves rows in groups of G as for bf16, with
// 8 | G and G | 128, so that interleaved rows [256j, 256j + 256) hold exactly gate block j and
// up block j. Fp8Block128 scale rows move as whole blocks: prepared block row 2j is gate
// block j, 2j + 1 up block j (docs/fp8.md, "Weights").

// Fp8Block128: the block row of w13_scale (within one expert) that scales w13 row `row` in
// the layout of `w` (Canonical: row / 128; GateUpInterleaved: see above).
int64_t w13_scale_row_block(const ExpertWeights& w, int64_t row);

}  // namespace modmoe

// ---------------------------------------------------------------------------------------
// NVFP4 (QuantScheme::Nvfp4): e2m1 values packed in pairs (DType::E2M1x2, low nibble first),
// one e4m3 block scale per 16 values along K, one fp32 global scale per tensor (activations) or
// per expert (weights). Every scale is a dequantization multiplier:
//   x ~ e2m1 * float(block_scale) * global_scale
// (global_scale = ModelOpt's weight_scale_2 / input_scale; FlashInfer's global_sf is its
// reciprocal). Every formula is in docs/nvfp4.md and src/core/nvfp4.h.
// ---------------------------------------------------------------------------------------

namespace modmoe {

// Values per e4m3 block scale. K dimensions (H, and I for weights) must be multiples of 32 so
// that a packed row (K/2 bytes) is a whole number of 16-byte vectors.
inline constexpr int64_t kNvfp4BlockSize = 16;

struct Nvfp4QuantizeOptions {
  // false (dynamic): the global scale max(amax, 1e-10) / (6 * 448) is computed and written:
  // over the tensor (global_scale [1]) or over each row (one global per row). true (static):
  // global_scale holds the caller's value(s) (a checkpoint's calibrated input_scale), only
  // read; blocks past 6 * 448 * global saturate.
  bool static_global_scale = false;
};

// Quantizes bf16 activations (or weights, one expert at a time) to NVFP4:
//   block scale = e4m3_satfinite((amax_block / 6) / global)
//   code        = e2m1_rn_satfinite(x / (float(block scale) * global)), 0 where that is 0
//   x:            [T, H] (or [E_local, max_m, H]) bf16, dense, H % 32 == 0
//   q:            x's shape with H replaced by H/2, E2M1x2
//   scale:        x's shape with H replaced by H/16, E4M3, token-major (FlashInfer's linear
//                 hidden_states_scale layout: the scales of a token are contiguous)
//   global_scale: fp32, [1] (one per tensor), or one per row: x's shape without H ([T] or
//                 [E_local, max_m]). Per row, each row is quantized as a tensor of its own:
//                 dynamic, its global is max(amax(row), 1e-10) / (6 * 448) over that row
//                 only (NOT the tensor's global repeated, unlike FP8's per-row form), so a
//                 token's bytes do not depend on the batch it came in. This is the form an
//                 all-to-all payload carries ("quantize before dispatch", docs/nvfp4.md):
//                 rows from different ranks keep their own globals, and the rows a rank
//                 sends are bit for bit those of the global batch quantized per row.
// CPU and CUDA tensors (the CUDA kernels give the same bytes); graph-capturable on CUDA.
void quantize_nvfp4(const TensorView& x, const TensorView& q, const TensorView& scale,
                    const TensorView& global_scale, const Nvfp4QuantizeOptions& options = {},
                    Stream stream = nullptr);

// The inverse (tests, debugging, and the receiver of an NVFP4 dispatch whose experts take bf16):
// out = (e2m1 * float(scale)) * global (the first product exact, one fp32 rounding), written
// as fp32 or rounded once more to bf16. q, scale, global_scale: as in quantize_nvfp4 (global
// [1] or one per row); out: [T, H] (q's shape with H/2 doubled).
void dequantize_nvfp4(const TensorView& q, const TensorView& scale,
                      const TensorView& global_scale, const TensorView& out,
                      Stream stream = nullptr);

// NVFP4 weights (prepare_weights with src.scheme = Nvfp4) take the checkpoint layout
// (ModelOpt / FlashInfer), K-major, shapes counting bytes for E2M1x2:
//   w13 [E_local, 2I (or I), H/2] E2M1x2, w2 [E_local, H, I/2] E2M1x2 (H, I multiples of 32);
//   w13_scale [E_local, 2I (or I), H/16] E4M3, w2_scale [E_local, H, I/16] E4M3 (linear);
//   w13_global_scale [E_local], w2_global_scale [E_local] fp32 (gate and up share one);
//   biases fp32 as for bf16.
// The prepared (GateUpInterleaved) layout interleaves the packed w13 rows, their scale rows
// and the bias in groups of G rows exactly as for bf16 (8 | G, G | I): a scale row belongs to
// one weight row, so any such G works. w2, w2_scale and the global scales are copied.
// CPU and CUDA tensors (docs/nvfp4.md, "Weights").

}  // namespace modmoe
