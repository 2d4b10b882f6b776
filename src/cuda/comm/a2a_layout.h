// Buffer layouts, control words and error records of the expert-parallel all-to-all, shared by
// the host code and the kernels (plain structs, no CUDA). Every byte formula of the shared and
// local buffers is written here, next to the offsets that carve them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace modmoe::comm {

constexpr int kMaxRanks = 64;      // destination masks are one uint64 per token
constexpr int kMaxPayloads = 8;    // caller payloads per dispatch
constexpr int kMaxRegions = kMaxPayloads + 1;  // + topk_ids, always region 0
constexpr int kMaxTopK = 64;
constexpr size_t kRegionAlign = 128;
// 32: 4x H200 (NV18), 4096 tokens per rank: 16/24/32 SMs gave 294/312/325 GB/s dispatch and
// 270/311/315 GB/s combine; at <= 128 tokens the SM count made no difference (docs/all_to_all.md).
constexpr int kDefaultNumSms = 32;
// Vector loads in flight per lane before the stores (ANCHORS.md: 4 fill NVLink; 8 measured no
// faster on 4x H200, 4096 tokens: 322 vs 324 GB/s dispatch).
constexpr int kUnroll = 4;

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// What a sender writes next to its data: the token count of this call, stamped with the call
// number and the signature of the payload layout, so the receiver can check all three.
struct alignas(16) CountRecord {
  uint32_t seq;         // low 32 bits of the dispatch call number
  uint32_t count;       // rows sent to this receiver
  uint32_t layout_sig;  // CallLayout::sig of the sender
  uint32_t pad;
};

// The start of every rank's shared buffer. Zeroed once at construction and never reset: the
// flags only grow (one monotonic count per call), so no reset is needed between calls and a
// CUDA graph can replay dispatch + combine any number of times.
struct Control {
  uint64_t dispatch_flag[kMaxRanks];  // [src]: + num_blocks per dispatch of rank src
  uint64_t combine_flag[kMaxRanks];   // [src]: + num_blocks per combine of rank src
  CountRecord count[kMaxRanks];       // [src]: what rank src sent in its latest dispatch
};
constexpr size_t kControlBytes = align_up(sizeof(Control), 256);  // 2048

// Per-rank state that only this rank's kernels touch.
struct State {
  uint64_t dispatch_seq;  // number of the last finished dispatch/combine pair (set by combine)
  uint64_t combine_seq;   // number of the last dispatch (set by dispatch, read by combine)
  uint32_t err_claim;     // 0 until the first error record is written (device atomic)
  uint32_t pad[11];
};
static_assert(sizeof(State) == 64, "State layout");

enum ErrorCode : int32_t {
  kErrNone = 0,
  kErrTimeout = 1,       // a wait on a peer's flag passed config.timeout_s
  kErrSendOverflow = 2,  // this rank would send more than runtime_max rows to one peer
  kErrBadCount = 3,      // a peer's count record exceeds runtime_max
  kErrBadSeq = 4,        // a peer's count record belongs to another call
  kErrBadLayout = 5,     // a peer used another payload layout (row sizes, runtime_max)
};

enum BufferId : int32_t {
  kBufDispatchFlag = 0,
  kBufCombineFlag = 1,
  kBufCountRecord = 2,
  kBufSendSlot = 3,
};

// Host-mapped memory (cudaHostAllocMapped): the first failing thread writes it, `code` last.
struct ErrorRecord {
  int32_t code;
  int32_t rank;
  int32_t peer;
  int32_t buffer;
  uint64_t expected;
  uint64_t seen;
  uint64_t seq;
};

inline const char* error_code_name(int code) {
  switch (code) {
    case kErrTimeout: return "timed out";
    case kErrSendOverflow: return "send overflow (more tokens for one peer than runtime_max_tokens_per_rank)";
    case kErrBadCount: return "count from peer exceeds runtime_max_tokens_per_rank";
    case kErrBadSeq: return "count record of another call";
    case kErrBadLayout: return "peer used another payload layout";
    default: return "no error";
  }
}
inline const char* buffer_name(int buffer) {
  switch (buffer) {
    case kBufDispatchFlag: return "dispatch flag";
    case kBufCombineFlag: return "combine flag";
    case kBufCountRecord: return "dispatch count record";
    case kBufSendSlot: return "dispatch send slot";
    default: return "?";
  }
}

// ---------------------------------------------------------------------------------------
// The shared ("symmetric") buffer of each rank, one cudaMalloc, mapped by the peers (CUDA IPC)
// for the NvLink backend and local for the NCCL backend. From its 256-aligned base:
//
//   [0, C)        Control                                    C = kControlBytes (2048)
//   [C, C+D)      dispatch receive                           D = ep*max_tokens*(4k + P)
//                   per call: regions p = 0 (topk_ids), 1..n      + 128*kMaxRegions
//                   each [ep, runtime_max, row_bytes_p], 128-aligned, packed in order;
//                   row [s, i] = the i-th token received from rank s (CallLayout)
//   [.., +B)      combine buffer [ep, max_tokens, H] bf16    B = ep*max_tokens*H*2
//                   used as [ep, runtime_max, H]: what the experts write (combine_buffer())
//   [.., +R)      combine receive [ep, max_tokens, H] bf16   R = B when the push combine or
//                   used as [ep, runtime_max, H]: row [r, i]     the NCCL backend is built,
//                   = rank r's result for my i-th token sent     else 0
//                   to r
//
// with P = max_payload_bytes_per_token. Every region starts on 256 bytes.
struct SymLayout {
  size_t dispatch_offset = 0, dispatch_bytes = 0;
  size_t combine_buffer_offset = 0, combine_buffer_bytes = 0;
  size_t combine_recv_offset = 0, combine_recv_bytes = 0;
  size_t total = 0;
};

inline SymLayout make_sym_layout(int ep, int max_tokens, int top_k, size_t max_payload_bytes,
                                 int64_t hidden, bool need_combine_recv) {
  SymLayout l;
  const size_t rows = static_cast<size_t>(ep) * static_cast<size_t>(max_tokens);
  l.dispatch_offset = kControlBytes;
  l.dispatch_bytes = align_up(rows * (4 * static_cast<size_t>(top_k) + max_payload_bytes) +
                                  kRegionAlign * kMaxRegions, 256);
  l.combine_buffer_offset = l.dispatch_offset + l.dispatch_bytes;
  l.combine_buffer_bytes = align_up(rows * static_cast<size_t>(hidden) * 2, 256);
  l.combine_recv_offset = l.combine_buffer_offset + l.combine_buffer_bytes;
  l.combine_recv_bytes = need_combine_recv ? l.combine_buffer_bytes : 0;
  l.total = l.combine_recv_offset + l.combine_recv_bytes;
  return l;
}

// The local buffer of each rank (one cudaMalloc, never shared):
//
//   [0, 64)        State
//   [256, 512)     recv_counts [kMaxRanks] int32: tokens received from each rank this call
//   [512, +S)      send_slot [max_tokens, ep] int32: row of my token t in rank r's block,   S = align256(max_tokens*ep*4)
//                    -1 when t does not go to r (written by dispatch, read by combine)
//   NCCL backend only:
//   [.., +1024)    send_records [kMaxRanks] CountRecord: the record for each peer
//   [.., +D)       send staging, laid out like the dispatch receive region, block r = what
//                    goes to rank r (D as above)
struct LocalLayout {
  size_t state_offset = 0;
  size_t recv_counts_offset = 256;
  size_t send_slot_offset = 512, send_slot_bytes = 0;
  size_t send_records_offset = 0, send_offset = 0, send_bytes = 0;
  size_t total = 0;
};

inline LocalLayout make_local_layout(int ep, int max_tokens, size_t dispatch_bytes, bool nccl) {
  LocalLayout l;
  l.send_slot_bytes = align_up(static_cast<size_t>(max_tokens) * ep * 4, 256);
  l.send_records_offset = l.send_slot_offset + l.send_slot_bytes;
  l.send_offset = l.send_records_offset + (nccl ? align_up(sizeof(CountRecord) * kMaxRanks, 256) : 0);
  l.send_bytes = nccl ? dispatch_bytes : 0;
  l.total = l.send_offset + l.send_bytes;
  return l;
}

// The layout of one dispatch call inside the dispatch receive region: what every rank must
// agree on (same payload row sizes, same runtime_max), checked through `sig`.
struct CallLayout {
  int runtime_max = 0;
  int num_regions = 0;                // 1 + number of payloads; region 0 is topk_ids
  size_t row_bytes[kMaxRegions] = {};
  size_t offset[kMaxRegions] = {};    // from the start of the dispatch receive region
  int vec_bytes[kMaxRegions] = {};    // 16, 8, 4, 2 or 1: the widest access that fits
  int num_segs[kMaxRegions] = {};     // row pieces of 32 lanes * kUnroll * vec_bytes
  int items_per_token = 0;            // sum of num_segs
  size_t bytes = 0;                   // end of the last region
  uint32_t sig = 0;
};

// row_bytes[p] and the address of each source (for the vector width); ep ranks.
inline CallLayout make_call_layout(int ep, int runtime_max, int num_regions,
                                   const size_t* row_bytes, const uintptr_t* src_addr) {
  CallLayout l;
  l.runtime_max = runtime_max;
  l.num_regions = num_regions;
  uint32_t h = 2166136261u;  // FNV-1a over the sizes
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint32_t>((v >> (8 * i)) & 0xff);
      h *= 16777619u;
    }
  };
  mix(static_cast<uint64_t>(runtime_max));
  mix(static_cast<uint64_t>(num_regions));
  size_t off = 0;
  for (int p = 0; p < num_regions; ++p) {
    const size_t row = row_bytes[p];
    l.row_bytes[p] = row;
    l.offset[p] = off;
    off += align_up(static_cast<size_t>(ep) * static_cast<size_t>(runtime_max) * row, kRegionAlign);
    int vec = 16;
    while (vec > 1 && (row % vec != 0 || src_addr[p] % vec != 0)) vec /= 2;
    l.vec_bytes[p] = vec;
    const size_t seg = static_cast<size_t>(32) * kUnroll * vec;
    l.num_segs[p] = static_cast<int>((row + seg - 1) / seg);
    l.items_per_token += l.num_segs[p];
    mix(row);
  }
  l.bytes = off;
  l.sig = h;
  return l;
}

}  // namespace modmoe::comm
