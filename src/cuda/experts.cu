// The experts stage on the GPU (docs/contract.md "Stage 3"):
//
//   standard: permute -> routing weights -> [scaled input] -> work list -> GEMM1 -> GEMM2
//             -> finalize (do_finalize) or the caller's metadata views
//             (at decode sizes permute, routing weights and work list are one one-block
//             kernel: permute_prepare_kernel)
//   batched:  work list -> GEMM1 -> GEMM2 -> zero the rows past each expert's count
//   FP8 (Fp8PerTensor, Fp8Block128; docs/fp8.md): e4m3 hidden rows with their scales in,
//             the FP8 GEMMs, and between them the bf16 intermediate re-quantized with 1x128
//             groups (quantize_rows_block128); apply_router_weight_on_input scales the input
//             scales instead of the input.
//   NVFP4 (W4A16; docs/nvfp4.md): the bf16 pipeline with the weight operand swapped: both
//             GEMMs on the W4A16 kernels (packed e2m1 weights, e4m3 block scales and the
//             per-expert global scale decoded in the GEMM), everything else as bf16.
//
// Asynchronous on `stream`: no allocation, no host synchronisation, capturable in a CUDA
// graph. Every size the launches depend on comes from the desc; every count that depends on
// the routing stays on the device (the GEMM grids are upper bounds, see grouped_gemm.h).
// Rounding points follow docs/HELPERS.md "Numerics", so small-integer inputs give the CPU
// reference's bits.
#include <cuda_bf16.h>

#include <algorithm>
#include <cub/block/block_scan.cuh>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend.h"
#include "core/check.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/launch.h"
#include "cuda/device/sm90_ptx.cuh"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/permute/permute_block.cuh"
#include "cuda/quant/quant.h"

namespace modmoe::cuda {
namespace {

constexpr size_t kAlign = 256;
constexpr int kThreads = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
bool is_fp8(QuantScheme s) { return s == QuantScheme::Fp8PerTensor || s == QuantScheme::Fp8Block128; }
constexpr int64_t kFp8Block = 128;

// The two GEMM problems of a call, from the sizes alone (the workspace is sized from them).
// The caller fills in what depends on the tensors (gate/up layout, alignment).
struct GemmDescs {
  gemm::GemmDesc d1, d2;
};
GemmDescs make_gemm_descs(const ExpertsDesc& d) {
  const bool standard = d.format == InputFormat::Standard;
  const int E = d.expert_map.num_local_experts;
  const int64_t M = d.num_tokens;
  const int64_t N = standard ? M * d.top_k : 0;
  const int64_t rows = standard ? N : E * M;
  GemmDescs g;
  gemm::GemmDesc& d1 = g.d1;
  d1.stage = gemm::GemmStage::Gemm1;
  d1.num_experts = E;
  d1.max_rows = rows;
  d1.max_rows_per_expert = standard ? N : M;
  // Balanced routing brings N * E_local / E local rows (most slots are remote under EP).
  d1.expected_rows =
      standard ? ceil_div(N * E, std::max(d.expert_map.num_experts, 1)) : rows;
  d1.n = d.intermediate;
  d1.k = d.hidden;
  d1.gated = is_gated(d.activation);
  // Sized as if the sm90 kernel may run (GateUpInterleaved, aligned): the workspace must not
  // depend on the tensors.
  d1.gate_up_group = d1.gated ? 8 : 0;
  d1.fp8 = is_fp8(d.scheme);
  d1.nvfp4 = d.scheme == QuantScheme::Nvfp4;
  // Opt-in FP8 fast accumulation (ExpertsOptions::fp8_fast_accum, Fp8PerTensor only: GEMM1's
  // scales are constant along K): the tile choice depends on it (the fast-accumulation tile
  // past 128 rows per expert), the workspace does not.
  d1.fp8_fast_accum = d.fp8_fast_accum;
  gemm::GemmDesc& d2 = g.d2;
  d2 = d1;
  d2.stage = gemm::GemmStage::Gemm2;
  d2.n = d.hidden;
  d2.k = d.intermediate;
  d2.gated = false;
  d2.gate_up_group = 0;
  d2.fp8_fast_accum = false;  // GEMM2 reads the intermediate's 1x128 scales: always promoted
  return g;
}

// Consecutive 256-byte aligned regions from a base rounded up to 256 bytes. With a null base
// it only counts, so the size formula and the carving are one piece of code.
class Carver {
 public:
  explicit Carver(void* base)
      : base_(base ? reinterpret_cast<char*>(
                         (reinterpret_cast<uintptr_t>(base) + kAlign - 1) / kAlign * kAlign)
                   : nullptr),
        offset_(kAlign) {}  // the leading 256 bytes pay for rounding any base up
  template <class T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + (offset_ - kAlign)) : nullptr;
    offset_ += align_up(sizeof(T) * static_cast<size_t>(count));
    return p;
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  size_t offset_;
};

// The workspace of one call. N = M * k (standard), R = rows of the row space (N, or
// E_local * max_m batched); every line is rounded up to 256 bytes, plus 256 in front:
//
//   standard only
//     permute_ws     cuda::permute_workspace_size(M, k, E_local)
//     offsets        int64 [E_local + 1]   expert_first_token_offset     8 (E_local + 1)
//     e2p            int32 [M, k]          expanded -> permuted, -1      4 N
//     p2e            int32 [N]             permuted -> expanded, -1      4 N
//     weights        fp32  [M, k]          expert_weights as applied     4 N
//   both
//     row_begin      int32 [E_local]       work list                     4 E_local
//     row_count      int32 [E_local]                                     4 E_local
//     tiles1         int32 [E_local + 1]   m-tiles of GEMM1's block_m    4 (E_local + 1)
//     tiles2         int32 [E_local + 1]   m-tiles of GEMM2's block_m    4 (E_local + 1)
//   standard, top_k == 1 only (apply_router_weight_on_input may be asked)
//     scaled         bf16  [M, H]          bf16(float(x) * w)            2 M H      (bf16)
//     in_scale       fp32  [M, H/128 or 1] x's scales * w                4 M HB     (FP8)
//   both
//     act            bf16  [R, I]          GEMM1 output (= GEMM2 input for bf16)   2 R I
//   FP8 only
//     act_q          e4m3  [R, I]          act re-quantized: GEMM2 input R I
//     act_scale      fp32  [R, I/128]      its 1x128 scales              4 R I/128
//   standard, do_finalize only
//     g2             bf16  [N, H]          gemm2_out, permuted           2 N H
//   split-K scratch (sm90 and the W4A16 deep tile, decode sizes only; gemm::split_k_capacity
//   of each GEMM)
//     split1         fp32  [cap1.partial_floats]                         4 cap1.partial_floats
//     split2         fp32  [cap2.partial_floats]                         4 cap2.partial_floats
//     counters       int32 [cap1.max_tiles + cap2.max_tiles]  zeroed by the work-list kernel
//
// The metadata regions are carved even when the caller passes its own views, so the size
// depends on the desc alone.
struct Layout {
  void* permute_ws = nullptr;
  size_t permute_bytes = 0;
  int64_t* offsets = nullptr;
  int32_t* e2p = nullptr;
  int32_t* p2e = nullptr;
  float* weights = nullptr;
  int32_t* row_begin = nullptr;
  int32_t* row_count = nullptr;
  int32_t* tiles1 = nullptr;
  int32_t* tiles2 = nullptr;
  __nv_bfloat16* scaled = nullptr;
  float* in_scale = nullptr;
  __nv_bfloat16* act = nullptr;
  uint8_t* act_q = nullptr;
  float* act_scale = nullptr;
  __nv_bfloat16* g2 = nullptr;
  float* split1 = nullptr;
  float* split2 = nullptr;
  int32_t* counters1 = nullptr;
  int32_t* counters2 = nullptr;
  int64_t num_counters = 0;
  size_t total_bytes = 0;
};

Layout carve(const ExpertsDesc& d, void* base) {
  const int E = d.expert_map.num_local_experts;
  const bool standard = d.format == InputFormat::Standard;
  const int64_t M = d.num_tokens;
  const int64_t N = standard ? M * d.top_k : 0;
  const int64_t R = standard ? N : E * M;
  Carver c(base);
  Layout l;
  if (standard) {
    l.permute_bytes = cuda::permute_workspace_size(M, d.top_k, E);
    l.permute_ws = c.take<char>(static_cast<int64_t>(l.permute_bytes));
    l.offsets = c.take<int64_t>(E + 1);
    l.e2p = c.take<int32_t>(N);
    l.p2e = c.take<int32_t>(N);
    l.weights = c.take<float>(N);
  }
  l.row_begin = c.take<int32_t>(E);
  l.row_count = c.take<int32_t>(E);
  l.tiles1 = c.take<int32_t>(E + 1);
  l.tiles2 = c.take<int32_t>(E + 1);
  const bool fp8 = is_fp8(d.scheme);
  const int64_t in_scale_cols = d.scheme == QuantScheme::Fp8Block128 ? d.hidden / kFp8Block : 1;
  if (standard && d.top_k == 1) {
    if (fp8) {
      l.in_scale = c.take<float>(M * in_scale_cols);
    } else {
      l.scaled = c.take<__nv_bfloat16>(M * d.hidden);
    }
  }
  l.act = c.take<__nv_bfloat16>(R * d.intermediate);
  if (fp8) {
    l.act_q = c.take<uint8_t>(R * d.intermediate);
    l.act_scale = c.take<float>(R * (d.intermediate / kFp8Block));
  }
  if (standard && d.do_finalize) l.g2 = c.take<__nv_bfloat16>(N * d.hidden);
  const GemmDescs g = make_gemm_descs(d);
  const gemm::SplitKCapacity cap1 = gemm::split_k_capacity(g.d1);
  const gemm::SplitKCapacity cap2 = gemm::split_k_capacity(g.d2);
  if (cap1.partial_floats > 0) l.split1 = c.take<float>(cap1.partial_floats);
  if (cap2.partial_floats > 0) l.split2 = c.take<float>(cap2.partial_floats);
  l.num_counters = cap1.max_tiles + cap2.max_tiles;
  if (l.num_counters > 0) {
    int32_t* counters = c.take<int32_t>(l.num_counters);
    l.counters1 = counters;
    l.counters2 = counters ? counters + cap1.max_tiles : nullptr;
  }
  l.total_bytes = c.bytes();
  return l;
}

// ---------------------------------------------------------------------------------------
// Small kernels around the GEMMs
// ---------------------------------------------------------------------------------------

struct RoutingArgs {
  const int32_t* topk_ids;     // [M, k] int32 global ids, or (id << 16) | bf16 bits
  const float* weights_f32;    // [M, k] fp32, or null
  const __nv_bfloat16* weights_bf16;  // [M, k] bf16, or null (both null: packed)
  int64_t num_entries;         // N = M * k
  int local_expert_offset;
  int num_local_experts;
  bool round_bf16;             // options.bf16_routing_weights
  bool on_input;               // options.apply_router_weight_on_input
};

// The routing weight of expanded index i as given, bf16-rounded on request; `local` says
// whether its expert is on this rank.
__device__ __forceinline__ float routing_weight(const RoutingArgs& a, int64_t i, bool& local) {
  const int32_t raw = a.topk_ids[i];
  float w;
  int32_t id;
  if (a.weights_f32 == nullptr && a.weights_bf16 == nullptr) {
    id = raw >> 16;  // arithmetic shift: the id is a signed 16-bit field
    w = __uint_as_float(static_cast<uint32_t>(raw) << 16);
  } else {
    id = raw;
    w = a.weights_f32 ? a.weights_f32[i] : __bfloat162float(a.weights_bf16[i]);
  }
  if (a.round_bf16) w = __bfloat162float(__float2bfloat16_rn(w));
  local = id >= a.local_expert_offset && id - a.local_expert_offset < a.num_local_experts;
  return w;
}

// expert_weights [M, k] fp32 (prepare_gemms_kernel): the weight finalize applies; 0 where not
// local, 1 when the weight went to the input (docs/HELPERS.md items 5 and 6).

// top_k == 1: scaled [M, H] = bf16(float(x) * w), the GEMM1 input (HELPERS.md item 6).
// One thread per 8 columns (16 bytes).
__global__ void scale_input_kernel(const RoutingArgs a, const __nv_bfloat16* x,
                                   __nv_bfloat16* scaled, int64_t hidden) {
  const int64_t chunks = hidden / 8;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= a.num_entries * chunks) return;
  const int64_t m = idx / chunks;
  bool local;
  const float w = routing_weight(a, m, local);
  const uint4 in = reinterpret_cast<const uint4*>(x)[idx];
  const auto* v = reinterpret_cast<const __nv_bfloat162*>(&in);
  uint4 outv;
  auto* o = reinterpret_cast<__nv_bfloat162*>(&outv);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(v[i]);
    o[i] = __floats2bfloat162_rn(__fmul_rn(f.x, w), __fmul_rn(f.y, w));
  }
  reinterpret_cast<uint4*>(scaled)[idx] = outv;
}

// FP8, top_k == 1: in_scale [M, cols] = fp32(x_scale(m, c) * w) (docs/fp8.md: the router
// weight multiplies the row's activation scales). x_scale(m, c) = x_scale[m * ld + c * step].
__global__ void scale_input_scales_kernel(const RoutingArgs a, const float* x_scale, int64_t ld,
                                          int64_t step, float* in_scale, int64_t cols) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= a.num_entries * cols) return;
  const int64_t m = idx / cols;
  const int64_t col = idx - m * cols;
  bool local;
  const float w = routing_weight(a, m, local);
  in_scale[idx] = __fmul_rn(x_scale[m * ld + col * step], w);
}

struct WorkListArgs {
  const int64_t* offsets;  // standard: expert_first_token_offset [E_local + 1], else null
  const int32_t* counts;   // batched: expert_num_tokens [E_local], else null
  int64_t max_m;           // batched
  int num_experts;         // E_local
  int block_m1;            // GEMM1 tile rows
  int tail_m1;             // GEMM1 tail rows (GemmConfig::tail_m)
  int block_m2;            // GEMM2 tile rows
  int tail_m2;
  int32_t* row_begin;      // [E_local]
  int32_t* row_count;      // [E_local]
  int32_t* tiles1;         // [E_local + 1] exclusive prefix of row_tiles(count, block_m1, tail_m1)
  int32_t* tiles2;         // [E_local + 1] same for GEMM2
  int32_t* counters;       // [num_counters] split-K arrival counts, zeroed here
  int64_t num_counters;
  // Standard format: the routing weights, computed by the same launch (grid-stride).
  bool with_weights;
  RoutingArgs routing;
  float* expert_weights;   // [M, k] fp32
};

// The work list, by one block of kBlock threads: row_begin, row_count, tiles1, tiles2.
// A batched count outside [0, max_m] is clamped: a corrupt count must not make the GEMMs read
// or write out of bounds (docs/contract.md, "Stage 2").
template <int kBlock>
__device__ __forceinline__ void build_work_list(
    const WorkListArgs& a, typename cub::BlockScan<int32_t, kBlock>::TempStorage& scan_storage) {
  using Scan = cub::BlockScan<int32_t, kBlock>;
  int32_t carry1 = 0;
  int32_t carry2 = 0;
  for (int base = 0; base < a.num_experts; base += kBlock) {
    const int e = base + static_cast<int>(threadIdx.x);
    int32_t count = 0;
    if (e < a.num_experts) {
      int64_t begin;
      int64_t n;
      if (a.offsets != nullptr) {
        begin = a.offsets[e];
        n = a.offsets[e + 1] - begin;
      } else {
        begin = e * a.max_m;
        n = min(max(static_cast<int64_t>(a.counts[e]), int64_t{0}), a.max_m);
      }
      count = static_cast<int32_t>(n);
      a.row_begin[e] = static_cast<int32_t>(begin);
      a.row_count[e] = count;
    }
    int32_t prefix1, total1, prefix2, total2;
    Scan(scan_storage).ExclusiveSum(gemm::row_tiles(count, a.block_m1, a.tail_m1), prefix1, total1);
    __syncthreads();
    Scan(scan_storage).ExclusiveSum(gemm::row_tiles(count, a.block_m2, a.tail_m2), prefix2, total2);
    __syncthreads();
    if (e < a.num_experts) {
      a.tiles1[e] = carry1 + prefix1;
      a.tiles2[e] = carry2 + prefix2;
    }
    carry1 += total1;
    carry2 += total2;
  }
  if (threadIdx.x == 0) {
    a.tiles1[a.num_experts] = carry1;
    a.tiles2[a.num_experts] = carry2;
  }
}

// Routing weights (standard format) and split-K counters, grid-stride from `first`.
__device__ __forceinline__ void weights_and_counters(const WorkListArgs& a, int64_t first,
                                                     int64_t stride) {
  for (int64_t i = first; i < a.num_counters; i += stride) a.counters[i] = 0;
  if (a.with_weights) {
    for (int64_t i = first; i < a.routing.num_entries; i += stride) {
      bool local;
      const float w = routing_weight(a.routing, i, local);
      a.expert_weights[i] = local ? (a.routing.on_input ? 1.0f : w) : 0.0f;
    }
  }
}

// Block 0 builds the work list; every block zeroes its share of the split-K counters and, in
// the standard format, computes the routing weights (one launch instead of two).
__global__ void __launch_bounds__(kThreads) prepare_gemms_kernel(const WorkListArgs a) {
  sm90::grid_dependency_wait();
  // The GEMMs wait for this grid to finish (programmatic dependent launch); let them start
  // their prologue now.
  sm90::grid_launch_dependents();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  weights_and_counters(a, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, stride);
  if (blockIdx.x != 0) return;
  __shared__ typename cub::BlockScan<int32_t, kThreads>::TempStorage scan_storage;
  build_work_list<kThreads>(a, scan_storage);
}

// Decode sizes (standard format, block_permute_fits): the permutation, the routing weights,
// the counters and the work list in one block, one launch instead of four (each launch costs
// ~2-4 us in a graph, more than its work at these sizes). The permute metadata is that of
// cuda::permute to the bit. hist: [E_local][32] int32, dynamic.
__global__ void __launch_bounds__(kBlockPermuteThreads)
    permute_prepare_kernel(const BlockPermuteArgs pa, const WorkListArgs a) {
  extern __shared__ int32_t hist[];
  __shared__ BlockPermuteScan::TempStorage scan_storage;
  __shared__ int32_t total;
  sm90::grid_dependency_wait();
  sm90::grid_launch_dependents();
  block_permute(pa, hist, scan_storage, total);
  __syncthreads();  // expert_first_token_offset is written: the work list reads it
  weights_and_counters(a, threadIdx.x, kBlockPermuteThreads);
  build_work_list<kBlockPermuteThreads>(a, scan_storage);
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch
// when MODMOE_STAGE_PDL=1 (gemm::use_stage_pdl): every kernel so launched waits (griddepcontrol.wait) before it
// reads or writes what the kernels before it touch.
template <class... KArgs, class... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, unsigned block, size_t smem,
                cudaStream_t stream, const Args&... args) {
  launch_kernel(kernel, grid, block, smem, stream, gemm::use_stage_pdl(), args...);
}

// Batched: gemm2_out [E_local, max_m, H] rows past expert e's count are written as zero.
// grid.y = expert.
__global__ void zero_batched_tail_kernel(const int32_t* counts, int64_t max_m, int64_t hidden,
                                         __nv_bfloat16* out) {
  const int e = static_cast<int>(blockIdx.y);
  const int64_t count = min(max(static_cast<int64_t>(counts[e]), int64_t{0}), max_m);
  const int64_t chunks = hidden / 8;
  uint4* base = reinterpret_cast<uint4*>(out + e * max_m * hidden);
  for (int64_t idx = count * chunks + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < max_m * chunks; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    base[idx] = make_uint4(0, 0, 0, 0);
  }
}

unsigned grid_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>(ceil_div(n, threads));
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MODMOE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MODMOE_CUDA_CHECK(cudaSetDevice(device));
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Where row a's scale of k-block kb is in an FP8 hidden_scale: [a * ld + kb * kb_step];
// `cols` scales per row of the router-weighted copy (in_scale).
struct ScaleIndex {
  int64_t ld = 0;
  int64_t kb = 0;
  int64_t cols = 1;
};
ScaleIndex hidden_scale_index(const ExpertsDesc& desc, const TensorView& hidden_scale) {
  if (desc.scheme == QuantScheme::Fp8Block128) {
    const int64_t hb = desc.hidden / kFp8Block;
    return {hb, 1, hb};
  }
  if (desc.scheme == QuantScheme::Fp8PerTensor) {
    return {hidden_scale.numel() == 1 ? 0 : 1, 0, 1};  // [1], or one per row
  }
  return {};
}

// The FP8 weight scales of one GEMM as the kernel indexes them (grouped_gemm.h, GemmArgs):
// Fp8Block128 [E_local, row blocks, k blocks], Fp8PerTensor [E_local].
void set_weight_scales(gemm::GemmArgs& g, const TensorView& scale, bool gate_up_interleaved) {
  g.b_scale = scale.ptr<const float>();
  g.b_scale_expert = scale.stride(0);
  g.b_scale_ld = scale.ndim == 3 ? scale.stride(1) : 0;
  g.b_scale_kb = scale.ndim == 3 ? static_cast<int>(scale.stride(2)) : 0;
  g.b_scale_gate_up = gate_up_interleaved && scale.ndim == 3 ? 1 : 0;
}

// NVFP4 weights of one GEMM: the e4m3 block scales [E_local, rows, K/16] (bytes) and the
// per-expert fp32 global scales [E_local].
void set_nvfp4_scales(gemm::GemmArgs& g, const TensorView& block_scale,
                      const TensorView& global_scale) {
  g.b_block_scale = block_scale.ptr<const uint8_t>();
  g.b_block_scale_expert = block_scale.stride(0);
  g.b_block_scale_ld = block_scale.stride(1);
  g.b_global_scale = global_scale.ptr<const float>();
}

// Test and benchmark hooks, read at every call (the 0|1 switches through check::env_switch:
// any other value is an error, as is a split count outside 1..64):
//   MODMOE_GEMM_CONFIG=<name>  use this compiled config (GemmConfig::to_string() without the
//                              split suffix) for both GEMMs where it can run; "sm80" keeps the
//                              mma.sync kernels only. NVFP4 problems take the w4a16_* names
//                              (e.g. the 64-K decode tile w4a16_16x128x64_s6 against the deep
//                              one); naming the tile select_config chose keeps its split-K;
//   MODMOE_GEMM_SPLIT_K=<n>    split-K slices of the sm90 narrow tile and of the W4A16 deep
//                              decode tile, not its wide variant (clamped to what the problem
//                              allows; 1: off);
//   MODMOE_GEMM_TAIL=0|1       tail rows (GemmConfig::tail_m) on the sm90 kernels off / on
//                              (unset: select_config's rule 3);
//   MODMOE_W4A16_WGMMA=0|1     NVFP4 prefill on Hopper: the wgmma W4A16 tile
//                              (w4a16_wgmma_256x128x64_s5) where select_config's rule 0 picks
//                              it (unset or 1, the default), or never (0: the mma.sync tiles,
//                              about half its speed at prefill; docs/nvfp4.md);
//                              naming it in MODMOE_GEMM_CONFIG forces it either way, and fails
//                              with an error where it cannot run (gated weights not
//                              GateUpInterleaved G = 8, unaligned);
//   MODMOE_FUSED_PERMUTE=0|1   the one-block permute_prepare_kernel off / on wherever it fits
//                              (unset: up to kBlockPermuteDefaultItems entries), instead of
//                              the chunked permute kernels and the work-list kernel.
gemm::GemmConfig apply_overrides(const gemm::GemmDesc& d, gemm::GemmConfig c) {
  const bool selected_tail = c.tail_m > 0;
  const char* name = std::getenv("MODMOE_GEMM_CONFIG");
  if (name != nullptr && name[0] != '\0') {
    for (const gemm::GemmConfig& k : gemm::compiled_configs()) {
      // NOTE: the other tiles fall back silently where they cannot run (a forced bf16 tile
      // meets the FP8 GEMMs of a call too); the wgmma W4A16 tile names one NVFP4 kernel, and a
      // test or A/B that forces it must not measure another.
      MODMOE_CHECK(!(k.nvfp4 && k.arch == 90 && d.nvfp4 && k.to_string() == name &&
                     !gemm::config_runs(d, k)),
                   "MODMOE_GEMM_CONFIG=", name, " cannot run this NVFP4 ",
                   d.stage == gemm::GemmStage::Gemm1 ? "GEMM1" : "GEMM2",
                   ": the wgmma W4A16 tile needs 16-byte aligned operands and, gated, weights in "
                   "the GateUpInterleaved layout with G = 8 (prepare_weights, interleave_rows = "
                   "8); the w4a16_* tiles read every layout");
      if (k.to_string() == name && gemm::config_runs(d, k)) {
        gemm::GemmConfig base = c;
        base.split_k = 1;
        const int selected_split = c.split_k;
        c = k;
        if (k.nvfp4 && base == k) c.split_k = selected_split;
      }
    }
  }
  const char* split = std::getenv("MODMOE_GEMM_SPLIT_K");
  if (split != nullptr && split[0] != '\0') {
    char* end = nullptr;
    const long want = std::strtol(split, &end, 10);
    MODMOE_CHECK(*end == '\0' && want >= 1 && want <= 64, "environment variable ",
                 "MODMOE_GEMM_SPLIT_K='", split, "': expected a split count from 1 to 64");
    gemm::GemmConfig split2 = c;  // does this tile split at all (sm90, the W4A16 deep tile)?
    split2.split_k = 2;
    split2.tail_m = 0;
    const bool w4a16_deep = c.nvfp4 && gemm::is_compiled(split2);
    if (c.arch == 90 || w4a16_deep) {
      const gemm::SplitKCapacity cap = gemm::split_k_capacity(d);
      const int clamped = std::min(static_cast<int>(want), cap.max_split);
      c.split_k = c.block_m == 64 || w4a16_deep ? std::max(1, clamped) : 1;
    }
  }
  // Tail rows: select_config's rule 3 (kept for a forced config too), or the variable's choice.
  const bool tail_on = check::env_switch("MODMOE_GEMM_TAIL").value_or(selected_tail);
  c.tail_m = c.arch == 90 && c.split_k == 1 && tail_on ? gemm::sm90_tail_rows(c) : 0;
  return c;
}

template <class T>
T* ptr_or(const TensorView& v, T* fallback) {
  return v.defined() ? v.ptr<T>() : fallback;
}

}  // namespace

size_t experts_workspace_size(const ExpertsDesc& desc) {
  return carve(desc, nullptr).total_bytes;
}

void experts(const ExpertsDesc& desc, const ExpertsInputs& in, const ExpertWeights& weights,
             const ExpertMap& map, const ExpertsOptions& options, const ExpertsOutputs& out,
             const Workspace& workspace, Stream stream_handle) {
  using gemm::GemmArgs;
  using gemm::GemmDesc;
  using gemm::GemmStage;
  const bool fp8 = is_fp8(desc.scheme);
  const bool nvfp4 = desc.scheme == QuantScheme::Nvfp4;
  MODMOE_CHECK(desc.scheme == QuantScheme::None || fp8 || nvfp4,
               "not supported yet: cuda::experts with ", quant_scheme_name(desc.scheme),
               " (none, fp8-tensor, fp8-block and nvfp4)");
  const cudaStream_t stream = stream_handle;
  const DeviceGuard guard(in.hidden.device.index);
  const Device dev = in.hidden.device;

  const bool standard = desc.format == InputFormat::Standard;
  const int E = map.num_local_experts;
  const int64_t M = desc.num_tokens;  // tokens (standard) or max_m (batched)
  const int k = standard ? desc.top_k : 1;
  const int64_t H = desc.hidden;
  const int64_t I = desc.intermediate;
  const int64_t N = M * k;
  const int64_t rows = standard ? N : E * M;
  const bool gated = is_gated(options.activation.kind);
  const ScaleIndex x_scale = hidden_scale_index(desc, in.hidden_scale);

  const Layout ws = carve(desc, workspace.data);
  MODMOE_CHECK(workspace.data != nullptr && workspace.bytes >= ws.total_bytes,
               "argument 'workspace' has ", workspace.bytes, " bytes at ", workspace.data,
               ": expected at least ", ws.total_bytes, " (experts_workspace_size)");

  // Views of the metadata: the caller's when given, else the workspace's.
  int64_t* offsets = ptr_or<int64_t>(out.expert_first_token_offset, ws.offsets);
  int32_t* e2p = ptr_or<int32_t>(out.expanded_idx_to_permuted_idx, ws.e2p);
  float* expert_weights = ptr_or<float>(out.expert_weights, ws.weights);
  // gemm2_out [rows, H]: the caller's when given (always when do_finalize is false).
  __nv_bfloat16* g2 = ptr_or<__nv_bfloat16>(out.gemm2_out, ws.g2);
  MODMOE_CHECK(g2 != nullptr || rows == 0, "argument 'gemm2_out' is missing: expected a [",
               rows, ", ", H, "] bf16 tensor when do_finalize is false");

  // The caller's gemm1_activation_output [N, I] is the act buffer itself when given.
  __nv_bfloat16* act = ws.act;
  if (standard && out.gemm1_activation_output.defined()) {
    act = out.gemm1_activation_output.ptr<__nv_bfloat16>();
  }

  // ---- the two GEMM problems and their tiles ----
  const gemm::DeviceProps props = gemm::DeviceProps::query(dev.index);
  GemmDescs descs = make_gemm_descs(desc);
  GemmDesc& d1 = descs.d1;
  GemmDesc& d2 = descs.d2;
  const bool gemm1_aligned =
      aligned16(in.hidden.data) && aligned16(weights.w13.data) &&
      weights.w13.stride(0) % 8 == 0 && weights.w13.stride(1) % 8 == 0 && H % 8 == 0;
  // FP8: the sm90 FP8 kernels are the only ones; refuse another device before anything is
  // launched (a layout they cannot read: api::check_fp8_experts_device, and select_config
  // below, which also runs before any launch).
  MODMOE_CHECK(!fp8 || (props.cc_major == 9 && props.cc_minor == 0),
               "not supported yet: FP8 experts on the GPU need an sm_90 (Hopper) device; ",
               dev.to_string(), " is sm_", props.cc_major, props.cc_minor);
  const bool gemm2_aligned = aligned16(weights.w2.data) && weights.w2.stride(0) % 8 == 0 &&
                             weights.w2.stride(1) % 8 == 0 && I % 8 == 0;
  if (gated) {
    // The sm90 kernel reads gate rows 0-7 and up rows 8-15 of every 16: GateUpInterleaved G = 8
    // (a canonical GateUp w13 with I = 8 is the same layout).
    const gemm::GateUpMap m = gemm::GateUpMap::from(weights, I);
    d1.gate_up_group = m.group == 8 && m.gate_offset == 0 && m.up_offset == 8 ? 8 : -1;
  }
  d1.aligned16 = gemm1_aligned && (ws.scaled == nullptr || aligned16(ws.scaled)) &&
                 aligned16(act);
  d2.aligned16 = gemm2_aligned && aligned16(act) && aligned16(g2);
  if (nvfp4) {
    // The W4A16 kernel copies 16-byte chunks of tokens and packed weights and 4-byte groups of
    // block scales (strides of E2M1x2 / E4M3 tensors count bytes); it has no unaligned path.
    const auto aligned4 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 == 0; };
    const bool ok = aligned16(in.hidden.data) && aligned16(weights.w13.data) &&
                    aligned16(weights.w2.data) && weights.w13.stride(0) % 16 == 0 &&
                    weights.w13.stride(1) % 16 == 0 && weights.w2.stride(0) % 16 == 0 &&
                    weights.w2.stride(1) % 16 == 0 && aligned4(weights.w13_scale.data) &&
                    aligned4(weights.w2_scale.data) && weights.w13_scale.stride(0) % 4 == 0 &&
                    weights.w13_scale.stride(1) % 4 == 0 && weights.w2_scale.stride(0) % 4 == 0 &&
                    weights.w2_scale.stride(1) % 4 == 0 && d1.aligned16 && d2.aligned16;
    MODMOE_CHECK(ok, "NVFP4 experts on the GPU: 'hidden', 'weights.w13' and 'weights.w2' must "
                 "start on 16 bytes and the block scales on 4 bytes (got hidden ", in.hidden.data,
                 ", w13 ", weights.w13.data, ", w2 ", weights.w2.data, ", w13_scale ",
                 weights.w13_scale.data, ", w2_scale ", weights.w2_scale.data, ")");
  }
  const char* force = std::getenv("MODMOE_GEMM_CONFIG");
  const bool sm80_only = force != nullptr && std::strcmp(force, "sm80") == 0;
  d1.allow_sm90 = !sm80_only;
  d2.allow_sm90 = !sm80_only;
  // The wgmma W4A16 tile where select_config picks it, unless MODMOE_W4A16_WGMMA=0 (an A/B
  // and fallback switch; docs/nvfp4.md, "Hopper wgmma kernel").
  // 0: the mma.sync W4A16 tiles only; 1 or unset: the wgmma tile where it applies.
  const bool wgmma_on = check::env_switch("MODMOE_W4A16_WGMMA").value_or(true);
  d1.allow_w4a16_wgmma = wgmma_on;
  d2.allow_w4a16_wgmma = wgmma_on;
  d1.validate();
  d2.validate();
  const gemm::GemmConfig c1 = apply_overrides(d1, gemm::select_config(d1, props));
  const gemm::GemmConfig c2 = apply_overrides(d2, gemm::select_config(d2, props));

  RoutingArgs ra{};
  // Decode sizes: permute, routing weights and work list in one launch (permute_prepare_kernel).
  const bool fused_permute = standard && use_block_permute(N, E);
  BlockPermuteArgs pa{};
  if (standard) {
    if (M == 0) {
      if (out.expert_first_token_offset.defined()) {
        MODMOE_CUDA_CHECK(cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (E + 1), stream));
      }
      return;
    }
    const bool packed = !in.topk_weights.defined();
    if (fused_permute) {
      MODMOE_CHECK(in.topk_ids.is_contiguous(), "cuda::experts: topk_ids must be contiguous");
      pa = BlockPermuteArgs{in.topk_ids.ptr<const int32_t>(), offsets, e2p, ws.p2e,
                            static_cast<int>(N), map.local_expert_offset, E, packed};
    } else {
      const PermuteMetadata meta{make_view(offsets, DType::I64, {E + 1}, dev),
                                 make_view(e2p, DType::I32, {M, k}, dev),
                                 make_view(ws.p2e, DType::I32, {N}, dev)};
      cuda::permute(in.topk_ids, packed, map, meta, Workspace{ws.permute_ws, ws.permute_bytes},
                    stream);
    }

    ra.topk_ids = in.topk_ids.ptr<const int32_t>();
    if (!packed) {
      if (in.topk_weights.dtype == DType::BF16) {
        ra.weights_bf16 = in.topk_weights.ptr<const __nv_bfloat16>();
      } else {
        ra.weights_f32 = in.topk_weights.ptr<const float>();
      }
    }
    ra.num_entries = N;
    ra.local_expert_offset = map.local_expert_offset;
    ra.num_local_experts = E;
    ra.round_bf16 = options.bf16_routing_weights;
    ra.on_input = options.apply_router_weight_on_input;
    if (options.apply_router_weight_on_input) {
      MODMOE_CHECK(k == 1 && (ws.scaled != nullptr || ws.in_scale != nullptr),
                   "apply_router_weight_on_input needs top_k == 1, got ", k);
      if (fp8) {
        scale_input_scales_kernel<<<grid_for(M * x_scale.cols), kThreads, 0, stream>>>(
            ra, in.hidden_scale.ptr<const float>(), x_scale.ld, x_scale.kb, ws.in_scale,
            x_scale.cols);
      } else {
        scale_input_kernel<<<grid_for(M * (H / 8)), kThreads, 0, stream>>>(
            ra, in.hidden.ptr<const __nv_bfloat16>(), ws.scaled, H);
      }
      MODMOE_LAUNCH_CHECK(stream);
    }
  }
  if (rows == 0) return;



  WorkListArgs wl{};
  wl.offsets = standard ? offsets : nullptr;
  wl.counts = standard ? nullptr : in.expert_num_tokens.ptr<const int32_t>();
  wl.max_m = M;
  wl.num_experts = E;
  wl.block_m1 = c1.block_m;
  wl.tail_m1 = c1.tail_m;
  wl.block_m2 = c2.block_m;
  wl.tail_m2 = c2.tail_m;
  wl.row_begin = ws.row_begin;
  wl.row_count = ws.row_count;
  wl.tiles1 = ws.tiles1;
  wl.tiles2 = ws.tiles2;
  wl.counters = ws.counters1;
  wl.num_counters = ws.num_counters;
  wl.with_weights = standard;
  wl.routing = ra;
  wl.expert_weights = expert_weights;
  if (fused_permute) {
    launch_pdl(permute_prepare_kernel, dim3(1), kBlockPermuteThreads,
               sizeof(int32_t) * E * kBlockPermuteWarps, stream, pa, wl);
  } else {
    // One block builds the work list; the others share the routing weights and the counters.
    const int64_t spread = std::max<int64_t>(standard ? N : 0, ws.num_counters);
    const unsigned prep_blocks =
        static_cast<unsigned>(std::clamp<int64_t>(ceil_div(spread, kThreads * 4), 1, 264));
    launch_pdl(prepare_gemms_kernel, dim3(prep_blocks), kThreads, 0, stream, wl);
  }

  // ---- GEMM1: act [rows, I] = activation(A @ w13[e]^T + bias + lora) ----
  GemmArgs g1;
  g1.tile_offsets = ws.tiles1;
  g1.row_begin = ws.row_begin;
  g1.row_count = ws.row_count;
  g1.a = options.apply_router_weight_on_input ? ws.scaled
                                              : static_cast<const __nv_bfloat16*>(in.hidden.data);
  g1.lda = H;
  g1.a_gather = standard ? ws.p2e : nullptr;
  g1.gather_div = k;
  g1.b = static_cast<const __nv_bfloat16*>(weights.w13.data);  // nvfp4: E2M1x2 bytes
  if (nvfp4) set_nvfp4_scales(g1, weights.w13_scale, weights.w13_global_scale);
  if (fp8) {
    g1.a = static_cast<const __nv_bfloat16*>(in.hidden.data);  // e4m3 bytes
    if (options.apply_router_weight_on_input) {
      g1.a_scale = ws.in_scale;
      g1.a_scale_ld = x_scale.cols;
      g1.a_scale_kb = x_scale.kb != 0 ? 1 : 0;
    } else {
      g1.a_scale = in.hidden_scale.ptr<const float>();
      g1.a_scale_ld = x_scale.ld;
      g1.a_scale_kb = static_cast<int>(x_scale.kb);
    }
    set_weight_scales(g1, weights.w13_scale, gated);
    // Fp8PerTensor: a_scale_kb = b_scale_kb = 0. With d1.fp8_fast_accum, where select_config
    // picks the fast-accumulation tile, the GEMM sums all of K and applies the scales once, in
    // its epilogue (docs/fp8.md "FP8 fast accumulation"); elsewhere every 128 of K, as
    // Fp8Block128.
  }
  g1.b_expert_stride = weights.w13.stride(0);
  g1.ldb = weights.w13.stride(1);
  if (gated) g1.gate_up = gemm::GateUpMap::from(weights, I);
  if (weights.w13_bias.defined()) {
    g1.bias = weights.w13_bias.ptr<const float>();
    g1.bias_expert_stride = weights.w13_bias.stride(0);
  }
  if (standard && in.gemm1_lora_delta.defined()) {
    g1.lora = in.gemm1_lora_delta.ptr<const __nv_bfloat16>();
    g1.ld_lora = in.gemm1_lora_delta.size(-1);  // contiguous [M, k, cols]: row = expanded idx
  }
  const ActivationParams& ap = options.activation;
  g1.activation.kind = static_cast<int>(ap.kind);
  g1.activation.alpha = ap.alpha;
  g1.activation.beta = ap.beta;
  g1.activation.limit = ap.limit;
  g1.activation.alpha_per_expert = ptr_or<const float>(ap.alpha_per_expert, nullptr);
  g1.activation.beta_per_expert = ptr_or<const float>(ap.beta_per_expert, nullptr);
  g1.activation.limit_per_expert = ptr_or<const float>(ap.limit_per_expert, nullptr);
  g1.c = act;
  g1.ldc = I;
  g1.split_partials = ws.split1;
  g1.split_counters = ws.counters1;
  gemm::launch_grouped_gemm(d1, c1, g1, stream);
  if (fp8) {
    // The GEMM2 input: act re-quantized with 1x128 groups (standard: the valid rows only).
    quantize_rows_block128(act, ws.act_q, ws.act_scale, rows, I, standard ? offsets + E : nullptr,
                           stream);
  }

  // ---- GEMM2: gemm2_out [rows, H] = act @ w2[e]^T + bias ----
  GemmArgs g2a;
  g2a.tile_offsets = ws.tiles2;
  g2a.row_begin = ws.row_begin;
  g2a.row_count = ws.row_count;
  g2a.a = act;
  g2a.lda = I;
  g2a.b = static_cast<const __nv_bfloat16*>(weights.w2.data);  // nvfp4: E2M1x2 bytes
  if (nvfp4) set_nvfp4_scales(g2a, weights.w2_scale, weights.w2_global_scale);
  if (fp8) {
    g2a.a = reinterpret_cast<const __nv_bfloat16*>(ws.act_q);  // e4m3 bytes
    g2a.a_scale = ws.act_scale;
    g2a.a_scale_ld = I / kFp8Block;
    g2a.a_scale_kb = 1;
    set_weight_scales(g2a, weights.w2_scale, false);
  }
  g2a.b_expert_stride = weights.w2.stride(0);
  g2a.ldb = weights.w2.stride(1);
  if (weights.w2_bias.defined()) {
    g2a.bias = weights.w2_bias.ptr<const float>();
    g2a.bias_expert_stride = weights.w2_bias.stride(0);
  }
  g2a.c = g2;
  g2a.ldc = H;
  g2a.split_partials = ws.split2;
  g2a.split_counters = ws.counters2;
  gemm::launch_grouped_gemm(d2, c2, g2a, stream);

  if (!standard) {
    const dim3 grid(std::min<unsigned>(grid_for(M * (H / 8)), 1024u), static_cast<unsigned>(E));
    zero_batched_tail_kernel<<<grid, kThreads, 0, stream>>>(
        in.expert_num_tokens.ptr<const int32_t>(), M, H, g2);
    MODMOE_LAUNCH_CHECK(stream);
    return;
  }
  if (options.do_finalize) {
    cuda::finalize(make_view(g2, DType::BF16, {N, H}, dev),
                   make_view(expert_weights, DType::F32, {M, k}, dev),
                   make_view(e2p, DType::I32, {M, k}, dev), out.out, stream);
  }
}

}  // namespace modmoe::cuda
