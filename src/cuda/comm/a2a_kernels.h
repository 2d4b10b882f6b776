// The all-to-all kernels' arguments and launchers (a2a_kernels.cu). Host code fills one
// globals struct per call; the kernels read everything else (call numbers, counts) from
// device memory, so a captured graph replays correctly.
#pragma once

#include <cuda_runtime.h>

#include "cuda/comm/a2a_layout.h"

namespace modmoe::comm {

enum class DispatchMode : int {
  NvLinkPush = 0,  // store rows into the peers' receive buffers, signal, wait for the peers
  Pack = 1,        // NCCL: write rows into the local send staging; no flags
};

enum class CombineMode : int {
  NvLinkPull = 0,  // signal "rows ready", wait, read the peers' rows over NVLink and reduce
  NvLinkPush = 1,  // push my rows into the sources' combine receive, signal, wait, reduce
  ReduceOnly = 2,  // NCCL: the rows are already in the local combine receive; reduce
};

struct DispatchGlobals {
  DispatchMode mode = DispatchMode::NvLinkPush;
  int rank = 0, ep_size = 1;
  int num_experts = 0, experts_per_rank = 1, top_k = 0;
  int num_tokens = 0;  // T on this rank
  int num_blocks = 1;  // grid size, the same on every rank (a flag counts one per block)
  CallLayout layout;
  const int32_t* topk_ids = nullptr;       // [T, k] int32 (also src[0])
  const uint8_t* src[kMaxRegions] = {};    // [T, row_bytes[p]] per region
  // Where the rows for rank r go: dest_base[r] + offset[p] + (dest_block[r]*runtime_max +
  // slot) * row_bytes[p]. NvLink: rank r's receive region, block = my rank. Pack: my send
  // staging, block r (my own rows go straight into my receive region).
  uint8_t* dest_base[kMaxRanks] = {};
  int dest_block[kMaxRanks] = {};
  CountRecord* record_out[kMaxRanks] = {};  // where the count record for rank r goes
  Control* dest_ctrl[kMaxRanks] = {};       // NvLink: rank r's control block (flags)
  Control* ctrl = nullptr;                  // mine
  uint8_t* recv = nullptr;                  // my dispatch receive region
  State* state = nullptr;
  int32_t* recv_counts = nullptr;           // [kMaxRanks]
  int32_t* send_slot = nullptr;             // [T, ep]
  ErrorRecord* error = nullptr;             // host-mapped
  uint64_t timeout_ns = 0;
  bool thread_fences = false;  // also fence in every thread before the signal barrier
};

struct CombineGlobals {
  CombineMode mode = CombineMode::NvLinkPull;
  int rank = 0, ep_size = 1;
  int num_tokens = 0, runtime_max = 0, num_blocks = 1;
  int64_t hidden = 0;
  const uint16_t* payload = nullptr;  // [ep, runtime_max, H] bf16, mine
  uint16_t* out = nullptr;            // [T, H] bf16
  // Row `slot` that rank r holds for my token: row_base[r] + (row_block[r]*runtime_max +
  // slot) * H. Pull: rank r's combine buffer, block = my rank. Push/ReduceOnly: my combine
  // receive, block r. Rank == me: my payload, block me.
  const uint16_t* row_base[kMaxRanks] = {};
  int row_block[kMaxRanks] = {};
  uint16_t* push_dest[kMaxRanks] = {};  // Push: rank r's combine receive region
  Control* dest_ctrl[kMaxRanks] = {};   // NvLink: rank r's control block
  Control* ctrl = nullptr;
  State* state = nullptr;
  const int32_t* recv_counts = nullptr;
  const int32_t* send_slot = nullptr;   // [T, ep]
  ErrorRecord* error = nullptr;
  uint64_t timeout_ns = 0;
  bool nc_loads = false;  // read the rows through the non-coherent (texture) path
};

// Dynamic shared memory of the dispatch kernel for `ep` ranks; call once per process before
// the first launch (raises the kernel's limit when above 48 KiB).
void prepare_dispatch_kernel(int ep);

void launch_dispatch(const DispatchGlobals& g, cudaStream_t stream);
// NCCL backend, after the transfers: check the count records, write recv_counts and the -1
// padding (what the NvLink dispatch kernel does after its waits).
void launch_dispatch_finish(const DispatchGlobals& g, cudaStream_t stream);
void launch_combine(const CombineGlobals& g, cudaStream_t stream);

}  // namespace modmoe::comm
