// The grouped BF16 GEMMs of the experts stage, behind a Desc / Config / Args interface with
// three kernel families behind it:
//   sm80  mma.sync + cp.async (sm80_mma_grouped_gemm.cuh): any layout, any sm_80+ GPU;
//   sm90  TMA + wgmma, warp-specialized and persistent (sm90_wgmma_grouped_gemm.cuh): Hopper,
//         weights as the wgmma A operand ("swap AB"), split-K for decode.
//   w4a16 mma.sync + cp.async (sm80_w4a16_grouped_gemm.cuh): NVFP4 weights decoded to bf16 in
//         registers, bf16 activations (docs/nvfp4.md); any sm_80+ GPU the build targets. Its
//         prefill tile on Hopper: the sm90 kernel with NVFP4 weights decoded into wgmma's A
//         registers (Sm90W4a16Tile, sm90_w4a16_grouped_gemm.cu).
//
//   GemmDesc    the problem (sizes, which GEMM, activation), with validate()
//   GemmConfig  one compiled tile shape (sizes, stages, warps), with to_string()
//   GemmArgs    device pointers and strides of one call
//   select_config(desc, props) -> a config from compiled_configs(), a pure function
//   launch_grouped_gemm(desc, config, args, stream)
//
// Restrictions, said plainly:
//   - groups vary M only: every expert has the same N and K;
//   - K % 8 == 0 and N % 8 == 0 (16-byte rows; tails of a tile are predicated);
//   - rows of the row space (M*k, or E_local*max_m) fit in int32.
//
// The row space. Both GEMMs address the rows they read and write through one index space:
// expert e owns rows [row_begin[e], row_begin[e] + row_count[e]). Standard format: the
// permuted rows (row_begin = expert_first_token_offset). Batched format: e * max_m + r.
// A device-side work list (build_work_list in experts.cu) turns the counts into
// tile_offsets; the GEMM grid is an upper bound on the tiles computed from sizes alone, so
// nothing waits on the host, and blocks past the device-side tile count exit at once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <string>

#include "modmoe/experts.h"

namespace modmoe::cuda::gemm {

enum class GemmStage : uint8_t {
  Gemm1,  // act = activation(A @ w13[e]^T + bias + lora), A rows gathered from hidden
  Gemm2,  // out = A @ w2[e]^T + bias, A = act rows
};

// What select_config may look at. Filled once per device (query()), then passed by value.
struct DeviceProps {
  int device = 0;
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  size_t max_smem_per_block = 0;  // opt-in limit

  static DeviceProps query(int device);  // cached per device; no stream work
};

struct GemmDesc {
  GemmStage stage = GemmStage::Gemm1;
  int num_experts = 0;           // E_local: the groups
  int64_t max_rows = 0;          // rows of the row space the GEMM may touch (M*k or E*max_m)
  int64_t max_rows_per_expert = 0;  // upper bound of one group's rows (M*k, or max_m)
  // Rows the routing is expected to bring, for the tile choice only (0: max_rows). With
  // expert parallelism most of the M*k slots are remote: about M*k*E_local/E are local.
  int64_t expected_rows = 0;
  int64_t n = 0;  // output columns: GEMM1 = I (gated or not), GEMM2 = H
  int64_t k = 0;  // reduction: GEMM1 = H, GEMM2 = I
  bool gated = false;  // GEMM1 only: B has 2n rows (gate and up) per expert
  // Gated GEMM1: 8 when B's rows come as 8 gate rows then the 8 matching up rows
  // (GateUpInterleaved with G = 8, the only gated layout the sm90 kernel reads); any other
  // value (-1 for the other layouts) keeps the problem on the mma.sync kernel.
  int64_t gate_up_group = 0;
  // Every pointer and row stride of the call is 16-byte aligned (TMA and cp.async need it).
  bool aligned16 = true;
  // The caller may take the sm90 kernel (false: the mma.sync kernel only).
  bool allow_sm90 = true;
  // FP8 (docs/fp8.md): A and B are e4m3 with fp32 dequantization scales per 128 of K
  // (GemmArgs::a_scale, b_scale); the sm90 FP8 kernels only. Needs k % 128 == 0 and
  // b_rows() % 128 == 0.
  bool fp8 = false;
  // FP8 fast accumulation allowed (ExpertsOptions::fp8_fast_accum; docs/fp8.md "FP8 fast
  // accumulation"): an FP8 GEMM1 whose scales do not change along K (Fp8PerTensor: GemmArgs
  // a_scale_kb == b_scale_kb == 0, checked at launch) may take the 256-token fast-accumulation
  // tile (Sm90Tile::kFastAccum), which sums all of K in the tensor cores' accumulator and
  // multiplies by the scales once, in the epilogue. select_config picks it past 128 rows per
  // group; elsewhere (and unset, the default) the FP8 tiles apply the scales every 128 of K in
  // CUDA-core fp32. The fast tile runs such GEMMs only.
  bool fp8_fast_accum = false;
  // NVFP4 weights, bf16 activations (W4A16, docs/nvfp4.md): B is packed e2m1 pairs with e4m3
  // scales per 16 of K and an fp32 global scale per expert (GemmArgs::b_block_scale,
  // b_global_scale); the w4a16 kernels only. Needs k % 64 == 0 (one stage = 4 scale blocks).
  bool nvfp4 = false;
  // NVFP4 only: select_config may pick the wgmma W4A16 tile (sm90 W4A16) at prefill sizes.
  // The experts stage clears it for MODMOE_W4A16_WGMMA=0 (on by default); a forced config
  // (MODMOE_GEMM_CONFIG) does not look at it.
  bool allow_w4a16_wgmma = true;
  // Rows of B (per expert) that the GEMM reads: 2n gated, else n.
  int64_t b_rows() const { return gated ? 2 * n : n; }
  // Upper bound of the number of (expert, m-tile) pairs, from sizes alone:
  // sum_e ceil(c_e / BM) <= floor(rows / BM) + E, <= E * ceil(max_per_expert / BM), <= rows.
  int64_t max_m_tiles(int block_m) const;
  // Whether the sm90 kernel can run this problem (the device is not looked at).
  bool sm90_supported() const;
  // Whether the wgmma W4A16 tile can run this NVFP4 problem (the device is not looked at):
  // aligned, and gated GEMM1 with GateUpInterleaved G = 8 (as sm90_supported).
  bool sm90_w4a16_supported() const;
  void validate() const;
};

struct GemmConfig {
  int block_m = 0;  // rows of the row space (tokens) per tile; sm90: the most, see below
  int block_n = 0;  // rows of B (weights) per tile (gated GEMM1: block_n / 2 output columns)
  int block_k = 0;
  int stages = 0;
  int warps_m = 0;  // sm90: consumer warpgroups
  int warps_n = 0;  // sm90: producer warpgroups
  int arch = 80;    // 80: mma.sync kernel, 90: TMA + wgmma kernel
  // sm90 and the W4A16 deep decode tile, a run-time choice (not compiled): K is cut into
  // split_k slices whose fp32 partial tiles are summed in slice order by the last CTA to finish
  // a tile (deterministic).
  int split_k = 1;
  // sm90 only, a run-time choice (not compiled): the last row tile of an expert may hold up to
  // block_m + tail_m rows (0, or the tile's tail: 16 narrow, 32 wide; never with split-K), so
  // an expert of block_m + a few rows runs one tile, not a full one plus a nearly empty one
  // that reads the whole weight tile again. The work list counts tiles with row_tiles().
  int tail_m = 0;
  // The W4A16 kernels (sm80_w4a16_grouped_gemm.cuh): block_m tokens x block_n weight rows,
  // block_k = 64 (W4a16Tile) or 256 (the deep decode tile, W4a16DeepTile), warps_n warps over
  // the weight rows; arch 80. With arch 90: the wgmma W4A16 tile (sm90_wgmma_grouped_gemm.cuh,
  // Sm90W4a16Tile; warps_m consumer warpgroups, tail_m as the sm90 tiles, no split-K).
  bool nvfp4 = false;

  int threads() const { return arch == 90 ? 128 * (warps_m + warps_n) : 32 * warps_m * warps_n; }
  // The compiled config behind this one: the run-time choices (split_k, tail_m) at their
  // defaults, what compiled_configs() lists and the launchers switch on.
  GemmConfig compiled_base() const {
    GemmConfig c = *this;
    c.split_k = 1;
    c.tail_m = 0;
    return c;
  }
  // "128x128x32_s4_w2x4", "sm90_64x128x64_s8", "..._k4" (split-K), "..._t32" (tail rows),
  // "w4a16_16x128x64_s6", "w4a16_16x128x256_s8_k2" (NVFP4, split-K),
  // "w4a16_wgmma_256x128x64_s5", "..._t32" (NVFP4 on wgmma, tail rows)
  std::string to_string() const;
  bool operator==(const GemmConfig&) const = default;
};

// Row tiles of an expert with `count` rows: ceil(count / block_m) without tail rows; with them
// the last tile takes up to block_m + tail_m rows (every other tile has block_m):
// count <= block_m + tail_m -> 1, else ceil((count - tail_m) / block_m). 0 for count <= 0.
// The work-list kernel (experts.cu) and the sm90 kernel's tile decode follow this formula.
constexpr int32_t row_tiles(int32_t count, int32_t block_m, int32_t tail_m) {
  if (count <= 0) return 0;
  if (count <= block_m + tail_m) return 1;
  return (count - tail_m + block_m - 1) / block_m;
}

// Every config that grouped_gemm.cu instantiates (split_k = 1, tail_m = 0), the only ones
// select_config may return (with split_k in [1, max_split_k()] and tail_m in {0,
// sm90_tail_rows()} for sm90 configs).
std::span<const GemmConfig> compiled_configs();
bool is_compiled(const GemmConfig& config);
// Whether a compiled config can run the problem: the element type (FP8 configs have
// block_k = 128 and are sm90; NVFP4 problems run on the nvfp4 configs only), the sm90
// conditions (sm90_supported, allow_sm90).
bool config_runs(const GemmDesc& desc, const GemmConfig& config);
// The FP8 tiles: sm90 with 128-element (128-byte e4m3) k-blocks.
bool is_fp8_config(const GemmConfig& config);
int max_split_k();
// The tail rows an sm90 config may take (tail_m when on): the tile's wgmma N step.
int sm90_tail_rows(const GemmConfig& config);

// Split-K capacity of a problem, a pure function of the sizes (the workspace is sized by it):
// split-K is for decode, where the tiles are too few to keep every SM streaming weights.
// bf16 / FP8: every group has at most 16 rows (the sm90 narrow tile); NVFP4: the deep W4A16
// decode tile's tiles (16 tokens x 128 weight rows) number at most 1024. max_split = 1: no split.
struct SplitKCapacity {
  int max_split = 1;
  int64_t max_tiles = 0;       // upper bound of the (expert, row tile, column tile) tiles
  int64_t partial_floats = 0;  // fp32 scratch: max_tiles * max_split units of 2048 floats
};
SplitKCapacity split_k_capacity(const GemmDesc& desc);

// Pure: same (desc, props) -> same config.
GemmConfig select_config(const GemmDesc& desc, const DeviceProps& props);

// Where the gate and the up rows of intermediate column i live in one expert's w13, and
// where their LoRA delta columns are. row(i) = (i / group) * 2 * group + i % group + offset:
//   canonical GateUp: group = I, gate offset 0, up offset I;
//   canonical UpGate: group = I, gate offset I, up offset 0;
//   GateUpInterleaved with G rows: group = G, gate offset 0, up offset G.
struct GateUpMap {
  int64_t group = 0;
  int64_t gate_offset = 0;
  int64_t up_offset = 0;
  int64_t lora_gate_col = 0;  // LoRA delta columns are canonical: gate at i + lora_gate_col
  int64_t lora_up_col = 0;

  static GateUpMap from(const ExpertWeights& w, int64_t intermediate);
};

// Activation of the GEMM1 epilogue, in device-readable form.
struct EpilogueActivation {
  int kind = 0;  // Activation as int
  float alpha = 1.702f;
  float beta = 1.0f;
  float limit = 7.0f;
  const float* alpha_per_expert = nullptr;  // [E_local] fp32, optional
  const float* beta_per_expert = nullptr;   // [E_local] fp32, optional
  const float* limit_per_expert = nullptr;  // [E_local] fp32, optional
};

struct GemmArgs {
  // The work list (device), see build_work_list in experts.cu.
  const int32_t* tile_offsets = nullptr;  // [E_local + 1], exclusive prefix of m-tiles
  const int32_t* row_begin = nullptr;     // [E_local]
  const int32_t* row_count = nullptr;     // [E_local]

  // A: [*, k] bf16, row stride lda. With a_gather, row r of the row space reads A row
  // a_gather[r] / gather_div (GEMM1 standard: permuted_idx_to_expanded_idx / top_k);
  // without it, A row r.
  const __nv_bfloat16* a = nullptr;
  int64_t lda = 0;
  const int32_t* a_gather = nullptr;  // [rows] int32
  int gather_div = 1;

  // B: expert e is [b_rows, k] bf16 at b + e * b_expert_stride, row stride ldb.
  const __nv_bfloat16* b = nullptr;
  int64_t b_expert_stride = 0;
  int64_t ldb = 0;
  GateUpMap gate_up;  // gated GEMM1 only

  // Epilogue: + bias[e * bias_expert_stride + b row], + lora[a_gather[r] * ld_lora + col].
  const float* bias = nullptr;
  int64_t bias_expert_stride = 0;
  const __nv_bfloat16* lora = nullptr;  // GEMM1 standard only: [M*k, 2I or I] bf16
  int64_t ld_lora = 0;
  EpilogueActivation activation;  // GEMM1 only

  // FP8 scales (desc.fp8), dequantization multipliers applied per k-block kb (128 of K):
  //   A row a (the row A is read from) : a_scale[a * a_scale_ld + kb * a_scale_kb]
  //     Fp8Block128 [*, k/128]: (k/128, 1); per-row [*]: (1, 0); per-tensor [1]: (0, 0)
  //   B row f of expert e : b_scale[e * b_scale_expert + block(f) * b_scale_ld + kb * b_scale_kb]
  //     block(f) = b_scale_gate_up ? 2 (f / 256) + (f / 8) % 2   (GateUpInterleaved G = 8 with
  //                the scale rows of prepare_weights: gate block j at 2j, up block j at 2j + 1)
  //                : f / 128;  per-expert scales: (b_scale_expert, ld, kb) = (1, 0, 0)
  // With FP8, `a` and `b` point at e4m3 bytes (lda, ldb, b_expert_stride count elements).
  // With desc.fp8_fast_accum (scales constant along K: a_scale_kb == 0 and b_scale_kb == 0)
  // they are not applied per k-block: out = (the tensor cores' sum over all of K) * (a scale *
  // b scale), the product of the scales rounded first (docs/fp8.md "FP8 fast accumulation").
  const float* a_scale = nullptr;
  int64_t a_scale_ld = 0;
  int a_scale_kb = 0;
  const float* b_scale = nullptr;
  int64_t b_scale_expert = 0;
  int64_t b_scale_ld = 0;
  int b_scale_kb = 0;
  int b_scale_gate_up = 0;

  // NVFP4 weights (desc.nvfp4): `b` points at E2M1x2 bytes, element 2i in the low nibble of
  // byte i (ldb and b_expert_stride count bytes). Weight row f of expert e, K value kk:
  //   block scale  b_block_scale[e * b_block_scale_expert + f * b_block_scale_ld + kk / 16]  e4m3
  //   global scale b_global_scale[e]  fp32, multiplies the accumulator (docs/nvfp4.md)
  // Linear scales [E_local, rows, K/16]: 4-byte aligned (K % 64 == 0).
  const uint8_t* b_block_scale = nullptr;
  int64_t b_block_scale_expert = 0;
  int64_t b_block_scale_ld = 0;
  const float* b_global_scale = nullptr;

  // C: row r of the row space at c + r * ldc, n columns bf16.
  __nv_bfloat16* c = nullptr;
  int64_t ldc = 0;

  // Split-K scratch (config.split_k > 1: sm90, W4A16 deep tile), sized by split_k_capacity(desc):
  float* split_partials = nullptr;    // [max_tiles * max_split, 2048] fp32
  int32_t* split_counters = nullptr;  // [max_tiles] int32, zero before the launch
};

// Launches one grouped GEMM on `stream`. No allocation, no host synchronisation. sm90 kernels
// are launched with programmatic dependent launch (they wait for the previous kernel of the
// stream before reading anything) unless MODMOE_NO_PDL=1.
void launch_grouped_gemm(const GemmDesc& desc, const GemmConfig& config, const GemmArgs& args,
                         cudaStream_t stream);

// Whether kernels of the experts stage use programmatic dependent launch (MODMOE_NO_PDL unset
// or 0), read once.
bool use_pdl();
// The same for the stage's other kernels (permute, work list, finalize): only with
// MODMOE_STAGE_PDL=1 as well, read once.
bool use_stage_pdl();

// sm90 launcher (sm90_grouped_gemm.cu); launch_grouped_gemm calls it for arch 90 configs.
void launch_sm90_grouped_gemm(const GemmDesc& desc, const GemmConfig& config,
                              const GemmArgs& args, cudaStream_t stream);
// W4A16 launcher (w4a16_grouped_gemm.cu); launch_grouped_gemm calls it for nvfp4 configs.
void launch_w4a16_grouped_gemm(const GemmDesc& desc, const GemmConfig& config,
                               const GemmArgs& args, cudaStream_t stream);
// wgmma W4A16 launcher (sm90_w4a16_grouped_gemm.cu); launch_grouped_gemm calls it for nvfp4
// configs with arch 90.
void launch_sm90_w4a16_grouped_gemm(const GemmDesc& desc, const GemmConfig& config,
                                    const GemmArgs& args, cudaStream_t stream);

}  // namespace modmoe::cuda::gemm
