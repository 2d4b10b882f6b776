// The CUDA side of modmoe::AllToAll: buffers, CUDA IPC mapping, NCCL transfers and the
// launches. src/api/all_to_all.cpp validates every argument and keeps the dispatch/combine
// state machine, then calls this class, which may assume valid input.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "cuda/comm/a2a_kernels.h"
#include "modmoe/all_to_all.h"

namespace modmoe::comm {

struct RegionArg {
  const void* data;  // [T, row_bytes] on this rank's device
  size_t row_bytes;
};

class Backend {
 public:
  // Collective over `comm`: allocates, exchanges IPC handles and config digests (NCCL
  // all-gather) and maps the peers' buffers. Synchronises the device; the calls below never do.
  Backend(const AllToAllConfig& config, ncclComm* comm);
  ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  // regions[0] is topk_ids ([T, k] int32).
  CallLayout plan(const std::vector<RegionArg>& regions, int runtime_max) const;
  void dispatch(const CallLayout& layout, const std::vector<RegionArg>& regions, int64_t num_tokens,
                cudaStream_t stream);
  // [ep, runtime_max, row_bytes[p]] of region p in my receive buffer.
  void* recv_region(const CallLayout& layout, int p) const;
  int32_t* recv_counts() const;
  uint16_t* combine_buffer() const;  // [ep, max_tokens, H] bf16 (used as [ep, runtime_max, H])
  void combine(const void* payload, void* out, int64_t num_tokens, int runtime_max, cudaStream_t stream);

  size_t dispatch_capacity() const { return sym_.dispatch_bytes; }
  int num_blocks() const { return num_blocks_; }
  int device() const { return device_; }
  const AllToAllConfig& config() const { return config_; }
  // The error record, or "" when none. Reads host-mapped memory; does not synchronise.
  std::string error_message() const;

 private:
  void exchange_and_map();
  uint8_t* sym_base(int rank) const { return peers_[static_cast<size_t>(rank)]; }

  AllToAllConfig config_;
  ncclComm* comm_ = nullptr;
  int device_ = 0;
  int num_blocks_ = 0;
  bool thread_fences_ = false;   // MODMOE_A2A_THREAD_FENCES=1: a fence in every thread too
  bool nc_loads_ = false;        // MODMOE_A2A_COMBINE_NC=1: combine reads with ld.global.nc
  SymLayout sym_;
  LocalLayout loc_;
  uint8_t* sym_ptr_ = nullptr;               // mine, cudaMalloc
  uint8_t* loc_ptr_ = nullptr;               // mine, cudaMalloc
  std::vector<uint8_t*> peers_;              // [ep] shared buffers (mine at my rank)
  std::vector<bool> opened_;                 // [ep] mapped through cudaIpcOpenMemHandle
  ErrorRecord* error_host_ = nullptr;        // cudaHostAlloc, mapped
  ErrorRecord* error_dev_ = nullptr;
};

// Test hook (defined in src/api/all_to_all.cpp): turns the host-side token-count checks of
// dispatch off, so that the device-side overflow detection can be tested.
void testing_skip_host_token_check(AllToAll& a2a, bool skip);

}  // namespace modmoe::comm
