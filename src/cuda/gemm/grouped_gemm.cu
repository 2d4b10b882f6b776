// Host side of the grouped GEMMs: config selection, the runtime -> template switch and the
// explicit instantiations of sm80_mma_grouped_gemm.cuh (the sm90 ones are in
// sm90_grouped_gemm.cu).
//
// Instantiations (the build's size, kept small for 2-core CI): sm80 2 tiles x 2 stages
// (GEMM1, GEMM2) = 4 kernels, sm90 bf16 2 tiles x 2 stages + FP8 2 tiles x 2 stages + the
// FP8 fast-accumulation 256-token tile for GEMM1 = 9 kernels (sm90_grouped_gemm.cu; the +1 is
// ExpertsOptions::fp8_fast_accum, a compile-time property of that tile only), W4A16 4 tiles
// with the stage at run time = 4 kernels (w4a16_grouped_gemm.cu), the wgmma W4A16 tile x 2
// stages = 2 kernels (sm90_w4a16_grouped_gemm.cu): 19 in all. Activation, gating, bias, LoRA,
// gather, the gate/up row map and split-K are run-time arguments, not template axes.
#include "cuda/gemm/grouped_gemm.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

#include "core/check.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/launch.h"
#include "cuda/gemm/sm80_mma_grouped_gemm.cuh"

namespace modmoe::cuda::gemm {

GemmConfig sm90_narrow_config();  // sm90_grouped_gemm.cu
GemmConfig sm90_wide_config();
GemmConfig sm90_fp8_narrow_config();
GemmConfig sm90_fp8_mid_config();
GemmConfig sm90_fp8_wide_config();
GemmConfig w4a16_decode_config();  // w4a16_grouped_gemm.cu
GemmConfig w4a16_decode_deep_config();
GemmConfig w4a16_decode_wide_config();
GemmConfig w4a16_prefill_config();
size_t w4a16_decode_deep_smem_bytes();
size_t w4a16_decode_wide_smem_bytes();
int w4a16_split_unit_floats();
GemmConfig sm90_w4a16_config();  // sm90_w4a16_grouped_gemm.cu
size_t sm90_w4a16_smem_bytes();
int sm90_w4a16_tail_rows();

namespace {

// 128x128x32, 4 stages, 8 warps as 2 x 4 (warp tile 64 x 32): 64 KB of shared memory and
// up to 128 registers, so two CTAs share an SM and one's epilogue hides the other's loads.
using TileLarge = Sm80Tile<128, 128, 4, 2, 4, 2>;
// 64x128x32, 4 stages, 4 warps as 2 x 2 (warp tile 32 x 64): for groups of few rows
// (decode, many experts), half the padded rows of the large tile and twice the CTAs.
using TileSmall = Sm80Tile<64, 128, 4, 2, 2, 3>;

constexpr int kNumConfigs = 12;
constexpr int kMaxSplitK = 8;
// NOTE: the order is the switch order of launch_grouped_gemm (sm80) and of select_config.
const std::array<GemmConfig, kNumConfigs>& configs() {
  static const std::array<GemmConfig, kNumConfigs> c = {
      TileLarge::config(),  TileSmall::config(),         sm90_narrow_config(),
      sm90_wide_config(),   sm90_fp8_narrow_config(),    sm90_fp8_mid_config(),
      w4a16_decode_config(), w4a16_prefill_config(), w4a16_decode_deep_config(),
      w4a16_decode_wide_config(), sm90_w4a16_config(), sm90_fp8_wide_config()};
  return c;
}
const GemmConfig& sm90_narrow() { return configs()[2]; }
const GemmConfig& sm90_wide() { return configs()[3]; }
const GemmConfig& sm90_fp8_narrow() { return configs()[4]; }
const GemmConfig& sm90_fp8_mid() { return configs()[5]; }
const GemmConfig& w4a16_decode() { return configs()[6]; }
const GemmConfig& w4a16_prefill() { return configs()[7]; }
const GemmConfig& w4a16_decode_deep() { return configs()[8]; }
const GemmConfig& w4a16_decode_wide() { return configs()[9]; }
const GemmConfig& w4a16_wgmma() { return configs()[10]; }
bool is_w4a16_wgmma(const GemmConfig& c) { return c.nvfp4 && c.arch == 90; }
const GemmConfig& sm90_fp8_wide() { return configs()[11]; }
bool is_w4a16_deep(const GemmConfig& c) {
  GemmConfig base = c;
  base.split_k = 1;
  return base == w4a16_decode_deep();
}
// The narrow (decode) and the wide sm90 tile of a problem's element type.
const GemmConfig& narrow_of(const GemmDesc& d) { return d.fp8 ? sm90_fp8_narrow() : sm90_narrow(); }
const GemmConfig& wide_of(const GemmDesc& d) { return d.fp8 ? sm90_fp8_mid() : sm90_wide(); }

// Experts that `rows` rows touch, of `experts`, under uniform routing:
// E * (1 - (1 - 1/E)^rows); at least 1.
double expected_touched(int64_t rows, int experts) {
  if (experts <= 1 || rows <= 0) return 1.0;
  const double untouched = std::exp(static_cast<double>(rows) * std::log1p(-1.0 / experts));
  return std::max(1.0, experts * (1.0 - untouched));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class Tile, bool kGemm1>
void launch_tile(const GemmDesc& desc, const GemmArgs& args, cudaStream_t stream) {
  const auto kernel = sm80_grouped_gemm_kernel<Tile, kGemm1>;
  // The opt-in above 48 KB of dynamic shared memory, once per device and kernel.
  static DynamicSmemOptIn smem_opt_in;
  smem_opt_in.ensure(kernel, Tile::kSmemBytes);

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
  MODMOE_CHECK(!fp8 || (k % 128 == 0 && b_rows() % 128 == 0), "grouped GEMM: FP8 with k = ", k,
               " and ", b_rows(), " weight rows: expected multiples of 128 (the scale blocks)");
  MODMOE_CHECK(!nvfp4 || (!fp8 && k % 64 == 0), "grouped GEMM: NVFP4 with k = ", k,
               ": expected a multiple of 64 (a W4A16 stage holds 4 scale blocks of 16)");
  MODMOE_CHECK(!fp8_fast_accum || (fp8 && stage == GemmStage::Gemm1),
               "grouped GEMM: fp8_fast_accum with fp8 = ", fp8, " and stage GEMM",
               stage == GemmStage::Gemm1 ? 1 : 2,
               ": fp8_fast_accum (scales constant along K) is an FP8 GEMM1 option; expected "
               "fp8 = true and GEMM1, or fp8_fast_accum = false");
}

bool GemmDesc::sm90_w4a16_supported() const {
  // TMA reads the packed weights (16-byte aligned rows: k % 64 == 0 makes them 32-byte rows),
  // the tokens as the bf16 sm90 kernel does; gated GEMM1 pairs rows r and r + 8 (G = 8).
  if (!nvfp4 || fp8 || !aligned16 || n < 8 || k < 64 || k % 64 != 0) return false;
  return !gated || gate_up_group == 8;
}

bool GemmDesc::sm90_supported() const {
  if (!aligned16 || n < 8 || k < 8 || nvfp4) return false;
  if (fp8 && (k % 128 != 0 || b_rows() % 128 != 0)) return false;
  // Gated GEMM1 needs gate and up rows interleaved in groups of 8 (see the kernel's header).
  return !gated || gate_up_group == 8;
}

std::string GemmConfig::to_string() const {
  std::ostringstream os;
  if (nvfp4) {
    os << (arch == 90 ? "w4a16_wgmma_" : "w4a16_") << block_m << "x" << block_n << "x"
       << block_k << "_s" << stages;
    if (split_k > 1) os << "_k" << split_k;
    if (tail_m > 0) os << "_t" << tail_m;
    return os.str();
  }
  if (arch == 90) {
    os << "sm90_" << block_m << "x" << block_n << "x" << block_k << "_s" << stages;
    if (split_k > 1) os << "_k" << split_k;
    if (tail_m > 0) os << "_t" << tail_m;
    return os.str();
  }
  os << block_m << "x" << block_n << "x" << block_k << "_s" << stages << "_w" << warps_m << "x"
     << warps_n;
  return os.str();
}

std::span<const GemmConfig> compiled_configs() { return {configs().data(), configs().size()}; }

int max_split_k() { return kMaxSplitK; }

bool is_compiled(const GemmConfig& config) {
  const GemmConfig base = config.compiled_base();
  if (std::find(configs().begin(), configs().end(), base) == configs().end()) return false;
  const bool split_ok = config.split_k == 1 ||
                        (((config.arch == 90 && !config.nvfp4) || is_w4a16_deep(config)) &&
                         config.split_k >= 1 && config.split_k <= kMaxSplitK);
  const bool tail_ok = config.tail_m == 0 ||
                       (config.arch == 90 && config.split_k == 1 &&
                        config.tail_m == sm90_tail_rows(base));
  return split_ok && tail_ok;
}

SplitKCapacity split_k_capacity(const GemmDesc& desc) {
  SplitKCapacity cap;
  if (desc.nvfp4) {
    // The W4A16 deep decode tile (16 tokens x 128 weight rows, 256 of K per k-tile). Every
    // slice keeps at least 2 k-tiles (512 of K), and the scratch stays under 8 MiB: 1024
    // (tile, slice) units of 16 x 128 floats, so only decode-sized grids get any.
    const GemmConfig& deep = w4a16_decode_deep();
    const int out_cols = desc.gated ? deep.block_n / 2 : deep.block_n;
    const int64_t tiles = desc.max_m_tiles(deep.block_m) * ceil_div(desc.n, out_cols);
    const int64_t k_tiles = ceil_div(desc.k, deep.block_k);
    const int64_t unit_floats = w4a16_split_unit_floats();
    constexpr int64_t kScratchBytes = int64_t{8} << 20;
    if (tiles == 0) return cap;
    const int64_t max_split = std::min({int64_t{kMaxSplitK}, k_tiles / 2,
                                        kScratchBytes / (tiles * unit_floats * 4)});
    if (max_split < 2) return cap;
    cap.max_split = static_cast<int>(max_split);
    cap.max_tiles = tiles;
    cap.partial_floats = tiles * max_split * unit_floats;
    return cap;
  }
  // Only the narrow sm90 tile splits, and only when no tile can hold more than 16 rows (its
  // narrowest wgmma), so a slice's fragment is 8 floats per consumer thread.
  if (!desc.sm90_supported() || desc.max_rows <= 0 || desc.max_rows_per_expert > 16) return cap;
  const GemmConfig& narrow = narrow_of(desc);
  const int64_t tiles = desc.max_m_tiles(narrow.block_m) * ceil_div(desc.b_rows(), narrow.block_n);
  const int64_t k_blocks = ceil_div(desc.k, narrow.block_k);
  // Every slice keeps at least 4 k-blocks (the pipeline must fill), and the scratch stays
  // under 32 MiB.
  constexpr int64_t kScratchBytes = int64_t{32} << 20;
  const int64_t unit_bytes = 2048 * 4;  // kSplitUnitFloats (sm90_wgmma_grouped_gemm.cuh)
  int64_t max_split = std::min<int64_t>(kMaxSplitK, k_blocks / 4);
  if (tiles > 0) max_split = std::min(max_split, kScratchBytes / (tiles * unit_bytes));
  if (max_split < 2 || tiles == 0) return cap;
  cap.max_split = static_cast<int>(max_split);
  cap.max_tiles = tiles;
  cap.partial_floats = tiles * max_split * 2048;
  return cap;
}

namespace {

// The sm90 choice (Hopper, a problem the kernel supports). Rows per touched group under
// uniform routing decide the tile; split-K fills the SMs when decode leaves too few tiles.
GemmConfig select_sm90(const GemmDesc& desc, const DeviceProps& /*props*/) {
  const int64_t rows = desc.expected_rows > 0 ? std::min(desc.expected_rows, desc.max_rows)
                                              : desc.max_rows;
  const double touched = std::min<double>(expected_touched(rows, desc.num_experts),
                                          std::max<int64_t>(rows, 1));
  const double rows_per_group = static_cast<double>(rows) / touched;
  // Rule 1: up to 64 rows per group the narrow tile (64 tokens, 8 stages of 16 KB weights)
  // keeps more weight bytes in flight; the wide tile's extra token stages would sit empty.
  // Past that the 128 x 256 CTA tile reads each weight tile once per 256 tokens.
  // Measured on an H100 SXM (2026-11-27, GpuExperts.GemmThroughput, v1 kernel, uniform rows):
  //   qwen3 GEMM2, 256 rows/expert: wide 346 vs narrow 223 TFLOP/s;
  //   mixtral GEMM2, 1024 and 4096 rows/expert: wide 391 / 352 vs narrow 256 / 245;
  // and `modmoe bench experts` (v2): every cell with <= 32 rows per expert on the narrow tile
  // runs at 1.00-1.12x of the weight-read floor. TODO(measure): the crossover between 64 and
  // 256 rows per group (qwen3 T=1024, 64 rows: narrow today) was not swept.
  // FP8 (its own pair, docs/fp8.md): the narrow tile and the 128-token one, same rule.
  GemmConfig c = rows_per_group <= 64.0 ? narrow_of(desc) : wide_of(desc);
  // Rule 1b: fp8-tensor GEMM1 with fast accumulation allowed (desc.fp8_fast_accum; docs/fp8.md
  // "FP8 fast accumulation") past 128 rows per group takes the 256-token fast-accumulation
  // tile (no promotion, one accumulator set), which reads each weight tile once per 256 tokens
  // as bf16's wide tile does. Never without the option. Up to 128 rows the promoted tiles run
  // it, as by default (one narrow or 128-token tile per group either way; decode is bound by
  // the weight reads, and the promoted sum is the more accurate one), so the option changes
  // the results only where this rule applies. Measured together with the fast loop on an H200
  // (branch fp8-tensor-noprom at fc2597e, 2026-11-27: mixtral T=4096 GEMM1+GEMM2 4855 -> 4081
  // us); TODO(measure): the crossover (128) was set on paper, not swept.
  if (desc.fp8 && desc.fp8_fast_accum && desc.stage == GemmStage::Gemm1 &&
      rows_per_group > 128.0) {
    c = sm90_fp8_wide();
  }
  // Rule 2 (none): no split-K by default. Split-K (the last CTA of a tile sums the fp32 slices
  // in slice order) was chosen when decode tiles left SMs idle in the last wave; same-run A/Bs
  // on an H100 SXM (2026-11-27, `--ab MODMOE_GEMM_SPLIT_K=1`, bench/results/
  // nvidia-h100-80gb-hbm3) made every T=1 cell faster without it and changed nothing at T >= 16:
  //   bf16 (experts.json, build 79f8562): qwen3 58.8 -> 47.1 us, gpt-oss 106.0 -> 90.0,
  //        deepseek 290.8 -> 260.5, mixtral 268.1 -> 255.3;
  //   fp8-block (experts_fp8_splitk_ab.json, build 4c8acf2): qwen3 49.6 -> 36.4, deepseek
  //        179.6 -> 152.8, mixtral 162.1 -> 154.4.
  // The scratch round trip and the last CTA's reduction cost more than the idle SMs. The
  // MODMOE_GEMM_SPLIT_K hook still forces it (the workspace keeps the scratch for it).
  // Rule 3: tail rows when the tiles are not split and a group has at most ~2048 rows. Under
  // uniform routing an expert's count spreads around its mean (std ~ sqrt(mean)): at 256 rows
  // per expert about half the experts would get a second, nearly empty wide tile that streams
  // the whole weight tile again; with 32 tail rows 98 % fit in one tile.
  // Measured on an H100 SXM (2026-11-27, `modmoe bench experts --ab MODMOE_GEMM_TAIL=1`,
  // bench/results/nvidia-h100-80gb-hbm3/experts_v3_ab.json): mixtral / deepseek T=1024 (256
  // rows per expert) -17 % / -10 %, qwen3 T=4096 (256) -16 %, qwen3 T=1024 (64, narrow) -7 %,
  // gpt-oss T=16384 (512) -9 %, qwen3 T=16384 (1024) -2 %, mixtral T=4096 (1024) -2 %; at 4096
  // rows per expert (mixtral / deepseek T=16384) +9 % / +11 % (the 32-token staging rounds and
  // a longer last tile, with run-to-run noise of ~5 % on those cells), so not there.
  // The FP8 tiles have no tail rows (sm90_tail_rows: 0).
  c.tail_m = c.split_k == 1 && rows_per_group <= 2048.0 ? sm90_tail_rows(c) : 0;
  return c;
}

}  // namespace

GemmConfig select_config(const GemmDesc& desc, const DeviceProps& props) {
  if (desc.nvfp4) {
    // W4A16 (docs/nvfp4.md): mma.sync + cp.async, any sm_80+ device (the build's images decide
    // where it launches: sm_90a, and sm_100a with MODMOE_SM100).
    if (props.cc_major < 8) {
      MODMOE_NOT_SUPPORTED("the NVFP4 (W4A16) grouped GEMM on sm_", props.cc_major,
                           props.cc_minor, ": it needs sm_80 or newer (bf16 mma.sync)");
    }
    // Rule 1: up to 16 rows per touched group (decode) a 16-token tile: no padded MMA rows,
    // and every weight is read and decoded once. Past that the 64-token tile, which decodes
    // each weight tile once per 64 tokens instead of once per 16.
    // TODO(measure): the crossover was set on paper.
    const int64_t rows = desc.expected_rows > 0 ? std::min(desc.expected_rows, desc.max_rows)
                                                : desc.max_rows;
    const double touched = std::min<double>(expected_touched(rows, desc.num_experts),
                                            std::max<int64_t>(rows, 1));
    const double rows_per_group = static_cast<double>(rows) / touched;
    // Rule 0: on Hopper, from 64 rows per touched group (prefill) the wgmma tile (256 tokens x
    // 128 weight rows, NVFP4 decoded into wgmma's A registers once per 256 tokens), where the
    // problem allows it (aligned; gated GEMM1 in GateUpInterleaved G = 8) and
    // desc.allow_w4a16_wgmma (the experts stage: on unless MODMOE_W4A16_WGMMA=0). The mma.sync
    // prefill tile below runs at ~233 TFLOP/s (0.41-0.55x bf16 at T = 4096); the wgmma tile
    // at 0.86-0.99x (H200) and 0.88-1.10x (H100) bf16 (docs/nvfp4.md, "Hopper wgmma kernel").
    // The threshold, measured (docs/nvfp4.md "Selection"): at 64 rows per expert the wgmma
    // tile is 1.15-1.34x the mma.sync one (H200: mixtral T = 256, qwen3 T = 1024, deepseek-ep8
    // T = 256, gpt-oss T = 2048), at 32 (gpt-oss T = 1024, H100) 0.94x. Tail rows as the bf16
    // sm90 tiles (select_sm90, rule 3).
    if (rows_per_group >= 64.0 && props.cc_major == 9 && props.cc_minor == 0 &&
        desc.allow_sm90 && desc.allow_w4a16_wgmma && desc.sm90_w4a16_supported() &&
        (props.max_smem_per_block == 0 ||
         props.max_smem_per_block >= sm90_w4a16_smem_bytes())) {
      GemmConfig c = w4a16_wgmma();
      c.tail_m = rows_per_group <= 2048.0 ? sm90_w4a16_tail_rows() : 0;
      return c;
    }
    if (rows_per_group > 16.0) return w4a16_prefill();
    // Rule 2: the deep decode tile (256 of K per stage, 8 stages, 8 warps: 126 KB of weights
    // and scales in flight per CTA against ~22 KB) where its 208 KB of shared memory fit; the
    // 64-K tile elsewhere. At decode a GEMM has at most ~SMs tiles, so one CTA per SM holds
    // all the bytes in flight: at 3 TB/s and ~1.5-2 us of loaded HBM latency the chip needs
    // ~4.5-6 MB in flight, 34-45 KB per SM; the 64-K tile's ~22 KB is a third to a half of
    // that (measured 15-43 % of the copy ceiling); the deep tile's gain is below (rule 2b).
    if (props.max_smem_per_block != 0 &&
        props.max_smem_per_block < w4a16_decode_deep_smem_bytes()) {
      return w4a16_decode();
    }
    GemmConfig c = w4a16_decode_deep();
    const int out_cols = desc.gated ? c.block_n / 2 : c.block_n;
    const int64_t tiles = static_cast<int64_t>(std::ceil(touched)) * ceil_div(desc.n, out_cols);
    // Rule 2b: the deep tile only where its CTAs fit one wave (tiles <= SMs) or its main loop
    // is long (>= 16 k-tiles: K >= 4096). One CTA per SM fills all 8 stages before its first
    // MMA, and past one wave each tile pays that fill again; with few k-tiles per tile the
    // fill is most of the tile. Measured on an H200 (experts_nvfp4_tune.json, build eafcff2,
    // deep on both GEMMs vs the 64-K tile on both): qwen3 T=16 (996 / 1328 tiles, K = 2048 /
    // 768) 225.9 vs 151.5 us, gpt-oss T=16 (2340 / 1196 tiles, K = 2880) 541.5 vs 501.8;
    // but mixtral T=16 (1792 tiles, K = 4096 / 14336) 469.1 vs 561.8, and every T=1 cell
    // (<= 1 wave, or K >= 4096) as fast or faster: mixtral 146.0 vs 200.3, deepseek 147.6 vs
    // 159.5, qwen3 37.7 vs 41.0, gpt-oss 71.9 vs 73.2.
    const int64_t k_tiles = ceil_div(desc.k, c.block_k);
    // Rule 2a: the wide deep tile (256 weight rows, 16 warps: twice the warps per SM, IPC 2.5
    // against 2.0 in ncu) where its grid fills at least half the SMs and the main loop has
    // >= 10 k-tiles of 256 (K >= 2304). Measured on an H200 (experts_nvfp4_wide_ab.json, build
    // 8f2f224, wide forced on both GEMMs vs the rule-2b default): mixtral T=16 367.1 vs 468.7
    // us, deepseek T=1 / 16 116.8 / 392.0 vs 143.8 / 472.3, gpt-oss T=1 / 16 68.9 / 421.9 vs
    // 71.9 / 508.2; slower where its grid is small (mixtral T=1 GEMM2: 32 CTAs, 188.9 vs
    // 146.5 with the split deep tile; qwen3 T=1 44.7 vs 37.6) or K short (qwen3 T=16, K =
    // 2048 / 768: 159.2 vs 151.4 on the 64-K tile).
    const GemmConfig& wide = w4a16_decode_wide();
    const int wide_cols = desc.gated ? wide.block_n / 2 : wide.block_n;
    const int64_t wide_tiles =
        static_cast<int64_t>(std::ceil(touched)) * ceil_div(desc.n, wide_cols);
    const bool wide_fits = props.max_smem_per_block == 0 ||
                           props.max_smem_per_block >= w4a16_decode_wide_smem_bytes();
    if (props.sm_count > 0 && 2 * wide_tiles >= props.sm_count && k_tiles >= 10 && wide_fits) {
      return wide;
    }
    if (props.sm_count > 0 && tiles > props.sm_count && k_tiles < 16) return w4a16_decode();
    // Rule 3: split-K when the expected tiles (touched experts x column tiles) fill at most
    // half the SMs: on the anchor grid mixtral T = 1 GEMM2 (2 experts x 32 tiles = 64 CTAs
    // for 132 SMs); an EP rank with one local expert touched (DeepSeek-V3 EP 8, T = 1: 32
    // and 56 tiles). What it buys here is decode work, not bytes in flight: a busy SM decodes
    // at most ~33-38 GB/s of weights and scales at one instruction per cycle per scheduler
    // (~105-120 warp instructions per 256 K x 16 rows, docs/nvfp4.md), so 64 busy SMs top
    // out at 2.1-2.4 TB/s before any stall, below the 3.0 TB/s copy rate; split 2 puts 128
    // SMs on it. The cost: each slice writes its 16 x 128 fp32 fragment (8 KB, to L2) and
    // the last CTA reads the others back; a mixtral GEMM2 tile streams 128 rows x 7 KB =
    // 896 KB of packed weights, so 2 x 8 KB more is 1.8 %. split = SMs / tiles, within
    // split_k_capacity (>= 2 k-tiles per slice, 8 MiB of scratch).
    // NOTE: bf16 / FP8 split-K on sm90 measured slower at T = 1 (select_sm90, rule 2), mixtral
    // included (bf16 268.1 vs 255.3 us, FP8 162.1 vs 154.4): there the SMs only move bytes
    // (TMA + wgmma, no per-value work), which 64 SMs with 128 KB in flight each can do. Hence
    // only below SMs / 2, and MODMOE_GEMM_SPLIT_K=1 turns it off for the A/B. Measured on an
    // H200 (experts_nvfp4_tune.json): mixtral T=1 146.0 us with split 2 vs 172.0 without;
    // the cells that do not split unchanged (deepseek T=1 147.6 / 147.7).
    const SplitKCapacity cap = split_k_capacity(desc);
    if (props.sm_count > 0 && cap.max_split > 1 && 2 * tiles <= props.sm_count) {
      c.split_k = static_cast<int>(std::clamp<int64_t>(props.sm_count / tiles, 1, cap.max_split));
    }
    return c;
  }
  if (props.cc_major == 9 && props.cc_minor == 0 && desc.allow_sm90 && desc.sm90_supported()) {
    return select_sm90(desc, props);
  }
  if (desc.fp8) {
    MODMOE_NOT_SUPPORTED("the FP8 grouped GEMM on sm_", props.cc_major, props.cc_minor,
                         desc.sm90_supported() ? "" : " for this problem (unaligned, or gated "
                                                      "weights not GateUpInterleaved with G = 8)",
                         ": it runs on sm_90 (Hopper) with the layout of prepare_weights");
  }
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

bool use_pdl() {
  static const bool v = [] {
    return !check::env_switch("MODMOE_NO_PDL").value_or(false);
  }();
  return v;
}

bool use_stage_pdl() {
  // NOTE: opt-in (MODMOE_STAGE_PDL=1): correct on an H100 (the GPU tests), but no gain measured
  // (`--ab MODMOE_STAGE_PDL=1`: every cell within noise, experts_v3_ab.json).
  static const bool v = [] {
    return use_pdl() && check::env_switch("MODMOE_STAGE_PDL").value_or(false);
  }();
  return v;
}

bool is_fp8_config(const GemmConfig& c) { return c.arch == 90 && c.block_k == 128; }

bool config_runs(const GemmDesc& desc, const GemmConfig& config) {
  if (!is_compiled(config)) return false;
  if (is_w4a16_wgmma(config)) {
    return desc.nvfp4 && desc.allow_sm90 && desc.sm90_w4a16_supported();
  }
  if (desc.nvfp4 || config.nvfp4) return desc.nvfp4 && config.nvfp4;
  if (config.arch != 90) return !desc.fp8;
  if (config.compiled_base() == sm90_fp8_wide() &&
      !(desc.fp8_fast_accum && desc.stage == GemmStage::Gemm1 && config.split_k == 1)) {
    return false;  // fast-accumulation FP8 GEMM1 only (one accumulator set), no split-K
  }
  return desc.allow_sm90 && desc.sm90_supported() && is_fp8_config(config) == desc.fp8;
}

void launch_grouped_gemm(const GemmDesc& desc, const GemmConfig& config, const GemmArgs& args,
                         cudaStream_t stream) {
  desc.validate();
  MODMOE_CHECK(!is_compiled(config) || config_runs(desc, config), "grouped GEMM: config ",
               config.to_string(), " cannot run this problem (",
               desc.fp8 ? "FP8" : (desc.nvfp4 ? "NVFP4" : "bf16"), ", sm90 ",
               desc.sm90_supported() ? "supported" : "not supported", ")");
  if (is_w4a16_wgmma(config)) return launch_sm90_w4a16_grouped_gemm(desc, config, args, stream);
  if (config.arch == 90 && is_compiled(config)) {
    return launch_sm90_grouped_gemm(desc, config, args, stream);
  }
  if (config.nvfp4) return launch_w4a16_grouped_gemm(desc, config, args, stream);
  MODMOE_CHECK(!desc.nvfp4, "grouped GEMM: an NVFP4 problem needs a w4a16 config, got ",
               config.to_string());
  const auto& c = configs();
  const int index = static_cast<int>(std::find(c.begin(), c.end(), config) - c.begin());
  // The run-time -> compile-time switch of the sm80 kernels; its cases follow the order of
  // configs().
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
