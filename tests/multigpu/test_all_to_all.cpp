// Expert-parallel dispatch/combine on real GPUs, one process per GPU (forked by each test),
// against the CPU oracle reference::ep_plan / ep_dispatch / ep_combine. Rank-stamped data,
// exact counts and source order, -1 padding, tokens whose experts all live elsewhere, an empty
// rank, T = 0 on one rank, several chunks per CTA, both combine modes, overflow and a missing
// rank (errors, never hangs), repeated runs bitwise equal, CUDA-graph replay, both backends and
// NCCL over sockets. A test skips when the machine has fewer GPUs than it needs.
//
// Children cannot use gtest's assertions (their failures would stay in the child): they
// return 0 or print the first mismatch and return 1, and the parent asserts on the codes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>

#include "core/host_tensor.h"
#include "cuda/comm/a2a_backend.h"
#include "cuda/comm/multiprocess.h"
#include "cuda/device/device_tensor.h"
#include "modmoe/modmoe.h"
#include "reference/ep_sim.h"

namespace modmoe {
namespace {

using comm::mp::RankComm;
using comm::mp::Rendezvous;

constexpr uint64_t kSeed = 20261127;
constexpr double kRunTimeout = 90.0;

// ---------------------------------------------------------------------------------------
// Inputs every process can regenerate for every rank
// ---------------------------------------------------------------------------------------

struct Scenario {
  int ep = 2;
  int num_experts = 32;
  int top_k = 4;
  int64_t hidden = 256;
  int scales = 2;               // fp32 per token (an 8-byte row: the 8-byte vector path)
  std::vector<int> tokens;      // T per rank
  int runtime_max = 0;          // >= every T
  int max_tokens = 0;           // config capacity, >= runtime_max
  int empty_rank = -1;          // no token picks this rank's experts
  int num_sms = 0;
  bool combine_pull = true;
  AllToAllBackend backend = AllToAllBackend::NvLink;
  double timeout_s = 5.0;

  size_t payload_bytes() const {
    return static_cast<size_t>(hidden) * 2 + static_cast<size_t>(top_k) * 4 + 4 + scales * 4;
  }
};

struct RankInputs {
  HostTensor hidden;   // [T, H] bf16: stamped with rank, token, column
  HostTensor ids;      // [T, k] int32
  HostTensor weights;  // [T, k] fp32
  HostTensor lora;     // [T] int32
  HostTensor scales;   // [T, S] fp32
};

// Call `iter` of the scenario, rank r. Token 0 of each rank picks only experts of the next
// rank (all remote); token 1 has two -1 ids; token 2 has only -1 ids (goes nowhere).
RankInputs make_inputs(const Scenario& sc, int r, int iter) {
  const int T = sc.tokens[r], k = sc.top_k, e = sc.num_experts, per = e / sc.ep;
  const int64_t h = sc.hidden;
  RankInputs in;
  in.hidden.reset(DType::BF16, {T, h});
  in.ids.reset(DType::I32, {T, k});
  in.weights.reset(DType::F32, {T, k});
  in.lora.reset(DType::I32, {T});
  in.scales.reset(DType::F32, {T, sc.scales});
  std::mt19937_64 rng(kSeed + 1000003ull * r + 7919ull * iter);
  std::vector<int> allowed;
  for (int x = 0; x < e; ++x) {
    if (x / per != sc.empty_rank) allowed.push_back(x);
  }
  for (int t = 0; t < T; ++t) {
    for (int64_t c = 0; c < h; ++c) {
      // rank + token + column stamps, exact in bf16: (r+1) * 2^-3 + (t % 16) * 2^-7 + ...
      const float v = static_cast<float>(r + 1) + static_cast<float>(t % 61) / 64.0f +
                      static_cast<float>((c + iter) % 7) / 512.0f;
      in.hidden.data<uint16_t>()[t * h + c] = float_to_bf16_bits(v * ((c + t) % 2 ? 1.0f : -1.0f));
    }
    std::vector<int> pick;
    const int next = (r + 1) % sc.ep;
    if (t == 0 && next != sc.empty_rank && per >= k) {
      for (int j = 0; j < k; ++j) pick.push_back(next * per + j);
    } else {
      std::vector<int> pool = allowed;
      std::shuffle(pool.begin(), pool.end(), rng);
      pick.assign(pool.begin(), pool.begin() + k);
    }
    if (t == 1 && k >= 3) pick[0] = pick[2] = -1;
    if (t == 2) std::fill(pick.begin(), pick.end(), -1);
    for (int j = 0; j < k; ++j) {
      in.ids.data<int32_t>()[t * k + j] = pick[j];
      in.weights.data<float>()[t * k + j] = static_cast<float>(rng() % 1000) / 1000.0f + r;
    }
    in.lora.data<int32_t>()[t] = 1000 * r + t;
    for (int s = 0; s < sc.scales; ++s) in.scales.data<float>()[t * sc.scales + s] = 0.25f * t + s + 100.0f * r;
  }
  return in;
}

struct Expected {
  reference::EpPlan plan;
  std::vector<reference::EpReceived> rx;  // per rank
  std::vector<HostTensor> payloads;       // per rank [ep, rm, H]: what its "experts" write
  std::vector<HostTensor> out;            // per rank [T_r, H]
};

// The combine payload of rank r: received row [s, i] times (r + 1), exact in bf16 for these
// stamps; padding rows NaN, so a combine that reads one fails.
HostTensor make_payload(const Scenario& sc, const reference::EpReceived& rx, int r) {
  const int64_t h = sc.hidden, rm = sc.runtime_max;
  HostTensor p(DType::BF16, {sc.ep, rm, h});
  for (int s = 0; s < sc.ep; ++s) {
    for (int64_t i = 0; i < rm; ++i) {
      uint16_t* dst = p.data<uint16_t>() + (s * rm + i) * h;
      const uint16_t* src = rx.hidden.data<uint16_t>() + (s * rm + i) * h;
      for (int64_t c = 0; c < h; ++c) {
        dst[c] = i < rx.recv_counts[s] ? float_to_bf16_bits(bf16_bits_to_float(src[c]) * static_cast<float>(r + 1))
                                       : 0x7fc0;
      }
    }
  }
  return p;
}

Expected expect(const Scenario& sc, const std::vector<RankInputs>& all) {
  std::vector<reference::EpRankTokens> views;
  for (const auto& in : all) views.push_back({in.hidden, in.ids, in.weights});
  Expected x;
  x.plan = reference::ep_plan(views, sc.num_experts, sc.ep, sc.runtime_max);
  x.rx = reference::ep_dispatch(x.plan, views);
  for (int r = 0; r < sc.ep; ++r) x.payloads.push_back(make_payload(sc, x.rx[r], r));
  x.out = reference::ep_combine(x.plan, views, x.payloads);
  return x;
}

// ---------------------------------------------------------------------------------------
// One rank's device state
// ---------------------------------------------------------------------------------------

struct DeviceInputs {
  DeviceTensor hidden, ids, weights, lora, scales;
  void upload(const RankInputs& in, int dev, cudaStream_t s) {
    auto put = [&](DeviceTensor& d, const HostTensor& h) {
      if (d.view().data == nullptr || d.view().nbytes() != h.nbytes()) {
        d = DeviceTensor(h.view().dtype,
                         std::vector<int64_t>(h.view().shape.begin(), h.view().shape.begin() + h.view().ndim), dev);
      }
      if (h.nbytes()) MODMOE_CUDA_CHECK(cudaMemcpyAsync(d.view().data, h.view().data, h.nbytes(), cudaMemcpyHostToDevice, s));
    };
    put(hidden, in.hidden);
    put(ids, in.ids);
    put(weights, in.weights);
    put(lora, in.lora);
    put(scales, in.scales);
  }
  std::vector<TensorView> payloads() const { return {hidden, weights, lora, scales}; }
};

AllToAllConfig make_config(const Scenario& sc, int rank) {
  AllToAllConfig c;
  c.backend = sc.backend;
  c.ep_size = sc.ep;
  c.ep_rank = rank;
  c.num_experts = sc.num_experts;
  c.top_k = sc.top_k;
  c.max_tokens_per_rank = sc.max_tokens;
  c.max_payload_bytes_per_token = sc.payload_bytes();
  c.hidden = sc.hidden;
  c.num_sms = sc.num_sms;
  c.timeout_s = sc.timeout_s;
  c.combine_pull = sc.combine_pull;
  return c;
}

HostTensor download(const TensorView& v) {
  HostTensor h(v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim));
  if (h.nbytes()) MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, v.data, h.nbytes(), cudaMemcpyDeviceToHost));
  return h;
}

// "" when equal, else the first mismatch.
std::string compare_rows(const char* what, const HostTensor& got, const void* want, int64_t row_bytes,
                         int64_t got_row, int64_t want_row, int s, int64_t i) {
  const auto* g = static_cast<const uint8_t*>(got.view().data) + got_row * row_bytes;
  const auto* w = static_cast<const uint8_t*>(want) + want_row * row_bytes;
  if (std::memcmp(g, w, static_cast<size_t>(row_bytes)) == 0) return "";
  for (int64_t b = 0; b < row_bytes; ++b) {
    if (g[b] != w[b]) {
      std::ostringstream os;
      os << what << ": row [" << s << ", " << i << "] differs first at byte " << b << " (got "
         << int(g[b]) << ", expected " << int(w[b]) << ")";
      return os.str();
    }
  }
  return "";
}

// Received views of rank r against the oracle: counts, ids (with -1 padding) of every row,
// payload rows below the count.
std::string check_dispatch(const Scenario& sc, const Expected& x, const std::vector<RankInputs>& all,
                           const DispatchResult& res, int r) {
  const int64_t rm = sc.runtime_max, k = sc.top_k, h = sc.hidden;
  const HostTensor counts = download(res.recv_counts);
  const HostTensor ids = download(res.topk_ids);
  const HostTensor hid = download(res.payloads[0]);
  const HostTensor wts = download(res.payloads[1]);
  const HostTensor lora = download(res.payloads[2]);
  const HostTensor scl = download(res.payloads[3]);
  for (int s = 0; s < sc.ep; ++s) {
    const auto& sent = x.plan.sent[s][r];
    if (counts.data<int32_t>()[s] != static_cast<int>(sent.size())) {
      return "recv_counts[" + std::to_string(s) + "] = " + std::to_string(counts.data<int32_t>()[s]) +
             ": expected " + std::to_string(sent.size());
    }
    for (int64_t i = 0; i < rm; ++i) {
      const int64_t row = s * rm + i;
      std::string e = compare_rows("topk_ids", ids, x.rx[r].topk_ids.view().data, k * 4, row, row, s, i);
      if (!e.empty()) return e;
      if (i >= static_cast<int64_t>(sent.size())) continue;
      const int64_t t = sent[i];
      if (!(e = compare_rows("hidden", hid, all[s].hidden.view().data, h * 2, row, t, s, i)).empty()) return e;
      if (!(e = compare_rows("topk_weights", wts, all[s].weights.view().data, k * 4, row, t, s, i)).empty()) return e;
      if (!(e = compare_rows("lora_id", lora, all[s].lora.view().data, 4, row, t, s, i)).empty()) return e;
      if (!(e = compare_rows("scales", scl, all[s].scales.view().data, sc.scales * 4, row, t, s, i)).empty()) return e;
    }
  }
  return "";
}

std::string check_out(const HostTensor& got, const HostTensor& want) {
  if (got.nbytes() != want.nbytes()) return "combine output has the wrong size";
  const int64_t h = got.view().ndim == 2 ? got.view().size(1) : 1;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const uint16_t g = got.data<uint16_t>()[i], w = want.data<uint16_t>()[i];
    if (g != w) {
      std::ostringstream os;
      os << "combine out[" << i / h << ", " << i % h << "] = " << bf16_bits_to_float(g)
         << " (0x" << std::hex << g << "): expected " << std::dec << bf16_bits_to_float(w) << " (0x"
         << std::hex << w << ")";
      return os.str();
    }
  }
  return "";
}

int fail(int rank, const std::string& msg) {
  std::fprintf(stderr, "[rank %d] FAILED: %s\n", rank, msg.c_str());
  return 1;
}

// Runs body(rank, comm) on `ep` processes and expects every one to return 0. `env` is set in
// each child before its communicator is made.
void run(int ep, const std::function<int(int, RankComm&)>& body,
         const std::vector<std::pair<const char*, const char*>>& env = {}) {
  comm::mp::SharedMemory shm(sizeof(Rendezvous));
  auto* rv = new (shm.data()) Rendezvous();
  rv->state.store(0);
  const std::vector<int> codes = comm::mp::run_ranks(ep, kRunTimeout, [&](int rank) {
    for (const auto& [k, v] : env) setenv(k, v, 1);
    RankComm c(rv, rank, ep, rank);
    return body(rank, c);
  });
  for (int r = 0; r < ep; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r << " (see its output above)";
}

#define NEED_GPUS(n)                                                                     \
  do {                                                                                   \
    const int have = comm::mp::probe_gpu_count();                                        \
    if (have < (n)) GTEST_SKIP() << "needs " << (n) << " GPUs, this machine has " << have; \
  } while (0)

// ---------------------------------------------------------------------------------------
// The round trip: dispatch, the "experts" (payload from the oracle), combine; several calls
// with new data, then the first call's data again, bitwise equal.
// ---------------------------------------------------------------------------------------

int round_trip(const Scenario& sc, int rank, RankComm& c, int iters) {
  auto a2a = create_all_to_all(make_config(sc, rank), c.get());
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  DeviceInputs din;
  DeviceTensor out(DType::BF16, {sc.tokens[rank], sc.hidden}, rank);
  HostTensor first_out;
  for (int it = 0; it <= iters; ++it) {
    const int data_iter = it == iters ? 0 : it;  // the last call repeats the first's data
    std::vector<RankInputs> all;
    for (int r = 0; r < sc.ep; ++r) all.push_back(make_inputs(sc, r, data_iter));
    const Expected x = expect(sc, all);
    din.upload(all[rank], rank, s);
    const DispatchResult res = a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s);
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    a2a->check();
    if (std::string e = check_dispatch(sc, x, all, res, rank); !e.empty()) return fail(rank, "call " + std::to_string(it) + ": " + e);
    // The experts: write this rank's payload into the zero-copy combine buffer.
    const TensorView cb = a2a->combine_buffer(sc.runtime_max);
    MODMOE_CUDA_CHECK(cudaMemcpyAsync(cb.data, x.payloads[rank].view().data, x.payloads[rank].nbytes(),
                                      cudaMemcpyHostToDevice, s));
    out.fill_bytes(0xff, s);  // poison
    a2a->combine(cb, out, sc.runtime_max, s);
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    a2a->check();
    const HostTensor got = out.to_host();
    if (std::string e = check_out(got, x.out[rank]); !e.empty()) return fail(rank, "call " + std::to_string(it) + ": " + e);
    if (it == 0) first_out = out.to_host();
    if (it == iters && std::memcmp(first_out.view().data, got.view().data, got.nbytes()) != 0) {
      return fail(rank, "a repeated call on the same data is not bitwise equal");
    }
  }
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

Scenario two_ranks(AllToAllBackend b) {
  Scenario sc;
  sc.ep = 2;
  sc.tokens = {37, 12};
  sc.runtime_max = 40;
  sc.max_tokens = 48;
  sc.backend = b;
  return sc;
}

Scenario four_ranks(AllToAllBackend b) {
  Scenario sc;
  sc.ep = 4;
  sc.num_experts = 64;
  sc.top_k = 6;  // 24-byte weight rows: the 8-byte vector path
  sc.hidden = 384;
  sc.tokens = {37, 0, 64, 9};  // T = 0 on rank 1
  sc.runtime_max = 64;
  sc.max_tokens = 64;
  sc.empty_rank = 3;           // rank 3 receives nothing but still sends
  sc.backend = b;
  return sc;
}

TEST(AllToAllConfig, RejectsBadFields) {
  AllToAllConfig c;
  c.ep_size = 4;
  c.ep_rank = 0;
  c.num_experts = 256;
  c.top_k = 8;
  c.max_tokens_per_rank = 128;
  c.max_payload_bytes_per_token = 7168 * 2 + 32;
  c.hidden = 7168;
  EXPECT_NO_THROW(c.validate());
  auto bad = [&](auto mutate, const char* needle) {
    AllToAllConfig b = c;
    mutate(b);
    try {
      b.validate();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  bad([](AllToAllConfig& b) { b.ep_rank = 4; }, "config.ep_rank");
  bad([](AllToAllConfig& b) { b.num_experts = 250; }, "config.num_experts");
  bad([](AllToAllConfig& b) { b.top_k = 0; }, "config.top_k");
  bad([](AllToAllConfig& b) { b.ep_size = 65; }, "config.ep_size");
  bad([](AllToAllConfig& b) { b.hidden = 7170; }, "config.hidden");
  bad([](AllToAllConfig& b) { b.max_tokens_per_rank = 0; }, "config.max_tokens_per_rank");
  bad([](AllToAllConfig& b) { b.timeout_s = 0; }, "config.timeout_s");
  EXPECT_THROW(create_all_to_all(c, nullptr), Error);
}

TEST(AllToAllMultiGpu, RoundTripNvLink2) {
  NEED_GPUS(2);
  const Scenario sc = two_ranks(AllToAllBackend::NvLink);
  run(sc.ep, [&](int r, RankComm& c) { return round_trip(sc, r, c, 3); });
}

TEST(AllToAllMultiGpu, RoundTripNccl2) {
  NEED_GPUS(2);
  const Scenario sc = two_ranks(AllToAllBackend::Nccl);
  run(sc.ep, [&](int r, RankComm& c) { return round_trip(sc, r, c, 3); });
}

TEST(AllToAllMultiGpu, RoundTripNvLink4EmptyRankAndZeroTokens) {
  NEED_GPUS(4);
  const Scenario sc = four_ranks(AllToAllBackend::NvLink);
  run(sc.ep, [&](int r, RankComm& c) { return round_trip(sc, r, c, 3); });
}

TEST(AllToAllMultiGpu, RoundTripNccl4EmptyRankAndZeroTokens) {
  NEED_GPUS(4);
  const Scenario sc = four_ranks(AllToAllBackend::Nccl);
  run(sc.ep, [&](int r, RankComm& c) { return round_trip(sc, r, c, 3); });
}

// Two CTAs for 700 tokens: several 256-token chunks per CTA and prefixes across CTAs; the
// push combine.
TEST(AllToAllMultiGpu, ManyChunksPushCombineNvLink) {
  NEED_GPUS(2);
  Scenario sc = two_ranks(AllToAllBackend::NvLink);
  sc.ep = comm::mp::probe_gpu_count() >= 4 ? 4 : 2;
  sc.num_experts = 16 * sc.ep;
  sc.tokens.assign(static_cast<size_t>(sc.ep), 700);
  sc.tokens[1] = 300;
  sc.runtime_max = 700;
  sc.max_tokens = 1024;
  sc.num_sms = 2;
  sc.combine_pull = false;
  run(sc.ep, [&](int r, RankComm& c) { return round_trip(sc, r, c, 2); });
}

TEST(AllToAllMultiGpu, NcclSocketPath) {
  NEED_GPUS(2);
  const Scenario sc = two_ranks(AllToAllBackend::Nccl);
  // NCCL over sockets only: no peer-to-peer, no shared memory.
  run(sc.ep, [&](int r, RankComm& c) { return round_trip(sc, r, c, 1); },
      {{"NCCL_P2P_DISABLE", "1"}, {"NCCL_SHM_DISABLE", "1"}});
}

// ---------------------------------------------------------------------------------------
// CUDA graph: dispatch, an identity "experts" (a copy of the received hidden rows into the
// combine buffer) and combine captured once, replayed with new inputs each time.
// ---------------------------------------------------------------------------------------

int graph_replay(const Scenario& sc, int rank, RankComm& c) {
  auto a2a = create_all_to_all(make_config(sc, rank), c.get());
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  DeviceInputs din;
  din.upload(make_inputs(sc, rank, 0), rank, s);
  DeviceTensor out(DType::BF16, {sc.tokens[rank], sc.hidden}, rank);
  MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  c.barrier();

  cudaGraph_t graph;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
  const DispatchResult res = a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s);
  const TensorView cb = a2a->combine_buffer(sc.runtime_max);
  MODMOE_CUDA_CHECK(cudaMemcpyAsync(cb.data, res.payloads[0].data, cb.nbytes(), cudaMemcpyDeviceToDevice, s));
  a2a->combine(cb, out, sc.runtime_max, s);
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  for (int it = 0; it < 5; ++it) {
    std::vector<RankInputs> all;
    for (int r = 0; r < sc.ep; ++r) all.push_back(make_inputs(sc, r, it));
    // Expected: combine of the received rows themselves (each token: hidden * #destinations).
    std::vector<reference::EpRankTokens> views;
    for (const auto& in : all) views.push_back({in.hidden, in.ids, in.weights});
    const auto plan = reference::ep_plan(views, sc.num_experts, sc.ep, sc.runtime_max);
    const auto rx = reference::ep_dispatch(plan, views);
    std::vector<HostTensor> payloads;
    for (int r = 0; r < sc.ep; ++r) {
      payloads.emplace_back(DType::BF16, std::vector<int64_t>{sc.ep, sc.runtime_max, sc.hidden});
      std::memcpy(payloads.back().view().data, rx[r].hidden.view().data, payloads.back().nbytes());
    }
    const auto want = reference::ep_combine(plan, views, payloads);
    din.upload(all[rank], rank, s);
    out.fill_bytes(0xff, s);
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, s));
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    a2a->check();
    const Expected x = expect(sc, all);
    if (std::string e = check_dispatch(sc, x, all, res, rank); !e.empty()) return fail(rank, "replay " + std::to_string(it) + ": " + e);
    if (std::string e = check_out(out.to_host(), want[rank]); !e.empty()) return fail(rank, "replay " + std::to_string(it) + ": " + e);
    // NOTE: the received views are read above after the combine; the peers' next dispatch
    // may overwrite them once this rank's combine has run, so all ranks check first.
    c.barrier();
  }
  MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

TEST(AllToAllMultiGpu, GraphReplayNvLink) {
  NEED_GPUS(2);
  Scenario sc = comm::mp::probe_gpu_count() >= 4 ? four_ranks(AllToAllBackend::NvLink)
                                                 : two_ranks(AllToAllBackend::NvLink);
  run(sc.ep, [&](int r, RankComm& c) { return graph_replay(sc, r, c); });
}

TEST(AllToAllMultiGpu, GraphReplayNccl) {
  NEED_GPUS(2);
  Scenario sc = two_ranks(AllToAllBackend::Nccl);
  run(sc.ep, [&](int r, RankComm& c) { return graph_replay(sc, r, c); });
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

bool throws_with(const std::function<void()>& fn, const std::vector<std::string>& needles, std::string* msg) {
  try {
    fn();
  } catch (const Error& e) {
    *msg = e.what();
    for (const auto& n : needles) {
      if (msg->find(n) == std::string::npos) return false;
    }
    return true;
  }
  *msg = "(no error)";
  return false;
}

int overflow(const Scenario& base, int rank, RankComm& c) {
  Scenario sc = base;
  auto a2a = create_all_to_all(make_config(sc, rank), c.get());
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  // Host side: T > runtime_max is refused before anything is launched.
  sc.tokens.assign(static_cast<size_t>(sc.ep), sc.runtime_max + 5);
  const int big = sc.runtime_max + 5;
  DeviceInputs din;
  RankInputs in = make_inputs(sc, rank, 0);
  // Every token of rank 0 goes to rank 1 only.
  for (int t = 0; t < big; ++t) {
    for (int j = 0; j < sc.top_k; ++j) {
      in.ids.data<int32_t>()[t * sc.top_k + j] = (rank == 0 ? 1 : 0) * (sc.num_experts / sc.ep) + j;
    }
  }
  din.upload(in, rank, s);
  std::string msg;
  if (!throws_with([&] { a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s); },
                   {"overflow", "runtime_max_tokens_per_rank"}, &msg)) {
    return fail(rank, "host-side overflow: " + msg);
  }
  // Device side (host check off): rank 0 sends runtime_max + 5 rows to rank 1. Rank 0 must
  // report a send overflow, rank 1 a count above runtime_max from peer 0; neither may hang.
  comm::testing_skip_host_token_check(*a2a, true);
  if (rank != 0) {  // one token, to the next rank (rank 0)
    Scenario one = sc;
    one.tokens.assign(static_cast<size_t>(sc.ep), 1);
    din.upload(make_inputs(one, rank, 0), rank, s);
  }
  a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s);
  MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  const std::vector<std::string> want = rank == 0 ? std::vector<std::string>{"rank 0", "send overflow", "peer 1"}
                                                  : std::vector<std::string>{"rank 1", "count from peer", "peer 0", "dispatch count record"};
  if (rank <= 1 && !throws_with([&] { a2a->check(); }, want, &msg)) return fail(rank, "device-side overflow: " + msg);
  if (rank <= 1 && !throws_with([&] { a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s); }, {"unusable"}, &msg)) {
    return fail(rank, "a call after an error: " + msg);
  }
  MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  c.barrier();
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

TEST(AllToAllMultiGpu, OverflowIsAnErrorNvLink) {
  NEED_GPUS(2);
  const Scenario sc = two_ranks(AllToAllBackend::NvLink);
  run(sc.ep, [&](int r, RankComm& c) { return overflow(sc, r, c); });
}

TEST(AllToAllMultiGpu, OverflowIsAnErrorNccl) {
  NEED_GPUS(2);
  const Scenario sc = two_ranks(AllToAllBackend::Nccl);
  run(sc.ep, [&](int r, RankComm& c) { return overflow(sc, r, c); });
}

// Rank 1 never calls dispatch (then never calls combine): rank 0 must time out with rank,
// peer and buffer named, not hang.
int missing_rank(const Scenario& base, int rank, RankComm& c) {
  Scenario sc = base;
  sc.timeout_s = 0.5;
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  DeviceInputs din;
  din.upload(make_inputs(sc, rank, 0), rank, s);
  DeviceTensor out(DType::BF16, {sc.tokens[rank], sc.hidden}, rank);
  std::string msg;
  {
    auto a2a = create_all_to_all(make_config(sc, rank), c.get());
    if (rank == 0) {
      a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s);
      MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
      if (!throws_with([&] { a2a->check(); }, {"rank 0", "timed out", "peer 1", "dispatch flag"}, &msg)) {
        return fail(rank, "dispatch timeout: " + msg);
      }
      std::fprintf(stderr, "[rank 0] expected error: %s\n", msg.c_str());
    }
    c.barrier();  // rank 1 keeps its buffer mapped until rank 0's kernel is done
  }
  {
    auto a2a = create_all_to_all(make_config(sc, rank), c.get());
    a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, s);
    if (rank == 0) a2a->combine(a2a->combine_buffer(sc.runtime_max), out, sc.runtime_max, s);
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    if (rank == 0 && !throws_with([&] { a2a->check(); }, {"rank 0", "timed out", "peer 1", "combine flag"}, &msg)) {
      return fail(rank, "combine timeout: " + msg);
    }
    if (rank == 1) a2a->check();
    c.barrier();
  }
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

TEST(AllToAllMultiGpu, MissingRankTimesOutNvLink) {
  NEED_GPUS(2);
  const Scenario sc = two_ranks(AllToAllBackend::NvLink);
  run(sc.ep, [&](int r, RankComm& c) { return missing_rank(sc, r, c); });
}

// One rank (ep_size = 1): everything stays local; argument errors name the argument.
TEST(AllToAllMultiGpu, SingleRankAndArgumentErrors) {
  NEED_GPUS(1);
  run(1, [&](int rank, RankComm& c) {
    Scenario sc = two_ranks(AllToAllBackend::NvLink);
    sc.ep = 1;
    sc.tokens = {20};
    if (int rc = round_trip(sc, rank, c, 1); rc != 0) return rc;
    auto a2a = create_all_to_all(make_config(sc, rank), c.get());
    DeviceInputs din;
    din.upload(make_inputs(sc, rank, 0), rank, nullptr);
    DeviceTensor out(DType::BF16, {20, sc.hidden}, rank);
    std::string msg;
    if (!throws_with([&] { a2a->combine(a2a->combine_buffer(sc.runtime_max), out, sc.runtime_max, nullptr); },
                     {"without a dispatch"}, &msg)) return fail(rank, msg);
    if (!throws_with([&] { a2a->dispatch(din.weights, din.payloads(), sc.runtime_max, nullptr); },
                     {"topk_ids"}, &msg)) return fail(rank, msg);
    if (!throws_with([&] { a2a->dispatch(din.ids, din.payloads(), sc.max_tokens + 1, nullptr); },
                     {"runtime_max_tokens_per_rank"}, &msg)) return fail(rank, msg);
    std::vector<TensorView> p = din.payloads();
    p[0].shape[0] = 19;
    if (!throws_with([&] { a2a->dispatch(din.ids, p, sc.runtime_max, nullptr); }, {"payloads[0]"}, &msg)) return fail(rank, msg);
    a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, nullptr);
    if (!throws_with([&] { a2a->dispatch(din.ids, din.payloads(), sc.runtime_max, nullptr); },
                     {"twice"}, &msg)) return fail(rank, msg);
    if (!throws_with([&] { a2a->combine(a2a->combine_buffer(sc.runtime_max), din.hidden, sc.runtime_max - 1, nullptr); },
                     {"runtime_max_tokens_per_rank"}, &msg)) return fail(rank, msg);
    a2a->combine(a2a->combine_buffer(sc.runtime_max), out, sc.runtime_max, nullptr);
    MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
    a2a->check();
    return 0;
  });
}

}  // namespace
}  // namespace modmoe
