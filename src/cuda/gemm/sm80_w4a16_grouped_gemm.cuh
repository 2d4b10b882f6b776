// Grouped W4A16 GEMM: NVFP4 weights (e2m1 pairs, e4m3 scale per 16 of K, fp32 global per
// expert; docs/nvfp4.md) times bf16 activations, on the sm_80 tensor-core path (mma.sync
// m16n8k16 bf16, cp.async multi-stage pipeline), fp32 accumulate. Runs on sm_90a (and sm_100a).
// The weights are decoded to bf16 in registers inside the mainloop; no bf16 copy of them is
// ever written.
//
// Roles ("swap AB"): the weights are the MMA's A operand (M = 16 weight rows), the tokens its B
// operand (N = 8 tokens), so a decode tile of 16 tokens wastes no MMA rows and every weight
// value is decoded exactly once per tile. One CTA (4 warps) computes one (expert, token tile,
// weight-row tile):
//   blockIdx.x  token tile in the device-side work list (binary search over tile_offsets)
//   blockIdx.y  weight-row tile (gated GEMM1: BN / 2 output columns, else BN)
// Warp w owns the tile's weight rows [w * BN/4, (w + 1) * BN/4) and every token of the tile.
//
// Shared memory per pipeline stage (BK = 64 values of K):
//   W  [BN][32] bytes  packed e2m1 pairs, row r at r * 32 (no swizzle: a warp's 8-byte reads
//                      of 4 rows x 4 threads cover 128 consecutive bytes per phase)
//   S  [BN][4] e4m3    the row's 4 block scales of the stage, row r at r * 4
//   X  [BM][64] bf16   token row t, 16-byte chunk c at t * 128 + ((c ^ (t & 7)) * 16); the XOR
//                      spreads the 8 lanes of a 16-byte read phase (two token rows, chunks
//                      2q or 2q + 1) over all 32 banks. Once landed, chunks 2q and 2q + 1 of a
//                      token are rewritten in place into the B fragments of their scale block
//                      (permute_token_pair, by the thread that copied them)
// Epilogue staging reuses the pipeline memory: C [BM][BN + 8] bf16.
//
// The decode (per thread, per stage, per m16 fragment): lane (g = lane / 4, q = lane % 4)
// holds weight rows g and g + 8 of the fragment and K values [16q, 16q + 16) of the stage,
// which are exactly one scale block. Its 8 bytes (two 32-bit words, nibble i of a word = K
// value i of the word, element 2i in the low nibble of byte i) decode into 8 bf16 pairs:
//   word x, nibbles n0..n7:  P_j = (n_j, n_{j+4}),  j = 0..3
//   bits of P_j: t = the two nibbles at bits 3:0 / 19:16 (or 7:4 / 23:20), one multiply
//   places each nibble's magnitude (e1 e0 m) at bf16 bits 8:6 and its sign at bit 15 (t *
//   0x1040 = t << 6 | t << 12, no carries), a mask keeps those: the bf16 whose exponent field
//   is e and top mantissa bit m, i.e. e2m1 * 2^-126 exactly (e = 0 lands on the subnormals,
//   which is e2m1's own subnormal 0.5).
//   one bf16x2 multiply by K = bf16(float(scale) * 2^119) gives w' * 2^-7, exact (w' = e2m1 *
//   scale has at most 6 significant bits in [2^-10, 2688]; K <= 448 * 2^119 < bf16 max).
// The 2^-7 goes back in the epilogue with the global scale: acc * (128 * global), one fp32
// multiply, bitwise the oracle's dot(x, w') * global (a power of two commutes with rounding).
// MMA step s (0..3) of the stage pairs mma-k {2q, 2q+1, 2q+8, 2q+9} with K values
// {16q + s, 16q + s + 4, 16q + 8 + s, 16q + 12 + s}: a permutation of K inside the stage, the
// same for both operands, so the dot product is unchanged. The B (token) fragment follows it
// with byte permutes of the token's 32 bytes [16q, 16q + 16), done once per stage by the
// copying thread (permute_token_pair), not by every reading warp.
//
// GEMM1, gated: tile row 16f + g (g < 8) is the gate row of output column 8f + g and tile row
// 16f + 8 + g its up row (GateUpMap decides where they live in w13; the prepared G = 8 layout
// makes the tile's rows contiguous), so a thread's accumulators (c0, c2) and (c1, c3) are the
// (gate, up) pairs of two tokens and the activation needs no data exchange.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "core/activation_math.h"
#include "core/nvfp4.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm80_mma_grouped_gemm.cuh"
#include "cuda/gemm/w4a16_decode.cuh"

namespace modmoe::cuda::gemm {

// 4-byte async copy global -> shared (the block scales); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

// The A fragments of one m16 fragment for the 4 MMA steps of a 64-K sub-block (a0..a3 as
// mma.sync numbers them): the lane's 8 packed bytes of row r8 (w_lo) and of row r8 + 8 (w_hi),
// decoded with their rows' scale factors k = (K of row r8, K of row r8 + 8).
__device__ __forceinline__ void decode_fragment(uint2 w_lo, uint2 w_hi, uint32_t k,
                                                uint32_t (&af)[4][4]) {
  uint32_t p_lo[4], q_lo[4], p_hi[4], q_hi[4];
  decode_word<0>(w_lo.x, k, p_lo);  // K values 16q + {j, j + 4}
  decode_word<0>(w_lo.y, k, q_lo);  // K values 16q + 8 + {j, j + 4}
  decode_word<1>(w_hi.x, k, p_hi);
  decode_word<1>(w_hi.y, k, q_hi);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    af[s][0] = p_lo[s];
    af[s][1] = p_hi[s];
    af[s][2] = q_lo[s];
    af[s][3] = q_hi[s];
  }
}

__device__ __forceinline__ void sts_128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}

// The token chunks of one scale block (bf16 values x0..x15 of K [16q, 16q + 16): x0..x7 at lo,
// x8..x15 at hi), rewritten in place as the B fragments of the 4 MMA steps of that K range:
// step s = (x_s, x_{s+4}), (x_{8+s}, x_{12+s}) (the K permutation of the decode), steps 0, 1 at
// lo and 2, 3 at hi, each fragment two consecutive words, as mma.sync takes them. The thread
// that copied both chunks does this once per stage, after its own cp.async group landed and
// before the barrier that hands the stage to the consumers: once per chunk pair instead of
// once per pair and reading warp, and the consumers load their fragments as they are.
__device__ __forceinline__ void permute_token_pair(uint32_t lo, uint32_t hi) {
  const uint4 a = lds_128(lo);  // (x0, x1), (x2, x3), (x4, x5), (x6, x7)
  const uint4 b = lds_128(hi);  // (x8, x9), ..
  sts_128(lo, make_uint4(__byte_perm(a.x, a.z, 0x5410), __byte_perm(b.x, b.z, 0x5410),
                         __byte_perm(a.x, a.z, 0x7632), __byte_perm(b.x, b.z, 0x7632)));
  sts_128(hi, make_uint4(__byte_perm(a.y, a.w, 0x5410), __byte_perm(b.y, b.w, 0x5410),
                         __byte_perm(a.y, a.w, 0x7632), __byte_perm(b.y, b.w, 0x7632)));
}

// The B fragments of the 4 MMA steps for one token of an n8 fragment, from a chunk pair that
// permute_token_pair has rewritten (lo: steps 0, 1; hi: steps 2, 3).
__device__ __forceinline__ void token_fragments(uint32_t lo, uint32_t hi, uint32_t (&bf)[4][2]) {
  const uint4 u = lds_128(lo);
  const uint4 v = lds_128(hi);
  bf[0][0] = u.x;
  bf[0][1] = u.y;
  bf[1][0] = u.z;
  bf[1][1] = u.w;
  bf[2][0] = v.x;
  bf[2][1] = v.y;
  bf[3][0] = v.z;
  bf[3][1] = v.w;
}

// 16-byte async copy global -> shared, or 16 zero bytes where zero (the ignore-src operand: a
// predicate, where a src_bytes register costs address arithmetic per copy).
__device__ __forceinline__ void cp_async_16_or_zero(uint32_t dst, const void* src, bool zero) {
  asm volatile(
      "{\n .reg .pred z;\n setp.ne.b32 z, %2, 0;\n"
      " cp.async.cg.shared.global [%0], [%1], 16, z;\n}\n" ::"r"(dst),
      "l"(src), "r"(static_cast<int>(zero)));
}

// ---------------------------------------------------------------------------------------
// Tile configuration (compile time), mirrored at run time by GemmConfig (nvfp4 = true)
// ---------------------------------------------------------------------------------------

template <int BM, int BN, int Stages, int MinBlocks>
struct W4a16Tile {
  static constexpr int kBlockM = BM;  // tokens
  static constexpr int kBlockN = BN;  // weight rows
  static constexpr int kBlockK = 64;  // K values per stage: 4 scale blocks, 32 packed bytes
  static constexpr int kStages = Stages;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocks = MinBlocks;
  static constexpr int kWarpRows = BN / kWarps;   // weight rows per warp
  static constexpr int kMmaM = kWarpRows / 16;    // m16 fragments (weight rows) per warp
  static constexpr int kMmaN = BM / 8;            // n8 fragments (tokens)
  static constexpr int kWBytes = BN * 32;
  static constexpr int kSBytes = BN * 4;
  static constexpr int kXBytes = BM * 128;
  static constexpr int kStageBytes = kWBytes + kSBytes + kXBytes;
  static constexpr int kWIters = BN * 2 / kThreads;   // 16-byte weight chunks per thread
  static constexpr int kSIters = BN / kThreads;       // 4-byte scale rows per thread
  static constexpr int kCPitch = BN + 8;              // bf16 per staged output row
  static constexpr int kSmemBytes =
      kStages * kStageBytes > BM * kCPitch * 2 ? kStages * kStageBytes : BM * kCPitch * 2;

  static_assert(BM % 16 == 0 && BM * 8 % kThreads == 0, "token chunks spread evenly");
  static_assert(BN % (16 * kWarps) == 0 && BN % kThreads == 0, "weight rows spread evenly");
  static_assert(BM <= kThreads, "row info is loaded one row per thread");
  static_assert(kStageBytes % 128 == 0, "stages stay 128-byte aligned");

  static GemmConfig config() {
    GemmConfig c{BM, BN, kBlockK, Stages, 1, kWarps};
    c.nvfp4 = true;
    return c;
  }
};


// Weight row (of the expert's B) that tile row r of column tile n_tile reads, or -1 past n.
// Gated GEMM1: tile rows 16f .. 16f + 7 are the gate rows and 16f + 8 .. 16f + 15 the up rows
// of output columns n_tile * BN / 2 + 8f .. + 7 (the epilogue's pairing).
template <int BN>
__device__ __forceinline__ int64_t w4a16_weight_row(const Sm80Params& p, bool gated, int n_tile,
                                                    int r) {
  if (gated) {
    const int64_t col = static_cast<int64_t>(n_tile) * (BN / 2) + (r / 16) * 8 + r % 8;
    return col < p.n ? gate_up_row(p.args.gate_up, col, (r % 16) >= 8) : -1;
  }
  const int64_t col = static_cast<int64_t>(n_tile) * BN + r;
  return col < p.n ? col : -1;
}

// ---------------------------------------------------------------------------------------
// Epilogue (both tiles), in fp32: * (128 * global), bias, LoRA, activation; staged as bf16 in
// the pipeline memory (every cp.async group waited for, then a barrier), then 16-byte stores of
// the tile's valid rows and columns. acc is the thread's MMA fragments (warp w: weight rows
// [w * kWarpRows, (w + 1) * kWarpRows), every token of the tile).
// ---------------------------------------------------------------------------------------
template <class Tile>
__device__ __forceinline__ void w4a16_epilogue(const Sm80Params& p,
                                               const float (&acc)[Tile::kMmaM][Tile::kMmaN][4],
                                               unsigned char* smem, const int32_t* s_lora_row,
                                               int expert, int n_tile, int row0, int rows) {
  constexpr int BN = Tile::kBlockN;
  const GemmArgs& g = p.args;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int gid = lane / 4;
  const int qid = lane % 4;
  const bool gemm1 = p.stage1 != 0;
  const bool gated = gemm1 && p.gated;

  __nv_bfloat16* sc = reinterpret_cast<__nv_bfloat16*>(smem);  // [BM][kCPitch]
  const int out_cols = gated ? BN / 2 : BN;
  const int64_t col0 = static_cast<int64_t>(n_tile) * out_cols;
  // NOTE: 128 * global is exact (a power of two); acc * it is the oracle's dot * global.
  const float gscale = __fmul_rn(g.b_global_scale[expert], nvfp4::kDecodeUnscale);
  const float* bias = g.bias ? g.bias + static_cast<int64_t>(expert) * g.bias_expert_stride
                             : nullptr;
  const Activation kind = static_cast<Activation>(g.activation.kind);
  const EpilogueActivation& ea = g.activation;
  const float alpha = gemm1 && ea.alpha_per_expert ? ea.alpha_per_expert[expert] : ea.alpha;
  const float beta = gemm1 && ea.beta_per_expert ? ea.beta_per_expert[expert] : ea.beta;
  const float limit = gemm1 && ea.limit_per_expert ? ea.limit_per_expert[expert] : ea.limit;

#pragma unroll
  for (int mi = 0; mi < Tile::kMmaM; ++mi) {
    if (gated) {
      const int j = (warp * Tile::kMmaM + mi) * 8 + gid;  // local output column
      const int64_t col = col0 + j;
      const bool col_ok = col < p.n;
      float bias_gate = 0.0f, bias_up = 0.0f;
      if (bias != nullptr && col_ok) {
        bias_gate = bias[gate_up_row(g.gate_up, col, false)];
        bias_up = bias[gate_up_row(g.gate_up, col, true)];
      }
#pragma unroll
      for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int t = ni * 8 + 2 * qid + c;  // token of the tile
          float gate = __fmul_rn(acc[mi][ni][c], gscale);
          float up = __fmul_rn(acc[mi][ni][2 + c], gscale);
          if (bias != nullptr) {
            gate = __fadd_rn(gate, bias_gate);
            up = __fadd_rn(up, bias_up);
          }
          const int32_t lora_row = s_lora_row[t];
          if (g.lora != nullptr && col_ok && lora_row >= 0) {
            const __nv_bfloat16* l = g.lora + static_cast<int64_t>(lora_row) * g.ld_lora;
            gate = __fadd_rn(gate, __bfloat162float(l[g.gate_up.lora_gate_col + col]));
            up = __fadd_rn(up, __bfloat162float(l[g.gate_up.lora_up_col + col]));
          }
          sc[t * Tile::kCPitch + j] =
              __float2bfloat16_rn(act::apply_activation(kind, gate, up, alpha, beta, limit));
        }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = warp * Tile::kWarpRows + mi * 16 + gid + 8 * h;  // local output column
        const int64_t col = col0 + j;
        const bool col_ok = col < p.n;
        const float b = (bias != nullptr && col_ok) ? bias[col] : 0.0f;
#pragma unroll
        for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int t = ni * 8 + 2 * qid + c;
            float x = __fmul_rn(acc[mi][ni][2 * h + c], gscale);
            if (bias != nullptr) x = __fadd_rn(x, b);
            if (gemm1) {
              const int32_t lora_row = s_lora_row[t];
              if (g.lora != nullptr && col_ok && lora_row >= 0) {
                x = __fadd_rn(x, __bfloat162float(
                                     g.lora[static_cast<int64_t>(lora_row) * g.ld_lora + col]));
              }
              x = act::apply_activation(kind, x, 0.0f, alpha, beta, limit);
            }
            sc[t * Tile::kCPitch + j] = __float2bfloat16_rn(x);
          }
      }
    }
  }
  __syncthreads();

  store_staged_tile<Tile>(sc, g, p.n, row0, rows, col0, out_cols, tid);
}

template <class Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    sm80_w4a16_grouped_gemm_kernel(const __grid_constant__ Sm80Params p) {
  constexpr int BM = Tile::kBlockM;
  constexpr int BN = Tile::kBlockN;
  constexpr int kThreads = Tile::kThreads;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int32_t s_a_row[BM];     // A row of each token of the tile; -1 past the expert's rows
  __shared__ int32_t s_lora_row[BM];  // GEMM1 standard: expanded index (LoRA delta row)

  const GemmArgs& g = p.args;
  const int tid = threadIdx.x;
  const bool gemm1 = p.stage1 != 0;

  // ---- which tile: the work list lives on the device, the grid is an upper bound ----
  Sm80TileRows t_rows;
  if (!sm80_tile_rows<BM>(p, static_cast<int>(blockIdx.x), s_a_row, s_lora_row, t_rows)) return;
  const int expert = t_rows.expert;
  const int row0 = t_rows.row0;
  const int rows = t_rows.rows;
  const int n_tile = static_cast<int>(blockIdx.y);
  const bool gated = gemm1 && p.gated;

  // ---- per-thread copy plan, fixed across the k-tiles ----
  // Every source is a valid address. A weight row past n copies row 0 of the expert (its
  // accumulators are never stored; no zero fill, so a copy is one 64-bit add per k-tile); a
  // token row without a token is zero-filled (its output row may be stored: a gather entry
  // of -1). Thread steps keep (row & 7) of the tokens fixed per thread: a thread's
  // destinations are its first one plus constants.
  // Tokens: chunk pairs (2c, 2c + 1) = one scale block (permute_token_pair), pair j % 4 of
  // token row j / 4 for j = tid + kThreads i; threads past the BM * 4 pairs copy none.
  constexpr int kXPairsAll = BM * 4;
  constexpr int kXCopiers = kXPairsAll < kThreads ? kXPairsAll : kThreads;
  constexpr int kXPairs = kXPairsAll / kXCopiers;  // per copying thread
  static_assert(kXPairs * kXCopiers == kXPairsAll && (kXCopiers / 4) % 8 == 0,
                "token pairs spread evenly, fixed swizzle term per thread");
  const bool x_copier = tid < kXCopiers;
  const int x_row0 = (tid % kXCopiers) / 4;
  const int x_pair = tid % 4;
  const __nv_bfloat16* x_src[kXPairs];  // the pair in k-tile 0 (row 0's: no token)
  bool x_zero[kXPairs];
#pragma unroll
  for (int i = 0; i < kXPairs; ++i) {
    const int32_t ar = s_a_row[x_row0 + i * (kXCopiers / 4)];
    x_src[i] = pinned(g.a + static_cast<int64_t>(ar >= 0 ? ar : 0) * g.lda + x_pair * 16);
    x_zero[i] = ar < 0;
  }
  // Chunk 2c (+ 1) of token t at t * 128 + (((2c (+ 1)) ^ (t & 7)) << 4).
  const uint32_t x_lo0 = pinned(Tile::kWBytes + Tile::kSBytes + x_row0 * 128 +
                                (((2 * x_pair) ^ (x_row0 & 7)) << 4));
  const uint32_t x_hi0 = pinned(Tile::kWBytes + Tile::kSBytes + x_row0 * 128 +
                                (((2 * x_pair + 1) ^ (x_row0 & 7)) << 4));
  constexpr int kXStep = kXCopiers / 4 * 128;  // destination step of pair i
  // Weight row of tile row r (gated: gate / up rows of 8 columns in turn), or -1 past n.
  auto weight_row = [&](int r) { return w4a16_weight_row<BN>(p, gated, n_tile, r); };
  const uint8_t* w_expert =
      reinterpret_cast<const uint8_t*>(g.b) + static_cast<int64_t>(expert) * g.b_expert_stride;
  const uint8_t* s_expert = g.b_block_scale + static_cast<int64_t>(expert) * g.b_block_scale_expert;
  // Packed weights: 16-byte chunk tid % 2 of tile rows tid / 2 + (kThreads / 2) i.
  const int w_chunk = tid % 2;
  const uint8_t* w_src[Tile::kWIters];
#pragma unroll
  for (int i = 0; i < Tile::kWIters; ++i) {
    const int64_t wr = weight_row(tid / 2 + i * (kThreads / 2));
    w_src[i] = pinned(w_expert + (wr >= 0 ? wr : 0) * g.ldb + w_chunk * 16);
  }
  const uint32_t w_dst0 = pinned((tid / 2) * 32 + w_chunk * 16);
  // Block scales: the 4 scales (4 bytes) of tile rows tid + kThreads i.
  const uint8_t* s_src[Tile::kSIters];
#pragma unroll
  for (int i = 0; i < Tile::kSIters; ++i) {
    const int64_t wr = weight_row(tid + i * kThreads);
    s_src[i] = pinned(s_expert + (wr >= 0 ? wr : 0) * g.b_block_scale_ld);
  }
  const uint32_t s_dst0 = pinned(Tile::kWBytes + tid * 4);

  const uint32_t smem_base = pinned(smem_u32(smem));
  const uint32_t smem_end = smem_base + Tile::kStages * Tile::kStageBytes;
  const int num_k_tiles = p.k / Tile::kBlockK;  // k % 64 == 0 (GemmDesc::validate)
  auto load_stage = [&](uint32_t stage, int k_tile) {
    const uint32_t k = static_cast<uint32_t>(k_tile);
    if (x_copier) {
#pragma unroll
      for (int i = 0; i < kXPairs; ++i) {
        cp_async_16_or_zero(stage + x_lo0 + i * kXStep, x_src[i] + k * 64, x_zero[i]);
        cp_async_16_or_zero(stage + x_hi0 + i * kXStep, x_src[i] + k * 64 + 8, x_zero[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < Tile::kWIters; ++i) {
      cp_async_16(stage + w_dst0 + i * (kThreads / 2) * 32, w_src[i] + k * 32, 16);
    }
#pragma unroll
    for (int i = 0; i < Tile::kSIters; ++i) {
      cp_async_4(stage + s_dst0 + i * kThreads * 4, s_src[i] + k * 4, 4);
    }
  };

  float acc[Tile::kMmaM][Tile::kMmaN][4];
#pragma unroll
  for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < num_k_tiles) load_stage(smem_base + s * Tile::kStageBytes, s);
    cp_async_commit();
  }

  const int warp = tid / 32;
  const int lane = tid % 32;
  const int gid = lane / 4;  // weight row (and +8) of a fragment; token of an n8 fragment
  const int qid = lane % 4;  // scale block of the stage; token pair of the accumulators
  // Shared-memory offsets inside a stage slot, fixed across the k-tiles (fragment mi and the
  // row + 8, token fragment ni: constant steps).
  const int r_lo0 = warp * Tile::kWarpRows + gid;  // row lo of fragment 0
  const uint32_t w_off = pinned(r_lo0 * 32 + qid * 8);  // + mi * 16 * 32 (+ 8 * 32: row hi)
  const uint32_t s_off = pinned(Tile::kWBytes + r_lo0 * 4 + qid);  // + mi * 16 * 4 (+ 8 * 4)
  // Token gid of n8 fragment ni, chunks 2q and 2q + 1 (t & 7 = gid): + ni * 8 * 128.
  const uint32_t x_off_lo =
      pinned(Tile::kWBytes + Tile::kSBytes + gid * 128 + (((2 * qid) ^ gid) << 4));
  const uint32_t x_off_hi =
      pinned(Tile::kWBytes + Tile::kSBytes + gid * 128 + (((2 * qid + 1) ^ gid) << 4));

  // One k-tile from the slot at sw: kN n8 fragments (kN = 1: the tile's rows fit in one; the
  // accumulators of the others belong to no token and are never stored).
  auto compute_k_tile = [&](uint32_t sw, auto n_frags) {
    constexpr int kN = decltype(n_frags)::value;
    const unsigned char* ss_ptr = smem + (sw - smem_base) + s_off;

    // Decode: af[mi][s] is the A fragment of MMA step s (a0..a3 as mma.sync numbers them).
    uint32_t af[Tile::kMmaM][4][4];
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi) {
      const uint2 w_lo = lds_64(sw + w_off + mi * 16 * 32);
      const uint2 w_hi = lds_64(sw + w_off + mi * 16 * 32 + 8 * 32);
      decode_fragment(w_lo, w_hi, scale_factors(ss_ptr[mi * 16 * 4], ss_ptr[mi * 16 * 4 + 8 * 4]),
                      af[mi]);
    }
    // Tokens: for each n8 fragment, token gid's K values [16q, 16q + 16) as the B fragments
    // of the 4 steps, then the MMAs.
#pragma unroll
    for (int ni = 0; ni < kN; ++ni) {
      uint32_t bf[4][2];
      token_fragments(sw + x_off_lo + ni * 8 * 128, sw + x_off_hi + ni * 8 * 128, bf);
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int mi = 0; mi < Tile::kMmaM; ++mi) mma_bf16_16816(acc[mi][ni], af[mi][s], bf[s]);
    }
  };

  uint32_t sw = smem_base;  // slot kt % Stages
  uint32_t sw_free = smem_base + (Tile::kStages - 1) * Tile::kStageBytes;  // (kt - 1) % Stages
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<Tile::kStages - 2>();
    // This thread's token pairs of k-tile kt landed (its own group): into fragment order.
    if (x_copier) {
#pragma unroll
      for (int i = 0; i < kXPairs; ++i) {
        permute_token_pair(sw + x_lo0 + i * kXStep, sw + x_hi0 + i * kXStep);
      }
    }
    __syncthreads();  // k-tile kt visible to all; slot (kt - 1) % Stages free to refill
    const int next = kt + Tile::kStages - 1;
    if (next < num_k_tiles) load_stage(sw_free, next);
    cp_async_commit();

    if (rows <= 8) {
      compute_k_tile(sw, std::integral_constant<int, 1>{});
    } else {
      compute_k_tile(sw, std::integral_constant<int, Tile::kMmaN>{});
    }
    sw_free = sw;
    sw = sw + Tile::kStageBytes == smem_end ? smem_base : sw + Tile::kStageBytes;
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline memory becomes the output staging tile

  w4a16_epilogue<Tile>(p, acc, smem, s_lora_row, expert, n_tile, row0, rows);
}


// ---------------------------------------------------------------------------------------
// The deep decode tile: 256 of K per stage, 8 warps, optional split-K (docs/nvfp4.md,
// "Deep decode tile")
// ---------------------------------------------------------------------------------------
//
// The decode, the MMAs and the K order inside every 64 of K are those of the kernel above; what
// changes is how much weight data one CTA keeps in flight and how many warps decode it:
//   - a stage holds 256 of K: 16 KB of packed weights per 128 rows, 2 KB of scales, 8 KB of
//     tokens; Stages - 1 stages are in flight (8 stages: 7 x 18 KB of weights and scales per
//     CTA, one CTA per SM, against 5 x 4.5 KB for the 64-K tile);
//   - 8 warps of 16 weight rows (one m16 fragment each), two per SM sub-partition, so one
//     warp's decode covers the other's shared-memory and MMA latencies;
//   - split-K, a run-time choice (Sm80Params::split_k, grid z): slice z computes the k-tiles
//     [z * kt / S, (z + 1) * kt / S) and writes its fp32 fragments to the scratch; the last CTA
//     of a tile to arrive (an arrival counter, zeroed by the work-list kernel) sums the S
//     fragments in slice order and runs the epilogue. The order does not depend on which CTA
//     arrives last: deterministic.
//
// Shared memory per stage slot:
//   W [BN][128] bytes   packed pairs of the stage's 256 K values; 16-byte chunk c (K values
//                       [32c, 32c + 32)) of row r at r * 128 + ((c ^ ((r & 3) << 1)) << 4).
//                       A half-warp's 8-byte reads (rows r = 4j + g, g = 0..3, one sub-block s,
//                       q = 0..3) land in chunks 2 (s ^ g) + (q >> 1): 128 distinct bytes.
//   S [BN][16] e4m3     row r's 16 block scales at r * 16
//   X [4][BM][64] bf16  sub-block s (K values [64s, 64s + 64)) in the layout of the 64-K tile:
//                       token t, chunk c at s * BM * 128 + t * 128 + ((c ^ (t & 7)) << 4)
// Epilogue staging reuses the pipeline memory: C [BM][BN + 8] bf16.
//
// Sub-block s of a stage is a stage of the 64-K tile: the same fragments, the same K
// permutation for weights and tokens, the same MMA order per accumulator. Without split-K each
// accumulator therefore sees the 64-K tile's sequence of MMAs and the two tiles agree bit for
// bit; split-K only regroups the fp32 sum (slices, then their sum in slice order).
// K tails (K % 256 = 64, 128, 192; K % 64 == 0): the last k-tile's missing chunks are not
// copied and its missing sub-blocks are not computed (a uniform branch).
// Tokens: rows without a token (past the tile's rows, or a gather entry of -1) are zeroed once
// in every slot and never copied; n8 fragments past the tile's rows are skipped (T <= 8).

template <int BM, int BN, int Stages, int Warps>
struct W4a16DeepTile {
  static constexpr int kBlockM = BM;  // tokens
  static constexpr int kBlockN = BN;  // weight rows
  static constexpr int kBlockK = 256;  // K values per stage: 16 scale blocks, 128 packed bytes
  static constexpr int kSubK = 64;     // a stage of the 64-K tile
  static constexpr int kSubs = kBlockK / kSubK;
  static constexpr int kStages = Stages;
  static constexpr int kWarps = Warps;
  static constexpr int kThreads = 32 * Warps;
  static constexpr int kMinBlocks = 1;
  static constexpr int kWarpRows = BN / Warps;  // weight rows per warp
  static constexpr int kMmaM = kWarpRows / 16;  // m16 fragments per warp
  static constexpr int kMmaN = BM / 8;          // n8 fragments (tokens)
  static constexpr int kWBytes = BN * 128;
  static constexpr int kSBytes = BN * 16;
  static constexpr int kXSubBytes = BM * 128;
  static constexpr int kXBytes = kSubs * kXSubBytes;
  static constexpr int kStageBytes = kWBytes + kSBytes + kXBytes;
  static constexpr int kWIters = BN * 8 / kThreads;   // 16-byte weight chunks per thread
  static constexpr int kSIters = BN * 4 / kThreads;   // 4-byte scale words per thread
  static constexpr int kCPitch = BN + 8;
  static constexpr int kSmemBytes =
      kStages * kStageBytes > BM * kCPitch * 2 ? kStages * kStageBytes : BM * kCPitch * 2;
  // Split-K: a tile's fp32 fragment, float4 j of thread t at (j * kThreads + t) * 4.
  static constexpr int kAccFloats = kMmaM * kMmaN * 4;
  static constexpr int kSplitUnitFloats = BM * BN;

  static_assert(kWarpRows % 16 == 0 && kMmaM >= 1, "whole m16 fragments per warp");
  static_assert(kWIters * kThreads == BN * 8 && kSIters * kThreads == BN * 4,
                "copies spread evenly over the threads");
  static_assert(kThreads % 32 == 0 && BM % 8 == 0 && BM <= kThreads, "token rows");
  static_assert(kStageBytes % 128 == 0, "stages stay 128-byte aligned");
  static_assert(kAccFloats * kThreads == kSplitUnitFloats, "the split unit is the tile");

  static GemmConfig config() {
    GemmConfig c{BM, BN, kBlockK, Stages, 1, Warps};
    c.nvfp4 = true;
    return c;
  }
};

__device__ __forceinline__ uint32_t u4_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <class Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    sm80_w4a16_deep_grouped_gemm_kernel(const __grid_constant__ Sm80Params p) {
  constexpr int BM = Tile::kBlockM;
  constexpr int BN = Tile::kBlockN;
  constexpr int BK = Tile::kBlockK;
  constexpr int kThreads = Tile::kThreads;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int32_t s_a_row[BM];     // A row of each token of the tile; -1: no token
  __shared__ int32_t s_lora_row[BM];  // GEMM1 standard: expanded index (LoRA delta row)
  __shared__ int s_last;              // split-K: this CTA sums the slices

  const GemmArgs& g = p.args;
  const int tid = threadIdx.x;
  const bool gated = p.stage1 != 0 && p.gated;

  Sm80TileRows t_rows;
  if (!sm80_tile_rows<BM>(p, static_cast<int>(blockIdx.x), s_a_row, s_lora_row, t_rows)) return;
  const int expert = t_rows.expert;
  const int rows = t_rows.rows;
  const int n_tile = static_cast<int>(blockIdx.y);
  const int slice = static_cast<int>(blockIdx.z);
  const int split = p.split_k;
  const int num_k_tiles = (p.k + BK - 1) / BK;  // the last one holds 64..256 of K
  const int kt_begin = slice * num_k_tiles / split;
  const int num_local = (slice + 1) * num_k_tiles / split - kt_begin;

  // ---- per-thread copy plan, fixed across the k-tiles ----
  // Weight sources are valid addresses for every row: a row past n copies row 0 of the expert
  // (its accumulators are never stored; no zero fill, so a copy is one 64-bit add per k-tile).
  // Thread steps keep (row & 7) (tokens) and (row & 3) (weights) fixed per thread: the
  // destinations of a thread's copies are its first one plus constants.
  // Tokens: chunk pairs (2c, 2c + 1) = one scale block (permute_token_pair): pair j % 16
  // (sub-block (j % 16) / 4, block j % 4) of token row j / 16 for j = tid + kThreads i;
  // threads past the BM * 16 pairs copy none. A row without a token is never copied (zeroed
  // once below).
  constexpr int kXPairsAll = BM * 16;
  constexpr int kXCopiers = kXPairsAll < kThreads ? kXPairsAll : kThreads;
  constexpr int kXPairs = kXPairsAll / kXCopiers;  // per copying thread
  constexpr int kWRowStep = kThreads / 8;
  constexpr int kSRowStep = kThreads / 4;
  static_assert(kXPairs * kXCopiers == kXPairsAll && (kXCopiers / 16) % 8 == 0 &&
                    kWRowStep % 4 == 0,
                "token pairs spread evenly, fixed swizzle terms per thread");
  const bool x_copier = tid < kXCopiers;
  const int x_row0 = (tid % kXCopiers) / 16;
  const int x_pair = tid % 16;
  const __nv_bfloat16* x_src[kXPairs];  // the pair in k-tile 0 (row 0's: no token)
  bool x_ok[kXPairs];
#pragma unroll
  for (int i = 0; i < kXPairs; ++i) {
    const int32_t ar = s_a_row[x_row0 + i * (kXCopiers / 16)];
    x_ok[i] = x_copier && ar >= 0;
    x_src[i] = pinned(g.a + static_cast<int64_t>(ar >= 0 ? ar : 0) * g.lda + x_pair * 16);
  }
  // Chunk c of sub-block s of token t at s * kXSubBytes + t * 128 + ((c ^ (t & 7)) << 4).
  const uint32_t x_lo0 =
      pinned(Tile::kWBytes + Tile::kSBytes + (x_pair / 4) * Tile::kXSubBytes + x_row0 * 128 +
             (((2 * (x_pair % 4)) ^ (x_row0 & 7)) << 4));
  const uint32_t x_hi0 =
      pinned(Tile::kWBytes + Tile::kSBytes + (x_pair / 4) * Tile::kXSubBytes + x_row0 * 128 +
             (((2 * (x_pair % 4) + 1) ^ (x_row0 & 7)) << 4));
  constexpr int kXStep = kXCopiers / 16 * 128;  // destination step of pair i
  const uint8_t* w_expert =
      reinterpret_cast<const uint8_t*>(g.b) + static_cast<int64_t>(expert) * g.b_expert_stride;
  const uint8_t* s_expert = g.b_block_scale + static_cast<int64_t>(expert) * g.b_block_scale_expert;
  // Packed weights: 16-byte chunk tid % 8 of tile rows tid / 8 + kWRowStep i.
  const int w_chunk = tid % 8;
  const uint8_t* w_src[Tile::kWIters];
#pragma unroll
  for (int i = 0; i < Tile::kWIters; ++i) {
    const int64_t wr = w4a16_weight_row<BN>(p, gated, n_tile, tid / 8 + i * kWRowStep);
    w_src[i] = pinned(w_expert + (wr >= 0 ? wr : 0) * g.ldb + w_chunk * 16);
  }
  const uint32_t w_dst0 = pinned((tid / 8) * 128 + ((w_chunk ^ (((tid / 8) & 3) << 1)) << 4));
  // Block scales: 4-byte word tid % 4 (the scales of 64 of K) of tile rows tid / 4 + kSRowStep i.
  const int s_word = tid % 4;
  const uint8_t* s_src[Tile::kSIters];
#pragma unroll
  for (int i = 0; i < Tile::kSIters; ++i) {
    const int64_t wr = w4a16_weight_row<BN>(p, gated, n_tile, tid / 4 + i * kSRowStep);
    s_src[i] = pinned(s_expert + (wr >= 0 ? wr : 0) * g.b_block_scale_ld + s_word * 4);
  }
  const uint32_t s_dst0 = pinned(Tile::kWBytes + (tid / 4) * 16 + s_word * 4);

  // Token rows without a token: zero in every slot, once (st.shared; the first barrier of the
  // mainloop orders them before any read). cp.async never writes them.
  for (int idx = tid; idx < Tile::kStages * Tile::kSubs * BM * 8; idx += kThreads) {
    const int t = (idx / 8) % BM;
    if (s_a_row[t] >= 0) continue;
    const int slot_sub = idx / (8 * BM);  // slot * kSubs + sub
    const int slot = slot_sub / Tile::kSubs;
    const int sub = slot_sub % Tile::kSubs;
    *reinterpret_cast<uint4*>(smem + slot * Tile::kStageBytes + Tile::kWBytes + Tile::kSBytes +
                              sub * Tile::kXSubBytes + t * 128 + (idx % 8) * 16) =
        make_uint4(0u, 0u, 0u, 0u);
  }

  const uint32_t smem_base = pinned(smem_u32(smem));
  const uint32_t smem_end = smem_base + Tile::kStages * Tile::kStageBytes;
  // A chunk is copied only where its K values exist (K % 64 == 0: a chunk is all in or all
  // out); the test is made once per k-tile for a full one (every chunk in).
  auto load_stage = [&](uint32_t stage, int k_tile) {
    const uint32_t k = static_cast<uint32_t>(k_tile);
    auto copy = [&](bool x_in, bool w_in, bool s_in) {
#pragma unroll
      for (int i = 0; i < kXPairs; ++i) {
        if (x_ok[i] && x_in) {
          const __nv_bfloat16* src = x_src[i] + k * BK;
          cp_async_16(stage + x_lo0 + i * kXStep, src, 16);
          cp_async_16(stage + x_hi0 + i * kXStep, src + 8, 16);
        }
      }
      if (w_in) {
#pragma unroll
        for (int i = 0; i < Tile::kWIters; ++i) {
          cp_async_16(stage + w_dst0 + i * kWRowStep * 128, w_src[i] + k * (BK / 2), 16);
        }
      }
      if (s_in) {
#pragma unroll
        for (int i = 0; i < Tile::kSIters; ++i) {
          cp_async_4(stage + s_dst0 + i * kSRowStep * 16, s_src[i] + k * (BK / 16), 4);
        }
      }
    };
    const int k0 = k_tile * BK;
    if (k0 + BK <= p.k) {
      copy(true, true, true);
    } else {
      copy(k0 + x_pair * 16 < p.k, k0 + w_chunk * 32 < p.k, k0 + s_word * 64 < p.k);
    }
  };

  float acc[Tile::kMmaM][Tile::kMmaN][4];
#pragma unroll
  for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < num_local) load_stage(smem_base + s * Tile::kStageBytes, kt_begin + s);
    cp_async_commit();
  }

  const int warp = tid / 32;
  const int lane = tid % 32;
  const int gid = lane / 4;  // weight row (and +8) of a fragment; token of an n8 fragment
  const int qid = lane % 4;  // scale block of a sub-block; token pair of the accumulators
  // The 8 packed bytes of (row, sub-block s) that lane (gid, qid) decodes, at row * 128 + this
  // (rows of a fragment are 4j + gid % 4: the swizzle term is the lane's).
  auto w_offset = [&](int s) -> uint32_t {
    return ((((2 * s) + (qid >> 1)) ^ ((gid & 3) << 1)) << 4) + (qid & 1) * 8;
  };
  // Shared-memory offsets inside a stage slot, fixed across the k-tiles; fragment mi, the row
  // + 8, sub-block s of the tokens and token fragment ni are constant steps from them.
  const int r_lo0 = warp * Tile::kWarpRows + gid;  // row lo of fragment 0
  uint32_t w_off[Tile::kSubs];                     // + mi * 16 * 128 (+ 8 * 128: row hi)
#pragma unroll
  for (int s = 0; s < Tile::kSubs; ++s) w_off[s] = pinned(r_lo0 * 128 + w_offset(s));
  const uint32_t s_off = pinned(Tile::kWBytes + r_lo0 * 16);  // + mi * 16 * 16 (+ 8 * 16)
  // Token gid of n8 fragment ni (t & 7 = gid), chunks 2q and 2q + 1 of sub-block s:
  // + s * kXSubBytes + ni * 8 * 128.
  const uint32_t x_off_lo =
      pinned(Tile::kWBytes + Tile::kSBytes + gid * 128 + (((2 * qid) ^ gid) << 4));
  const uint32_t x_off_hi =
      pinned(Tile::kWBytes + Tile::kSBytes + gid * 128 + (((2 * qid + 1) ^ gid) << 4));
  // Byte qid of the row-lo word (bits 7:0) and of the row-hi word (bits 15:8).
  const uint32_t scale_sel = pinned(static_cast<uint32_t>(qid | ((qid + 4) << 4)));

  // One k-tile from the slot at sw: kN n8 fragments computed (the tile's tokens fit in them,
  // or kTail: the fragments past the tile's rows skipped at run time), kTail: the sub-blocks
  // past K skipped. Three variants (a uniform choice per k-tile) so that the steady state
  // tests neither per sub-block nor per fragment.
  auto compute_k_tile = [&](uint32_t sw, int k0, auto n_frags, auto tail) {
    constexpr int kN = decltype(n_frags)::value;
    constexpr bool kTail = decltype(tail)::value;
    // The 16 block scales of each of the thread's rows (a broadcast over the 4 lanes of a row).
    uint4 sc_lo[Tile::kMmaM], sc_hi[Tile::kMmaM];
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi) {
      sc_lo[mi] = lds_128(sw + s_off + mi * 16 * 16);
      sc_hi[mi] = lds_128(sw + s_off + mi * 16 * 16 + 8 * 16);
    }
#pragma unroll
    for (int s = 0; s < Tile::kSubs; ++s) {
      if (kTail && k0 + s * Tile::kSubK >= p.k) break;  // K tail: uniform over the CTA
      // Decode: af[mi][step] as in the 64-K tile.
      uint32_t af[Tile::kMmaM][4][4];
#pragma unroll
      for (int mi = 0; mi < Tile::kMmaM; ++mi) {
        const uint2 w_lo = lds_64(sw + w_off[s] + mi * 16 * 128);
        const uint2 w_hi = lds_64(sw + w_off[s] + mi * 16 * 128 + 8 * 128);
        const uint32_t k = scale_factors_pair(
            __byte_perm(u4_word(sc_lo[mi], s), u4_word(sc_hi[mi], s), scale_sel));
        decode_fragment(w_lo, w_hi, k, af[mi]);
      }
#pragma unroll
      for (int ni = 0; ni < kN; ++ni) {
        if ((kTail || ni >= 2) && ni * 8 >= rows) break;  // no token in this fragment (uniform)
        uint32_t bf[4][2];
        token_fragments(sw + x_off_lo + s * Tile::kXSubBytes + ni * 8 * 128,
                        sw + x_off_hi + s * Tile::kXSubBytes + ni * 8 * 128, bf);
#pragma unroll
        for (int st = 0; st < 4; ++st)
#pragma unroll
          for (int mi = 0; mi < Tile::kMmaM; ++mi) mma_bf16_16816(acc[mi][ni], af[mi][st], bf[st]);
      }
    }
  };
  using One = std::integral_constant<int, 1>;
  using All = std::integral_constant<int, Tile::kMmaN>;

  uint32_t sw = smem_base;  // slot it % Stages
  uint32_t sw_free = smem_base + (Tile::kStages - 1) * Tile::kStageBytes;  // (it - 1) % Stages
  for (int it = 0; it < num_local; ++it) {
    cp_async_wait<Tile::kStages - 2>();
    const int k0 = (kt_begin + it) * BK;
    // This thread's token pairs of k-tile it landed (its own group): into fragment order.
    // Rows without a token (zeroed by other threads before the first barrier) and pairs past
    // K (not copied) are left alone.
#pragma unroll
    for (int i = 0; i < kXPairs; ++i) {
      if (x_ok[i] && k0 + x_pair * 16 < p.k) {
        permute_token_pair(sw + x_lo0 + i * kXStep, sw + x_hi0 + i * kXStep);
      }
    }
    __syncthreads();  // k-tile it visible to all; slot (it - 1) % Stages free to refill
    const int next = it + Tile::kStages - 1;
    if (next < num_local) load_stage(sw_free, kt_begin + next);
    cp_async_commit();

    if (k0 + BK > p.k) {
      compute_k_tile(sw, k0, All{}, std::true_type{});
    } else if (rows <= 8) {
      compute_k_tile(sw, k0, One{}, std::false_type{});
    } else {
      compute_k_tile(sw, k0, All{}, std::false_type{});
    }
    sw_free = sw;
    sw = sw + Tile::kStageBytes == smem_end ? smem_base : sw + Tile::kStageBytes;
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline memory becomes the output staging tile

  if (split > 1) {
    // ---- split-K: publish this slice; the last CTA of the tile sums all in slice order ----
    // scratch [tiles * split][kSplitUnitFloats] fp32, tile id = blockIdx.x * n_tiles + n_tile
    const int64_t tile_id = static_cast<int64_t>(blockIdx.x) * gridDim.y + n_tile;
    float* mine = g.split_partials + (tile_id * split + slice) * Tile::kSplitUnitFloats;
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
      for (int ni = 0; ni < Tile::kMmaN; ++ni) {
        const int j = mi * Tile::kMmaN + ni;
        __stcg(reinterpret_cast<float4*>(mine + (j * kThreads + tid) * 4),
               make_float4(acc[mi][ni][0], acc[mi][ni][1], acc[mi][ni][2], acc[mi][ni][3]));
      }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      const int old = atomicAdd(g.split_counters + tile_id, 1);  // an arrival count only
      s_last = old == split - 1;
    }
    __syncthreads();
    if (s_last == 0) return;
    __threadfence();
    float sum[Tile::kMmaM][Tile::kMmaN][4];
    for (int z = 0; z < split; ++z) {
      const float* part = g.split_partials + (tile_id * split + z) * Tile::kSplitUnitFloats;
#pragma unroll
      for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tile::kMmaN; ++ni) {
          float v[4];
          if (z == slice) {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] = acc[mi][ni][e];
          } else {
            const float4 f = __ldcg(reinterpret_cast<const float4*>(
                part + ((mi * Tile::kMmaN + ni) * kThreads + tid) * 4));
            v[0] = f.x;
            v[1] = f.y;
            v[2] = f.z;
            v[3] = f.w;
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sum[mi][ni][e] = z == 0 ? v[e] : __fadd_rn(sum[mi][ni][e], v[e]);
          }
        }
    }
#pragma unroll
    for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
      for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = sum[mi][ni][e];
  }

  w4a16_epilogue<Tile>(p, acc, smem, s_lora_row, expert, n_tile, t_rows.row0, rows);
}

}  // namespace modmoe::cuda::gemm
