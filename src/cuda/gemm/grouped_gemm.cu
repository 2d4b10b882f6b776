// Host side of the grouped GEMMs: config selection, the runtime -> template switch and the
// explicit instantiations of sm80_mma_grouped_gemm.cuh.
//
// Instantiations (the build's size, kept small for 2-core CI): 2 tiles x 2 stages
// (GEMM1, GEMM2) = 4 kernels. Activation, gating, bias, LoRA, gather and the gate/up row
// map are run-time arguments of the epilogue and the copy plan, not template axes.
#include "cuda/gemm/grouped_gemm.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <sstream>

#include "cuda/device/cuda_check.h"
#include "cuda/gemm/sm80_mma_grouped_gemm.cuh"

namespace modmoe::cuda::gemm {
namespace {

// 128x128x32, 4 stages, 8 warps as 2 x 4 (warp tile 64 x 32): 64 KB of shared memory and
// up to 128 registers, so two CTAs share an SM and one's epilogue hides the other's loads.
using TileLarge = Sm80Tile<128, 128, 4, 2, 4, 2>;
// 64x128x32, 4 stages, 4 warps as 2 x 2 (warp tile 32 x 64): for groups of few rows
// (decode, many experts), half the padded rows of the large tile and twice the CTAs.
using TileSmall = Sm80Tile<64, 128, 4, 2, 2, 3>;

constexpr int kNumConfigs = 2;
const std::array<GemmConfig, kNumConfigs>& configs() {
  static const std::array<GemmConfig, kNumConfigs> c = {TileLarge::config(),
                                                        TileSmall::config()};
  return c;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class Tile, bool kGemm1>
void launch_tile(const GemmDesc& desc, const GemmArgs& args, cudaStream_t stream) {
  const auto kernel = sm80_grouped_gemm_kernel<Tile, kGemm1>;
  // The opt-in above 48 KB of dynamic shared memory, once per device and kernel.
  static std::atomic<uint64_t> configured_devices{0};
  int device = 0;
  MODMOE_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = uint64_t{1} << (device % 64);
  if ((configured_devices.load(std::memory_order_acquire) & bit) == 0) {
    MODMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Tile::kSmemBytes));
    configured_devices.fetch_or(bit, std::memory_order_acq_rel);
  }

  const int out_cols_per_tile = desc.gated ? Tile::kBlockN / 2 : Tile::kBlockN;
  const int64_t m_tiles = desc.max_m_tiles(Tile::kBlockM);
  const int64_t n_tiles = ceil_div(desc.n, out_cols_per_tile);
  if (m_tiles == 0 || n_tiles == 0) return;
  MODMOE_CHECK(n_tiles <= 65535, "grouped GEMM: ", n_tiles,
               " column tiles: expected at most 65535 (grid y)");
  const Sm80Params params{args, desc.num_experts, static_cast<int>(desc.n),
                          static_cast<int>(desc.k), desc.gated ? 1 : 0};
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(params);
  MODMOE_LAUNCH_CHECK(stream);
}

template <class Tile>
void launch_stage(const GemmDesc& desc, const GemmArgs& args, cudaStream_t stream) {
  switch (desc.stage) {
    case GemmStage::Gemm1: return launch_tile<Tile, true>(desc, args, stream);
    case GemmStage::Gemm2: return launch_tile<Tile, false>(desc, args, stream);
  }
  MODMOE_FAIL("grouped GEMM: unknown stage ", static_cast<int>(desc.stage));
}

}  // namespace

DeviceProps DeviceProps::query(int device) {
  static std::mutex mu;
  static std::array<DeviceProps, 64> cache{};
  static std::array<bool, 64> known{};
  MODMOE_CHECK(device >= 0 && device < 64, "DeviceProps::query: device ", device,
               ": expected 0..63");
  std::lock_guard<std::mutex> lock(mu);
  if (!known[device]) {
    DeviceProps p;
    p.device = device;
    int smem = 0;
    MODMOE_CUDA_CHECK(cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, device));
    MODMOE_CUDA_CHECK(cudaDeviceGetAttribute(&p.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    MODMOE_CUDA_CHECK(cudaDeviceGetAttribute(&p.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    MODMOE_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    p.max_smem_per_block = static_cast<size_t>(smem);
    cache[device] = p;
    known[device] = true;
  }
  return cache[device];
}

int64_t GemmDesc::max_m_tiles(int block_m) const {
  if (max_rows <= 0 || num_experts <= 0) return 0;
  const int64_t by_rows = max_rows / block_m + num_experts;
  const int64_t by_experts = num_experts * ceil_div(max_rows_per_expert, block_m);
  return std::min({by_rows, by_experts, max_rows});
}

void GemmDesc::validate() const {
  MODMOE_CHECK(num_experts >= 1, "grouped GEMM: num_experts = ", num_experts, ": expected >= 1");
  MODMOE_CHECK(max_rows >= 0 && max_rows < INT32_MAX, "grouped GEMM: max_rows = ", max_rows,
               ": expected 0 <= rows < 2^31 - 1 (rows are int32 on the device)");
  MODMOE_CHECK(max_rows_per_expert >= 0 && max_rows_per_expert <= max_rows,
               "grouped GEMM: max_rows_per_expert = ", max_rows_per_expert,
               ": expected 0..max_rows (", max_rows, ")");
  MODMOE_CHECK(n >= 8 && n % 8 == 0 && n < INT32_MAX, "grouped GEMM: n = ", n,
               ": expected a positive multiple of 8 (16-byte output rows)");
  MODMOE_CHECK(k >= 8 && k % 8 == 0 && k < INT32_MAX, "grouped GEMM: k = ", k,
               ": expected a positive multiple of 8 (16-byte cp.async chunks)");
  MODMOE_CHECK(!gated || stage == GemmStage::Gemm1, "grouped GEMM: gated is a GEMM1 option");
  MODMOE_CHECK(expected_rows >= 0, "grouped GEMM: expected_rows = ", expected_rows,
               ": expected >= 0");
}

std::string GemmConfig::to_string() const {
  std::ostringstream os;
  os << block_m << "x" << block_n << "x" << block_k << "_s" << stages << "_w" << warps_m << "x"
     << warps_n;
  return os.str();
}

std::span<const GemmConfig> compiled_configs() { return {configs().data(), configs().size()}; }

GemmConfig select_config(const GemmDesc& desc, const DeviceProps& props) {
  // Rows per group, assuming balanced routing (the counts live on the device; the choice
  // must not wait for them).
  const int64_t rows = desc.expected_rows > 0 ? std::min(desc.expected_rows, desc.max_rows)
                                              : desc.max_rows;
  const int64_t rows_per_expert = desc.num_experts > 0 ? ceil_div(rows, desc.num_experts) : 0;
  const GemmConfig& large = configs()[0];
  const GemmConfig& small = configs()[1];
  // Measured on an H100 SXM (2026-11-27, GpuExperts.GemmThroughput, uniform routing):
  //   E=8, 1024 rows/expert, H=4096, I=14336: GEMM1 292 (large) vs 237 (small) TFLOP/s,
  //                                           GEMM2 250 vs 221;
  //   E=128, 256 rows/expert, H=2048, I=768:  both tiles 160-166 TFLOP/s on both GEMMs.
  // Rule 1: below 96 rows per group the 128-row tile pads more than a quarter of its MMAs.
  if (rows_per_expert < 96) return small;
  // Rule 2: when the large tiles cannot fill every SM once, the small tile's doubled CTA
  // count keeps more SMs busy (a partially filled wave dominates at these sizes).
  const int out_cols = desc.gated ? large.block_n / 2 : large.block_n;
  const int64_t large_ctas = (rows / large.block_m) * ceil_div(desc.n, out_cols);
  if (props.sm_count > 0 && large_ctas < props.sm_count) return small;
  // Rule 3: the large tile needs its 64 KB stage memory (every Hopper and Ampere part has it).
  if (props.max_smem_per_block != 0 &&
      props.max_smem_per_block < static_cast<size_t>(TileLarge::kSmemBytes)) {
    return small;
  }
  return large;
}

GateUpMap GateUpMap::from(const ExpertWeights& w, int64_t intermediate) {
  GateUpMap m;
  if (w.layout == WeightLayout::GateUpInterleaved) {
    m.group = w.interleave_rows;
    m.gate_offset = 0;
    m.up_offset = w.interleave_rows;
  } else {
    m.group = intermediate;
    const bool gate_first = w.order == GateUpOrder::GateUp;
    m.gate_offset = gate_first ? 0 : intermediate;
    m.up_offset = gate_first ? intermediate : 0;
  }
  // The LoRA delta's columns follow the canonical order, whatever the layout.
  const bool gate_first = w.order == GateUpOrder::GateUp;
  m.lora_gate_col = gate_first ? 0 : intermediate;
  m.lora_up_col = gate_first ? intermediate : 0;
  return m;
}

void launch_grouped_gemm(const GemmDesc& desc, const GemmConfig& config, const GemmArgs& args,
                         cudaStream_t stream) {
  desc.validate();
  const auto& c = configs();
  const int index = static_cast<int>(std::find(c.begin(), c.end(), config) - c.begin());
  // The one run-time -> compile-time switch; its cases follow the order of configs().
  switch (index) {
    case 0: return launch_stage<TileLarge>(desc, args, stream);
    case 1: return launch_stage<TileSmall>(desc, args, stream);
    default: break;
  }
  std::ostringstream known;
  for (const GemmConfig& c : compiled_configs()) known << " " << c.to_string();
  MODMOE_FAIL("grouped GEMM config ", config.to_string(), " is not compiled; compiled:",
              known.str());
}

}  // namespace modmoe::cuda::gemm
