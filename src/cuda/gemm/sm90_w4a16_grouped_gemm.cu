// Host side of the wgmma W4A16 grouped GEMM (NVFP4 weights, bf16 tokens, sm_90a; docs/nvfp4.md
// "Hopper wgmma kernel"): the tile, its launch and its explicit instantiations of
// sm90_wgmma_grouped_gemm.cuh (the kernel family of the bf16 / FP8 sm90 tiles, with the weight
// operand decoded into wgmma's A registers).
//
// Instantiations: 1 tile x 2 stages (GEMM1, GEMM2) = 2 kernels. The wgmma width per tile (8
// widths plus the tail variant), activation, gating, bias, LoRA and gather are run-time.
#include <cuda.h>


#include "cuda/device/cuda_check.h"
#include "cuda/device/launch.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90_wgmma_grouped_gemm.cuh"

namespace modmoe::cuda::gemm {

// Prefill: up to 256 tokens per tile (288 with the tail rows), N in steps of 32, 5 stages of
// 36 KB of tokens + 4 KB of packed weights + 0.5 KB of block scales (the bf16 wide tile's token
// side; a stage of 64 of K, one TMA box of weights). Each weight is decoded once per 256 tokens
// (the mma.sync prefill tile: once per 64).
using Sm90W4a16Wide = Sm90W4a16Tile<256, 5, 32>;

GemmConfig sm90_w4a16_config() { return Sm90W4a16Wide::config(); }
size_t sm90_w4a16_smem_bytes() { return Sm90W4a16Wide::kSmemBytes; }
int sm90_w4a16_tail_rows() { return Sm90W4a16Wide::kTail; }

namespace {

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <class Tile, bool kGemm1>
void launch_tile(const GemmDesc& desc, const GemmConfig& config, const GemmArgs& args,
                 cudaStream_t stream) {
  const auto kernel = sm90_grouped_gemm_kernel<Tile, kGemm1>;
  static DynamicSmemOptIn smem_opt_in;
  const int device = smem_opt_in.ensure(kernel, Tile::kSmemBytes);
  const DeviceProps props = DeviceProps::query(device);
  MODMOE_CHECK(props.cc_major == 9 && props.cc_minor == 0, "sm90 W4A16 grouped GEMM: ",
               config.to_string(), " runs on sm_90 (Hopper) only; device ", device, " is sm_",
               props.cc_major, props.cc_minor);

  const int64_t n_tiles = (desc.b_rows() + Tile::kBlockN - 1) / Tile::kBlockN;
  const int64_t m_tiles = desc.max_m_tiles(Tile::kBlockM);
  const int64_t units = m_tiles * n_tiles;
  if (units == 0) return;
  MODMOE_CHECK(units < INT32_MAX, "sm90 W4A16 grouped GEMM: ", units,
               " work units: expected < 2^31");

  Sm90Params params{};
  params.tmap_w = sm90_packed_weight_map(desc, args, Tile::kWRowBytes);
  params.x_tma = args.a_gather == nullptr ? 1 : 0;
  if (params.x_tma) params.tmap_x = sm90_token_map(desc, args, Tile::kNStep);
  sm90_fill_params(params, desc, config, args, n_tiles);

  const int sms = props.sm_count > 0 ? props.sm_count : 132;
  const unsigned grid = static_cast<unsigned>(units < sms ? units : sms);
  launch_kernel(kernel, dim3(grid), Tile::kThreads, Tile::kSmemBytes, stream, use_pdl(), params);
}

}  // namespace

void launch_sm90_w4a16_grouped_gemm(const GemmDesc& desc, const GemmConfig& config,
                                    const GemmArgs& args, cudaStream_t stream) {
  using Tile = Sm90W4a16Wide;
  GemmConfig base = config;
  base.tail_m = 0;
  MODMOE_CHECK(base == Tile::config(), "sm90 W4A16 grouped GEMM: config ", config.to_string(),
               " is not compiled; compiled: ", Tile::config().to_string());
  MODMOE_CHECK(config.tail_m == 0 || config.tail_m == Tile::kTail, "sm90 W4A16 grouped GEMM: ",
               "tail_m = ", config.tail_m, ": expected 0 or ", Tile::kTail);
  MODMOE_CHECK(desc.nvfp4, "sm90 W4A16 grouped GEMM: ", config.to_string(),
               " needs an NVFP4 problem (packed e2m1 weights)");
  MODMOE_CHECK(desc.sm90_w4a16_supported(), "sm90 W4A16 grouped GEMM: ", config.to_string(),
               " cannot run this problem: it needs 16-byte aligned operands, k % 64 == 0 (k = ",
               desc.k, ") and, gated, the GateUpInterleaved layout with G = 8 (prepare_weights "
               "with interleave_rows = 8); the mma.sync W4A16 tiles (w4a16_*) read every layout");
  MODMOE_CHECK(args.b_block_scale != nullptr && args.b_global_scale != nullptr,
               "sm90 W4A16 grouped GEMM: the block and global scales are missing");
  MODMOE_CHECK(aligned(args.a, 16) && aligned(args.b, 16) && aligned(args.c, 16) &&
                   args.lda % 8 == 0 && args.ldb % 16 == 0 && args.b_expert_stride % 16 == 0 &&
                   args.ldc % 8 == 0,
               "sm90 W4A16 grouped GEMM: pointers and row strides must be 16-byte aligned (lda ",
               args.lda, ", ldb ", args.ldb, " bytes, expert stride ", args.b_expert_stride,
               " bytes, ldc ", args.ldc, ")");
  MODMOE_CHECK(aligned(args.b_block_scale, 4) && args.b_block_scale_ld % 4 == 0 &&
                   args.b_block_scale_expert % 4 == 0,
               "sm90 W4A16 grouped GEMM: the block scales must be 4-byte aligned (row stride ",
               args.b_block_scale_ld, ", expert stride ", args.b_block_scale_expert, ")");
  switch (desc.stage) {
    case GemmStage::Gemm1: return launch_tile<Tile, true>(desc, config, args, stream);
    case GemmStage::Gemm2: return launch_tile<Tile, false>(desc, config, args, stream);
  }
  MODMOE_FAIL("sm90 W4A16 grouped GEMM: unknown stage ", static_cast<int>(desc.stage));
}

}  // namespace modmoe::cuda::gemm
