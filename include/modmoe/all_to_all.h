// Stage 2: expert-parallel dispatch and combine (docs/contract.md, "Stage 2"). One process
// per GPU; every rank constructs an AllToAll over the same communicator.
#pragma once

#include <memory>
#include <vector>

#include "modmoe/tensor.h"

struct ncclComm;  // ncclComm_t without including nccl.h

namespace modmoe {

enum class AllToAllBackend : uint8_t {
  NvLink,  // one-sided: senders store straight into peers' receive buffers (CUDA IPC)
  Nccl,    // ncclSend/ncclRecv groups; also works across nodes
};

const char* all_to_all_backend_name(AllToAllBackend backend);

struct AllToAllConfig {
  AllToAllBackend backend = AllToAllBackend::NvLink;
  int ep_size = 1;
  int ep_rank = 0;
  int num_experts = 0;  // E, global; rank r owns [r*E/ep_size, (r+1)*E/ep_size)
  int top_k = 0;
  int max_tokens_per_rank = 0;               // upper bound of T on any rank
  size_t max_payload_bytes_per_token = 0;    // sum of the row bytes of all dispatch payloads
  int64_t hidden = 0;                        // combine row length
  int num_sms = 0;                           // CTAs (one per SM) of the kernels; 0 = default (32)
  double timeout_s = 10.0;                   // every wait gives up after this, with an error
  // NvLink combine: true = each rank reads the rows it sent back from the peers' combine
  // buffers over NVLink and reduces them in one pass (the payload must be combine_buffer(),
  // or it is copied there first); false = each rank pushes its rows to their sources, which
  // reduce them locally (two passes, any payload tensor). Every rank must use the same value.
  bool combine_pull = true;

  void validate() const;
};

struct DispatchResult {
  // [ep_size, runtime_max_tokens_per_rank, k] int32. Row [r, i] is the i-th token received
  // from rank r, in source token order; padding rows are -1.
  TensorView topk_ids;
  // One view per payload, [ep_size, runtime_max_tokens_per_rank, *], in the order given.
  std::vector<TensorView> payloads;
  // [ep_size] int32 on the device: tokens received from each rank, checked <= max_tokens.
  TensorView recv_counts;
};

class AllToAll {
 public:
  virtual ~AllToAll() = default;

  // topk_ids: [T, k] int32 global ids on this rank. payloads: per-token [T, *] views (hidden,
  // topk_weights, scales, lora_id, ...), contiguous, at most 8. T <= runtime_max_tokens_per_rank
  // <= max_tokens. Every rank passes the same runtime_max_tokens_per_rank and payloads with the
  // same row sizes (checked on the device: a mismatch is an error, see check()). Asynchronous on
  // `stream`, no host synchronisation. The views are valid until this rank's combine(): once
  // it has started, the peers' next dispatch may overwrite them.
  virtual DispatchResult dispatch(const TensorView& topk_ids,
                                  const std::vector<TensorView>& payloads,
                                  int runtime_max_tokens_per_rank, Stream stream) = 0;

  // [ep_size, runtime_max_tokens_per_rank, H] bf16 view inside the workspace: the experts
  // stage can write its output here and combine reads it without a copy.
  virtual TensorView combine_buffer(int runtime_max_tokens_per_rank) = 0;

  // payload: [ep_size, runtime_max_tokens_per_rank, H] bf16 (combine_buffer() or any other).
  // out: [T, H] bf16; per token, the fp32 sum of the rows it sent, in rank order, cast once.
  virtual void combine(const TensorView& payload, const TensorView& out,
                       int runtime_max_tokens_per_rank, Stream stream) = 0;

  // Throws modmoe::Error if a kernel of this object recorded an error (a wait that timed out,
  // a count above runtime_max_tokens_per_rank, a peer with another payload layout), naming
  // this rank, the peer and the buffer. Call it after synchronising the stream. After an
  // error the object is unusable: every later call throws; destroy it and build a new one.
  virtual void check() const = 0;

  virtual const AllToAllConfig& config() const = 0;
};

// Collective: every rank of `comm` calls it with the same config but its own ep_rank, with the
// CUDA device of its tensors current. One process per GPU. Setup synchronises; dispatch and
// combine never do. Destroy it before the communicator.
std::unique_ptr<AllToAll> create_all_to_all(const AllToAllConfig& config, ncclComm* comm);

}  // namespace modmoe
