// Grouped BF16 GEMM on the sm_80 tensor-core path (mma.sync m16n8k16, ldmatrix, cp.async
// multi-stage pipeline), fp32 accumulate. Runs on sm_90a as it is; a TMA + wgmma kernel
// replaces it for speed later (grouped_gemm.h is the seam).
//
// One CTA computes one (expert, m-tile, n-tile) output tile:
//   blockIdx.x  m-tile in the device-side work list (binary search over tile_offsets);
//               blocks past the work list's count exit at once
//   blockIdx.y  n-tile
//
// Shared memory, per pipeline stage (BK = 32, so a row is 64 bytes = 4 chunks of 16):
//   A  [BM][32] bf16   row r, chunk c at r*64 + ((c ^ ((r >> 1) & 3)) * 16)
//   B  [BN][32] bf16   same swizzle
// The XOR spreads the 8 rows an ldmatrix phase reads over all 32 banks (two 64-byte rows
// share one 128-byte bank line, so rows r and r+2 would collide without it).
// Epilogue staging reuses the pipeline memory: C [BM][BN + 8] bf16 (+8: 16 bytes of pad so
// consecutive rows shift by 4 banks), then 16-byte coalesced row stores.
//
// GEMM1, gated: B row 2j of the tile is gate row j, row 2j + 1 the matching up row (the
// GateUpMap decides where they live in w13), so each thread's accumulator pair
// (c[2h], c[2h+1]) is (gate, up) of one intermediate column and the activation needs no
// data exchange. The tile then writes BN / 2 output columns.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "core/activation_math.h"
#include "cuda/gemm/grouped_gemm.h"

namespace modmoe::cuda::gemm {

// ---------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 fills the 16 bytes with zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b, m16n8k16, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---------------------------------------------------------------------------------------
// Tile configuration (compile time), mirrored at run time by GemmConfig
// ---------------------------------------------------------------------------------------

template <int BM, int BN, int Stages, int WarpsM, int WarpsN, int MinBlocks>
struct Sm80Tile {
  static constexpr int kBlockM = BM;
  static constexpr int kBlockN = BN;
  static constexpr int kBlockK = 32;  // the swizzle above assumes 4 chunks per row
  static constexpr int kStages = Stages;
  static constexpr int kWarpsM = WarpsM;
  static constexpr int kWarpsN = WarpsN;
  static constexpr int kMinBlocks = MinBlocks;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWarpTileM = BM / WarpsM;
  static constexpr int kWarpTileN = BN / WarpsN;
  static constexpr int kMmaM = kWarpTileM / 16;  // m16 fragments per warp
  static constexpr int kMmaN = kWarpTileN / 8;   // n8 fragments per warp
  static constexpr int kChunks = kBlockK / 8;    // 16-byte chunks per smem row
  static constexpr int kAIters = BM * kChunks / kThreads;
  static constexpr int kBIters = BN * kChunks / kThreads;
  static constexpr int kAStageBytes = BM * kBlockK * 2;
  static constexpr int kStageBytes = (BM + BN) * kBlockK * 2;
  static constexpr int kCPitch = BN + 8;  // bf16 elements per staged output row
  static constexpr int kSmemBytes =
      kStages * kStageBytes > BM * kCPitch * 2 ? kStages * kStageBytes : BM * kCPitch * 2;

  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 16 == 0, "warp tile: m16 x n16 steps");
  static_assert(BM * kChunks % kThreads == 0 && BN * kChunks % kThreads == 0,
                "every thread copies the same number of chunks");
  static_assert(kThreads % kChunks == 0, "a thread keeps one chunk column");
  static_assert(BM <= kThreads, "row info is loaded one row per thread");

  static GemmConfig config() { return {BM, BN, kBlockK, Stages, WarpsM, WarpsN}; }
};

struct Sm80Params {
  GemmArgs args;
  int num_experts;  // E_local
  int n;            // output columns
  int k;            // reduction length
  int gated;        // GEMM1: B rows come in (gate, up) pairs
  int stage1 = 0;   // W4A16 kernel: GEMM1 (activation, LoRA) rather than GEMM2, at run time
  int split_k = 1;  // W4A16 deep tile: K slices (grid z), summed by the last CTA of a tile
};

// ---------------------------------------------------------------------------------------
// Tile prologue (every sm80 kernel: the bf16 tiles, the W4A16 ones): the (expert, token tile) of work-list tile `tile` (binary search
// over tile_offsets) and the A row / LoRA row of each of its BM tokens in shared memory (-1
// past the expert's rows), followed by a barrier. false (before any barrier, uniform over the
// CTA): the tile is past the device-side tile count and the CTA exits.
// ---------------------------------------------------------------------------------------
struct Sm80TileRows {
  int expert;
  int row0;  // first row of the row space
  int rows;  // valid tokens of the tile, 1..BM
};

template <int BM>
__device__ __forceinline__ bool sm80_tile_rows(const Sm80Params& p, int tile,
                                                int32_t* s_a_row, int32_t* s_lora_row,
                                                Sm80TileRows& out) {
  const GemmArgs& g = p.args;
  if (tile >= g.tile_offsets[p.num_experts]) return false;
  int lo = 0, hi = p.num_experts;  // tile_offsets[lo] <= tile < tile_offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (g.tile_offsets[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int m_tile = tile - g.tile_offsets[lo];
  out.expert = lo;
  out.row0 = g.row_begin[lo] + m_tile * BM;
  out.rows = min(BM, g.row_count[lo] - m_tile * BM);
  const int tid = threadIdx.x;
  if (tid < BM) {
    int32_t a_row = -1;
    int32_t lora_row = -1;
    if (tid < out.rows) {
      if (g.a_gather != nullptr) {
        const int32_t expanded = g.a_gather[out.row0 + tid];
        if (expanded >= 0) {
          a_row = expanded / g.gather_div;
          lora_row = expanded;
        }
      } else {
        a_row = out.row0 + tid;
      }
    }
    s_a_row[tid] = a_row;
    s_lora_row[tid] = lora_row;
  }
  __syncthreads();
  return true;
}

// Byte offset of 16-byte chunk c of row r in a swizzled [rows][32] bf16 tile.
__device__ __forceinline__ uint32_t swizzle_offset(int r, int c) {
  return static_cast<uint32_t>(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

__device__ __forceinline__ int64_t gate_up_row(const GateUpMap& m, int64_t i, bool up) {
  return (i / m.group) * 2 * m.group + i % m.group + (up ? m.up_offset : m.gate_offset);
}

// The epilogue's coalesced 16-byte stores of the staged tile sc [BM][kCPitch] bf16: rows
// r < rows to C row row0 + r, columns col0 + [0, out_cols) below n.
template <class Tile>
__device__ __forceinline__ void store_staged_tile(const __nv_bfloat16* sc, const GemmArgs& g,
                                                  int n, int row0, int rows, int64_t col0,
                                                  int out_cols, int tid) {
  const int chunks_per_row = out_cols / 8;
  for (int idx = tid; idx < Tile::kBlockM * chunks_per_row; idx += Tile::kThreads) {
    const int r = idx / chunks_per_row;
    const int c = idx % chunks_per_row;
    const int64_t col = col0 + c * 8;
    if (r < rows && col < n) {
      *reinterpret_cast<uint4*>(g.c + static_cast<int64_t>(row0 + r) * g.ldc + col) =
          *reinterpret_cast<const uint4*>(sc + r * Tile::kCPitch + c * 8);
    }
  }
}

template <class Tile, bool kGemm1>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    sm80_grouped_gemm_kernel(const __grid_constant__ Sm80Params p) {
  constexpr int BM = Tile::kBlockM;
  constexpr int BN = Tile::kBlockN;
  constexpr int BK = Tile::kBlockK;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kChunks = Tile::kChunks;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int32_t s_a_row[BM];     // A row of each tile row; -1 past the expert's rows
  __shared__ int32_t s_lora_row[BM];  // GEMM1 standard: expanded index (LoRA delta row)

  const GemmArgs& g = p.args;
  const int tid = threadIdx.x;

  // ---- which tile: the work list lives on the device, the grid is an upper bound ----
  Sm80TileRows t_rows;
  if (!sm80_tile_rows<BM>(p, static_cast<int>(blockIdx.x), s_a_row, s_lora_row, t_rows)) return;
  const int expert = t_rows.expert;
  const int row0 = t_rows.row0;  // first row of the row space
  const int rows = t_rows.rows;  // valid rows in this tile
  const int n_tile = static_cast<int>(blockIdx.y);
  const bool gated = kGemm1 && p.gated;

  // ---- per-thread copy plan: fixed rows, one chunk column, across every k-tile ----
  const int chunk = tid % kChunks;
  const __nv_bfloat16* a_src[Tile::kAIters];  // row start, or null for a zero row
  uint32_t a_dst[Tile::kAIters];
#pragma unroll
  for (int i = 0; i < Tile::kAIters; ++i) {
    const int r = tid / kChunks + i * (kThreads / kChunks);
    const int32_t ar = s_a_row[r];
    a_src[i] = ar >= 0 ? g.a + static_cast<int64_t>(ar) * g.lda : nullptr;
    a_dst[i] = swizzle_offset(r, chunk);
  }
  const __nv_bfloat16* b_expert = g.b + static_cast<int64_t>(expert) * g.b_expert_stride;
  const __nv_bfloat16* b_src[Tile::kBIters];
  uint32_t b_dst[Tile::kBIters];
#pragma unroll
  for (int i = 0; i < Tile::kBIters; ++i) {
    const int r = tid / kChunks + i * (kThreads / kChunks);
    int64_t b_row;
    bool valid;
    if (gated) {
      const int64_t col = static_cast<int64_t>(n_tile) * (BN / 2) + r / 2;
      valid = col < p.n;
      b_row = gate_up_row(g.gate_up, col, (r & 1) != 0);
    } else {
      const int64_t col = static_cast<int64_t>(n_tile) * BN + r;
      valid = col < p.n;
      b_row = col;
    }
    b_src[i] = valid ? b_expert + b_row * g.ldb : nullptr;
    b_dst[i] = Tile::kAStageBytes + swizzle_offset(r, chunk);
  }

  const uint32_t smem_base = smem_u32(smem);
  const int num_k_tiles = (p.k + BK - 1) / BK;
  auto load_stage = [&](int slot, int k_tile) {
    const uint32_t stage = smem_base + slot * Tile::kStageBytes;
    const int k_elem = (k_tile * kChunks + chunk) * 8;
    const bool k_ok = k_elem < p.k;  // K % 8 == 0: a chunk is all in or all out
#pragma unroll
    for (int i = 0; i < Tile::kAIters; ++i) {
      const bool ok = k_ok && a_src[i] != nullptr;
      cp_async_16(stage + a_dst[i], ok ? a_src[i] + k_elem : g.a, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < Tile::kBIters; ++i) {
      const bool ok = k_ok && b_src[i] != nullptr;
      cp_async_16(stage + b_dst[i], ok ? b_src[i] + k_elem : g.b, ok ? 16 : 0);
    }
  };

  // ---- main loop: Stages - 1 tiles in flight, one barrier per k-tile ----
  float acc[Tile::kMmaM][Tile::kMmaN][4];
#pragma unroll
  for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_m = warp / Tile::kWarpsN;
  const int warp_n = warp % Tile::kWarpsN;

  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<Tile::kStages - 2>();
    __syncthreads();  // k-tile kt visible to all; slot (kt - 1) % Stages free to refill
    const int next = kt + Tile::kStages - 1;
    if (next < num_k_tiles) load_stage(next % Tile::kStages, next);
    cp_async_commit();

    const uint32_t sa = smem_base + (kt % Tile::kStages) * Tile::kStageBytes;
    const uint32_t sb = sa + Tile::kAStageBytes;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[Tile::kMmaM][4];
      uint32_t bf[Tile::kMmaN][2];
#pragma unroll
      for (int mi = 0; mi < Tile::kMmaM; ++mi) {
        const int r = warp_m * Tile::kWarpTileM + mi * 16 + (lane % 16);
        ldmatrix_x4(af[mi], sa + swizzle_offset(r, kk * 2 + lane / 16));
      }
#pragma unroll
      for (int nj = 0; nj < Tile::kMmaN / 2; ++nj) {
        const int r = warp_n * Tile::kWarpTileN + nj * 16 + (lane / 16) * 8 + (lane % 8);
        uint32_t t[4];
        ldmatrix_x4(t, sb + swizzle_offset(r, kk * 2 + (lane / 8) % 2));
        bf[2 * nj][0] = t[0];
        bf[2 * nj][1] = t[1];
        bf[2 * nj + 1][0] = t[2];
        bf[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tile::kMmaN; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline memory becomes the output staging tile

  // ---- epilogue in fp32 (docs/HELPERS.md "Numerics"), staged as bf16 in shared memory ----
  __nv_bfloat16* sc = reinterpret_cast<__nv_bfloat16*>(smem);  // [BM][kCPitch]
  const int grp = lane / 4;  // accumulator row within an m16 fragment (and +8)
  const int qid = lane % 4;  // accumulator column pair within an n8 fragment
  const int out_cols = gated ? BN / 2 : BN;
  const int64_t col0 = static_cast<int64_t>(n_tile) * out_cols;

  if constexpr (kGemm1) {
    const Activation kind = static_cast<Activation>(g.activation.kind);
    const EpilogueActivation& ea = g.activation;
    const float alpha = ea.alpha_per_expert ? ea.alpha_per_expert[expert] : ea.alpha;
    const float beta = ea.beta_per_expert ? ea.beta_per_expert[expert] : ea.beta;
    const float limit = ea.limit_per_expert ? ea.limit_per_expert[expert] : ea.limit;
    const float* bias = g.bias ? g.bias + static_cast<int64_t>(expert) * g.bias_expert_stride
                               : nullptr;
    if (gated) {
#pragma unroll
      for (int ni = 0; ni < Tile::kMmaN; ++ni) {
        const int j = (warp_n * Tile::kWarpTileN + ni * 8) / 2 + qid;  // local output column
        const int64_t col = col0 + j;                                  // intermediate column
        const bool col_ok = col < p.n;
        float bias_gate = 0.0f;
        float bias_up = 0.0f;
        if (bias != nullptr && col_ok) {
          bias_gate = bias[gate_up_row(g.gate_up, col, false)];
          bias_up = bias[gate_up_row(g.gate_up, col, true)];
        }
#pragma unroll
        for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = warp_m * Tile::kWarpTileM + mi * 16 + grp + 8 * h;
            float gate = acc[mi][ni][2 * h];
            float up = acc[mi][ni][2 * h + 1];
            if (bias != nullptr) {
              gate += bias_gate;
              up += bias_up;
            }
            const int32_t lora_row = s_lora_row[r];
            if (g.lora != nullptr && col_ok && lora_row >= 0) {
              const __nv_bfloat16* l = g.lora + static_cast<int64_t>(lora_row) * g.ld_lora;
              gate += __bfloat162float(l[g.gate_up.lora_gate_col + col]);
              up += __bfloat162float(l[g.gate_up.lora_up_col + col]);
            }
            sc[r * Tile::kCPitch + j] =
                __float2bfloat16_rn(act::apply_activation(kind, gate, up, alpha, beta, limit));
          }
      }
    } else {
#pragma unroll
      for (int ni = 0; ni < Tile::kMmaN; ++ni)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = warp_n * Tile::kWarpTileN + ni * 8 + 2 * qid + c;
          const int64_t col = col0 + j;
          const bool col_ok = col < p.n;
          const float b = (bias != nullptr && col_ok) ? bias[col] : 0.0f;
#pragma unroll
          for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = warp_m * Tile::kWarpTileM + mi * 16 + grp + 8 * h;
              float x = acc[mi][ni][2 * h + c];
              if (bias != nullptr) x += b;
              const int32_t lora_row = s_lora_row[r];
              if (g.lora != nullptr && col_ok && lora_row >= 0) {
                x += __bfloat162float(g.lora[static_cast<int64_t>(lora_row) * g.ld_lora + col]);
              }
              sc[r * Tile::kCPitch + j] =
                  __float2bfloat16_rn(act::apply_activation(kind, x, 0.0f, alpha, beta, limit));
            }
        }
    }
  } else {
    const float* bias = g.bias ? g.bias + static_cast<int64_t>(expert) * g.bias_expert_stride
                               : nullptr;
#pragma unroll
    for (int ni = 0; ni < Tile::kMmaN; ++ni) {
      const int j = warp_n * Tile::kWarpTileN + ni * 8 + 2 * qid;
      const int64_t col = col0 + j;
      float b0 = 0.0f;
      float b1 = 0.0f;
      if (bias != nullptr && col < p.n) {  // n % 8 == 0: col and col + 1 are in or out together
        b0 = bias[col];
        b1 = bias[col + 1];
      }
#pragma unroll
      for (int mi = 0; mi < Tile::kMmaM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = warp_m * Tile::kWarpTileM + mi * 16 + grp + 8 * h;
          float x0 = acc[mi][ni][2 * h];
          float x1 = acc[mi][ni][2 * h + 1];
          if (bias != nullptr) {
            x0 += b0;
            x1 += b1;
          }
          *reinterpret_cast<__nv_bfloat162*>(sc + r * Tile::kCPitch + j) =
              __floats2bfloat162_rn(x0, x1);
        }
    }
  }
  __syncthreads();

  store_staged_tile<Tile>(sc, g, p.n, row0, rows, col0, out_cols, tid);
}

}  // namespace modmoe::cuda::gemm
