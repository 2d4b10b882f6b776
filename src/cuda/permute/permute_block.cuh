// The local permutation (permute.cu) in one thread block, for small batches: the same stable
// counting sort, with the 32 warps of the block in the place of permute.cu's chunks, so the
// three launches (count, scan, scatter) become one. Used by cuda::permute and fused into the
// experts stage's first kernel (experts.cu) at decode sizes, where each launch costs more than
// its work.
//
//   1. count:   warp w owns the contiguous entries [w * per, (w + 1) * per), per = ceil(N / 32),
//               and counts them per local expert into hist[e][w] (shared-memory atomics: an
//               integer count, order-free);
//   2. scan:    exclusive prefix sum of hist in expert-major order (cub::BlockScan): hist[e][w]
//               becomes the first permuted row of expert e's entries of warp w, and hist[e][0]
//               is expert_first_token_offset[e];
//   3. scatter: each warp walks its entries in ascending x, 32 at a time; lanes with the same
//               expert find each other with __match_any_sync and take consecutive rows in lane
//               order (permute.cu's scatter kernel, one warp per range).
// Rows of an expert come in warp order, then in order inside a warp: ascending expanded index,
// the result of permute.cu to the bit.
#pragma once

#include <cstdint>
#include <cub/block/block_scan.cuh>

namespace modmoe::cuda {

constexpr int kBlockPermuteThreads = 1024;
constexpr int kBlockPermuteWarps = kBlockPermuteThreads / 32;
// Limits of the one-block path: hist is [E_local][32] int32 in shared memory (32 KB at 256
// experts), and beyond ~16K entries the chunked kernels spread the work over more SMs.
constexpr int kBlockPermuteMaxExperts = 256;
constexpr int64_t kBlockPermuteMaxItems = 16384;
// The default takes it up to 4096 entries. Measured on an H100 SXM (2026-11-27, `modmoe bench
// experts --ab MODMOE_FUSED_PERMUTE=1`, experts_v3_ab.json): -2 to -16 us at 8 to 4096 entries
// (qwen3 T=1 60.1 -> 57.9 us, qwen3 T=128 448 -> 432 us), +3 to +6 us at 8192 (qwen3 and
// deepseek T=1024), where the chunked kernels spread the sort over more SMs.
constexpr int64_t kBlockPermuteDefaultItems = 4096;

constexpr bool block_permute_fits(int64_t num_items, int num_local_experts) {
  return num_items <= kBlockPermuteMaxItems && num_local_experts <= kBlockPermuteMaxExperts;
}
// Whether the one-block path runs (permute.cu): it fits, and MODMOE_FUSED_PERMUTE is "1", or
// it is unset and num_items <= kBlockPermuteDefaultItems (read at every call).
bool use_block_permute(int64_t num_items, int num_local_experts);

struct BlockPermuteArgs {
  const int32_t* topk_ids;        // [N] int32: global ids, or (id << 16) | bf16, signed id
  int64_t* first_token_offset;    // [E_local + 1] int64 out
  int32_t* expanded_to_permuted;  // [N] int32 out, -1 where not local
  int32_t* permuted_to_expanded;  // [N] int32 out, -1 for rows >= P
  int num_items;                  // N
  int local_expert_offset;
  int num_local_experts;  // E_local <= kBlockPermuteMaxExperts
  bool packed;
};

using BlockPermuteScan = cub::BlockScan<int32_t, kBlockPermuteThreads>;

// The local expert of entry i < N, or E_local when its id is not local.
__device__ __forceinline__ int block_permute_expert(const BlockPermuteArgs& a, int i) {
  const int32_t raw = a.topk_ids[i];
  const int64_t id = a.packed ? (raw >> 16) : raw;  // arithmetic shift keeps the id's sign
  const int64_t local = id - a.local_expert_offset;
  return local >= 0 && local < a.num_local_experts ? static_cast<int>(local) : a.num_local_experts;
}

// Called by all kBlockPermuteThreads threads of one block. hist: shared memory of
// [E_local][32] int32. Returns P (the permuted rows) to every thread. The outputs are written
// to global memory; a __syncthreads() after it makes them visible to the whole block.
__device__ __forceinline__ int block_permute(const BlockPermuteArgs& a, int32_t* hist,
                                             BlockPermuteScan::TempStorage& scan_storage,
                                             int32_t& total_shared) {
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int len = a.num_local_experts * kBlockPermuteWarps;
  for (int i = tid; i < len; i += kBlockPermuteThreads) hist[i] = 0;
  __syncthreads();

  // 1. count
  const int per = (a.num_items + kBlockPermuteWarps - 1) / kBlockPermuteWarps;
  const int begin = min(warp * per, a.num_items);
  const int end = min(begin + per, a.num_items);
  for (int i = begin + lane; i < end; i += 32) {
    const int e = block_permute_expert(a, i);
    if (e < a.num_local_experts) atomicAdd(&hist[e * kBlockPermuteWarps + warp], 1);
  }
  __syncthreads();

  // 2. scan, expert-major: thread t owns [t * pt, (t + 1) * pt)
  const int pt = (len + kBlockPermuteThreads - 1) / kBlockPermuteThreads;
  const int s0 = min(tid * pt, len);
  const int s1 = min(s0 + pt, len);
  int32_t sum = 0;
  for (int i = s0; i < s1; ++i) sum += hist[i];
  int32_t prefix, total;
  BlockPermuteScan(scan_storage).ExclusiveSum(sum, prefix, total);
  for (int i = s0; i < s1; ++i) {
    const int32_t c = hist[i];
    hist[i] = prefix;
    if (i % kBlockPermuteWarps == 0) a.first_token_offset[i / kBlockPermuteWarps] = prefix;
    prefix += c;
  }
  if (tid == 0) {
    a.first_token_offset[a.num_local_experts] = total;
    total_shared = total;
  }
  __syncthreads();
  const int num_permuted = total_shared;  // P

  // 3. scatter: warp w's cursors are column w of hist
  constexpr unsigned kFull = 0xffffffffu;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += 32) {  // warp-uniform bounds
    const int i = base + lane;
    const int e = i < end ? block_permute_expert(a, i) : a.num_local_experts;
    const unsigned peers = __match_any_sync(kFull, e);  // lanes with the same expert
    const bool is_local = e < a.num_local_experts;
    int32_t* cursor = hist + e * kBlockPermuteWarps + warp;
    if (is_local) {
      const int row = *cursor + __popc(peers & lanes_below);
      a.expanded_to_permuted[i] = row;
      a.permuted_to_expanded[row] = i;
    } else if (i < end) {
      a.expanded_to_permuted[i] = -1;
    }
    __syncwarp();
    if (is_local && (peers & lanes_below) == 0) *cursor += __popc(peers);
    __syncwarp();
  }
  // Rows >= P hold no entry (the scatter writes rows < P only).
  for (int i = num_permuted + tid; i < a.num_items; i += kBlockPermuteThreads) {
    a.permuted_to_expanded[i] = -1;
  }
  return num_permuted;
}

}  // namespace modmoe::cuda
