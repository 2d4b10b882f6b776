// Host side of the W4A16 grouped GEMM (NVFP4 weights, bf16 activations; docs/nvfp4.md): its
// two tiles and the explicit instantiations of sm80_w4a16_grouped_gemm.cuh.
//
// Instantiations: 2 tiles = 2 kernels. GEMM1 / GEMM2, gating, activation, bias, LoRA and the
// gate/up row map are run-time arguments.
#include <atomic>

#include "cuda/device/cuda_check.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm80_w4a16_grouped_gemm.cuh"

namespace modmoe::cuda::gemm {

// Decode: 16 tokens x 128 weight rows, 6 stages of 4 KB packed weights + 0.5 KB scales + 2 KB
// tokens (39 KB), 4 CTAs per SM: up to 24 weight tiles (~110 KB) in flight per SM, which the
// copy rate of HBM3 over the load latency asks for (about 25 KB per SM at 3.35 TB/s and 1 us).
// TODO(measure): stages and CTAs per SM were chosen on paper; no GPU run yet.
using W4a16Decode = W4a16Tile<16, 128, 6, 4>;
// Prefill: 64 tokens x 128 weight rows, 4 stages of 4.5 + 8 KB (51 KB), 2 CTAs per SM: each
// decoded weight feeds 8 token fragments.
using W4a16Prefill = W4a16Tile<64, 128, 4, 2>;

GemmConfig w4a16_decode_config() { return W4a16Decode::config(); }
GemmConfig w4a16_prefill_config() { return W4a16Prefill::config(); }

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class Tile>
void launch_tile(const GemmDesc& desc, const GemmArgs& args, cudaStream_t stream) {
  const auto kernel = sm80_w4a16_grouped_gemm_kernel<Tile>;
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
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
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
  // The run-time -> compile-time switch; its cases are the two configs above.
  if (config == w4a16_decode_config()) return launch_tile<W4a16Decode>(desc, args, stream);
  if (config == w4a16_prefill_config()) return launch_tile<W4a16Prefill>(desc, args, stream);
  MODMOE_FAIL("W4A16 grouped GEMM config ", config.to_string(), " is not compiled; compiled: ",
              w4a16_decode_config().to_string(), " ", w4a16_prefill_config().to_string());
}

}  // namespace modmoe::cuda::gemm
