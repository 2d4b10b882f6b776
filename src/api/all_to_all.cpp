// modmoe::AllToAll (include/modmoe/all_to_all.h): argument validation, the dispatch/combine
// state machine and the result views. The CUDA side is src/cuda/comm/.
#include "modmoe/all_to_all.h"

#include "core/check.h"
#include "modmoe/error.h"
#ifdef MODMOE_WITH_CUDA
#include "cuda/comm/a2a_backend.h"
#include "cuda/comm/nccl_lib.h"
#endif

namespace modmoe {

const char* all_to_all_backend_name(AllToAllBackend backend) {
  switch (backend) {
    case AllToAllBackend::NvLink: return "nvlink";
    case AllToAllBackend::Nccl: return "nccl";
  }
  return "?";
}

void AllToAllConfig::validate() const {
  MODMOE_CHECK(backend == AllToAllBackend::NvLink || backend == AllToAllBackend::Nccl,
               "argument 'config.backend' = ", static_cast<int>(backend), ": expected NvLink or Nccl");
  MODMOE_CHECK(ep_size >= 1 && ep_size <= 64, "argument 'config.ep_size' = ", ep_size,
               ": expected in [1, 64]");
  MODMOE_CHECK(ep_rank >= 0 && ep_rank < ep_size, "argument 'config.ep_rank' = ", ep_rank,
               ": expected in [0, ep_size = ", ep_size, ")");
  MODMOE_CHECK(num_experts >= 1 && num_experts % ep_size == 0, "argument 'config.num_experts' = ",
               num_experts, ": expected a positive multiple of ep_size = ", ep_size,
               " (rank r owns experts [r*E/ep_size, (r+1)*E/ep_size))");
  MODMOE_CHECK(top_k >= 1 && top_k <= 64 && top_k <= num_experts, "argument 'config.top_k' = ",
               top_k, ": expected in [1, min(64, num_experts = ", num_experts, ")]");
  MODMOE_CHECK(max_tokens_per_rank >= 1 && max_tokens_per_rank <= (1 << 24),
               "argument 'config.max_tokens_per_rank' = ", max_tokens_per_rank,
               ": expected in [1, 16777216]");
  MODMOE_CHECK(hidden >= 8 && hidden % 8 == 0, "argument 'config.hidden' = ", hidden,
               ": expected a positive multiple of 8 (combine moves 16-byte vectors of bf16)");
  MODMOE_CHECK(max_payload_bytes_per_token >= 1, "argument 'config.max_payload_bytes_per_token' = ",
               max_payload_bytes_per_token, ": expected the sum of the row bytes of every dispatch ",
               "payload (hidden, topk_weights, scales, lora_id, ...), at least 1");
  MODMOE_CHECK(num_sms >= 0 && num_sms <= 1024, "argument 'config.num_sms' = ", num_sms,
               ": expected 0 (default) or a CTA count of at most the GPU's SMs");
  MODMOE_CHECK(timeout_s > 0.0 && timeout_s <= 3600.0, "argument 'config.timeout_s' = ", timeout_s,
               ": expected in (0, 3600]");
}

#ifdef MODMOE_WITH_CUDA
namespace {

// The leading dimension is the token; the rest of the view is one contiguous row.
size_t row_bytes_of(const TensorView& t) {
  size_t elems = 1;
  for (int d = 1; d < t.ndim; ++d) elems *= static_cast<size_t>(t.size(d));
  return elems * dtype_bytes(t.dtype);
}

class CheckedAllToAll final : public AllToAll {
 public:
  CheckedAllToAll(const AllToAllConfig& config, ncclComm* comm)
      : config_(config), impl_(config, comm) {}

  DispatchResult dispatch(const TensorView& topk_ids, const std::vector<TensorView>& payloads,
                          int runtime_max, Stream stream) override {
    throw_if_failed("dispatch");
    MODMOE_CHECK(!dispatched_, "AllToAll::dispatch: called twice without a combine in between: "
                               "expected dispatch, combine, dispatch, ...");
    const Device dev = Device::cuda(impl_.device());
    check::dtype(topk_ids, "topk_ids", {DType::I32});
    MODMOE_CHECK(topk_ids.ndim == 2 && topk_ids.size(1) == config_.top_k,
                 "argument 'topk_ids' has shape ", topk_ids.shape_string(), ": expected [T, ",
                 config_.top_k, "] (top_k of the config)");
    const int64_t t_count = topk_ids.size(0);
    MODMOE_CHECK(runtime_max >= 1 && runtime_max <= config_.max_tokens_per_rank,
                 "argument 'runtime_max_tokens_per_rank' = ", runtime_max,
                 ": expected in [1, config.max_tokens_per_rank = ", config_.max_tokens_per_rank, "]");
    if (!skip_host_token_check_) {
      MODMOE_CHECK(t_count <= runtime_max, "all-to-all overflow: topk_ids has T = ", t_count,
                   " tokens: expected at most runtime_max_tokens_per_rank = ", runtime_max,
                   " (more tokens than max_tokens is an error; raise runtime_max_tokens_per_rank "
                   "on every rank)");
    }
    MODMOE_CHECK(payloads.size() <= static_cast<size_t>(comm::kMaxPayloads),
                 "argument 'payloads' has ", payloads.size(), " tensors: expected at most ",
                 comm::kMaxPayloads);
    std::vector<comm::RegionArg> regions;
    auto add = [&](const TensorView& t, const char* name) {
      if (t_count > 0) {
        check::device(t, name, dev);
        check::contiguous(t, name);
      }
      regions.push_back({t.data, row_bytes_of(t)});
    };
    add(topk_ids, "topk_ids");
    size_t payload_bytes = 0;
    for (size_t i = 0; i < payloads.size(); ++i) {
      const TensorView& p = payloads[i];
      const std::string name = "payloads[" + std::to_string(i) + "]";
      MODMOE_CHECK(p.defined() && p.ndim <= TensorView::kMaxDims - 1, "argument '", name,
                   "' has shape ", p.shape_string(), ": expected a [T, ...] view of at most ",
                   TensorView::kMaxDims - 1, " dimensions");
      MODMOE_CHECK(p.size(0) == t_count, "argument '", name, "' has shape ", p.shape_string(),
                   ": expected ", t_count, " rows (T of topk_ids)");
      MODMOE_CHECK(row_bytes_of(p) > 0, "argument '", name, "' has shape ", p.shape_string(),
                   ": expected a non-empty row");
      add(p, name.c_str());
      payload_bytes += row_bytes_of(p);
    }
    MODMOE_CHECK(payload_bytes <= config_.max_payload_bytes_per_token,
                 "argument 'payloads': ", payload_bytes, " bytes per token: expected at most ",
                 "config.max_payload_bytes_per_token = ", config_.max_payload_bytes_per_token);
    const comm::CallLayout layout = impl_.plan(regions, runtime_max);
    MODMOE_CHECK(layout.bytes <= impl_.dispatch_capacity(), "all-to-all: this call needs ",
                 layout.bytes, " bytes of receive buffer: expected at most ",
                 impl_.dispatch_capacity());

    impl_.dispatch(layout, regions, t_count, stream);
    dispatched_ = true;
    num_tokens_ = t_count;
    runtime_max_ = runtime_max;

    const int64_t ep = config_.ep_size;
    DispatchResult res;
    res.topk_ids = make_view(impl_.recv_region(layout, 0), DType::I32,
                             {ep, runtime_max, config_.top_k}, dev);
    for (size_t i = 0; i < payloads.size(); ++i) {
      const TensorView& p = payloads[i];
      int64_t shape[TensorView::kMaxDims];
      shape[0] = ep;
      shape[1] = runtime_max;
      for (int d = 1; d < p.ndim; ++d) shape[d + 1] = p.size(d);
      res.payloads.push_back(make_view(impl_.recv_region(layout, static_cast<int>(i) + 1), p.dtype,
                                       shape, p.ndim + 1, dev));
    }
    res.recv_counts = make_view(impl_.recv_counts(), DType::I32, {ep}, dev);
    return res;
  }

  TensorView combine_buffer(int runtime_max) override {
    MODMOE_CHECK(runtime_max >= 1 && runtime_max <= config_.max_tokens_per_rank,
                 "argument 'runtime_max_tokens_per_rank' = ", runtime_max,
                 ": expected in [1, config.max_tokens_per_rank = ", config_.max_tokens_per_rank, "]");
    return make_view(impl_.combine_buffer(), DType::BF16,
                     {config_.ep_size, runtime_max, config_.hidden}, Device::cuda(impl_.device()));
  }

  void combine(const TensorView& payload, const TensorView& out, int runtime_max,
               Stream stream) override {
    throw_if_failed("combine");
    MODMOE_CHECK(dispatched_, "AllToAll::combine: called without a dispatch before it: expected "
                              "dispatch, combine, dispatch, ...");
    MODMOE_CHECK(runtime_max == runtime_max_, "argument 'runtime_max_tokens_per_rank' = ",
                 runtime_max, ": expected ", runtime_max_, ", the value of the dispatch");
    const Device dev = Device::cuda(impl_.device());
    check::dtype(payload, "payload", {DType::BF16});
    check::shape(payload, "payload", {config_.ep_size, runtime_max, config_.hidden});
    check::device(payload, "payload", dev);
    check::contiguous(payload, "payload");
    check::rows_aligned16(payload, "payload");
    check::dtype(out, "out", {DType::BF16});
    check::shape(out, "out", {num_tokens_, config_.hidden});
    if (num_tokens_ > 0) {
      check::device(out, "out", dev);
      check::contiguous(out, "out");
      check::rows_aligned16(out, "out");
    }
    impl_.combine(payload.data, out.data, num_tokens_, runtime_max, stream);
    dispatched_ = false;
  }

  void check() const override {
    const std::string msg = impl_.error_message();
    if (!msg.empty()) MODMOE_FAIL(msg);
  }

  const AllToAllConfig& config() const override { return config_; }

  void set_skip_host_token_check(bool skip) { skip_host_token_check_ = skip; }

 private:
  void throw_if_failed(const char* what) const {
    const std::string msg = impl_.error_message();
    if (!msg.empty()) {
      MODMOE_FAIL("AllToAll::", what, ": an earlier call failed, the object is unusable: ", msg);
    }
  }

  AllToAllConfig config_;
  comm::Backend impl_;
  bool dispatched_ = false;
  bool skip_host_token_check_ = false;
  int64_t num_tokens_ = 0;
  int runtime_max_ = 0;
};

}  // namespace

namespace comm {
void testing_skip_host_token_check(AllToAll& a2a, bool skip) {
  auto* c = dynamic_cast<CheckedAllToAll*>(&a2a);
  MODMOE_CHECK(c != nullptr, "testing_skip_host_token_check: not a modmoe AllToAll");
  c->set_skip_host_token_check(skip);
}
}  // namespace comm
#endif

std::unique_ptr<AllToAll> create_all_to_all(const AllToAllConfig& config, ncclComm* comm) {
  config.validate();
  MODMOE_CHECK(comm != nullptr, "argument 'comm' is null: expected the NCCL communicator of the ",
               config.ep_size, " expert-parallel ranks");
#ifdef MODMOE_WITH_CUDA
  const comm::NcclLib& n = comm::nccl();
  int count = 0, rank = 0;
  MODMOE_NCCL_CHECK(n.CommCount(comm, &count));
  MODMOE_NCCL_CHECK(n.CommUserRank(comm, &rank));
  MODMOE_CHECK(count == config.ep_size, "argument 'config.ep_size' = ", config.ep_size,
               ": expected the communicator's size, ", count);
  MODMOE_CHECK(rank == config.ep_rank, "argument 'config.ep_rank' = ", config.ep_rank,
               ": expected the communicator's rank, ", rank);
  return std::make_unique<CheckedAllToAll>(config, comm);
#else
  MODMOE_FAIL("create_all_to_all: this build of modmoe has no CUDA backend (configured with "
              "MODMOE_CUDA=OFF or without nvcc): expected a build with CUDA");
#endif
}

}  // namespace modmoe
