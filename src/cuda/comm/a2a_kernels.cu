// Expert-parallel dispatch and combine kernels (docs/contract.md "Stage 2").
//
// dispatch (one kernel, num_blocks CTAs of 512 threads, the same grid on every rank):
//   1. Each CTA owns a contiguous token range [t_begin, t_end). It counts, per destination
//      rank, the tokens before its range (a redundant pass over topk_ids, warp ballots), so
//      every CTA knows where its rows start without talking to the others.
//   2. For each chunk of 256 tokens: a destination mask per token (the distinct owners of its
//      k ids; ids outside [0, E) go nowhere), then per rank an exclusive prefix count over
//      the chunk. The slot of token t in rank r's block is the number of earlier tokens sent
//      to r: source order, never arrival order, so every run is the same.
//   3. Copy: a warp takes (token, region, segment) items, loads kUnroll vectors per lane
//      (4 x 16 B in flight) and stores them to every destination of the token.
//   4. Signal (NvLink): after a CTA barrier, thread r fences at system scope and adds 1 to
//      rank r's dispatch_flag[me] (red.release.sys). The last CTA (whose prefix covers all
//      T tokens) first writes rank r's count record {call, count, layout signature}.
//   5. Receive (NvLink): CTA b waits for sources s = b, b + num_blocks, ... until
//      dispatch_flag[s] == call * num_blocks (ld.acquire.sys, globaltimer timeout), checks
//      the record (call number, layout, count <= runtime_max) before using the count, writes
//      recv_counts[s] and sets topk_ids of rows [count, runtime_max) to -1.
//
// combine (one kernel, same grid): pull (the default): block 0 signals "my combine buffer is
//   ready" to every peer, every CTA waits for all peers, then each warp sums, for (token,
//   piece of H) items, the rows it sent in rank order in fp32 (reading the peers' rows over
//   NVLink, 4 ranks x 4 vectors in flight per lane) and casts once. Push: every CTA first
//   stores my rows for source s into s's combine receive, signals, waits, then reduces
//   locally. ReduceOnly (NCCL): the reduce alone.
//
// Call numbers: dispatch uses state.dispatch_seq + 1 and publishes it in state.combine_seq;
// combine reads combine_seq and writes it back into dispatch_seq. Flags only grow, so no
// reset is needed and the pair can be captured in a CUDA graph and replayed.
#include <cuda_bf16.h>

#include <cstdio>

#include "cuda/comm/a2a_kernels.h"
#include "cuda/device/cuda_check.h"

namespace modmoe::comm {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kChunkTokens = 256;  // tokens planned at once: 8 tiles of 32
constexpr int kTiles = kChunkTokens / 32;
constexpr int kReduceUnroll = 4;   // 16-byte vectors per lane per reduce item
constexpr int kRankGroup = 4;      // ranks whose rows are loaded before accumulating
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_sys_add(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint4 ld_volatile_v4(const void* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ void st_volatile_v4(void* p, const uint4& v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// The first error of this rank wins; it goes to host-mapped memory (code written last) and
// to stdout.
__device__ void report(State* state, ErrorRecord* err, int code, int rank, int peer, int buffer,
                       uint64_t expected, uint64_t seen, uint64_t seq) {
  if (atomicCAS(&state->err_claim, 0u, 1u) != 0u) return;
  volatile ErrorRecord* e = err;
  e->rank = rank;
  e->peer = peer;
  e->buffer = buffer;
  e->expected = expected;
  e->seen = seen;
  e->seq = seq;
  __threadfence_system();
  e->code = code;
  __threadfence_system();
  const char* what = code == kErrTimeout        ? "timed out waiting"
                     : code == kErrSendOverflow ? "send overflow (rows for one peer > runtime_max)"
                     : code == kErrBadCount     ? "count from peer > runtime_max"
                     : code == kErrBadSeq       ? "count record of another call"
                                                : "peer used another payload layout";
  const char* buf = buffer == kBufDispatchFlag  ? "dispatch flag"
                    : buffer == kBufCombineFlag ? "combine flag"
                    : buffer == kBufCountRecord ? "dispatch count record"
                                                : "dispatch send slot";
  printf("modmoe all-to-all: rank %d: %s: peer %d, buffer '%s', call %llu: expected %llu, seen %llu\n",
         rank, what, peer, buf, static_cast<unsigned long long>(seq),
         static_cast<unsigned long long>(expected), static_cast<unsigned long long>(seen));
}

// Spins until *flag >= target. Gives up, with an error record, after timeout_ns, or as soon
// as another thread of this rank has recorded an error.
__device__ bool wait_geq(const uint64_t* flag, uint64_t target, uint64_t timeout_ns, State* state,
                         ErrorRecord* err, int rank, int peer, int buffer, uint64_t seq) {
  uint64_t v = ld_acquire_sys(flag);
  if (v >= target) return true;
  const uint64_t start = globaltimer();
  for (uint32_t it = 1;; ++it) {
    v = ld_acquire_sys(flag);
    if (v >= target) return true;
    if ((it & 63u) == 0) {
      if (*reinterpret_cast<volatile uint32_t*>(&state->err_claim) != 0u) return false;
      if (globaltimer() - start > timeout_ns) {
        report(state, err, kErrTimeout, rank, peer, buffer, target, v, seq);
        return false;
      }
    }
  }
}

// The distinct ranks that own one of the token's ids; ids outside [0, E) go nowhere.
__device__ __forceinline__ uint64_t token_mask(const int32_t* ids, int k, int num_experts,
                                               int per_rank) {
  uint64_t m = 0;
  for (int j = 0; j < k; ++j) {
    const int id = __ldg(ids + j);
    if (id >= 0 && id < num_experts) m |= 1ull << (id / per_rank);
  }
  return m;
}

template <int V> struct VecOf;
template <> struct VecOf<16> { using T = uint4; };
template <> struct VecOf<8> { using T = uint2; };
template <> struct VecOf<4> { using T = unsigned int; };
template <> struct VecOf<2> { using T = unsigned short; };
template <> struct VecOf<1> { using T = unsigned char; };

// `mask` (bits [0, ep)) rotated right by `start`: bit b stands for rank (b + start) % ep.
__device__ __forceinline__ uint64_t rotate_mask(uint64_t mask, int start, int ep) {
  if (start == 0) return mask;
  const uint64_t full = ep == 64 ? ~0ull : (1ull << ep) - 1;
  return ((mask >> start) | (mask << (ep - start))) & full;
}

// One segment (32 lanes x U vectors) of token t's row of region p, to every rank in `mask`
// that has a slot. The destinations are visited from rank `start` on (start differs per rank
// and per warp), so that the warps of all ranks do not all store to the same GPU at once.
template <int V, int U>
__device__ __forceinline__ void copy_segment(const DispatchGlobals& g, int p, int t, int seg,
                                             uint64_t mask, const int* slots, int lane, int start) {
  using Vec = typename VecOf<V>::T;
  const size_t row = g.layout.row_bytes[p];
  const uint8_t* src = g.src[p] + static_cast<size_t>(t) * row;
  const size_t base = static_cast<size_t>(seg) * (32 * U * V);
  Vec v[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const size_t off = base + static_cast<size_t>(u * 32 + lane) * V;
    if (off < row) v[u] = __ldg(reinterpret_cast<const Vec*>(src + off));
  }
  const int ep = g.ep_size;
  uint64_t rot = rotate_mask(mask, start, ep);
  while (rot != 0) {
    int r = __ffsll(static_cast<long long>(rot)) - 1 + start;
    rot &= rot - 1;
    if (r >= ep) r -= ep;
    const int slot = slots[r];
    if (slot < 0) continue;
    uint8_t* dst = g.dest_base[r] + g.layout.offset[p] +
                   (static_cast<size_t>(g.dest_block[r]) * g.layout.runtime_max + slot) * row;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t off = base + static_cast<size_t>(u * 32 + lane) * V;
      if (off < row) *reinterpret_cast<Vec*>(dst + off) = v[u];
    }
  }
}

// Receiver side for source s: check the record, publish the count, pad topk_ids with -1.
__device__ void receive_source(const DispatchGlobals& g, int s, bool wait, uint64_t seq) {
  __shared__ int s_count;
  if (threadIdx.x == 0) {
    int count = 0;
    bool ok = true;
    if (wait) {
      ok = wait_geq(&g.ctrl->dispatch_flag[s], seq * static_cast<uint64_t>(g.num_blocks),
                    g.timeout_ns, g.state, g.error, g.rank, s, kBufDispatchFlag, seq);
    }
    if (ok) {
      const uint4 raw = ld_volatile_v4(&g.ctrl->count[s]);
      const uint32_t rec_seq = raw.x, rec_count = raw.y, rec_sig = raw.z;
      if (rec_seq != static_cast<uint32_t>(seq)) {
        report(g.state, g.error, kErrBadSeq, g.rank, s, kBufCountRecord, seq, rec_seq, seq);
      } else if (rec_sig != g.layout.sig) {
        report(g.state, g.error, kErrBadLayout, g.rank, s, kBufCountRecord, g.layout.sig, rec_sig, seq);
      } else if (rec_count > static_cast<uint32_t>(g.layout.runtime_max)) {
        // NOTE: checked before any use, so a corrupted count cannot index past the block.
        report(g.state, g.error, kErrBadCount, g.rank, s, kBufCountRecord,
               static_cast<uint64_t>(g.layout.runtime_max), rec_count, seq);
      } else {
        count = static_cast<int>(rec_count);
      }
    }
    g.recv_counts[s] = count;
    s_count = count;
  }
  __syncthreads();
  const int count = s_count;
  const int k = g.top_k;
  int32_t* ids = reinterpret_cast<int32_t*>(g.recv + g.layout.offset[0]) +
                 static_cast<size_t>(s) * g.layout.runtime_max * k;
  const size_t end = static_cast<size_t>(g.layout.runtime_max) * k;
  for (size_t i = static_cast<size_t>(count) * k + threadIdx.x; i < end; i += kThreads) ids[i] = -1;
  __syncthreads();
}

size_t dispatch_smem_bytes(int ep) {
  // s_mask [kChunkTokens] u64 | s_slot [kChunkTokens, ep] i32 | s_tile [kTiles, ep] i32 | s_base [ep] i32
  return kChunkTokens * 8 + static_cast<size_t>(kChunkTokens) * ep * 4 +
         static_cast<size_t>(kTiles) * ep * 4 + static_cast<size_t>(ep) * 4;
}

__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(const __grid_constant__ DispatchGlobals g) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int ep = g.ep_size;
  uint64_t* s_mask = reinterpret_cast<uint64_t*>(smem);
  int* s_slot = reinterpret_cast<int*>(s_mask + kChunkTokens);
  int* s_tile = s_slot + kChunkTokens * ep;
  int* s_base = s_tile + kTiles * ep;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t seq = g.state->dispatch_seq + 1;
  const int T = g.num_tokens, k = g.top_k;
  const int t_begin = static_cast<int>(static_cast<int64_t>(T) * blockIdx.x / g.num_blocks);
  const int t_end = static_cast<int>(static_cast<int64_t>(T) * (blockIdx.x + 1) / g.num_blocks);

  // 1. Tokens before my range, per destination rank.
  for (int r = threadIdx.x; r < ep; r += kThreads) s_base[r] = 0;
  __syncthreads();
  {
    uint32_t c_lo = 0, c_hi = 0;  // lane l counts ranks l and l + 32
    for (int t0 = warp * 32; t0 < t_begin; t0 += kWarps * 32) {
      const int t = t0 + lane;
      const uint64_t m = t < t_begin ? token_mask(g.topk_ids + static_cast<size_t>(t) * k, k,
                                                  g.num_experts, g.experts_per_rank)
                                     : 0;
      for (int r = 0; r < ep; ++r) {
        const unsigned b = __ballot_sync(kFull, (m >> r) & 1);
        if (lane == (r & 31)) (r < 32 ? c_lo : c_hi) += __popc(b);
      }
    }
    if (lane < ep && c_lo) atomicAdd(&s_base[lane], static_cast<int>(c_lo));  // a count: order-free
    if (lane + 32 < ep && c_hi) atomicAdd(&s_base[lane + 32], static_cast<int>(c_hi));
  }
  __syncthreads();

  // 2-3. Plan and copy my range, chunk by chunk.
  for (int c0 = t_begin; c0 < t_end; c0 += kChunkTokens) {
    const int n = min(kChunkTokens, t_end - c0);
    if (warp < kTiles) {
      const int i = warp * 32 + lane;
      const uint64_t m = i < n ? token_mask(g.topk_ids + static_cast<size_t>(c0 + i) * k, k,
                                            g.num_experts, g.experts_per_rank)
                               : 0;
      s_mask[i] = m;
      for (int r = 0; r < ep; ++r) {
        const unsigned b = __ballot_sync(kFull, (m >> r) & 1);
        if (lane == 0) s_tile[warp * ep + r] = __popc(b);
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < ep; r += kThreads) {  // tile counts -> tile bases
      int run = s_base[r];
      for (int w = 0; w < kTiles; ++w) {
        const int c = s_tile[w * ep + r];
        s_tile[w * ep + r] = run;
        run += c;
      }
      s_base[r] = run;
    }
    __syncthreads();
    if (warp < kTiles) {
      const int i = warp * 32 + lane;
      const uint64_t m = s_mask[i];
      for (int r = 0; r < ep; ++r) {
        const bool to_r = (m >> r) & 1;
        const unsigned b = __ballot_sync(kFull, to_r);
        int slot = -1;
        if (to_r) {
          slot = s_tile[warp * ep + r] + __popc(b & lanemask_lt());
          if (slot >= g.layout.runtime_max) {
            report(g.state, g.error, kErrSendOverflow, g.rank, r, kBufSendSlot,
                   static_cast<uint64_t>(g.layout.runtime_max), static_cast<uint64_t>(slot) + 1, seq);
            slot = -1;  // never written past the block
          }
        }
        if (i < n) {
          s_slot[i * ep + r] = slot;
          g.send_slot[static_cast<size_t>(c0 + i) * ep + r] = slot;
        }
      }
    }
    __syncthreads();
    const int items = n * g.layout.items_per_token;
    for (int item = warp; item < items; item += kWarps) {
      const int i = item / g.layout.items_per_token;
      int seg = item - i * g.layout.items_per_token;
      int p = 0;
      while (seg >= g.layout.num_segs[p]) seg -= g.layout.num_segs[p++];
      const uint64_t m = s_mask[i];
      const int* slots = s_slot + i * ep;
      const int start = (g.rank + 1 + static_cast<int>(blockIdx.x) * kWarps + warp) % ep;
      switch (g.layout.vec_bytes[p]) {
        case 16: copy_segment<16, kUnroll>(g, p, c0 + i, seg, m, slots, lane, start); break;
        case 8: copy_segment<8, kUnroll>(g, p, c0 + i, seg, m, slots, lane, start); break;
        case 4: copy_segment<4, kUnroll>(g, p, c0 + i, seg, m, slots, lane, start); break;
        case 2: copy_segment<2, kUnroll>(g, p, c0 + i, seg, m, slots, lane, start); break;
        default: copy_segment<1, kUnroll>(g, p, c0 + i, seg, m, slots, lane, start); break;
      }
    }
    __syncthreads();
  }

  // 4. Count records (last CTA: its s_base now counts all T tokens) and signals.
  // NOTE: the CTA's peer stores precede the barrier that ended the last chunk; the signalling
  // thread's red.release.sys after it orders them before the flag (PTX causality order is
  // cumulative through bar.sync, and a release at system scope is fence.acq_rel.sys + the
  // add: the pattern of cooperative groups' grid sync, at system scope). A fence.sc.sys in
  // front of the release was dropped after a same-machine A/B on 2x H200 (docs/all_to_all.md,
  // "Switches"): 0.4-1.0 us less per dispatch and combine at 1-2048 tokens, the multigpu tests
  // passing without it. A fence in every thread first cost 2 us more per dispatch at 1-16
  // tokens on 4x H200 and changed nothing else; MODMOE_A2A_THREAD_FENCES=1 brings it back.
  if (g.mode == DispatchMode::NvLinkPush && g.thread_fences) {
    __threadfence_system();
    __syncthreads();
  }
  if (threadIdx.x < ep) {
    const int r = threadIdx.x;
    if (blockIdx.x == g.num_blocks - 1) {
      const uint4 rec = make_uint4(static_cast<uint32_t>(seq), static_cast<uint32_t>(s_base[r]),
                                   g.layout.sig, 0u);
      st_volatile_v4(g.record_out[r], rec);
    }
    if (g.mode == DispatchMode::NvLinkPush) {
      // every CTA thread's stores (ordered by the barrier above), and the record
      red_release_sys_add(&g.dest_ctrl[r]->dispatch_flag[g.rank], 1);
    }
  }

  // 5. Receive.
  if (g.mode == DispatchMode::NvLinkPush) {
    for (int s = blockIdx.x; s < ep; s += g.num_blocks) receive_source(g, s, true, seq);
    if (blockIdx.x == 0 && threadIdx.x == 0) g.state->combine_seq = seq;
  }
}

__global__ void __launch_bounds__(kThreads, 1) dispatch_finish_kernel(const __grid_constant__ DispatchGlobals g) {
  const uint64_t seq = g.state->dispatch_seq + 1;
  for (int s = blockIdx.x; s < g.ep_size; s += gridDim.x) receive_source(g, s, false, seq);
  if (blockIdx.x == 0 && threadIdx.x == 0) g.state->combine_seq = seq;
}

__device__ __forceinline__ void add_bf16x8(float* acc, const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] += __uint_as_float(w[i] << 16);
    acc[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint4 to_bf16x8(const float* acc) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);  // .x = low half
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__global__ void __launch_bounds__(kThreads, 1) combine_kernel(const __grid_constant__ CombineGlobals g) {
  const int ep = g.ep_size, me = g.rank;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + warp, nwarps = g.num_blocks * kWarps;
  const uint64_t seq = g.state->combine_seq;
  const int64_t vec_per_row = g.hidden / 8;  // 16-byte vectors of 8 bf16
  const size_t rm = static_cast<size_t>(g.runtime_max);
  const uint64_t target = seq * static_cast<uint64_t>(g.num_blocks);

  if (g.mode == CombineMode::NvLinkPush) {
    // My rows for source s, [0, count_s) of payload block s, as one flat range to s's
    // combine receive block `me`; items of 32 lanes x kUnroll vectors spread over all warps.
    constexpr int64_t kSegVec = 32 * kUnroll;
    int64_t first = 0;  // global item index of this source's first segment
    for (int d = 1; d < ep; ++d) {
      const int s = (me + d) % ep;  // rank r starts with r + 1: the ranks store to different GPUs
      const int64_t nvec = static_cast<int64_t>(g.recv_counts[s]) * vec_per_row;
      const int64_t nseg = (nvec + kSegVec - 1) / kSegVec;
      const uint4* src = reinterpret_cast<const uint4*>(g.payload) + s * rm * vec_per_row;
      uint4* dst = reinterpret_cast<uint4*>(g.push_dest[s]) + me * rm * vec_per_row;
      int64_t i = ((gwarp - first) % nwarps + nwarps) % nwarps;
      for (; i < nseg; i += nwarps) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t idx = i * kSegVec + u * 32 + lane;
          if (idx < nvec) v[u] = __ldg(src + idx);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t idx = i * kSegVec + u * 32 + lane;
          if (idx < nvec) dst[idx] = v[u];
        }
      }
      first += nseg;
    }
    __syncthreads();  // the CTA's peer stores, then the signalling threads' releases (see dispatch)
    if (threadIdx.x < ep && threadIdx.x != me) {
      red_release_sys_add(&g.dest_ctrl[threadIdx.x]->combine_flag[me], 1);
    }
  } else if (g.mode == CombineMode::NvLinkPull && blockIdx.x == 0) {
    // "My combine buffer holds this call's rows": written by earlier kernels of this stream.
    if (threadIdx.x < ep && threadIdx.x != me) {
      red_release_sys_add(&g.dest_ctrl[threadIdx.x]->combine_flag[me],
                          static_cast<uint64_t>(g.num_blocks));
    }
  }

  if (g.mode != CombineMode::ReduceOnly) {
    __shared__ int s_ok;
    if (threadIdx.x == 0) s_ok = 1;
    __syncthreads();
    if (threadIdx.x < ep && threadIdx.x != me) {
      if (!wait_geq(&g.ctrl->combine_flag[threadIdx.x], target, g.timeout_ns, g.state, g.error,
                    me, threadIdx.x, kBufCombineFlag, seq)) {
        s_ok = 0;
      }
    }
    __syncthreads();
    if (!s_ok) return;
  }

  // Reduce: out[t] = bf16(sum over r in rank order of row(r, slot[t][r])), fp32.
  constexpr int64_t kItemVec = 32 * kReduceUnroll;
  const int64_t items_per_token = (vec_per_row + kItemVec - 1) / kItemVec;
  const int64_t total = static_cast<int64_t>(g.num_tokens) * items_per_token;
  for (int64_t item = gwarp; item < total; item += nwarps) {
    const int64_t t = item / items_per_token;
    const int64_t v0 = (item - t * items_per_token) * kItemVec;
    const int* slots = g.send_slot + t * ep;
    float acc[kReduceUnroll][8];
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[u][e] = 0.0f;
    for (int r0 = 0; r0 < ep; r0 += kRankGroup) {
      uint4 v[kRankGroup][kReduceUnroll];
      bool has[kRankGroup];
#pragma unroll
      for (int q = 0; q < kRankGroup; ++q) {
        const int r = r0 + q;
        const int slot = r < ep ? slots[r] : -1;
        has[q] = slot >= 0;
        if (has[q]) {
          const uint4* row = reinterpret_cast<const uint4*>(g.row_base[r]) +
                             (static_cast<size_t>(g.row_block[r]) * rm + slot) * vec_per_row;
#pragma unroll
          for (int u = 0; u < kReduceUnroll; ++u) {
            const int64_t idx = v0 + u * 32 + lane;
            if (idx < vec_per_row) v[q][u] = g.nc_loads ? __ldg(row + idx) : __ldcg(row + idx);
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kRankGroup; ++q) {
        if (!has[q]) continue;
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u) {
          if (v0 + u * 32 + lane < vec_per_row) add_bf16x8(acc[u], v[q][u]);
        }
      }
    }
    uint4* out = reinterpret_cast<uint4*>(g.out) + t * vec_per_row;
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int64_t idx = v0 + u * 32 + lane;
      if (idx < vec_per_row) out[idx] = to_bf16x8(acc[u]);
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) g.state->dispatch_seq = seq;
}

}  // namespace

void prepare_dispatch_kernel(int ep) {
  const size_t bytes = dispatch_smem_bytes(ep);
  if (bytes > 48 * 1024) {
    MODMOE_CUDA_CHECK(cudaFuncSetAttribute(dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
  }
}

void launch_dispatch(const DispatchGlobals& g, cudaStream_t stream) {
  dispatch_kernel<<<g.num_blocks, kThreads, dispatch_smem_bytes(g.ep_size), stream>>>(g);
  MODMOE_LAUNCH_CHECK(stream);
}

void launch_dispatch_finish(const DispatchGlobals& g, cudaStream_t stream) {
  dispatch_finish_kernel<<<g.ep_size, kThreads, 0, stream>>>(g);
  MODMOE_LAUNCH_CHECK(stream);
}

void launch_combine(const CombineGlobals& g, cudaStream_t stream) {
  combine_kernel<<<g.num_blocks, kThreads, 0, stream>>>(g);
  MODMOE_LAUNCH_CHECK(stream);
}

}  // namespace modmoe::comm
