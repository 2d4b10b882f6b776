#include "cuda/comm/a2a_backend.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/check.h"
#include "cuda/comm/nccl_lib.h"
#include "cuda/device/cuda_check.h"

namespace modmoe::comm {
namespace {

// What every rank sends every other rank at construction (NCCL all-gather, 256 bytes each).
struct Hello {
  cudaIpcMemHandle_t handle;  // 64 bytes
  uint64_t config_digest;
  int32_t rank;
  int32_t device;
  int32_t pid;
  int32_t num_blocks;
  uint8_t pad[256 - 64 - 8 - 16];
};
static_assert(sizeof(Hello) == 256, "Hello layout");

uint64_t digest(const AllToAllConfig& c, int num_blocks) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) {
    h ^= v;
    h *= 1099511628211ull;
    h ^= h >> 29;
  };
  mix(static_cast<uint64_t>(c.backend));
  mix(static_cast<uint64_t>(c.ep_size));
  mix(static_cast<uint64_t>(c.num_experts));
  mix(static_cast<uint64_t>(c.top_k));
  mix(static_cast<uint64_t>(c.max_tokens_per_rank));
  mix(static_cast<uint64_t>(c.max_payload_bytes_per_token));
  mix(static_cast<uint64_t>(c.hidden));
  mix(static_cast<uint64_t>(num_blocks));
  mix(static_cast<uint64_t>(c.combine_pull));
  return h;
}

}  // namespace

Backend::Backend(const AllToAllConfig& config, ncclComm* comm) : config_(config), comm_(comm) {
  MODMOE_CUDA_CHECK(cudaGetDevice(&device_));
  int sms = 0;
  MODMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
  num_blocks_ = config.num_sms > 0 ? config.num_sms : kDefaultNumSms;
  MODMOE_CHECK(num_blocks_ <= sms, "argument 'config.num_sms' = ", config.num_sms,
               ": expected at most the ", sms, " SMs of GPU ", device_);
  const bool nccl_backend = config.backend == AllToAllBackend::Nccl;
  const bool need_combine_recv = nccl_backend || !config.combine_pull;
  sym_ = make_sym_layout(config.ep_size, config.max_tokens_per_rank, config.top_k,
                         config.max_payload_bytes_per_token, config.hidden, need_combine_recv);
  loc_ = make_local_layout(config.ep_size, config.max_tokens_per_rank, sym_.dispatch_bytes,
                           nccl_backend);

  MODMOE_CUDA_CHECK(cudaMalloc(&sym_ptr_, sym_.total));
  MODMOE_CUDA_CHECK(cudaMalloc(&loc_ptr_, loc_.total));
  MODMOE_CUDA_CHECK(cudaMemset(sym_ptr_, 0, kControlBytes));
  MODMOE_CUDA_CHECK(cudaMemset(loc_ptr_, 0, loc_.send_slot_offset));
  MODMOE_CUDA_CHECK(cudaHostAlloc(&error_host_, sizeof(ErrorRecord), cudaHostAllocMapped));
  std::memset(error_host_, 0, sizeof(ErrorRecord));
  MODMOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_dev_), error_host_, 0));
  prepare_dispatch_kernel(config.ep_size);
  // NOTE: a switch for measurements and diagnosis (see the dispatch kernel), not an API.
  thread_fences_ = check::env_switch("MODMOE_A2A_THREAD_FENCES").value_or(false);
  // NOTE: the rows a combine reads were written before the flag it waited for, by an earlier
  // kernel, and are read once: the non-coherent path is safe there. A measurement switch.
  nc_loads_ = check::env_switch("MODMOE_A2A_COMBINE_NC").value_or(false);
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  exchange_and_map();
}

void Backend::exchange_and_map() {
  const int ep = config_.ep_size, me = config_.ep_rank;
  const bool nvlink = config_.backend == AllToAllBackend::NvLink;
  Hello mine{};
  if (nvlink) MODMOE_CUDA_CHECK(cudaIpcGetMemHandle(&mine.handle, sym_ptr_));
  mine.config_digest = digest(config_, num_blocks_);
  mine.rank = me;
  mine.device = device_;
  mine.pid = static_cast<int32_t>(getpid());
  mine.num_blocks = num_blocks_;

  // NOTE: setup may synchronise (docs/contract.md); a private stream keeps the caller's clean.
  cudaStream_t s = nullptr;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  void* d_all = nullptr;
  MODMOE_CUDA_CHECK(cudaMalloc(&d_all, sizeof(Hello) * ep));
  MODMOE_CUDA_CHECK(cudaMemcpy(static_cast<uint8_t*>(d_all) + sizeof(Hello) * me, &mine,
                               sizeof(Hello), cudaMemcpyHostToDevice));
  const NcclLib& n = nccl();
  MODMOE_NCCL_CHECK(n.AllGather(static_cast<uint8_t*>(d_all) + sizeof(Hello) * me, d_all,
                                sizeof(Hello), ncclUint8, comm_, s));
  MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<Hello> all(static_cast<size_t>(ep));
  MODMOE_CUDA_CHECK(cudaMemcpy(all.data(), d_all, sizeof(Hello) * ep, cudaMemcpyDeviceToHost));
  MODMOE_CUDA_CHECK(cudaFree(d_all));
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));

  for (int r = 0; r < ep; ++r) {
    MODMOE_CHECK(all[r].rank == r, "create_all_to_all: communicator rank ", r,
                 " passed config.ep_rank = ", all[r].rank, ": expected ep_rank = its NCCL rank");
    MODMOE_CHECK(all[r].config_digest == mine.config_digest, "create_all_to_all: rank ", r,
                 " passed another config than rank ", me,
                 " (backend, ep_size, num_experts, top_k, max_tokens_per_rank, ",
                 "max_payload_bytes_per_token, hidden, num_sms, combine_pull must be equal on ",
                 "every rank)");
  }
  peers_.assign(static_cast<size_t>(ep), nullptr);
  opened_.assign(static_cast<size_t>(ep), false);
  peers_[static_cast<size_t>(me)] = sym_ptr_;
  if (!nvlink) return;
  for (int r = 0; r < ep; ++r) {
    if (r == me) continue;
    void* p = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&p, all[r].handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      MODMOE_FAIL("create_all_to_all (nvlink): rank ", me, " (GPU ", device_,
                  ") cannot map the buffer of rank ", r, " (GPU ", all[r].device, ", pid ",
                  all[r].pid, "): cudaIpcOpenMemHandle: ", cudaGetErrorString(err),
                  ". The NvLink backend needs peer access between all GPUs of one node; use "
                  "AllToAllBackend::Nccl otherwise");
    }
    peers_[static_cast<size_t>(r)] = static_cast<uint8_t*>(p);
    opened_[static_cast<size_t>(r)] = true;
  }
}

Backend::~Backend() {
  // NOTE: no barrier: after every rank's last combine no peer writes into this buffer any
  // more (each one's writes into it precede a flag this rank waited for).
  cudaSetDevice(device_);
  for (size_t r = 0; r < peers_.size(); ++r) {
    if (opened_[r]) cudaIpcCloseMemHandle(peers_[r]);
  }
  if (sym_ptr_) cudaFree(sym_ptr_);
  if (loc_ptr_) cudaFree(loc_ptr_);
  if (error_host_) cudaFreeHost(error_host_);
}

CallLayout Backend::plan(const std::vector<RegionArg>& regions, int runtime_max) const {
  size_t rows[kMaxRegions];
  uintptr_t addr[kMaxRegions];
  for (size_t p = 0; p < regions.size(); ++p) {
    rows[p] = regions[p].row_bytes;
    addr[p] = reinterpret_cast<uintptr_t>(regions[p].data);
  }
  return make_call_layout(config_.ep_size, runtime_max, static_cast<int>(regions.size()), rows, addr);
}

void* Backend::recv_region(const CallLayout& layout, int p) const {
  return sym_ptr_ + sym_.dispatch_offset + layout.offset[p];
}

int32_t* Backend::recv_counts() const {
  return reinterpret_cast<int32_t*>(loc_ptr_ + loc_.recv_counts_offset);
}

uint16_t* Backend::combine_buffer() const {
  return reinterpret_cast<uint16_t*>(sym_ptr_ + sym_.combine_buffer_offset);
}

void Backend::dispatch(const CallLayout& layout, const std::vector<RegionArg>& regions,
                       int64_t num_tokens, cudaStream_t stream) {
  const int ep = config_.ep_size, me = config_.ep_rank;
  const bool nvlink = config_.backend == AllToAllBackend::NvLink;
  DispatchGlobals g;
  g.mode = nvlink ? DispatchMode::NvLinkPush : DispatchMode::Pack;
  g.rank = me;
  g.ep_size = ep;
  g.num_experts = config_.num_experts;
  g.experts_per_rank = config_.num_experts / ep;
  g.top_k = config_.top_k;
  g.num_tokens = static_cast<int>(num_tokens);
  g.num_blocks = num_blocks_;
  g.layout = layout;
  g.topk_ids = static_cast<const int32_t*>(regions[0].data);
  for (size_t p = 0; p < regions.size(); ++p) g.src[p] = static_cast<const uint8_t*>(regions[p].data);
  Control* my_ctrl = reinterpret_cast<Control*>(sym_ptr_);
  uint8_t* my_recv = sym_ptr_ + sym_.dispatch_offset;
  auto* send_records = reinterpret_cast<CountRecord*>(loc_ptr_ + loc_.send_records_offset);
  for (int r = 0; r < ep; ++r) {
    if (nvlink || r == me) {
      g.dest_base[r] = sym_base(r) + sym_.dispatch_offset;
      g.dest_block[r] = me;
      g.dest_ctrl[r] = reinterpret_cast<Control*>(sym_base(r));
      g.record_out[r] = &g.dest_ctrl[r]->count[me];
    } else {
      g.dest_base[r] = loc_ptr_ + loc_.send_offset;
      g.dest_block[r] = r;
      g.record_out[r] = &send_records[r];
    }
  }
  g.ctrl = my_ctrl;
  g.recv = my_recv;
  g.state = reinterpret_cast<State*>(loc_ptr_ + loc_.state_offset);
  g.recv_counts = recv_counts();
  g.send_slot = reinterpret_cast<int32_t*>(loc_ptr_ + loc_.send_slot_offset);
  g.error = error_dev_;
  g.timeout_ns = static_cast<uint64_t>(config_.timeout_s * 1e9);
  g.thread_fences = thread_fences_;
  launch_dispatch(g, stream);
  if (nvlink) return;

  // NCCL: fixed blocks of runtime_max rows per region and peer (see docs/all_to_all.md), and
  // the 16-byte count records, in one group; then the receiver-side checks.
  const NcclLib& n = nccl();
  const size_t rm = static_cast<size_t>(layout.runtime_max);
  uint8_t* send = loc_ptr_ + loc_.send_offset;
  MODMOE_NCCL_CHECK(n.GroupStart());
  for (int r = 0; r < ep; ++r) {
    if (r == me) continue;
    for (int p = 0; p < layout.num_regions; ++p) {
      const size_t bytes = rm * layout.row_bytes[p];
      MODMOE_NCCL_CHECK(n.Send(send + layout.offset[p] + r * bytes, bytes, ncclUint8, r, comm_, stream));
      MODMOE_NCCL_CHECK(n.Recv(my_recv + layout.offset[p] + r * bytes, bytes, ncclUint8, r, comm_, stream));
    }
    MODMOE_NCCL_CHECK(n.Send(&send_records[r], sizeof(CountRecord), ncclUint8, r, comm_, stream));
    MODMOE_NCCL_CHECK(n.Recv(&my_ctrl->count[r], sizeof(CountRecord), ncclUint8, r, comm_, stream));
  }
  MODMOE_NCCL_CHECK(n.GroupEnd());
  launch_dispatch_finish(g, stream);
}

void Backend::combine(const void* payload, void* out, int64_t num_tokens, int runtime_max,
                      cudaStream_t stream) {
  const int ep = config_.ep_size, me = config_.ep_rank;
  const bool nvlink = config_.backend == AllToAllBackend::NvLink;
  const size_t rm = static_cast<size_t>(runtime_max);
  const size_t block_bytes = rm * static_cast<size_t>(config_.hidden) * 2;
  CombineGlobals g;
  g.rank = me;
  g.ep_size = ep;
  g.num_tokens = static_cast<int>(num_tokens);
  g.runtime_max = runtime_max;
  g.num_blocks = num_blocks_;
  g.hidden = config_.hidden;
  g.out = static_cast<uint16_t*>(out);
  g.ctrl = reinterpret_cast<Control*>(sym_ptr_);
  g.state = reinterpret_cast<State*>(loc_ptr_ + loc_.state_offset);
  g.recv_counts = recv_counts();
  g.send_slot = reinterpret_cast<const int32_t*>(loc_ptr_ + loc_.send_slot_offset);
  g.error = error_dev_;
  g.timeout_ns = static_cast<uint64_t>(config_.timeout_s * 1e9);
  g.nc_loads = nc_loads_;
  uint16_t* my_recv = reinterpret_cast<uint16_t*>(sym_ptr_ + sym_.combine_recv_offset);

  if (nvlink && config_.combine_pull) {
    // The peers read my rows from my combine buffer: a payload elsewhere is copied there.
    if (payload != combine_buffer()) {
      MODMOE_CUDA_CHECK(cudaMemcpyAsync(combine_buffer(), payload, ep * block_bytes,
                                        cudaMemcpyDeviceToDevice, stream));
    }
    g.mode = CombineMode::NvLinkPull;
    g.payload = combine_buffer();
    for (int r = 0; r < ep; ++r) {
      g.row_base[r] = r == me ? combine_buffer()
                              : reinterpret_cast<const uint16_t*>(sym_base(r) + sym_.combine_buffer_offset);
      g.row_block[r] = me;
      g.dest_ctrl[r] = reinterpret_cast<Control*>(sym_base(r));
    }
  } else {
    g.mode = nvlink ? CombineMode::NvLinkPush : CombineMode::ReduceOnly;
    g.payload = static_cast<const uint16_t*>(payload);
    for (int r = 0; r < ep; ++r) {
      g.row_base[r] = r == me ? g.payload : my_recv;
      g.row_block[r] = r;
      if (nvlink) {
        g.push_dest[r] = reinterpret_cast<uint16_t*>(sym_base(r) + sym_.combine_recv_offset);
        g.dest_ctrl[r] = reinterpret_cast<Control*>(sym_base(r));
      }
    }
    if (!nvlink) {
      const NcclLib& n = nccl();
      const auto* src = static_cast<const uint8_t*>(payload);
      auto* dst = reinterpret_cast<uint8_t*>(my_recv);
      MODMOE_NCCL_CHECK(n.GroupStart());
      for (int r = 0; r < ep; ++r) {
        if (r == me) continue;
        MODMOE_NCCL_CHECK(n.Send(src + r * block_bytes, block_bytes, ncclUint8, r, comm_, stream));
        MODMOE_NCCL_CHECK(n.Recv(dst + r * block_bytes, block_bytes, ncclUint8, r, comm_, stream));
      }
      MODMOE_NCCL_CHECK(n.GroupEnd());
    }
  }
  launch_combine(g, stream);
}

std::string Backend::error_message() const {
  const volatile ErrorRecord* e = error_host_;
  const int code = e->code;
  if (code == kErrNone) return "";
  std::ostringstream os;
  os << "all-to-all (" << all_to_all_backend_name(config_.backend) << ") rank " << e->rank << ": "
     << error_code_name(code) << ": peer " << e->peer << ", buffer '" << buffer_name(e->buffer)
     << "', call " << e->seq << ": expected " << e->expected << ", seen " << e->seen;
  if (code == kErrTimeout) {
    os << " (after " << config_.timeout_s << " s: did rank " << e->peer
       << " call the same dispatch/combine?)";
  }
  return os.str();
}

}  // namespace modmoe::comm
