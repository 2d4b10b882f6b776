// The experts stage on the GPU (docs/contract.md "Stage 3"):
//
//   standard: permute -> routing weights -> [scaled input] -> work list -> GEMM1 -> GEMM2
//             -> finalize (do_finalize) or the caller's metadata views
//   batched:  work list -> GEMM1 -> GEMM2 -> zero the rows past each expert's count
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

#include "backend.h"
#include "cuda/device/cuda_check.h"
#include "cuda/gemm/grouped_gemm.h"

namespace modmoe::cuda {
namespace {

constexpr size_t kAlign = 256;
constexpr int kThreads = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
//     scaled         bf16  [M, H]          bf16(float(x) * w)            2 M H
//   both
//     act            bf16  [R, I]          GEMM1 output = GEMM2 input    2 R I
//   standard, do_finalize only
//     g2             bf16  [N, H]          gemm2_out, permuted           2 N H
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
  __nv_bfloat16* act = nullptr;
  __nv_bfloat16* g2 = nullptr;
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
  if (standard && d.top_k == 1) l.scaled = c.take<__nv_bfloat16>(M * d.hidden);
  l.act = c.take<__nv_bfloat16>(R * d.intermediate);
  if (standard && d.do_finalize) l.g2 = c.take<__nv_bfloat16>(N * d.hidden);
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

// expert_weights [M, k] fp32: the weight finalize applies; 0 where not local, 1 when the
// weight went to the input (docs/HELPERS.md items 5 and 6).
__global__ void routing_weights_kernel(const RoutingArgs a, float* expert_weights) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= a.num_entries) return;
  bool local;
  const float w = routing_weight(a, i, local);
  expert_weights[i] = local ? (a.on_input ? 1.0f : w) : 0.0f;
}

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

struct WorkListArgs {
  const int64_t* offsets;  // standard: expert_first_token_offset [E_local + 1], else null
  const int32_t* counts;   // batched: expert_num_tokens [E_local], else null
  int64_t max_m;           // batched
  int num_experts;         // E_local
  int block_m1;            // GEMM1 tile rows
  int block_m2;            // GEMM2 tile rows
  int32_t* row_begin;      // [E_local]
  int32_t* row_count;      // [E_local]
  int32_t* tiles1;         // [E_local + 1] exclusive prefix of ceil(count / block_m1)
  int32_t* tiles2;         // [E_local + 1] same for block_m2
};

// One block. A batched count outside [0, max_m] is clamped: a corrupt count must not make
// the GEMMs read or write out of bounds (docs/contract.md, "Stage 2").
__global__ void __launch_bounds__(kThreads) build_work_list_kernel(const WorkListArgs a) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  int32_t carry1 = 0;
  int32_t carry2 = 0;
  for (int base = 0; base < a.num_experts; base += kThreads) {
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
    Scan(scan_storage).ExclusiveSum((count + a.block_m1 - 1) / a.block_m1, prefix1, total1);
    __syncthreads();
    Scan(scan_storage).ExclusiveSum((count + a.block_m2 - 1) / a.block_m2, prefix2, total2);
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
  MODMOE_CHECK(desc.scheme == QuantScheme::None, "not supported yet: cuda::experts with ",
               quant_scheme_name(desc.scheme), " (only QuantScheme::None)");
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

  if (standard) {
    if (M == 0) {
      if (out.expert_first_token_offset.defined()) {
        MODMOE_CUDA_CHECK(cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (E + 1), stream));
      }
      return;
    }
    const bool packed = !in.topk_weights.defined();
    const PermuteMetadata meta{make_view(offsets, DType::I64, {E + 1}, dev),
                               make_view(e2p, DType::I32, {M, k}, dev),
                               make_view(ws.p2e, DType::I32, {N}, dev)};
    cuda::permute(in.topk_ids, packed, map, meta, Workspace{ws.permute_ws, ws.permute_bytes},
                  stream);

    RoutingArgs ra{};
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
    routing_weights_kernel<<<grid_for(N), kThreads, 0, stream>>>(ra, expert_weights);
    MODMOE_LAUNCH_CHECK(stream);
    if (options.apply_router_weight_on_input) {
      MODMOE_CHECK(k == 1 && ws.scaled != nullptr,
                   "apply_router_weight_on_input needs top_k == 1, got ", k);
      scale_input_kernel<<<grid_for(M * (H / 8)), kThreads, 0, stream>>>(
          ra, in.hidden.ptr<const __nv_bfloat16>(), ws.scaled, H);
      MODMOE_LAUNCH_CHECK(stream);
    }
  }
  if (rows == 0) return;

  // ---- the two GEMM problems and their tiles ----
  const gemm::DeviceProps props = gemm::DeviceProps::query(dev.index);
  GemmDesc d1;
  d1.stage = GemmStage::Gemm1;
  d1.num_experts = E;
  d1.max_rows = rows;
  d1.max_rows_per_expert = standard ? N : M;
  // Balanced routing brings N * E_local / E local rows (most slots are remote under EP).
  d1.expected_rows = standard ? ceil_div(N * E, map.num_experts) : rows;
  d1.n = I;
  d1.k = H;
  d1.gated = gated;
  GemmDesc d2 = d1;
  d2.stage = GemmStage::Gemm2;
  d2.n = H;
  d2.k = I;
  d2.gated = false;
  d1.validate();
  d2.validate();
  const gemm::GemmConfig c1 = gemm::select_config(d1, props);
  const gemm::GemmConfig c2 = gemm::select_config(d2, props);

  WorkListArgs wl{};
  wl.offsets = standard ? offsets : nullptr;
  wl.counts = standard ? nullptr : in.expert_num_tokens.ptr<const int32_t>();
  wl.max_m = M;
  wl.num_experts = E;
  wl.block_m1 = c1.block_m;
  wl.block_m2 = c2.block_m;
  wl.row_begin = ws.row_begin;
  wl.row_count = ws.row_count;
  wl.tiles1 = ws.tiles1;
  wl.tiles2 = ws.tiles2;
  build_work_list_kernel<<<1, kThreads, 0, stream>>>(wl);
  MODMOE_LAUNCH_CHECK(stream);

  // ---- GEMM1: act [rows, I] = activation(A @ w13[e]^T + bias + lora) ----
  // The caller's gemm1_activation_output [N, I] is the act buffer itself when given.
  __nv_bfloat16* act = ws.act;
  if (standard && out.gemm1_activation_output.defined()) {
    act = out.gemm1_activation_output.ptr<__nv_bfloat16>();
  }
  GemmArgs g1;
  g1.tile_offsets = ws.tiles1;
  g1.row_begin = ws.row_begin;
  g1.row_count = ws.row_count;
  g1.a = options.apply_router_weight_on_input ? ws.scaled
                                              : in.hidden.ptr<const __nv_bfloat16>();
  g1.lda = H;
  g1.a_gather = standard ? ws.p2e : nullptr;
  g1.gather_div = k;
  g1.b = weights.w13.ptr<const __nv_bfloat16>();
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
  gemm::launch_grouped_gemm(d1, c1, g1, stream);

  // ---- GEMM2: gemm2_out [rows, H] = act @ w2[e]^T + bias ----
  GemmArgs g2a;
  g2a.tile_offsets = ws.tiles2;
  g2a.row_begin = ws.row_begin;
  g2a.row_count = ws.row_count;
  g2a.a = act;
  g2a.lda = I;
  g2a.b = weights.w2.ptr<const __nv_bfloat16>();
  g2a.b_expert_stride = weights.w2.stride(0);
  g2a.ldb = weights.w2.stride(1);
  if (weights.w2_bias.defined()) {
    g2a.bias = weights.w2_bias.ptr<const float>();
    g2a.bias_expert_stride = weights.w2_bias.stride(0);
  }
  g2a.c = g2;
  g2a.ldc = H;
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
