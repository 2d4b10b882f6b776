// Grouped BF16 GEMM for Hopper (sm_90a): TMA + wgmma, warp-specialized, persistent.
//
// "Swap AB": the weights are the wgmma A operand and the tokens the B operand, so a tile is
// 128 weight rows (output features; 64 per consumer warpgroup) by up to kBlockM tokens:
//   D^T [128 features, tokens] = W[e] [128 features, K] x X^T [K, tokens].
// Few tokens per expert (decode) then means a narrow wgmma N (16..64), not a padded M.
//
// Warp roles (384 threads, one CTA per SM):
//   warpgroup 0  producer (setmaxnreg 40): thread 0 loads the weight tile of each k-block with
//                one TMA from a 3D tensor map [E_local, rows, K] (the expert is a coordinate).
//                Token rows: where they are contiguous (GEMM2, batched GEMM1) thread 0 loads
//                them too, with kNStep-row TMA boxes of a 2D map over the row space; where they
//                are gathered (GEMM1: row = permuted_idx_to_expanded_idx / top_k, so the
//                permuted activations are never materialised) all 128 threads copy them with
//                16-byte cp.async into the 128-byte-swizzled layout and signal with
//                cp.async.mbarrier.arrive.noinc.
//   warpgroups 1, 2  consumers (setmaxnreg 232): m64nNk16 wgmma over the stage, then the
//                epilogue (bias, LoRA, activation, bf16), staged through shared memory with
//                stmatrix.trans and written as 16-byte row chunks.
// The pipeline is kStages deep: full[s] (gathered rows: 129 arrivals, 128 cp.async + the
// TMA's expect_tx; TMA rows: 1; plus the TMA bytes) and empty[s] (8 arrivals: lane 0 of each
// consumer warp after its wgmma reading stage s completed).
//
// Work list: units u in [blockIdx.x, total) step gridDim.x; u = tile * split_k + slice;
// tiles are (expert, row tile, column tile), experts in order, and inside an expert groups of
// 8 column tiles with every row tile of the expert (so CTAs running at the same time share
// weight and token tiles in L2). The counts come from tile_offsets on the device; the grid is
// min(#SMs, upper bound), so nothing waits on the host.
//
// Per-tile N: a tile with r valid rows runs the smallest compiled wgmma N >= r (multiples of
// kNStep), so a 20-row tail costs a 32-wide MMA, not a kBlockM-wide one.
//
// Tail rows (run-time option p.tail, GemmConfig::tail_m): the last row tile of an expert may
// hold up to kBlockM + kTail rows (kTail = kNStep). Such a tile runs the kBlockM-wide MMA and a
// second kTail-wide MMA on rows kBlockM.. of the same stage, with its own accumulators: the
// weight tile is read once for all of them. Without it, an expert with 256 + 20 rows costs a
// full tile plus a 20-row tile that streams the whole weight tile again for a 32-wide MMA
// (bound by the L2 -> SM rate, ~40 % of a full tile's time). The work list counts such tiles
// with row_tiles() (grouped_gemm.h).
//
// Split-K (decode; every tile has <= 16 rows): slice s of a tile accumulates k-blocks
// [s * KB / S, (s + 1) * KB / S), writes its fp32 fragment to the scratch, and the CTA that
// completes the tile's arrival count sums the S fragments in slice order, then runs the
// epilogue: the same bits whichever CTA finishes last.
//
// GEMM1 gated requires the GateUpInterleaved layout with G = 8: in the accumulator a thread
// holds feature rows r and r + 8 of its warp's 16-row slice, which are then the gate and up
// rows of one intermediate column, so the activation needs no data exchange.
//
// Shared memory (dynamic, 1024-byte aligned):
//   W      [kStages][128][64] bf16   16 KB per stage, TMA 128-byte swizzle
//   X      [kStages][kMaxRows][64] bf16  kMaxRows * 128 B per stage (kMaxRows = kBlockM +
//                                       kTail), same swizzle (TMA, or by hand for cp.async:
//                                       chunk c of row r at c ^ (r % 8))
//   stage  [2][kStagingTokens][72] bf16  epilogue staging, one per consumer warpgroup
//   xsrc   [kMaxRows] uint64           producer (gather): address of each token row, 0 none
//   bars   full[kStages], empty[kStages] uint64; flag int32
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "core/activation_math.h"
#include "cuda/device/sm90_ptx.cuh"
#include "cuda/device/sm90_wgmma.cuh"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/w4a16_decode.cuh"

namespace modmoe::cuda::gemm {

// StagingTokens: tokens per epilogue staging round (the staging memory is what is left once
// the stages, with their tail rows, are carved: 32 tokens in both tiles).
// Fp8: e4m3 operands (m64nNk32 wgmma, 128 elements per k-block: the same 128-byte rows), the
// per-k-block scales of docs/fp8.md, no tail rows; see sm90_mainloop_fp8.
// FP8 with more than 128 tokens (kFastAccum): the FP8 fast-accumulation tile (opt-in,
// ExpertsOptions::fp8_fast_accum; the Fp8PerTensor GEMM1 only, docs/fp8.md "FP8 fast
// accumulation"): sm90_mainloop_fp8_fast, the scales in the epilogue. A compile-time property
// of the tile: the other tiles' kernels compile none of it.
template <int BlockM, int Stages, int StagingTokens, bool Fp8 = false>
struct Sm90Tile {
  static constexpr bool kFp8 = Fp8;
  static constexpr bool kNvfp4 = false;
  // The promoted loop's two accumulator sets would take kBlockM registers per thread past 128
  // tokens; fast accumulation needs one.
  static constexpr bool kFastAccum = Fp8 && BlockM > 128;
  static constexpr int kElemBytes = Fp8 ? 1 : 2;
  static constexpr int kRowBytes = 128;   // one 128-byte swizzle row per operand row and k-block
  static constexpr int kBlockM = BlockM;  // tokens per tile (without the tail rows)
  static constexpr int kBlockN = 128;     // weight rows per tile
  static constexpr int kBlockK = kRowBytes / kElemBytes;  // 64 bf16 or 128 e4m3
  static constexpr int kWCoordK = kBlockK;  // the weight map's dim-0 coordinate per k-block
  static constexpr int kKSteps = 4;       // wgmma k-steps per k-block (32 bytes of K each)
  static constexpr int kStages = Stages;
  static constexpr int kThreads = 384;
  static constexpr int kNStep = BlockM >= 128 ? 32 : 16;  // granularity of the per-tile N
  static constexpr int kTail = Fp8 ? 0 : kNStep;  // rows a tile may hold past kBlockM (p.tail)
  static constexpr int kMaxRows = BlockM + kTail;
  // Variants 0 .. kNumVariants - 1: N = (v + 1) * kNStep; variant kNumVariants: the tail.
  static constexpr int kNumVariants = BlockM / kNStep;
  static constexpr int kAccRegs = BlockM / 2;  // fp32 accumulators per consumer thread
  static constexpr int kTailRegs = Fp8 ? 1 : kTail / 2;  // and those of the tail rows
  static constexpr int kWStageBytes = kBlockN * kRowBytes;
  static constexpr int kXStageBytes = kMaxRows * kRowBytes;
  static constexpr int kStagingTokens = StagingTokens;
  static constexpr int kStagingPitch = 144;  // bytes: 64 features + 16 bytes of pad
  static constexpr int kStagingBytes = kStagingTokens * kStagingPitch;
  static constexpr int kWOffset = 0;
  static constexpr int kXOffset = kStages * kWStageBytes;
  static constexpr int kStagingOffset = kXOffset + kStages * kXStageBytes;
  static constexpr int kXRowOffset = kStagingOffset + 2 * kStagingBytes;
  // FP8: each stage's token scales [kStages][kMaxRows] fp32 (k-block kb of every row), and the
  // address of each row's scales [kMaxRows] uint64 (0: none).
  static constexpr int kScaleOffset = kXRowOffset + kMaxRows * 8;
  static constexpr int kScaleStageFloats = Fp8 ? kMaxRows : 0;
  static constexpr int kScaleRowOffset = kScaleOffset + kStages * kScaleStageFloats * 4;
  // kFastAccum: the tile's token scales, one copy per consumer warpgroup [2][kBlockM] fp32
  // (kBlockM / 4 registers per thread would not fit next to the kBlockM / 2 accumulators).
  static constexpr int kTokScaleOffset = kScaleRowOffset + (Fp8 ? kMaxRows * 8 : 0);
  static constexpr int kTokScaleBytes = kFastAccum ? 2 * kBlockM * 4 : 0;
  static constexpr int kBarOffset = kTokScaleOffset + kTokScaleBytes;
  static constexpr int kFlagOffset = kBarOffset + 2 * kStages * 8;
  static constexpr int kSmemBytes = kFlagOffset + 16 + 1024;  // + 1024: alignment slack

  static_assert(kXStageBytes % 1024 == 0, "X stages must stay 1024-byte aligned");
  static_assert((kBlockM * kRowBytes) % 1024 == 0, "tail rows must start 1024-byte aligned");
  static_assert(BlockM % kNStep == 0 && kNStep % 16 == 0, "N variants in 16-token pairs");
  static_assert(kStagingTokens % 16 == 0 && BlockM % kStagingTokens == 0, "staging rounds");
  static_assert(kBarOffset % 8 == 0, "mbarriers are 8-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");

  static GemmConfig config() { return {BlockM, kBlockN, kBlockK, Stages, 2, 1, 90, 1}; }
};

// The W4A16 variant (NVFP4 weights, bf16 tokens; docs/nvfp4.md "Hopper wgmma kernel"): the
// token side is Sm90Tile's bf16 one (kBlockK = 64, 128-byte swizzled rows, tail rows); the weight
// side of a stage is the packed tile [128 rows][32 bytes] (TMA, no swizzle) and its block scales
// [128 rows][4] e4m3 (cp.async by the producer warpgroup, one row per thread). The consumers
// decode A into registers (wgmma with A from registers, B from shared memory). No split-K.
// Shared memory (dynamic, 1024-byte aligned):
//   X      [kStages][kMaxRows][64] bf16  kMaxRows * 128 B per stage, 128-byte swizzle
//   W      [kStages][128][32] uint8      4 KB per stage: row r at r * 32 (bytes = K / 2)
//   S      [kStages][128][4] e4m3        512 B per stage: row r's 4 block scales at r * 4
//   stage  [2][kStagingTokens][72] bf16  epilogue staging, one per consumer warpgroup
//   xsrc   [kMaxRows] uint64             producer (gather): address of each token row, 0 none
//   bars   full[kStages], empty[kStages] uint64; flag int32
template <int BlockM, int Stages, int StagingTokens>
struct Sm90W4a16Tile {
  static constexpr bool kFp8 = false;
  static constexpr bool kNvfp4 = true;
  static constexpr bool kFastAccum = false;
  static constexpr int kElemBytes = 2;    // tokens
  static constexpr int kRowBytes = 128;   // token row bytes per k-block
  static constexpr int kBlockM = BlockM;  // tokens per tile (without the tail rows)
  static constexpr int kBlockN = 128;     // weight rows per tile
  static constexpr int kBlockK = 64;      // 4 scale blocks, 32 packed bytes per weight row
  static constexpr int kWCoordK = kBlockK / 2;  // the packed map's dim 0 counts bytes
  static constexpr int kKSteps = 4;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = 384;
  static constexpr int kNStep = 32;
  static constexpr int kTail = kNStep;
  static constexpr int kMaxRows = BlockM + kTail;
  static constexpr int kNumVariants = BlockM / kNStep;
  static constexpr int kAccRegs = BlockM / 2;
  static constexpr int kTailRegs = kTail / 2;
  static constexpr int kWRowBytes = kBlockK / 2;
  static constexpr int kWStageBytes = kBlockN * kWRowBytes;
  static constexpr int kSStageBytes = kBlockN * (kBlockK / 16);
  static constexpr int kXStageBytes = kMaxRows * kRowBytes;
  static constexpr int kStagingTokens = StagingTokens;
  static constexpr int kStagingPitch = 144;
  static constexpr int kStagingBytes = kStagingTokens * kStagingPitch;
  static constexpr int kXOffset = 0;
  static constexpr int kWOffset = kXOffset + kStages * kXStageBytes;
  static constexpr int kSOffset = kWOffset + kStages * kWStageBytes;
  static constexpr int kStagingOffset = kSOffset + kStages * kSStageBytes;
  static constexpr int kXRowOffset = kStagingOffset + 2 * kStagingBytes;
  // FP8 names the kernel's producer refers to (unused: no per-row token scales).
  static constexpr int kScaleOffset = kXRowOffset + kMaxRows * 8;
  static constexpr int kScaleStageFloats = 0;
  static constexpr int kScaleRowOffset = kScaleOffset;
  static constexpr int kBarOffset = kScaleRowOffset;
  // bars: full[kStages], empty[kStages] (the tokens, read by wgmma: lane 0 of each consumer
  // warp once its wgmma of the stage completed), and a_empty[kStages] (the packed weights and
  // block scales, read by ld.shared: every consumer thread right after its own reads, 256
  // arrivals). The producers rewrite a stage's weights and scales after both.
  static constexpr int kAEmptyOffset = kBarOffset + 2 * kStages * 8;
  static constexpr int kFlagOffset = kAEmptyOffset + kStages * 8;
  static constexpr int kSmemBytes = kFlagOffset + 16 + 1024;

  static_assert(kXStageBytes % 1024 == 0, "X stages must stay 1024-byte aligned");
  static_assert((kBlockM * kRowBytes) % 1024 == 0, "tail rows must start 1024-byte aligned");
  static_assert(kWOffset % 128 == 0 && kWStageBytes % 128 == 0, "TMA destinations");
  static_assert(BlockM % kNStep == 0, "N variants");
  static_assert(kStagingTokens % 16 == 0 && BlockM % kStagingTokens == 0, "staging rounds");
  static_assert(kBarOffset % 8 == 0, "mbarriers are 8-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");

  static GemmConfig config() {
    GemmConfig c{BlockM, kBlockN, kBlockK, Stages, 2, 1, 90, 1};
    c.nvfp4 = true;
    return c;
  }
};

struct Sm90Params {
  CUtensorMap tmap_w;  // weights [E_local, b_rows, k] bf16 / e4m3: dims (k, b_rows, E_local)
  CUtensorMap tmap_x;  // x_tma (bf16 only): token rows [rows, k]: dims (k, rows), box (64, kNStep)
  GemmArgs args;
  int x_tma;        // token rows by TMA (no gather), else cp.async
  int num_experts;  // E_local
  int n;            // output columns (gated: I)
  int k;            // reduction length
  int b_rows;       // weight rows per expert (gated: 2n)
  int n_tiles;      // ceil(b_rows / 128)
  int split_k;
  int gated;
  int tail;  // the last row tile of an expert holds up to kBlockM + kTail rows (row_tiles())
};

// Host: the fields of Sm90Params that every sm90 tile fills alike (the tensor maps and x_tma
// are the launcher's).
inline void sm90_fill_params(Sm90Params& p, const GemmDesc& desc, const GemmConfig& config,
                             const GemmArgs& args, int64_t n_tiles) {
  p.args = args;
  p.num_experts = desc.num_experts;
  p.n = static_cast<int>(desc.n);
  p.k = static_cast<int>(desc.k);
  p.b_rows = static_cast<int>(desc.b_rows());
  p.n_tiles = static_cast<int>(n_tiles);
  p.split_k = config.split_k;
  p.gated = desc.gated ? 1 : 0;
  p.tail = config.tail_m > 0 ? 1 : 0;
}

// Split-K fragments: [unit][2][256][4] fp32 (n <= 16 tokens: j = 0, 1 of the accumulator).
constexpr int kSplitUnitFloats = 2 * 256 * 4;

struct Sm90TileCoord {
  int expert, n_tile, slice, tile;
  int row0;  // first row of the row space
  int rows;  // valid rows (tokens) of the tile
};

template <class Tile>
__device__ __forceinline__ Sm90TileCoord sm90_decode_unit(const Sm90Params& p, int unit) {
  const GemmArgs& g = p.args;
  Sm90TileCoord c;
  c.tile = unit / p.split_k;
  c.slice = unit - c.tile * p.split_k;
  const int nt = p.n_tiles;
  int lo = 0, hi = p.num_experts;  // tile_offsets[lo] * nt <= tile < tile_offsets[hi] * nt
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(g.tile_offsets + mid) * nt <= c.tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  c.expert = lo;
  const int first = __ldg(g.tile_offsets + lo);
  const int m_tiles = __ldg(g.tile_offsets + lo + 1) - first;
  const int local = c.tile - first * nt;
  constexpr int kGroup = 8;  // column tiles per raster group
  const int group = local / (m_tiles * kGroup);
  const int idx = local - group * m_tiles * kGroup;
  const int group_cols = min(kGroup, nt - group * kGroup);
  const int m_tile = idx / group_cols;
  c.n_tile = group * kGroup + (idx - m_tile * group_cols);
  c.row0 = __ldg(g.row_begin + lo) + m_tile * Tile::kBlockM;
  // Every row tile but the last has kBlockM rows; the last has the rest: at most kBlockM, or
  // kBlockM + kTail with tail rows (the work list counted the tiles with row_tiles()).
  const int left = __ldg(g.row_count + lo) - m_tile * Tile::kBlockM;
  c.rows = m_tile == m_tiles - 1 ? min(left, p.tail ? Tile::kMaxRows : Tile::kBlockM)
                                 : Tile::kBlockM;
  return c;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The consumer main loop of one tile at wgmma width N (kTail: N = kBlockM, plus the kTail-wide
// MMA of the tail rows into acc_tail): k-blocks [kb_begin, kb_end), pipeline position `it`
// (running count of k-blocks this CTA consumed before the tile).
template <class Tile, int N, bool kTail>
__device__ __forceinline__ void sm90_mainloop(float (&acc)[Tile::kAccRegs],
                                              float (&acc_tail)[Tile::kTailRegs], uint32_t smem,
                                              int cwg, int lane, int kb_begin, int kb_end,
                                              int it, bool x_tma) {
  const uint32_t full = smem + Tile::kBarOffset;
  const uint32_t empty = full + Tile::kStages * 8;
  for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
    const int s = it % Tile::kStages;
    sm90::mbar_wait(full + 8 * s, (it / Tile::kStages) & 1);
    // NOTE: gathered token rows were written by cp.async (generic proxy); wgmma reads through
    // the async proxy. TMA-loaded rows need no fence.
    if (!x_tma) sm90::fence_proxy_async_smem();
    const uint32_t xs = smem + Tile::kXOffset + s * Tile::kXStageBytes;
    const uint64_t da = sm90::smem_desc_sw128(smem + Tile::kWOffset + s * Tile::kWStageBytes +
                                              cwg * (Tile::kWStageBytes / 2));
    const uint64_t db = sm90::smem_desc_sw128(xs);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Tile::kKSteps; ++kk) {
      sm90::Wgmma<N>::mma(acc, da + 2 * kk, db + 2 * kk, (kb > kb_begin || kk > 0) ? 1 : 0);
    }
    if constexpr (kTail) {
      // Rows kBlockM.. of the stage: 1024-byte aligned, so the same swizzle phase.
      const uint64_t dt = sm90::smem_desc_sw128(xs + Tile::kBlockM * Tile::kRowBytes);
#pragma unroll
      for (int kk = 0; kk < Tile::kKSteps; ++kk) {
        sm90::Wgmma<Tile::kTail>::mma(acc_tail, da + 2 * kk, dt + 2 * kk,
                                      (kb > kb_begin || kk > 0) ? 1 : 0);
      }
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<1>();  // the k-block before this one is done reading its stage
    if (kb > kb_begin && lane == 0) sm90::mbar_arrive(empty + 8 * ((it - 1) % Tile::kStages));
  }
  sm90::wgmma_wait<0>();
  sm90::fence_regs(acc);
  if constexpr (kTail) sm90::fence_regs(acc_tail);
  if (lane == 0) sm90::mbar_arrive(empty + 8 * ((it - 1) % Tile::kStages));
}

// The W4A16 main loop of one tile (Sm90W4a16Tile) at wgmma width N (kTail: plus the kTail-wide
// MMA of the tail rows into acc_tail), A from registers. Per stage each thread reads the 32
// packed bytes and the 4 block scales of its two rows (r8 and r8 + 8 of its warp's 16: the
// wgmma A fragment rows), then per k16 step kk decodes its fragment in natural K order (a0 / a1:
// byte 8 kk + q of rows r8 / r8 + 8, a2 / a3: byte 8 kk + q + 4; nvfp4::e2m1_byte_pairs_spread)
// with the rows' scale factors of block kk, and issues the wgmma: w' * 2^-7 exactly, as in the
// mma.sync kernel (the epilogue multiplies by 128 * global).
// NOTE: wgmma reads its A registers asynchronously. Two fragment buffers: step kk writes
// af[kk % 2] while step kk - 1's wgmma may still read af[(kk - 1) % 2]; the wgmma_wait<1> after
// each commit completes every group but the newest, so the buffer written next (read two steps
// back) is free. wgmma_fence before each wgmma orders the fresh register writes before it.
template <class Tile, int N, bool kTail>
__device__ __forceinline__ void sm90_mainloop_w4a16(float (&acc)[Tile::kAccRegs],
                                                    float (&acc_tail)[Tile::kTailRegs],
                                                    uint32_t smem, int cwg, int lane,
                                                    int kb_begin, int kb_end, int it,
                                                    bool x_tma) {
  const uint32_t full = smem + Tile::kBarOffset;
  const uint32_t empty = full + Tile::kStages * 8;
  const int warp = (threadIdx.x >> 5) & 3;
  const int r_lo = cwg * 64 + warp * 16 + (lane >> 2);  // tile row of a0 / a2; a1 / a3: + 8
  const int q = lane & 3;
  const uint32_t sel = static_cast<uint32_t>(q | ((q + 4) << 4));
  uint32_t af[2][4];
  for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
    const int s = it % Tile::kStages;
    sm90::mbar_wait(full + 8 * s, (it / Tile::kStages) & 1);
    // NOTE: gathered token rows were written by cp.async (generic proxy); wgmma reads them
    // through the async proxy. The weights and scales are read here with ld.shared.
    if (!x_tma) sm90::fence_proxy_async_smem();
    const uint32_t ws = smem + Tile::kWOffset + s * Tile::kWStageBytes;
    const uint4 lo0 = lds_128(ws + r_lo * Tile::kWRowBytes);
    const uint4 lo1 = lds_128(ws + r_lo * Tile::kWRowBytes + 16);
    const uint4 hi0 = lds_128(ws + (r_lo + 8) * Tile::kWRowBytes);
    const uint4 hi1 = lds_128(ws + (r_lo + 8) * Tile::kWRowBytes + 16);
    const uint32_t ss = smem + Tile::kSOffset + s * Tile::kSStageBytes;
    const uint32_t sc_lo = lds_32(ss + r_lo * 4);
    const uint32_t sc_hi = lds_32(ss + (r_lo + 8) * 4);
    // This thread's reads of the stage's weights and scales are done (the arrive releases
    // them): the producers may rewrite those once all 256 consumer threads arrived here and
    // the tokens' stage is free too (empty, below).
    sm90::mbar_arrive(smem + Tile::kAEmptyOffset + 8 * s);
    const uint32_t xs = smem + Tile::kXOffset + s * Tile::kXStageBytes;
    const uint64_t db = sm90::smem_desc_sw128(xs);
    // Rows kBlockM.. of the stage: 1024-byte aligned, so the same swizzle phase.
    const uint64_t dt = sm90::smem_desc_sw128(xs + Tile::kBlockM * Tile::kRowBytes);
#pragma unroll
    for (int kk = 0; kk < Tile::kKSteps; ++kk) {
      uint32_t(&a)[4] = af[kk & 1];
      // words 2 kk and 2 kk + 1 of each row's 32 bytes: packed bytes [8 kk, 8 kk + 8)
      const uint32_t x_lo = kk == 0 ? lo0.x : kk == 1 ? lo0.z : kk == 2 ? lo1.x : lo1.z;
      const uint32_t y_lo = kk == 0 ? lo0.y : kk == 1 ? lo0.w : kk == 2 ? lo1.y : lo1.w;
      const uint32_t x_hi = kk == 0 ? hi0.x : kk == 1 ? hi0.z : kk == 2 ? hi1.x : hi1.z;
      const uint32_t y_hi = kk == 0 ? hi0.y : kk == 1 ? hi0.w : kk == 2 ? hi1.y : hi1.w;
      // scale factors of block kk of rows r_lo (low lane) and r_lo + 8 (high lane)
      const uint32_t k = scale_factors_pair(__byte_perm(sc_lo, sc_hi, kk | ((kk + 4) << 4)));
      decode_natural_pairs<0>(x_lo, y_lo, sel, k, a[0], a[2]);
      decode_natural_pairs<1>(x_hi, y_hi, sel, k, a[1], a[3]);
      const int scale_d = (kb > kb_begin || kk > 0) ? 1 : 0;
      sm90::wgmma_fence();
      sm90::WgmmaRegA<N>::mma(acc, a, db + 2 * kk, scale_d);
      if constexpr (kTail) sm90::WgmmaRegA<Tile::kTail>::mma(acc_tail, a, dt + 2 * kk, scale_d);
      sm90::wgmma_commit();
      sm90::wgmma_wait<1>();
      // After step 0's wait every wgmma of the previous k-block is complete: its stage is free.
      if (kk == 0 && kb > kb_begin && lane == 0) {
        sm90::mbar_arrive(empty + 8 * ((it - 1) % Tile::kStages));
      }
    }
  }
  sm90::wgmma_wait<0>();
  sm90::fence_regs(acc);
  if constexpr (kTail) sm90::fence_regs(acc_tail);
  if (lane == 0) sm90::mbar_arrive(empty + 8 * ((it - 1) % Tile::kStages));
}

// Runs the main loop of variant v (compile-time recursion over V): N = (v + 1) * kNStep for
// v < kNumVariants, the tail variant (kBlockM + kTail rows) for v = kNumVariants.
template <class Tile, int V>
__device__ __forceinline__ void sm90_mainloop_variant(int v, float (&acc)[Tile::kAccRegs],
                                                      float (&acc_tail)[Tile::kTailRegs],
                                                      uint32_t smem, int cwg, int lane,
                                                      int kb_begin, int kb_end, int it,
                                                      bool x_tma) {
  if constexpr (V < Tile::kNumVariants) {
    if (v == V) {
      if constexpr (Tile::kNvfp4) {
        sm90_mainloop_w4a16<Tile, (V + 1) * Tile::kNStep, false>(acc, acc_tail, smem, cwg, lane,
                                                                 kb_begin, kb_end, it, x_tma);
      } else {
        sm90_mainloop<Tile, (V + 1) * Tile::kNStep, false>(acc, acc_tail, smem, cwg, lane,
                                                           kb_begin, kb_end, it, x_tma);
      }
    } else {
      sm90_mainloop_variant<Tile, V + 1>(v, acc, acc_tail, smem, cwg, lane, kb_begin, kb_end,
                                         it, x_tma);
    }
  } else if constexpr (Tile::kNvfp4) {
    sm90_mainloop_w4a16<Tile, Tile::kBlockM, true>(acc, acc_tail, smem, cwg, lane, kb_begin,
                                                   kb_end, it, x_tma);
  } else {
    sm90_mainloop<Tile, Tile::kBlockM, true>(acc, acc_tail, smem, cwg, lane, kb_begin, kb_end,
                                             it, x_tma);
  }
}

// The FP8 main loop of one tile at wgmma width N (docs/fp8.md, "Experts"): per k-block the four
// m64nNk32 wgmma of the stage sum 128 products in `part` (fresh per k-block), then
//   acc = fma(part, sx[token][kb] * sw[row][kb], acc)        in fp32, the product rounded first
// so the scales are applied every 128 of K, as the CPU oracle does. sx comes from the stage's
// scale row in shared memory (the producer copies it with the token rows), sw from the weight
// scales in global memory: rows r8 and r8 + 8 of the warp's slice (gate and up with G = 8) each
// have one scale block, b_scale_gate_up picks the interleaved map (block 2 (f / 256) + (f / 8) % 2)
// or the plain one (f / 128). The wgmma of a k-block is waited for before its promotion.
template <class Tile, int N>
__device__ __forceinline__ void sm90_mainloop_fp8(float (&acc)[Tile::kAccRegs], uint32_t smem,
                                                  const float* s_scale, const Sm90Params& p,
                                                  const Sm90TileCoord& c, int cwg, int warp,
                                                  int lane, int kb_begin, int kb_end, int it) {
  const GemmArgs& g = p.args;
  const uint32_t full = smem + Tile::kBarOffset;
  const uint32_t empty = full + Tile::kStages * 8;
  constexpr int kRegs = N / 2;
  float part[kRegs];
#pragma unroll
  for (int i = 0; i < kRegs; ++i) acc[i] = 0.0f;
  const int f = c.n_tile * Tile::kBlockN + cwg * 64 + warp * 16 + (lane >> 2);
  auto block_of = [&](int row) {
    return g.b_scale_gate_up ? 2 * (row / 256) + (row / 8) % 2 : row / 128;
  };
  const float* bs = g.b_scale + static_cast<int64_t>(c.expert) * g.b_scale_expert;
  const float* bs_lo = bs + static_cast<int64_t>(block_of(f)) * g.b_scale_ld;
  const float* bs_hi = bs + static_cast<int64_t>(block_of(f + 8)) * g.b_scale_ld;
  const int q2 = 2 * (lane & 3);
  for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
    const int s = it % Tile::kStages;
    const float w_lo = __ldg(bs_lo + static_cast<int64_t>(kb) * g.b_scale_kb);
    const float w_hi = __ldg(bs_hi + static_cast<int64_t>(kb) * g.b_scale_kb);
    sm90::mbar_wait(full + 8 * s, (it / Tile::kStages) & 1);
    // NOTE: token rows come by cp.async (generic proxy) on the FP8 path; wgmma reads them
    // through the async proxy.
    sm90::fence_proxy_async_smem();
    const uint32_t xs = smem + Tile::kXOffset + s * Tile::kXStageBytes;
    const uint64_t da = sm90::smem_desc_sw128(smem + Tile::kWOffset + s * Tile::kWStageBytes +
                                              cwg * (Tile::kWStageBytes / 2));
    const uint64_t db = sm90::smem_desc_sw128(xs);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Tile::kKSteps; ++kk) {
      sm90::WgmmaE4m3<N>::mma(part, da + 2 * kk, db + 2 * kk, kk > 0 ? 1 : 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_regs(part);
    const float* sx = s_scale + s * Tile::kScaleStageFloats;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      // part[4 j + 2 h + c]: feature row r8 + 8 h, token 8 j + 2 (lane % 4) + c
      const float2 x = *reinterpret_cast<const float2*>(sx + 8 * j + q2);
      acc[4 * j] = __fmaf_rn(part[4 * j], __fmul_rn(x.x, w_lo), acc[4 * j]);
      acc[4 * j + 1] = __fmaf_rn(part[4 * j + 1], __fmul_rn(x.y, w_lo), acc[4 * j + 1]);
      acc[4 * j + 2] = __fmaf_rn(part[4 * j + 2], __fmul_rn(x.x, w_hi), acc[4 * j + 2]);
      acc[4 * j + 3] = __fmaf_rn(part[4 * j + 3], __fmul_rn(x.y, w_hi), acc[4 * j + 3]);
    }
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(empty + 8 * s);  // the stage's operands and scales are read
  }
}

template <class Tile, int V>
__device__ __forceinline__ void sm90_mainloop_fp8_variant(int v, float (&acc)[Tile::kAccRegs],
                                                          uint32_t smem, const float* s_scale,
                                                          const Sm90Params& p,
                                                          const Sm90TileCoord& c, int cwg,
                                                          int warp, int lane, int kb_begin,
                                                          int kb_end, int it) {
  if constexpr (V < Tile::kNumVariants) {
    if (v == V) {
      sm90_mainloop_fp8<Tile, (V + 1) * Tile::kNStep>(acc, smem, s_scale, p, c, cwg, warp, lane,
                                                       kb_begin, kb_end, it);
    } else {
      sm90_mainloop_fp8_variant<Tile, V + 1>(v, acc, smem, s_scale, p, c, cwg, warp, lane,
                                             kb_begin, kb_end, it);
    }
  }
}

// FP8 fast accumulation (Tile::kFastAccum only; docs/fp8.md "FP8 fast accumulation"). Nothing
// below is compiled into another tile's kernel.
//
// The weight scales of this consumer thread's feature rows f and f + 8 (rows r8 and r8 + 8 of
// the warp's slice; gate and up with G = 8) at k-block 0, as sm90_mainloop_fp8 picks them.
struct Sm90Fp8RowScales {
  const float* lo;
  const float* hi;
};
template <class Tile>
__device__ __forceinline__ Sm90Fp8RowScales sm90_fp8_row_scales(const GemmArgs& g,
                                                                  const Sm90TileCoord& c,
                                                                  int cwg, int warp, int lane) {
  const int f = c.n_tile * Tile::kBlockN + cwg * 64 + warp * 16 + (lane >> 2);
  auto block_of = [&](int row) {
    return g.b_scale_gate_up ? 2 * (row / 256) + (row / 8) % 2 : row / 128;
  };
  const float* bs = g.b_scale + static_cast<int64_t>(c.expert) * g.b_scale_expert;
  return {bs + static_cast<int64_t>(block_of(f)) * g.b_scale_ld,
          bs + static_cast<int64_t>(block_of(f + 8)) * g.b_scale_ld};
}

// The fast-accumulation main loop at wgmma width N (scales constant along K: the Fp8PerTensor
// GEMM1, checked by the launcher): the bf16 main loop with e4m3 wgmma. Every k-block's wgmma
// accumulates into acc (the tensor cores' sum over all of K, from +0: fp32 registers, but
// Hopper's FP8 wgmma keeps about 14 bits of it), and a k-block's stage is released once the
// next k-block's wgmma is issued and the previous group has completed (wgmma_wait<1>): no wait
// per k-block and no promotion. The scale product is applied once, by the epilogue.
// The token scales: the producer copies them into the tile's first k-block stage only (they do
// not change along K); this copies that row into tok_scale (this warpgroup's, shared memory),
// which the epilogue reads after its first named barrier (the same barrier orders the previous
// tile's last reads before these writes). NOTE: not from the producer's per-tile row table
// (s_ssrc) in the epilogue: the producer rewrites it for its next tile while the consumers still
// run this one's epilogue; and not into registers: kBlockM / 4 of them next to the kBlockM / 2
// accumulators spilled.
template <class Tile, int N>
__device__ __forceinline__ void sm90_mainloop_fp8_fast(float (&acc)[Tile::kAccRegs],
                                                       float* tok_scale, uint32_t smem,
                                                       const float* s_scale, int cwg, int warp,
                                                       int lane, int kb_begin, int kb_end,
                                                       int it) {
  static_assert(Tile::kFastAccum, "the fast-accumulation tile only");
  const uint32_t full = smem + Tile::kBarOffset;
  const uint32_t empty = full + Tile::kStages * 8;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
    const int s = it % Tile::kStages;
    sm90::mbar_wait(full + 8 * s, (it / Tile::kStages) & 1);
    // NOTE: token rows come by cp.async (generic proxy) on the FP8 path; wgmma reads them
    // through the async proxy.
    sm90::fence_proxy_async_smem();
    const uint32_t xs = smem + Tile::kXOffset + s * Tile::kXStageBytes;
    const uint64_t da = sm90::smem_desc_sw128(smem + Tile::kWOffset + s * Tile::kWStageBytes +
                                              cwg * (Tile::kWStageBytes / 2));
    const uint64_t db = sm90::smem_desc_sw128(xs);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Tile::kKSteps; ++kk) {
      sm90::WgmmaE4m3<N>::mma(acc, da + 2 * kk, db + 2 * kk, 1);
    }
    sm90::wgmma_commit();
    if (kb == kb_begin) {
      const float* st = s_scale + s * Tile::kScaleStageFloats;
      for (int r = warp * 32 + lane; r < N; r += 128) tok_scale[r] = st[r];
      __syncwarp();  // every lane has read the scales before lane 0 releases the stage
    }
    sm90::wgmma_wait<1>();  // the k-block before this one is done reading its stage
    if (kb > kb_begin && lane == 0) sm90::mbar_arrive(empty + 8 * ((it - 1) % Tile::kStages));
  }
  sm90::wgmma_wait<0>();
  if (lane == 0) sm90::mbar_arrive(empty + 8 * ((it - 1) % Tile::kStages));
  sm90::fence_regs(acc);
}

template <class Tile, int V>
__device__ __forceinline__ void sm90_mainloop_fp8_fast_variant(int v,
                                                               float (&acc)[Tile::kAccRegs],
                                                               float* tok_scale, uint32_t smem,
                                                               const float* s_scale, int cwg,
                                                               int warp, int lane, int kb_begin,
                                                               int kb_end, int it) {
  if constexpr (V < Tile::kNumVariants) {
    if (v == V) {
      sm90_mainloop_fp8_fast<Tile, (V + 1) * Tile::kNStep>(acc, tok_scale, smem, s_scale, cwg,
                                                           warp, lane, kb_begin, kb_end, it);
    } else {
      sm90_mainloop_fp8_fast_variant<Tile, V + 1>(v, acc, tok_scale, smem, s_scale, cwg, warp,
                                                  lane, kb_begin, kb_end, it);
    }
  }
}

// Activations of the epilogue as types, so that each unrolled copy of the epilogue holds one
// formula (a run-time switch inside the unrolled loops made the wide GEMM1 kernel ~30k
// instructions, and the epilogue ran out of the instruction cache). The formulas are those of
// act::apply_activation (core/activation_math.h), the CPU reference's.
struct ActIdentity {
  __device__ __forceinline__ float operator()(float x) const { return x; }
};
struct ActRelu2 {
  __device__ __forceinline__ float operator()(float x) const { return act::relu2(x); }
};
struct ActSwiglu {
  __device__ __forceinline__ float operator()(float gate, float up) const {
    return act::silu(gate) * up;
  }
};
struct ActSwigluOai {
  float alpha, beta, limit;
  __device__ __forceinline__ float operator()(float gate, float up) const {
    return act::swiglu_oai(gate, up, alpha, beta, limit);
  }
};
struct ActGeglu {
  __device__ __forceinline__ float operator()(float gate, float up) const {
    return act::gelu_erf(gate) * up;
  }
};

// What the epilogue of one tile needs besides the accumulators.
struct Sm90Epilogue {
  const Sm90Params& p;
  const Sm90TileCoord& c;
  int n_used;  // tokens the wgmma computed (>= c.rows)
  int cwg, warp, lane;
  uint32_t staging;  // this warpgroup's staging tile (shared address)
  const uint8_t* staging_ptr;
  // W4A16 (Tile::kNvfp4) only: every accumulator is multiplied by it first, one fp32 multiply
  // (128 * global: the decode gave w' * 2^-7, and a power of two commutes with rounding, so
  // this is the oracle's dot(x, w') * global bitwise).
  float acc_scale = 1.0f;
  // FP8 fast accumulation (Tile::kFastAccum) only: the weight scales of feature rows f and
  // f + 8, and this warpgroup's token scales [kBlockM] fp32 (shared memory).
  float w_lo = 1.0f, w_hi = 1.0f;
  const float* tok_scale = nullptr;
};

// The epilogue in fp32 (docs/HELPERS.md "Numerics"): + bias, + LoRA (GEMM1), the activation,
// bf16; staged by stmatrix.trans as [token][features] rows, then 16-byte chunks of the valid
// rows and columns to C. kGated: rows r8 and r8 + 8 of the warp's 16-row slice are the gate and
// up rows of intermediate column (slice / 16) * 8 + r8 (GateUpInterleaved, G = 8).
// kTokens: the token columns of `acc` (kBlockM, or kTail for the tail rows, whose coordinate
// then starts at row0 + kBlockM).
// FP8 fast accumulation (Tile::kFastAccum): first x = acc * (sx[token] * sw[row]), the product
// of the scales rounded first (docs/fp8.md "FP8 fast accumulation"); after the split-K sum, so
// it multiplies the sum over all of K. NOTE: here, where acc is read, not in acc before the
// epilogue (on the run-time-mode version of this loop, writing acc in place made ptxas
// serialise the wgmma, C7515).
template <class Tile, int kTokens, bool kGated, class Act>
__device__ __forceinline__ void sm90_epilogue(float (&acc)[kTokens / 2], const Sm90Epilogue& e,
                                              const Act& act_fn) {
  constexpr int kStaging = kTokens < Tile::kStagingTokens ? kTokens : Tile::kStagingTokens;
  const Sm90Params& p = e.p;
  const Sm90TileCoord& c = e.c;
  const GemmArgs& g = p.args;
  const int quad = e.lane & 3;
  const int r8 = e.lane >> 2;
  const int wtid = e.warp * 32 + e.lane;
  // This thread's feature rows (rows of B within the expert): f and f + 8.
  const int f = c.n_tile * Tile::kBlockN + e.cwg * 64 + e.warp * 16 + r8;
  // gated: intermediate column of this thread; else feature f (f + 8 is the other one)
  const int64_t out_col =
      kGated ? static_cast<int64_t>(c.n_tile) * (Tile::kBlockN / 2) + e.cwg * 32 + e.warp * 8 + r8
             : f;
  const int stage_col = kGated ? e.warp * 8 : e.warp * 16;  // staging column (elements)
  constexpr int kOutColsWg = kGated ? 32 : 64;               // output columns of the warpgroup
  const int64_t col0_wg = kGated ? static_cast<int64_t>(c.n_tile) * (Tile::kBlockN / 2) + e.cwg * 32
                                 : static_cast<int64_t>(c.n_tile) * Tile::kBlockN + e.cwg * 64;
  const float* bias = g.bias ? g.bias + static_cast<int64_t>(c.expert) * g.bias_expert_stride
                             : nullptr;
  float bias_lo = 0.0f, bias_hi = 0.0f;  // gated: gate and up
  if (bias != nullptr) {
    if (kGated) {
      if (out_col < p.n) {
        bias_lo = bias[f];
        bias_hi = bias[f + 8];
      }
    } else {
      if (f < p.n) bias_lo = bias[f];
      if (f + 8 < p.n) bias_hi = bias[f + 8];
    }
  }
  // LoRA delta of token t, column col (GEMM1 standard only: a_gather is set).
  const bool has_lora = g.lora != nullptr;
  auto lora_at = [&](int t, int64_t col) -> float {
    const int32_t expanded = g.a_gather[c.row0 + t];
    return __bfloat162float(g.lora[static_cast<int64_t>(expanded) * g.ld_lora + col]);
  };

#pragma unroll
  for (int cb = 0; cb < kTokens; cb += kStaging) {
    if (cb >= e.n_used) break;
    sm90::named_barrier_sync(2 + e.cwg, 128);  // the staging tile is free
#pragma unroll
    for (int jp = 0; jp < kStaging / 16; ++jp) {
      const int j = cb / 8 + 2 * jp;  // 8-token blocks j and j + 1
      if (8 * j >= e.n_used) break;
      uint32_t regs[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int jj = j + h;
        if constexpr (kGated) {
          float out[2];
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            float gate = acc[4 * jj + k];
            float up = acc[4 * jj + 2 + k];
            if constexpr (Tile::kNvfp4) {
              gate = __fmul_rn(gate, e.acc_scale);  // never fused with the bias add below
              up = __fmul_rn(up, e.acc_scale);
            }
            if constexpr (Tile::kFastAccum) {
              const float t_scale = e.tok_scale[8 * jj + 2 * quad + k];
              gate = __fmul_rn(gate, __fmul_rn(t_scale, e.w_lo));
              up = __fmul_rn(up, __fmul_rn(t_scale, e.w_hi));
            }
            if (bias != nullptr) {
              gate += bias_lo;
              up += bias_hi;
            }
            const int t = 8 * jj + 2 * quad + k;
            if (has_lora && t < c.rows && out_col < p.n) {
              gate += lora_at(t, g.gate_up.lora_gate_col + out_col);
              up += lora_at(t, g.gate_up.lora_up_col + out_col);
            }
            out[k] = act_fn(gate, up);
          }
          regs[h] = pack_bf16(out[0], out[1]);
        } else {
          float v[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const bool hi = k >= 2;
            float x = acc[4 * jj + k];
            if constexpr (Tile::kNvfp4) x = __fmul_rn(x, e.acc_scale);
            if constexpr (Tile::kFastAccum) {
              const float t_scale = e.tok_scale[8 * jj + 2 * quad + (k & 1)];
              x = __fmul_rn(x, __fmul_rn(t_scale, hi ? e.w_hi : e.w_lo));
            }
            if (bias != nullptr) x += hi ? bias_hi : bias_lo;
            if constexpr (!std::is_same_v<Act, ActIdentity>) {
              const int t = 8 * jj + 2 * quad + (k & 1);
              const int64_t col = f + (hi ? 8 : 0);
              if (has_lora && t < c.rows && col < p.n) x += lora_at(t, col);
              x = act_fn(x);
            }
            v[k] = x;
          }
          regs[2 * h] = pack_bf16(v[0], v[1]);      // feature row r8
          regs[2 * h + 1] = pack_bf16(v[2], v[3]);  // feature row r8 + 8
        }
      }
      if constexpr (kGated) {
        // matrix m (lanes 8m..8m+7): tokens 8 (j + m) + lane % 8, 8 columns of the warp
        const int tok = 8 * (j + ((e.lane >> 3) & 1)) + (e.lane & 7) - cb;
        sm90::stmatrix_x2_trans(e.staging + tok * Tile::kStagingPitch + stage_col * 2, regs[0],
                                regs[1]);
      } else {
        // matrix m: tokens 8 (j + m / 2) + lane % 8, feature rows 8 (m % 2) .. of the warp
        const int m = e.lane >> 3;
        const int tok = 8 * (j + (m >> 1)) + (e.lane & 7) - cb;
        sm90::stmatrix_x4_trans(e.staging + tok * Tile::kStagingPitch + (stage_col + 8 * (m & 1)) * 2,
                                regs[0], regs[1], regs[2], regs[3]);
      }
    }
    sm90::named_barrier_sync(2 + e.cwg, 128);
    // 16-byte chunks of the staged rows to the valid rows and columns of C.
    constexpr int kChunks = kOutColsWg / 8;
    for (int idx = wtid; idx < kStaging * kChunks; idx += 128) {
      const int r = idx / kChunks;
      const int ch = idx - r * kChunks;
      const int t = cb + r;
      const int64_t col = col0_wg + ch * 8;
      if (t < c.rows && col < p.n) {
        *reinterpret_cast<uint4*>(g.c + static_cast<int64_t>(c.row0 + t) * g.ldc + col) =
            *reinterpret_cast<const uint4*>(e.staging_ptr + r * Tile::kStagingPitch + ch * 16);
      }
    }
  }
}

// The epilogue of kTokens accumulator columns with the activation of the call: one
// compile-time activation per copy of the unrolled code.
template <class Tile, int kTokens, bool kGemm1>
__device__ __forceinline__ void sm90_epilogue_dispatch(float (&acc)[kTokens / 2],
                                                       const Sm90Epilogue& e) {
  if constexpr (!kGemm1) {
    sm90_epilogue<Tile, kTokens, false, ActIdentity>(acc, e, ActIdentity{});
  } else {
    const Sm90Params& p = e.p;
    const EpilogueActivation& ea = p.args.activation;
    if (p.gated == 0) {
      sm90_epilogue<Tile, kTokens, false, ActRelu2>(acc, e, ActRelu2{});  // the one non-gated kind
      return;
    }
    switch (static_cast<Activation>(ea.kind)) {
      case Activation::SwigluOai: {
        const int x = e.c.expert;
        const float alpha = ea.alpha_per_expert ? ea.alpha_per_expert[x] : ea.alpha;
        const float beta = ea.beta_per_expert ? ea.beta_per_expert[x] : ea.beta;
        const float limit = ea.limit_per_expert ? ea.limit_per_expert[x] : ea.limit;
        sm90_epilogue<Tile, kTokens, true, ActSwigluOai>(acc, e, ActSwigluOai{alpha, beta, limit});
        break;
      }
      case Activation::Geglu:
        sm90_epilogue<Tile, kTokens, true, ActGeglu>(acc, e, ActGeglu{});
        break;
      default:
        sm90_epilogue<Tile, kTokens, true, ActSwiglu>(acc, e, ActSwiglu{});
        break;
    }
  }
}

// W4A16 producer: producer thread ptid copies the 4 block scales (64 of K, 4 bytes: the linear
// [rows, K/16] layout with K % 64 == 0) of tile row ptid for k-block kb into stage s; rows past
// the expert's b_rows are zero-filled (their weights are TMA's zero fill).
template <class Tile>
__device__ __forceinline__ void sm90_w4a16_copy_scales(const Sm90Params& p,
                                                       const Sm90TileCoord& c, uint32_t smem,
                                                       int s, int kb, int ptid) {
  const GemmArgs& g = p.args;
  const int row = c.n_tile * Tile::kBlockN + ptid;
  const bool ok = row < p.b_rows;
  const uint8_t* src = g.b_block_scale + static_cast<int64_t>(c.expert) * g.b_block_scale_expert +
                       static_cast<int64_t>(row) * g.b_block_scale_ld + 4 * kb;
  sm90::cp_async_4(smem + Tile::kSOffset + s * Tile::kSStageBytes + 4 * ptid,
                   ok ? static_cast<const void*>(src) : static_cast<const void*>(g.b_block_scale),
                   ok ? 4 : 0);
}

template <class Tile, bool kGemm1>
__global__ void __launch_bounds__(Tile::kThreads, 1)
    sm90_grouped_gemm_kernel(const __grid_constant__ Sm90Params p) {
  // NOTE: wgmma and setmaxnreg exist on sm_90a only. Other targets (an sm_100a build) compile
  // an empty kernel; select_config never picks an sm90 config on them.
#if defined(__CUDA_ARCH__) && !(__CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  __trap();
#else
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = sm90::smem_u32(smem_raw);
  const uint32_t smem = (raw + 1023u) & ~1023u;
  uint8_t* smem_ptr = smem_raw + (smem - raw);
  const uint32_t full = smem + Tile::kBarOffset;
  const uint32_t empty = full + Tile::kStages * 8;
  uint64_t* s_xsrc = reinterpret_cast<uint64_t*>(smem_ptr + Tile::kXRowOffset);
  int32_t* s_flag = reinterpret_cast<int32_t*>(smem_ptr + Tile::kFlagOffset);
  const GemmArgs& g = p.args;

  if (threadIdx.x == 0) {
    for (int s = 0; s < Tile::kStages; ++s) {
      // W4A16: every producer thread copies block scales (cp.async), so always 129.
      sm90::mbar_init(full + 8 * s, p.x_tma && !Tile::kNvfp4 ? 1 : 129);
      sm90::mbar_init(empty + 8 * s, 8);
      if constexpr (Tile::kNvfp4) sm90::mbar_init(smem + Tile::kAEmptyOffset + 8 * s, 256);
    }
    sm90::fence_barrier_init();
    sm90::prefetch_tensormap(&p.tmap_w);
    if (p.x_tma) sm90::prefetch_tensormap(&p.tmap_x);
  }
  __syncthreads();
  // Everything below reads what earlier kernels of the stream wrote.
  sm90::grid_dependency_wait();
  sm90::grid_launch_dependents();

  const int total_units = g.tile_offsets[p.num_experts] * p.n_tiles * p.split_k;
  const int num_kb = (p.k + Tile::kBlockK - 1) / Tile::kBlockK;
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    // ------------------------------- producer -------------------------------
    sm90::setmaxnreg_dec<40>();
    const int ptid = threadIdx.x;
    if (!Tile::kFp8 && p.x_tma) {
      // Contiguous token rows: thread 0 issues every TMA copy of the stage (W4A16: every
      // thread also copies its weight row's block scales, sm90_w4a16_copy_scales).
      if (!Tile::kNvfp4 && ptid != 0) return;
      int it = 0;
      for (int unit = blockIdx.x; unit < total_units; unit += gridDim.x) {
        const Sm90TileCoord c = sm90_decode_unit<Tile>(p, unit);
        const int n_used = (c.rows + Tile::kNStep - 1) / Tile::kNStep * Tile::kNStep;
        const int kb_begin = c.slice * num_kb / p.split_k;
        const int kb_end = (c.slice + 1) * num_kb / p.split_k;
        for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
          const int s = it % Tile::kStages;
          const uint32_t bar_full = full + 8 * s;
          sm90::mbar_wait(empty + 8 * s, ((it / Tile::kStages) & 1) ^ 1);
          if constexpr (Tile::kNvfp4) {
            sm90::mbar_wait(smem + Tile::kAEmptyOffset + 8 * s, ((it / Tile::kStages) & 1) ^ 1);
          }
          if (ptid == 0) {
            sm90::mbar_arrive_expect_tx(bar_full,
                                        Tile::kWStageBytes + n_used * Tile::kRowBytes);
            sm90::tma_load_3d(smem + Tile::kWOffset + s * Tile::kWStageBytes, &p.tmap_w,
                              bar_full, kb * Tile::kWCoordK, c.n_tile * Tile::kBlockN, c.expert);
            // Rows past the group's end (the next group's, or zeros past the row space) land
            // in token columns the epilogue never stores.
            const uint32_t xs = smem + Tile::kXOffset + s * Tile::kXStageBytes;
            for (int r0 = 0; r0 < n_used; r0 += Tile::kNStep) {
              sm90::tma_load_2d(xs + r0 * Tile::kRowBytes, &p.tmap_x, bar_full,
                                kb * Tile::kBlockK, c.row0 + r0);
            }
          }
          if constexpr (Tile::kNvfp4) {
            sm90_w4a16_copy_scales<Tile>(p, c, smem, s, kb, ptid);
            sm90::cp_async_mbar_arrive_noinc(bar_full);
          }
        }
      }
      if constexpr (Tile::kNvfp4) sm90::cp_async_wait_all();
      return;
    }
    // Gathered token rows: every producer thread copies 16-byte chunk `chunk` of rows
    // ptid / 8 + 16 i; the swizzled chunk position (chunk ^ (row % 8)) is the same for all i.
    // FP8: also the k-block's scale of rows ptid + 128 i, into the stage's scale row.
    uint64_t* s_ssrc = reinterpret_cast<uint64_t*>(smem_ptr + Tile::kScaleRowOffset);
    const uint32_t scale_base = smem + Tile::kScaleOffset;
    const int chunk = ptid & 7;
    const uint32_t x_thread = (ptid >> 3) * 128 + ((chunk ^ ((ptid >> 3) & 7)) << 4);
    int it = 0;
    for (int unit = blockIdx.x; unit < total_units; unit += gridDim.x) {
      const Sm90TileCoord c = sm90_decode_unit<Tile>(p, unit);
      const int n_used = (c.rows + Tile::kNStep - 1) / Tile::kNStep * Tile::kNStep;
      const int kb_begin = c.slice * num_kb / p.split_k;
      const int kb_end = (c.slice + 1) * num_kb / p.split_k;
      sm90::named_barrier_sync(1, 128);  // the previous tile's rows are no longer read
      for (int r = ptid; r < n_used; r += 128) {
        uint64_t src = 0;
        uint64_t ssrc = 0;
        if (r < c.rows) {
          const int row = c.row0 + r;
          const int32_t a_row =
              g.a_gather != nullptr
                  ? (g.a_gather[row] >= 0 ? g.a_gather[row] / g.gather_div : -1)
                  : row;
          if (a_row >= 0) {
            src = reinterpret_cast<uint64_t>(g.a) +
                  static_cast<uint64_t>(a_row) * g.lda * Tile::kElemBytes;
            if constexpr (Tile::kFp8) {
              ssrc = reinterpret_cast<uint64_t>(g.a_scale + static_cast<int64_t>(a_row) * g.a_scale_ld);
            }
          }
        }
        s_xsrc[r] = src;
        if constexpr (Tile::kFp8) s_ssrc[r] = ssrc;
      }
      sm90::named_barrier_sync(1, 128);
      const int row_steps = n_used >> 4;  // rows ptid / 8 + 16 i, i < row_steps
      for (int kb = kb_begin; kb < kb_end; ++kb, ++it) {
        const int s = it % Tile::kStages;
        const uint32_t bar_full = full + 8 * s;
        sm90::mbar_wait(empty + 8 * s, ((it / Tile::kStages) & 1) ^ 1);
        if constexpr (Tile::kNvfp4) {
          sm90::mbar_wait(smem + Tile::kAEmptyOffset + 8 * s, ((it / Tile::kStages) & 1) ^ 1);
        }
        if (ptid == 0) {
          sm90::mbar_arrive_expect_tx(bar_full, Tile::kWStageBytes);
          sm90::tma_load_3d(smem + Tile::kWOffset + s * Tile::kWStageBytes, &p.tmap_w, bar_full,
                            kb * Tile::kWCoordK, c.n_tile * Tile::kBlockN, c.expert);
        }
        const int k_elem = kb * Tile::kBlockK + chunk * (16 / Tile::kElemBytes);
        // K % 8 == 0 (bf16) or K % 128 == 0 (FP8): a chunk is all in or all out
        const bool k_ok = k_elem < p.k;
        const uint32_t xd = smem + Tile::kXOffset + s * Tile::kXStageBytes + x_thread;
        const uint64_t* xsrc = s_xsrc + (ptid >> 3);
        const uint64_t k_bytes = Tile::kElemBytes * static_cast<uint64_t>(k_elem);
        auto copy_row = [&](int i, uint64_t src) {
          const bool ok = k_ok && src != 0;
          const void* gp = ok ? reinterpret_cast<const void*>(src + k_bytes)
                              : static_cast<const void*>(g.a);
          sm90::cp_async_16(xd + i * 2048, gp, ok ? 16 : 0);
        };
        int i = 0;
        // NOTE: four row addresses read before the four copies, so the shared-memory loads
        // overlap (one at a time, each copy waited ~30 cycles for its address).
        for (; i + 4 <= row_steps; i += 4) {
          const uint64_t s0 = xsrc[16 * i], s1 = xsrc[16 * i + 16];
          const uint64_t s2 = xsrc[16 * i + 32], s3 = xsrc[16 * i + 48];
          copy_row(i, s0);
          copy_row(i + 1, s1);
          copy_row(i + 2, s2);
          copy_row(i + 3, s3);
        }
        for (; i < row_steps; ++i) copy_row(i, xsrc[16 * i]);
        // Tile::kFastAccum: the scales are constant along K and the consumers read the tile's
        // first stage only, so the copies of the other k-blocks are skipped.
        if constexpr (Tile::kFp8) {
          if (!Tile::kFastAccum || kb == kb_begin) {
            const uint32_t sd = scale_base + s * Tile::kScaleStageFloats * 4;
            const uint64_t kb_bytes = 4 * static_cast<uint64_t>(kb) * g.a_scale_kb;
            for (int r = ptid; r < n_used; r += 128) {
              const uint64_t src = s_ssrc[r];
              const void* gp = src != 0 ? reinterpret_cast<const void*>(src + kb_bytes)
                                        : static_cast<const void*>(g.a_scale);
              sm90::cp_async_4(sd + 4 * r, gp, src != 0 ? 4 : 0);
            }
          }
        }
        if constexpr (Tile::kNvfp4) sm90_w4a16_copy_scales<Tile>(p, c, smem, s, kb, ptid);
        sm90::cp_async_mbar_arrive_noinc(bar_full);
      }
    }
    sm90::cp_async_wait_all();
    return;
  }

  // ------------------------------- consumers -------------------------------
  sm90::setmaxnreg_inc<232>();
  const int cwg = wg - 1;                  // consumer warpgroup: feature rows 64 * cwg ..
  const int ctid = threadIdx.x - 128;      // 0..255
  const int warp = (ctid & 127) >> 5;      // warp in the warpgroup: 16 feature rows each
  const int lane = threadIdx.x & 31;
  const uint32_t staging = smem + Tile::kStagingOffset + cwg * Tile::kStagingBytes;
  const uint8_t* staging_ptr = smem_ptr + Tile::kStagingOffset + cwg * Tile::kStagingBytes;
  float acc[Tile::kAccRegs];
  float acc_tail[Tile::kTailRegs];  // the tail rows' columns (tail variant only)
  // Tile::kFastAccum only: this thread's rows' weight scales and this warpgroup's token scales
  // [kBlockM] fp32 (shared memory), which the epilogue multiplies by.
  float w_lo = 1.0f, w_hi = 1.0f;
  float* tok_scale = nullptr;
  if constexpr (Tile::kFastAccum) {
    tok_scale = reinterpret_cast<float*>(smem_ptr + Tile::kTokScaleOffset) + cwg * Tile::kBlockM;
  }
  int it = 0;
  for (int unit = blockIdx.x; unit < total_units; unit += gridDim.x) {
    const Sm90TileCoord c = sm90_decode_unit<Tile>(p, unit);
    const int variant = (c.rows + Tile::kNStep - 1) / Tile::kNStep - 1;
    const int n_used = (variant + 1) * Tile::kNStep;
    const int kb_begin = c.slice * num_kb / p.split_k;
    const int kb_end = (c.slice + 1) * num_kb / p.split_k;
    if constexpr (Tile::kFastAccum) {
      // Loaded before the main loop, used after it: the latency hides under the MMAs.
      const Sm90Fp8RowScales ws = sm90_fp8_row_scales<Tile>(g, c, cwg, warp, lane);
      w_lo = __ldg(ws.lo);
      w_hi = __ldg(ws.hi);
      sm90_mainloop_fp8_fast_variant<Tile, 0>(
          variant, acc, tok_scale, smem,
          reinterpret_cast<const float*>(smem_ptr + Tile::kScaleOffset), cwg, warp, lane,
          kb_begin, kb_end, it);
    } else if constexpr (Tile::kFp8) {
      sm90_mainloop_fp8_variant<Tile, 0>(
          variant, acc, smem, reinterpret_cast<const float*>(smem_ptr + Tile::kScaleOffset), p, c,
          cwg, warp, lane, kb_begin, kb_end, it);
    } else {
      sm90_mainloop_variant<Tile, 0>(variant, acc, acc_tail, smem, cwg, lane, kb_begin, kb_end,
                                     it, p.x_tma != 0);
    }
    it += kb_end - kb_begin;

    if constexpr (Tile::kNStep == 16) {
      if (p.split_k > 1) {
        // ---- split-K: publish this slice, the last one sums all in slice order ----
        float* mine = g.split_partials + static_cast<int64_t>(unit) * kSplitUnitFloats;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          *reinterpret_cast<float4*>(mine + (j * 256 + ctid) * 4) =
              make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
        }
        __threadfence();
        sm90::named_barrier_sync(4, 256);
        if (ctid == 0) {
          const int old = atomicAdd(g.split_counters + c.tile, 1);  // an arrival count only
          *s_flag = old == p.split_k - 1;
        }
        sm90::named_barrier_sync(4, 256);
        if (*s_flag == 0) continue;
        __threadfence();
        float sum[8];
        for (int s = 0; s < p.split_k; ++s) {
          float v[8];
          if (s == c.slice) {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = acc[i];
          } else {
            const float* part = g.split_partials +
                                static_cast<int64_t>(c.tile * p.split_k + s) * kSplitUnitFloats;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const float4 f = __ldcg(reinterpret_cast<const float4*>(part + (j * 256 + ctid) * 4));
              v[4 * j] = f.x;
              v[4 * j + 1] = f.y;
              v[4 * j + 2] = f.z;
              v[4 * j + 3] = f.w;
            }
          }
          if (s == 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sum[i] = v[i];
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) sum[i] = __fadd_rn(sum[i], v[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = sum[i];
      }
    }

    // W4A16: the epilogue multiplies each accumulator by 128 * global (sm90_epilogue).
    // NOTE: not in place here: ptxas serializes the wgmma pipeline (C7515) when non-wgmma
    // instructions define the accumulator registers between tiles.
    const float acc_scale =
        Tile::kNvfp4 ? __fmul_rn(__ldg(g.b_global_scale + c.expert), nvfp4::kDecodeUnscale) : 1.0f;

    // ---- epilogue: the kBlockM columns, then the tail rows' columns if the tile has them ----
    const Sm90Epilogue e{p, c, n_used < Tile::kBlockM ? n_used : Tile::kBlockM, cwg, warp, lane,
                         staging, staging_ptr, acc_scale, w_lo, w_hi, tok_scale};
    sm90_epilogue_dispatch<Tile, Tile::kBlockM, kGemm1>(acc, e);
    if constexpr (!Tile::kFp8) {
      if (n_used > Tile::kBlockM) {
        Sm90TileCoord ct = c;
        ct.row0 += Tile::kBlockM;
        ct.rows -= Tile::kBlockM;
        const Sm90Epilogue et{p, ct, Tile::kTail, cwg, warp, lane, staging, staging_ptr,
                              acc_scale};
        sm90_epilogue_dispatch<Tile, Tile::kTail, kGemm1>(acc_tail, et);
      }
    }
  }
#endif
}

// Host: the tensor maps of sm90_grouped_gemm.cu that the W4A16 launcher shares.
// Token rows [max_rows, k] bf16, box (64, box_rows), 128-byte swizzle.
CUtensorMap sm90_token_map(const GemmDesc& desc, const GemmArgs& args, int box_rows);
// Packed NVFP4 weights [E_local, b_rows, k / 2] bytes, box (box_bytes, 128, 1), no swizzle.
CUtensorMap sm90_packed_weight_map(const GemmDesc& desc, const GemmArgs& args, int box_bytes);

}  // namespace modmoe::cuda::gemm
