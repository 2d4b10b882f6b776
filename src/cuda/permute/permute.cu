// Local permutation on the GPU: topk_ids [M, k] -> permute metadata (experts.h).
//
// Permuted rows are grouped by local expert in id order and, inside an expert, in ascending
// expanded index x = token * k + j (docs/HELPERS.md item 8): a stable counting sort of the
// N = M * k expanded entries by local expert. The entries are cut into chunks of kChunk:
//   1. count:   per chunk, entries per local expert -> counts [E_local, num_chunks];
//   2. scan:    one block, exclusive prefix sum of counts in expert-major order (cub::BlockScan):
//               counts[e][c] becomes the first permuted row of expert e's entries of chunk c,
//               and counts[e][0] is expert_first_token_offset[e];
//   3. scatter: one warp per chunk walks it in ascending x, 32 entries at a time; lanes with
//               the same expert find each other with __match_any_sync and take consecutive
//               rows in lane order. It also writes -1 to permuted rows >= P of its chunk.
// No global atomics, no host synchronisation, fixed launch shapes: the result is the same on
// every run and the three launches can be captured in a CUDA graph.
//
// Small batches (N <= 16384 entries, E_local <= 256: decode and the middle) run the same sort
// in one block of one launch instead (permute_block.cuh), with the same result. The kernels
// are launched with programmatic dependent launch where the experts stage uses it (they wait
// for the previous kernel of the stream before reading anything).
//
// NOTE: not cub::DeviceRadixSort: its temp-storage query needs a CUDA device, and
// permute_workspace_size (which the API also calls for CPU tensors in a CUDA build) must be
// a pure function of the sizes, valid on a machine without a GPU.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cub/block/block_scan.cuh>

#include "backend.h"
#include "core/check.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/launch.h"
#include "cuda/device/sm90_ptx.cuh"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/permute/permute_block.cuh"

namespace modmoe::cuda {
namespace {

constexpr int kChunk = 2048;  // expanded entries per chunk
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kMaxLocalExperts = 12 * 1024;  // cursors live in 48 KiB of shared memory
constexpr size_t kAlign = 256;
constexpr unsigned kFull = 0xffffffffu;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
int64_t num_chunks_for(int64_t n) { return (n + kChunk - 1) / kChunk; }

// The workspace: one array, carved from the base rounded up to 256 bytes (hence the leading
// 256, so any base pointer works):
//   counts  int32 [E_local, num_chunks]  per-chunk counts, then their exclusive scan
// bytes = N == 0 ? 0 : 256 + align256(4 * E_local * ceil(N / kChunk))
size_t workspace_bytes(int64_t n, int num_local_experts) {
  if (n == 0) return 0;
  return kAlign + align_up(sizeof(int32_t) * size_t(num_local_experts) * num_chunks_for(n));
}

struct PermuteArgs {
  const int32_t* topk_ids;        // [N] int32: global ids, or (id << 16) | bf16, signed id
  int32_t* counts;                // [E_local, num_chunks] workspace
  int64_t* first_token_offset;    // [E_local + 1] int64 out
  int32_t* expanded_to_permuted;  // [N] int32 out, -1 where not local
  int32_t* permuted_to_expanded;  // [N] int32 out, -1 for rows >= P
  int num_items;                  // N
  int num_chunks;
  int local_expert_offset;
  int num_local_experts;  // E_local
  bool packed;
};

// The local expert of entry i < N, or E_local when its id is not local (-1 padding, E, ids
// of other ranks).
__device__ __forceinline__ int local_expert(const PermuteArgs& a, int i) {
  const int32_t raw = a.topk_ids[i];
  const int64_t id = a.packed ? (raw >> 16) : raw;  // arithmetic shift keeps the id's sign
  const int64_t local = id - a.local_expert_offset;
  return local >= 0 && local < a.num_local_experts ? static_cast<int>(local) : a.num_local_experts;
}

__global__ void __launch_bounds__(kCountThreads) permute_count_kernel(const PermuteArgs a) {
  extern __shared__ int32_t hist[];  // [E_local]
  sm90::grid_dependency_wait();
  sm90::grid_launch_dependents();
  for (int e = threadIdx.x; e < a.num_local_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int begin = blockIdx.x * kChunk;
  for (int i = begin + threadIdx.x; i < begin + kChunk && i < a.num_items; i += blockDim.x) {
    const int e = local_expert(a, i);
    if (e < a.num_local_experts) atomicAdd(&hist[e], 1);  // an integer count: order-free
  }
  __syncthreads();
  for (int e = threadIdx.x; e < a.num_local_experts; e += blockDim.x) {
    a.counts[int64_t(e) * a.num_chunks + blockIdx.x] = hist[e];
  }
}

__global__ void __launch_bounds__(kScanThreads) permute_scan_kernel(const PermuteArgs a) {
  using BlockScan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  sm90::grid_dependency_wait();
  sm90::grid_launch_dependents();
  const int64_t len = int64_t(a.num_local_experts) * a.num_chunks;
  const int64_t per_thread = (len + kScanThreads - 1) / kScanThreads;
  const int64_t begin = threadIdx.x * per_thread;
  const int64_t end = begin + per_thread < len ? begin + per_thread : len;
  int32_t sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += a.counts[i];
  int32_t prefix, total;
  BlockScan(scan_storage).ExclusiveSum(sum, prefix, total);
  for (int64_t i = begin; i < end; ++i) {
    const int32_t c = a.counts[i];
    a.counts[i] = prefix;
    if (i % a.num_chunks == 0) a.first_token_offset[i / a.num_chunks] = prefix;
    prefix += c;
  }
  if (threadIdx.x == 0) a.first_token_offset[a.num_local_experts] = total;
  if (a.num_chunks == 0) {  // N = 0: every expert starts (and ends) at row 0
    for (int e = threadIdx.x; e < a.num_local_experts; e += blockDim.x) a.first_token_offset[e] = 0;
  }
}

__global__ void __launch_bounds__(32) permute_scatter_kernel(const PermuteArgs a) {
  extern __shared__ int32_t cursor[];  // [E_local] next permuted row of each expert
  sm90::grid_dependency_wait();
  sm90::grid_launch_dependents();
  const int lane = threadIdx.x;
  for (int e = lane; e < a.num_local_experts; e += 32) {
    cursor[e] = a.counts[int64_t(e) * a.num_chunks + blockIdx.x];
  }
  __syncwarp();
  const int begin = blockIdx.x * kChunk;
  const int end = begin + kChunk < a.num_items ? begin + kChunk : a.num_items;
  const int64_t num_permuted = a.first_token_offset[a.num_local_experts];  // P
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {
    const int i = base + lane;
    const int e = i < end ? local_expert(a, i) : a.num_local_experts;
    const unsigned peers = __match_any_sync(kFull, e);  // lanes with the same expert
    const bool is_local = e < a.num_local_experts;
    if (is_local) {
      const int row = cursor[e] + __popc(peers & lanes_below);
      a.expanded_to_permuted[i] = row;
      a.permuted_to_expanded[row] = i;
    } else if (i < end) {
      a.expanded_to_permuted[i] = -1;
    }
    __syncwarp();
    if (is_local && (peers & lanes_below) == 0) cursor[e] += __popc(peers);
    __syncwarp();
    if (i < end && i >= num_permuted) a.permuted_to_expanded[i] = -1;
  }
}

// One block: the whole permutation (permute_block.cuh). hist: [E_local][32] int32, dynamic.
__global__ void __launch_bounds__(kBlockPermuteThreads) permute_block_kernel(const BlockPermuteArgs a) {
  extern __shared__ int32_t block_hist[];
  __shared__ BlockPermuteScan::TempStorage scan_storage;
  __shared__ int32_t total;
  sm90::grid_dependency_wait();
  sm90::grid_launch_dependents();
  block_permute(a, block_hist, scan_storage, total);
}

// Launches kernel<<<grid, block, smem, stream>>>(args), checked, with programmatic dependent
// launch when the stage's other kernels use it (MODMOE_STAGE_PDL=1, gemm::use_stage_pdl).
template <class Kernel, class Args>
void launch_pdl(Kernel kernel, unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                const Args& args) {
  launch_kernel(kernel, dim3(grid), block, smem, stream, gemm::use_stage_pdl(), args);
}

}  // namespace

bool use_block_permute(int64_t num_items, int num_local_experts) {
  // Read at every call (a test and benchmark hook): MODMOE_FUSED_PERMUTE=1 takes the one-block
  // kernel wherever it fits, =0 never; unset, up to kBlockPermuteDefaultItems entries.
  if (const std::optional<bool> on = check::env_switch("MODMOE_FUSED_PERMUTE")) {
    return *on && block_permute_fits(num_items, num_local_experts);
  }
  return num_items <= kBlockPermuteDefaultItems && block_permute_fits(num_items, num_local_experts);
}

size_t permute_workspace_size(int64_t num_tokens, int top_k, int num_local_experts) {
  const int64_t n = num_tokens * top_k;
  MODMOE_CHECK(n >= 0 && n < INT32_MAX, "cuda::permute_workspace_size: num_tokens * top_k = ", n,
               ": expected below 2^31 - 1");
  return workspace_bytes(n, num_local_experts);
}

void permute(const TensorView& topk_ids, bool packed, const ExpertMap& map,
             const PermuteMetadata& out, const Workspace& workspace, Stream stream) {
  const int64_t n = topk_ids.numel();
  const int E_local = map.num_local_experts;
  MODMOE_CHECK(n < INT32_MAX, "cuda::permute: M * k = ", n, ": expected below 2^31 - 1");
  MODMOE_CHECK(E_local >= 1 && E_local <= kMaxLocalExperts,
               "cuda::permute: num_local_experts = ", E_local, ": expected 1 to ",
               kMaxLocalExperts);
  MODMOE_CHECK(topk_ids.is_contiguous(), "cuda::permute: topk_ids must be contiguous");
  const size_t needed = workspace_bytes(n, E_local);
  MODMOE_CHECK(needed == 0 || (workspace.data != nullptr && workspace.bytes >= needed),
               "cuda::permute: workspace of ", workspace.bytes, " bytes: expected at least ",
               needed, " (permute_workspace_size)");

  PermuteArgs a{};
  a.topk_ids = topk_ids.ptr<const int32_t>();
  a.counts = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(workspace.data) + kAlign - 1) /
                                        kAlign * kAlign);
  a.first_token_offset = out.expert_first_token_offset.ptr<int64_t>();
  a.expanded_to_permuted = out.expanded_idx_to_permuted_idx.ptr<int32_t>();
  a.permuted_to_expanded = out.permuted_idx_to_expanded_idx.ptr<int32_t>();
  a.num_items = static_cast<int>(n);
  a.num_chunks = static_cast<int>(num_chunks_for(n));
  a.local_expert_offset = map.local_expert_offset;
  a.num_local_experts = E_local;
  a.packed = packed;
  const size_t cursor_bytes = sizeof(int32_t) * E_local;  // <= 48 KiB: no opt-in needed

  if (use_block_permute(n, E_local)) {
    const BlockPermuteArgs b{a.topk_ids, a.first_token_offset, a.expanded_to_permuted,
                             a.permuted_to_expanded, a.num_items, a.local_expert_offset,
                             a.num_local_experts, a.packed};
    launch_pdl(permute_block_kernel, 1, kBlockPermuteThreads,
               sizeof(int32_t) * E_local * kBlockPermuteWarps, stream, b);
    return;
  }
  if (a.num_chunks > 0) {
    launch_pdl(permute_count_kernel, a.num_chunks, kCountThreads, cursor_bytes, stream, a);
  }
  launch_pdl(permute_scan_kernel, 1, kScanThreads, 0, stream, a);
  if (a.num_chunks > 0) {
    launch_pdl(permute_scatter_kernel, a.num_chunks, 32, cursor_bytes, stream, a);
  }
}

}  // namespace modmoe::cuda
