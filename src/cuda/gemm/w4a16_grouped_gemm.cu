// Host side of the W4A16 grouped GEMM (NVFP4 weights, bf16 activations; docs/nvfp4.md): its
// three tiles and the explicit instantiations of sm80_w4a16_grouped_gemm.cuh.
//
// Instantiations: 4 tiles = 4 kernels. GEMM1 / GEMM2, gating, activation, bias, LoRA, the
// gate/up row map and split-K (deep tile) are run-time arguments.
#include <atomic>

#include "cuda/device/cuda_check.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm80_w4a16_grouped_gemm.cuh"

namespace modmoe::cuda::gemm {

// Decode: 16 tokens x 128 weight rows, 6 stages of 4 KB packed weights + 0.5 KB scales + 2 KB
// tokens (39 KB), 4 CTAs per SM: up to 24 weight tiles (~110 KB) in flight per SM, which the
// copy rate of HBM3 over the load latency asks for (about 25 KB per SM at 3.35 TB/s and 1 us).
// Kept selectable (MODMOE_GEMM_CONFIG=w4a16_16x128x64_s6) for A/B against the deep tile, and
// the decode tile of devices whose shared memory cannot hold the deep one.
// Measured on an H100 SXM (2026-11-27, docs/nvfp4.md "Measured"): decode at 15-43 % of the
// copy ceiling on the packed bytes; one CTA per SM at decode grids (tiles <= SMs), so ~5 x 4.5 KB
// in flight per SM, and one warp per SM sub-partition to decode.
using W4a16Decode = W4a16Tile<16, 128, 6, 4>;
// Deep decode: 16 tokens x 128 weight rows, 8 stages of 256 of K (16 KB packed + 2 KB scales +
// 8 KB tokens = 26 KB; 208 KB, one CTA per SM), 8 warps. 7 stages in flight = 126 KB of weights
// and scales per SM, ~5.5x the 64-K tile's; a GEMM with fewer tiles than SMs / 2 splits K
// (select_config). Measured on an H200: docs/nvfp4.md "Deep decode tile".
using W4a16DecodeDeep = W4a16DeepTile<16, 128, 8, 8>;
// Wide deep decode (select_config rule 2a; forced: MODMOE_GEMM_CONFIG=w4a16_16x256x256_s4): 256
// weight rows, 16 warps (four per SM sub-partition, against two: the deep tile's decode ran at
// 2.0 instructions per cycle with half its cycles issuing nothing), 4 stages of 44 KB (176 KB;
// 3 x 36 KB of weights and scales in flight). No split-K. Measured: docs/nvfp4.md "The wide
// deep tile and rule 2a".
using W4a16DecodeWide = W4a16DeepTile<16, 256, 4, 16>;
// Prefill: 64 tokens x 128 weight rows, 4 stages of 4.5 + 8 KB (51 KB), 2 CTAs per SM: each
// decoded weight feeds 8 token fragments.
using W4a16Prefill = W4a16Tile<64, 128, 4, 2>;

GemmConfig w4a16_decode_config() { return W4a16Decode::config(); }
GemmConfig w4a16_decode_deep_config() { return W4a16DecodeDeep::config(); }
GemmConfig w4a16_decode_wide_config() { return W4a16DecodeWide::config(); }
GemmConfig w4a16_prefill_config() { return W4a16Prefill::config(); }
size_t w4a16_decode_deep_smem_bytes() { return W4a16DecodeDeep::kSmemBytes; }
size_t w4a16_decode_wide_smem_bytes() { return W4a16DecodeWide::kSmemBytes; }
int w4a16_split_unit_floats() { return W4a16DecodeDeep::kSplitUnitFloats; }

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// kDeep: the deep tile's kernel (split-K at run time), else the 64-K one.
template <class Tile, bool kDeep>
void launch_tile(const GemmDesc& desc, const GemmArgs& args, int split_k, cudaStream_t stream) {
  void (*kernel)(Sm80Params) = nullptr;
  if constexpr (kDeep) {
    kernel = sm80_w4a16_deep_grouped_gemm_kernel<Tile>;
  } else {
    kernel = sm80_w4a16_grouped_gemm_kernel<Tile>;
  }
  // The opt-in above 48 KB of dynamic shared memory, once per device; a device the build has
  // no image for is named here, before the launch.
  static std::atomic<uint64_t> configured_devices{0};
  int device = 0;
  MODMOE_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = uint64_t{1} << (device & 63);
  if ((configured_devices.load() & bit) == 0) {
    cudaFuncAttributes attr{};
    const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      MODMOE_NOT_SUPPORTED("the NVFP4 (W4A16) grouped GEMM on device ", device, ": ",
                           cudaGetErrorString(e),
                           " (this build compiles it for sm_90a, and sm_100a with MODMOE_SM100)");
    }
    MODMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Tile::kSmemBytes));
    configured_devices.fetch_or(bit);
  }
  const int64_t m_tiles = desc.max_m_tiles(Tile::kBlockM);
  if (m_tiles == 0) return;
  const int out_cols = desc.gated ? Tile::kBlockN / 2 : Tile::kBlockN;
  const int64_t n_tiles = ceil_div(desc.n, out_cols);
  MODMOE_CHECK(m_tiles <= INT32_MAX && n_tiles <= 65535, "W4A16 grouped GEMM: grid ", m_tiles,
               " x ", n_tiles, " exceeds the launch limits");
  Sm80Params params{args, desc.num_experts, static_cast<int>(desc.n), static_cast<int>(desc.k),
                    desc.gated ? 1 : 0};
  params.stage1 = desc.stage == GemmStage::Gemm1 ? 1 : 0;
  params.split_k = split_k;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles),
                  static_cast<unsigned>(split_k));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  MODMOE_LAUNCH_CHECK(stream);
}

}  // namespace

void launch_w4a16_grouped_gemm(const GemmDesc& desc, const GemmConfig& config,
                               const GemmArgs& args, cudaStream_t stream) {
  MODMOE_CHECK(desc.nvfp4 && config.nvfp4, "W4A16 grouped GEMM: config ", config.to_string(),
               " and an ", desc.nvfp4 ? "NVFP4" : "bf16", " problem");
  MODMOE_CHECK(args.b_block_scale != nullptr && args.b_global_scale != nullptr,
               "W4A16 grouped GEMM: the block and global scales are missing");
  GemmConfig base = config;
  base.split_k = 1;
  if (config.split_k > 1) {
    const SplitKCapacity cap = split_k_capacity(desc);
    MODMOE_CHECK(base == w4a16_decode_deep_config() && config.split_k <= cap.max_split &&
                     args.split_partials != nullptr && args.split_counters != nullptr,
                 "W4A16 grouped GEMM: split-K ", config.split_k, " with ", config.to_string(),
                 ": only the deep decode tile splits, at most ", cap.max_split,
                 " for this problem, with the scratch");
  }
  // The run-time -> compile-time switch; its cases are the four configs above.
  if (base == w4a16_decode_deep_config()) {
    return launch_tile<W4a16DecodeDeep, true>(desc, args, config.split_k, stream);
  }
  if (config == w4a16_decode_config()) {
    return launch_tile<W4a16Decode, false>(desc, args, 1, stream);
  }
  if (config == w4a16_decode_wide_config()) {
    return launch_tile<W4a16DecodeWide, true>(desc, args, 1, stream);
  }
  if (config == w4a16_prefill_config()) {
    return launch_tile<W4a16Prefill, false>(desc, args, 1, stream);
  }
  MODMOE_FAIL("W4A16 grouped GEMM config ", config.to_string(), " is not compiled; compiled: ",
              w4a16_decode_deep_config().to_string(), " ", w4a16_decode_wide_config().to_string(),
              " ", w4a16_decode_config().to_string(), " ", w4a16_prefill_config().to_string());
}

}  // namespace modmoe::cuda::gemm
