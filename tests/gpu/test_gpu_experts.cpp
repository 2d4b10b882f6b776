// The experts stage on the GPU (cuda::experts through modmoe::experts) against the CPU
// reference (reference::experts through modmoe::experts on host views):
//   - small-integer inputs, where every fp32 sum is exact: bitwise equal;
//   - random inputs at the shapes of every preset: relative L2 below 6e-3;
//   - every activation, LoRA delta, packed top-k, both do_finalize modes, the batched format,
//     EP slices, invalid ids, repeated runs and CUDA-graph replay;
//   - the grouped GEMM interface itself: every compiled config gives the same bits, and a
//     throughput line at a large shape.
// Outputs are poisoned (0xFF: NaN in bf16/fp32, -1 in int32) before every run; inputs are
// never zeros. Seeds are printed ([ seed ] lines) and replayable with MODMOE_TEST_SEED.
//
// Without a GPU the suite skips. MODMOE_GPU_TEST_DRYRUN=1 runs the harness on such a machine
// with the CPU reference on both sides (shapes cut down), to check the harness itself.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/test_util.h"
#include "core/host_tensor.h"
#include "core/presets.h"
#include "core/synth_fill.h"
#include "cuda/device/cuda_check.h"
#include "gpu_test_util.h"
#include "cuda/device/device_tensor.h"
#include "cuda/gemm/grouped_gemm.h"
#include "modmoe/experts.h"
#include "modmoe/quant.h"

namespace modmoe {
namespace {

// ---------------------------------------------------------------------------------------
// Where the side under test runs
// ---------------------------------------------------------------------------------------

bool has_gpu() {
  static const bool v = [] {
    int n = 0;
    const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    (void)cudaGetLastError();
    return ok;
  }();
  return v;
}

bool dry_run() {
  const char* v = std::getenv("MODMOE_GPU_TEST_DRYRUN");
  return !has_gpu() && v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

class GpuExperts : public ::testing::Test {
 protected:
  void SetUp() override {
    if (has_gpu()) {
      MODMOE_CUDA_CHECK(cudaSetDevice(0));
    } else if (!dry_run()) {
      GTEST_SKIP() << "no CUDA device";
    }
  }
};
template <class P>
class GpuExpertsP : public GpuExperts, public ::testing::WithParamInterface<P> {};

// A tensor on the GPU (or, in a dry run or for the reference, on the host).
class Buf {
 public:
  Buf() = default;
  Buf(bool gpu, DType dtype, const std::vector<int64_t>& shape) : gpu_(gpu) {
    if (gpu_) {
      d_.reset(dtype, shape);
    } else {
      h_.reset(dtype, shape);
    }
  }
  static Buf copy_of(bool gpu, const HostTensor& src) {
    const TensorView& v = src.view();
    if (!v.defined()) return {};
    Buf b(gpu, v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim));
    b.write(src.view().data);
    return b;
  }
  const TensorView& view() const { return gpu_ ? d_.view() : h_.view(); }
  bool defined() const { return view().defined(); }
  void write(const void* src) {
    if (view().nbytes() == 0) return;
    if (gpu_) {
      MODMOE_CUDA_CHECK(cudaMemcpy(view().data, src, view().nbytes(), cudaMemcpyHostToDevice));
    } else {
      std::memcpy(view().data, src, view().nbytes());
    }
  }
  HostTensor to_host() const {
    const TensorView& v = view();
    if (!v.defined()) return {};
    HostTensor h(v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim));
    if (v.nbytes() == 0) return h;
    if (gpu_) {
      MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, v.data, v.nbytes(), cudaMemcpyDeviceToHost));
    } else {
      std::memcpy(h.view().data, v.data, v.nbytes());
    }
    return h;
  }
  void poison(cudaStream_t s = nullptr) {
    if (view().nbytes() == 0) return;
    if (gpu_) {
      MODMOE_CUDA_CHECK(cudaMemsetAsync(view().data, 0xFF, view().nbytes(), s));
    } else {
      std::memset(view().data, 0xFF, view().nbytes());
    }
  }

 private:
  bool gpu_ = false;
  HostTensor h_;
  DeviceTensor d_;
};

// Copies a view (host or device) into host memory.
void copy_to_host(const TensorView& v, void* dst) {
  if (v.nbytes() == 0) return;
  if (v.device.is_cuda()) {
    MODMOE_CUDA_CHECK(cudaMemcpy(dst, v.data, v.nbytes(), cudaMemcpyDeviceToHost));
  } else {
    std::memcpy(dst, v.data, v.nbytes());
  }
}

// Experts [begin, begin + count) of a [E, ...] contiguous view.
TensorView slice0(const TensorView& v, int64_t begin, int64_t count) {
  TensorView s = v;
  s.data = static_cast<char*>(v.data) + begin * v.strides[0] * int64_t(dtype_bytes(v.dtype));
  s.shape[0] = count;
  return s;
}

HostTensor take_rows(const HostTensor& t, const std::vector<int64_t>& rows) {
  const TensorView& v = t.view();
  std::vector<int64_t> shape(v.shape.begin(), v.shape.begin() + v.ndim);
  shape[0] = static_cast<int64_t>(rows.size());
  HostTensor out(v.dtype, shape);
  const size_t row_bytes = v.strides[0] * dtype_bytes(v.dtype);
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(static_cast<char*>(out.view().data) + i * row_bytes,
                static_cast<const char*>(v.data) + rows[i] * row_bytes, row_bytes);
  }
  return out;
}

HostTensor first_rows(const HostTensor& t, int64_t n) {
  std::vector<int64_t> rows(static_cast<size_t>(n));
  std::iota(rows.begin(), rows.end(), 0);
  return take_rows(t, rows);
}

// ---------------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------------

enum class TopkForm { F32, BF16, Packed };

struct Spec {
  std::string name;
  int num_experts = 8;   // E, global
  int top_k = 2;
  int64_t hidden = 128;  // H
  int64_t inter = 64;    // I
  int64_t tokens = 37;   // M (standard) or max_m (batched)
  Activation act = Activation::Swiglu;
  int ep_size = 1;
  int ep_rank = 0;
  bool biases = false;
  bool lora = false;
  bool per_expert_act = false;  // SwigluOai alpha/beta/limit tensors
  WeightLayout layout = WeightLayout::Canonical;
  GateUpOrder order = GateUpOrder::GateUp;
  int interleave = 8;
  TopkForm topk = TopkForm::F32;
  bool small_int = false;     // integer inputs and weights: GEMM sums are exact
  bool invalid_ids = false;   // some slots -1 or num_experts
  bool pow2_weights = false;  // routing weights in {1/4, 1/2, 1, 2}
  bool bf16_routing = false;
  bool on_input = false;      // apply_router_weight_on_input (top_k = 1)
  bool batched = false;
  float x_std = 0.1f;
  bool device_weights = false;  // weights filled on the GPU (large presets)
  int sample_tokens = 0;        // reference on this many tokens (0: all)
  uint64_t salt = 0;
};

constexpr uint64_t kStreamHidden = 11;
constexpr uint64_t kStreamLora = 12;
constexpr uint64_t kStreamW13 = 1000000;
constexpr uint64_t kStreamW2 = 2000000;

struct Problem {
  Spec s;
  ExpertMap map;
  uint64_t seed = 0;
  int64_t rows13 = 0;  // 2I (gated) or I
  HostTensor hidden;   // [M, H] or [E_local, max_m, H] bf16
  HostTensor ids;      // [M, k] int32, packed form when topk == Packed
  HostTensor weights;  // [M, k] fp32 or bf16; undefined when packed
  HostTensor counts;   // batched: [E_local] int32
  HostTensor lora;     // [M, k, rows13] bf16
  HostTensor w13;      // [E, rows13, H] bf16 canonical (empty with device_weights)
  HostTensor w2;       // [E, H, I] bf16
  HostTensor b13;      // [E, rows13] fp32
  HostTensor b2;       // [E, H] fp32
  HostTensor alpha, beta, limit;  // [E] fp32

  int64_t M() const { return s.tokens; }
  int k() const { return s.batched ? 1 : s.top_k; }
  // Global id and routing weight (as given) of slot (m, j).
  std::pair<int, float> slot(int64_t m, int j) const {
    const int32_t raw = ids.data<int32_t>()[m * s.top_k + j];
    if (s.topk == TopkForm::Packed) {
      return {static_cast<int16_t>(static_cast<uint32_t>(raw) >> 16),
              bf16_bits_to_float(static_cast<uint16_t>(raw & 0xFFFF))};
    }
    const float w = s.topk == TopkForm::BF16
                        ? bf16_bits_to_float(weights.data<uint16_t>()[m * s.top_k + j])
                        : weights.data<float>()[m * s.top_k + j];
    return {raw, w};
  }
};

void fill_expert_weights(const Spec& s, uint64_t seed, int global_expert, const TensorView& w13,
                         const TensorView& w2) {
  synth::fill(w13, seed, kStreamW13 + global_expert, 1.0f / std::sqrt(float(s.hidden)));
  synth::fill(w2, seed, kStreamW2 + global_expert, 1.0f / std::sqrt(float(s.inter)));
}

Problem make_problem(const Spec& s) {
  Problem p;
  p.s = s;
  p.seed = test::seed(s.salt);
  std::mt19937_64 rng(p.seed);
  p.map = ExpertMap::for_rank(s.num_experts, s.ep_size, s.ep_rank);
  const int E = s.num_experts;
  const int E_local = p.map.num_local_experts;
  const int64_t H = s.hidden;
  p.rows13 = is_gated(s.act) ? 2 * s.inter : s.inter;
  // Gated small-int problems keep |gate| small so that silu stays away from under/overflow.
  const int x_range = is_gated(s.act) ? 1 : 2;

  if (s.batched) {
    p.hidden.reset(DType::BF16, {E_local, s.tokens, H});
    p.counts.reset(DType::I32, {E_local});
    std::uniform_int_distribution<int64_t> cnt(0, s.tokens);
    for (int e = 0; e < E_local; ++e) {
      // Cover the edges: an empty expert, a full one, then anything in between.
      p.counts.data<int32_t>()[e] =
          static_cast<int32_t>(e == 0 ? 0 : (e == 1 ? s.tokens : cnt(rng)));
    }
  } else {
    p.hidden.reset(DType::BF16, {s.tokens, H});
    const int k = s.top_k;
    p.ids.reset(DType::I32, {s.tokens, k});
    if (s.topk != TopkForm::Packed) {
      p.weights.reset(s.topk == TopkForm::BF16 ? DType::BF16 : DType::F32, {s.tokens, k});
    }
    std::vector<int> perm(static_cast<size_t>(E));
    std::uniform_real_distribution<float> wdist(0.05f, 1.0f);
    std::uniform_int_distribution<int> pick(0, 5);
    std::uniform_int_distribution<int> p2(-2, 1);
    for (int64_t m = 0; m < s.tokens; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      for (int j = 0; j < k; ++j) {  // k distinct experts: a partial Fisher-Yates shuffle
        std::uniform_int_distribution<int> d(j, E - 1);
        std::swap(perm[j], perm[d(rng)]);
        int id = perm[j];
        if (s.invalid_ids) {
          const int r = pick(rng);
          if (r == 0) id = -1;
          if (r == 1) id = E;
        }
        const float w = s.pow2_weights ? std::ldexp(1.0f, p2(rng)) : wdist(rng);
        const int64_t x = m * k + j;
        if (s.topk == TopkForm::Packed) {
          p.ids.data<int32_t>()[x] = static_cast<int32_t>((static_cast<uint32_t>(id) << 16) |
                                                          float_to_bf16_bits(w));
        } else {
          p.ids.data<int32_t>()[x] = id;
          if (s.topk == TopkForm::BF16) {
            p.weights.data<uint16_t>()[x] = float_to_bf16_bits(w);
          } else {
            p.weights.data<float>()[x] = w;
          }
        }
      }
    }
    if (s.lora) {
      p.lora.reset(DType::BF16, {s.tokens, k, p.rows13});
      if (s.small_int) {
        test::fill_small_int(p.lora, rng, 2);
      } else {
        synth::fill_host(p.lora.view(), p.seed, kStreamLora, 0.2f * s.x_std);
      }
    }
  }
  if (s.small_int) {
    test::fill_small_int(p.hidden, rng, x_range);
  } else {
    synth::fill_host(p.hidden.view(), p.seed, kStreamHidden, s.x_std);
  }

  if (!s.device_weights) {
    p.w13.reset(DType::BF16, {E, p.rows13, H});
    p.w2.reset(DType::BF16, {E, H, s.inter});
    if (s.small_int) {
      test::fill_small_int(p.w13, rng, 1);
      test::fill_small_int(p.w2, rng, 1);
    } else {
      for (int e = 0; e < E; ++e) {
        fill_expert_weights(s, p.seed, e, p.w13.view().select0(e), p.w2.view().select0(e));
      }
    }
  }
  if (s.biases) {
    p.b13.reset(DType::F32, {E, p.rows13});
    p.b2.reset(DType::F32, {E, H});
    if (s.small_int) {
      test::fill_small_int(p.b13, rng, 2);
      test::fill_small_int(p.b2, rng, 2);
    } else {
      test::fill_normal(p.b13, rng, 0.05f);
      test::fill_normal(p.b2, rng, 0.05f);
    }
  }
  if (s.per_expert_act) {
    p.alpha.reset(DType::F32, {E});
    p.beta.reset(DType::F32, {E});
    p.limit.reset(DType::F32, {E});
    std::uniform_real_distribution<float> a(1.0f, 2.0f), b(0.5f, 1.5f), l(0.3f, 1.5f);
    for (int e = 0; e < E; ++e) {
      p.alpha.data<float>()[e] = a(rng);
      p.beta.data<float>()[e] = b(rng);
      p.limit.data<float>()[e] = l(rng);
    }
  }
  return p;
}

// ---------------------------------------------------------------------------------------
// One side of a comparison: inputs and weights as views, on the GPU or the host
// ---------------------------------------------------------------------------------------

struct Side {
  ExpertMap map;
  Buf hidden, ids, weights, counts, lora;
  Buf w13, w2, b13, b2, alpha, beta, limit;
  ExpertWeights ew;
  ExpertsInputs in;
  ActivationParams act;
};

// Interleaves canonical [E, 2I, H] (or [E, 2I]) rows into GateUpInterleaved groups of G.
HostTensor interleave_rows(const HostTensor& canon, int64_t inter, GateUpOrder order, int G) {
  const TensorView& v = canon.view();
  HostTensor out(v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim));
  const int64_t E = v.shape[0];
  const size_t row_bytes = (v.ndim == 3 ? v.shape[2] : 1) * dtype_bytes(v.dtype);
  const auto* src = static_cast<const char*>(v.data);
  auto* dst = static_cast<char*>(out.view().data);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < inter; ++i) {
      const int64_t gate_src = order == GateUpOrder::GateUp ? i : inter + i;
      const int64_t up_src = order == GateUpOrder::GateUp ? inter + i : i;
      const int64_t gate_dst = (i / G) * 2 * G + i % G;
      const int64_t up_dst = gate_dst + G;
      std::memcpy(dst + (e * 2 * inter + gate_dst) * row_bytes,
                  src + (e * 2 * inter + gate_src) * row_bytes, row_bytes);
      std::memcpy(dst + (e * 2 * inter + up_dst) * row_bytes,
                  src + (e * 2 * inter + up_src) * row_bytes, row_bytes);
    }
  }
  return out;
}

HostTensor slice_copy(const HostTensor& t, int64_t begin, int64_t count) {
  std::vector<int64_t> rows(static_cast<size_t>(count));
  std::iota(rows.begin(), rows.end(), begin);
  return take_rows(t, rows);
}

void finish_side(const Problem& p, Side& side) {
  const Spec& s = p.s;
  side.ew.layout = WeightLayout::Canonical;
  side.ew.order = s.order;
  side.ew.w13 = side.w13.view();
  side.ew.w2 = side.w2.view();
  if (side.b13.defined()) side.ew.w13_bias = side.b13.view();
  if (side.b2.defined()) side.ew.w2_bias = side.b2.view();
  side.in.hidden = side.hidden.view();
  if (side.ids.defined()) side.in.topk_ids = side.ids.view();
  if (side.weights.defined()) side.in.topk_weights = side.weights.view();
  if (side.counts.defined()) side.in.expert_num_tokens = side.counts.view();
  if (side.lora.defined()) side.in.gemm1_lora_delta = side.lora.view();
  side.act.kind = s.act;
  if (side.alpha.defined()) {
    side.act.alpha_per_expert = side.alpha.view();
    side.act.beta_per_expert = side.beta.view();
    side.act.limit_per_expert = side.limit.view();
  }
}

// The side under test: the problem as the caller gives it, local experts of `map`.
Side test_side(const Problem& p, const ExpertMap& map) {
  const Spec& s = p.s;
  const bool gpu = has_gpu();
  const int64_t off = map.local_expert_offset;
  const int64_t E_local = map.num_local_experts;
  Side side;
  side.map = map;
  side.hidden = Buf::copy_of(gpu, p.hidden);
  if (s.batched) {
    side.counts = Buf::copy_of(gpu, p.counts);
  } else {
    side.ids = Buf::copy_of(gpu, p.ids);
    if (p.weights.view().defined()) side.weights = Buf::copy_of(gpu, p.weights);
    if (s.lora) side.lora = Buf::copy_of(gpu, p.lora);
  }
  const bool interleaved = s.layout == WeightLayout::GateUpInterleaved;
  if (s.device_weights) {
    side.w13 = Buf(gpu, DType::BF16, {E_local, p.rows13, s.hidden});
    side.w2 = Buf(gpu, DType::BF16, {E_local, s.hidden, s.inter});
    for (int64_t e = 0; e < E_local; ++e) {
      fill_expert_weights(s, p.seed, static_cast<int>(off + e), side.w13.view().select0(e),
                          side.w2.view().select0(e));
    }
    if (gpu) MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  } else {
    HostTensor w13 = slice_copy(p.w13, off, E_local);
    if (interleaved) w13 = interleave_rows(w13, s.inter, s.order, s.interleave);
    side.w13 = Buf::copy_of(gpu, w13);
    side.w2 = Buf::copy_of(gpu, slice_copy(p.w2, off, E_local));
  }
  if (s.biases) {
    HostTensor b13 = slice_copy(p.b13, off, E_local);
    if (interleaved) b13 = interleave_rows(b13, s.inter, s.order, s.interleave);
    side.b13 = Buf::copy_of(gpu, b13);
    side.b2 = Buf::copy_of(gpu, slice_copy(p.b2, off, E_local));
  }
  if (s.per_expert_act) {
    side.alpha = Buf::copy_of(gpu, slice_copy(p.alpha, off, E_local));
    side.beta = Buf::copy_of(gpu, slice_copy(p.beta, off, E_local));
    side.limit = Buf::copy_of(gpu, slice_copy(p.limit, off, E_local));
  }
  finish_side(p, side);
  if (interleaved) {
    side.ew.layout = WeightLayout::GateUpInterleaved;
    side.ew.interleave_rows = s.interleave;
  }
  return side;
}

// The reference's side, on the host, canonical weights. Standard format: the tokens in
// `tokens` only, and only the local experts in `experts` (ids remapped to their position,
// anything else to -1), so the CPU computes no more than it must. `source` (the side under
// test) gives the weights when the problem has no host copy.
Side reference_side(const Problem& p, const ExpertMap& map, const std::vector<int64_t>& tokens,
                    const std::vector<int>& experts, const Side& source) {
  const Spec& s = p.s;
  const int64_t n_ref = static_cast<int64_t>(experts.size());
  Side side;
  // num_experts >= top_k, as the API requires; ids >= n_ref would be non-local (none are).
  side.map = ExpertMap{std::max(static_cast<int>(n_ref), s.top_k), 0, static_cast<int>(n_ref)};
  if (s.batched) {
    side.hidden = Buf::copy_of(false, p.hidden);
    side.counts = Buf::copy_of(false, p.counts);
  } else {
    side.hidden = Buf::copy_of(false, take_rows(p.hidden, tokens));
    const int k = s.top_k;
    const int64_t T = static_cast<int64_t>(tokens.size());
    HostTensor ids(DType::I32, {T, k});
    HostTensor wts(DType::F32, {T, k});
    for (int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < k; ++j) {
        const auto [id, w] = p.slot(tokens[t], j);
        int ref_id = -1;
        if (map.is_local(id)) {
          const auto it = std::find(experts.begin(), experts.end(), id);
          if (it != experts.end()) ref_id = static_cast<int>(it - experts.begin());
        }
        ids.data<int32_t>()[t * k + j] = ref_id;
        wts.data<float>()[t * k + j] = w;
      }
    }
    side.ids = Buf::copy_of(false, ids);
    side.weights = Buf::copy_of(false, wts);
    if (s.lora) side.lora = Buf::copy_of(false, take_rows(p.lora, tokens));
  }
  side.w13 = Buf(false, DType::BF16, {n_ref, p.rows13, s.hidden});
  side.w2 = Buf(false, DType::BF16, {n_ref, s.hidden, s.inter});
  for (int64_t i = 0; i < n_ref; ++i) {
    const int g = experts[i];
    if (p.w13.view().defined()) {
      copy_to_host(p.w13.view().select0(g), side.w13.view().select0(i).data);
      copy_to_host(p.w2.view().select0(g), side.w2.view().select0(i).data);
    } else {  // device weights: canonical layout, expert g - offset of the source side
      const int64_t local = g - source.map.local_expert_offset;
      copy_to_host(source.w13.view().select0(local), side.w13.view().select0(i).data);
      copy_to_host(source.w2.view().select0(local), side.w2.view().select0(i).data);
    }
  }
  auto per_expert = [&](const HostTensor& full) {
    std::vector<int64_t> rows(experts.begin(), experts.end());
    return Buf::copy_of(false, take_rows(full, rows));
  };
  if (s.biases) {
    side.b13 = per_expert(p.b13);
    side.b2 = per_expert(p.b2);
  }
  if (s.per_expert_act) {
    side.alpha = per_expert(p.alpha);
    side.beta = per_expert(p.beta);
    side.limit = per_expert(p.limit);
  }
  finish_side(p, side);
  return side;
}

// ---------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------

struct Mode {
  bool do_finalize = true;
  bool with_meta = false;   // pass the metadata views (always when do_finalize is false)
  bool with_act = false;    // pass gemm1_activation_output
  bool with_gemm2 = false;  // pass gemm2_out with do_finalize
};

struct Result {
  HostTensor out;        // [M, H]
  HostTensor gemm2_out;  // [M*k, H] or [E_local, max_m, H]
  HostTensor expert_weights, e2p, offsets, act;
};

// The outputs and workspace of one side, allocated once, poisoned before every launch.
class Runner {
 public:
  Runner(const Problem& p, const Side& side, const Mode& mode) : side_(side) {
    const Spec& s = p.s;
    const bool gpu = side.in.hidden.device.is_cuda();
    const int64_t M = side.in.hidden.size(s.batched ? 1 : 0);
    const int64_t H = s.hidden;
    const int E_local = side.map.num_local_experts;
    opt_.activation = side.act;
    opt_.do_finalize = s.batched ? false : mode.do_finalize;
    opt_.apply_router_weight_on_input = s.on_input;
    opt_.bf16_routing_weights = s.bf16_routing;
    if (s.batched) {
      gemm2_ = Buf(gpu, DType::BF16, {E_local, M, H});
    } else {
      const int k = s.top_k;
      if (opt_.do_finalize) out_ = Buf(gpu, DType::BF16, {M, H});
      if (!opt_.do_finalize || mode.with_gemm2) gemm2_ = Buf(gpu, DType::BF16, {M * k, H});
      if (!opt_.do_finalize || mode.with_meta) {
        ew_ = Buf(gpu, DType::F32, {M, k});
        e2p_ = Buf(gpu, DType::I32, {M, k});
        offsets_ = Buf(gpu, DType::I64, {E_local + 1});
      }
      if (mode.with_act) act_ = Buf(gpu, DType::BF16, {M * k, s.inter});
    }
    outs_.out = out_.view();
    outs_.gemm2_out = gemm2_.view();
    outs_.expert_weights = ew_.view();
    outs_.expanded_idx_to_permuted_idx = e2p_.view();
    outs_.expert_first_token_offset = offsets_.view();
    outs_.gemm1_activation_output = act_.view();
    const ExpertsDesc desc = make_experts_desc(side.in, side.ew, side.map, opt_, outs_);
    const size_t bytes = experts_workspace_size(desc);
    ws_ = Buf(gpu, DType::U8, {static_cast<int64_t>(std::max<size_t>(bytes, 1))});
  }

  void poison(cudaStream_t s = nullptr) {
    for (Buf* b : {&out_, &gemm2_, &ew_, &e2p_, &offsets_, &act_, &ws_}) b->poison(s);
  }
  void launch(cudaStream_t s = nullptr) {
    experts(side_.in, side_.ew, side_.map, opt_, outs_,
            Workspace{ws_.view().data, ws_.view().nbytes()}, s);
  }
  Result run() {
    poison();
    launch();
    if (side_.in.hidden.device.is_cuda()) MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
    return fetch();
  }
  // The call captured in a CUDA graph on a stream of its own, then `replays` replays, each
  // over poisoned outputs: the results of each replay.
  std::vector<Result> graph_replays(int replays) {
    cudaStream_t stream;
    MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    MODMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    launch(stream);
    MODMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    std::vector<Result> results;
    for (int r = 0; r < replays; ++r) {
      poison(stream);
      MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      results.push_back(fetch());
    }
    MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
    MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
    MODMOE_CUDA_CHECK(cudaStreamDestroy(stream));
    return results;
  }
  Result fetch() const {
    Result r;
    r.out = out_.to_host();
    r.gemm2_out = gemm2_.to_host();
    r.expert_weights = ew_.to_host();
    r.e2p = e2p_.to_host();
    r.offsets = offsets_.to_host();
    r.act = act_.to_host();
    return r;
  }

 private:
  const Side& side_;
  ExpertsOptions opt_;
  ExpertsOutputs outs_;
  Buf out_, gemm2_, ew_, e2p_, offsets_, act_, ws_;
};

std::vector<int> local_experts(const ExpertMap& map) {
  std::vector<int> v(static_cast<size_t>(map.num_local_experts));
  std::iota(v.begin(), v.end(), map.local_expert_offset);
  return v;
}

// The reference on every token with every local expert: same permutation as the GPU.
Result reference_full(const Problem& p, const ExpertMap& map, const Side& tested,
                      const Mode& mode) {
  std::vector<int64_t> tokens(static_cast<size_t>(p.s.batched ? 0 : p.M()));
  std::iota(tokens.begin(), tokens.end(), 0);
  const Side ref = reference_side(p, map, tokens, local_experts(map), tested);
  Runner runner(p, ref, mode);
  return runner.run();
}

// The reference's `out` rows of `tokens`, one token per call on all cores: each call
// carries only the experts that token picks.
HostTensor reference_rows(const Problem& p, const ExpertMap& map, const Side& tested,
                          const std::vector<int64_t>& tokens) {
  HostTensor out(DType::BF16, {static_cast<int64_t>(tokens.size()), p.s.hidden});
  const size_t row_bytes = p.s.hidden * 2;
  auto one = [&](size_t t) {
    std::vector<int> experts;
    for (int j = 0; j < p.s.top_k; ++j) {
      const int id = p.slot(tokens[t], j).first;
      if (map.is_local(id) && std::find(experts.begin(), experts.end(), id) == experts.end()) {
        experts.push_back(id);
      }
    }
    if (experts.empty()) experts.push_back(map.local_expert_offset);  // a map needs one
    std::sort(experts.begin(), experts.end());
    const Side ref = reference_side(p, map, {tokens[t]}, experts, tested);
    Runner runner(p, ref, Mode{});
    const Result r = runner.run();
    std::memcpy(static_cast<char*>(out.view().data) + t * row_bytes, r.out.view().data,
                row_bytes);
  };
  const size_t workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::future<void>> jobs;
  for (size_t w = 0; w < workers; ++w) {
    jobs.push_back(std::async(std::launch::async, [&, w] {
      for (size_t t = w; t < tokens.size(); t += workers) one(t);
    }));
  }
  for (auto& j : jobs) j.get();
  return out;
}

std::vector<int64_t> sample_tokens(int64_t M, int n) {
  std::vector<int64_t> t;
  if (n <= 0 || n >= M) {
    for (int64_t m = 0; m < M; ++m) t.push_back(m);
    return t;
  }
  for (int i = 0; i < n; ++i) t.push_back(i * (M - 1) / (n - 1));
  return t;
}

// ---------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------

constexpr double kTol = 6e-3;

double rel_l2(const HostTensor& out, const HostTensor& ref) {
  return test::rel_l2(test::to_double(out), test::to_double(ref));
}

// The first permuted rows that both sides wrote.
int64_t permuted_rows(const Result& r, int E_local) {
  return r.offsets.data<int64_t>()[E_local];
}

// bf16 tensors: how many elements differ in bits, and the largest distance in units of the
// last place (same sign only; a sign change counts as 1000).
struct UlpReport {
  int64_t differ = 0;
  int64_t max_ulp = 0;
};
UlpReport ulp_report(const HostTensor& a, const HostTensor& b) {
  UlpReport r;
  const auto* pa = a.data<uint16_t>();
  const auto* pb = b.data<uint16_t>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (pa[i] == pb[i]) continue;
    ++r.differ;
    const bool same_sign = (pa[i] & 0x8000) == (pb[i] & 0x8000);
    const int64_t d = same_sign ? std::abs(int64_t(pa[i] & 0x7FFF) - int64_t(pb[i] & 0x7FFF)) : 1000;
    r.max_ulp = std::max(r.max_ulp, d);
  }
  return r;
}

void expect_metadata_equal(const Result& gpu, const Result& ref) {
  EXPECT_TRUE(test::bitwise_equal(gpu.offsets, ref.offsets)) << "expert_first_token_offset";
  EXPECT_TRUE(test::bitwise_equal(gpu.e2p, ref.e2p)) << "expanded_idx_to_permuted_idx";
  EXPECT_TRUE(test::bitwise_equal(gpu.expert_weights, ref.expert_weights)) << "expert_weights";
}

// ---------------------------------------------------------------------------------------
// GEMM interface
// ---------------------------------------------------------------------------------------

TEST(GpuGemm, SelectConfigOnlyReturnsCompiledConfigs) {
  // The full sweep (Hopper and Ampere properties, every layout) is the CPU test
  // GemmConfig.SelectOnlyReturnsCompiledConfigs; this one checks the refusal of an unknown
  // config, which needs the launcher.
  const auto compiled = cuda::gemm::compiled_configs();
  ASSERT_FALSE(compiled.empty());
  cuda::gemm::DeviceProps props;
  props.sm_count = 132;
  props.cc_major = 9;
  props.max_smem_per_block = 227 * 1024;
  int checked = 0;
  for (int stage = 0; stage < 2; ++stage) {
    for (int64_t rows : {1, 7, 64, 100, 1000, 8192, 65536, 1 << 20}) {
      for (int E : {1, 8, 32, 128, 256}) {
        for (int64_t n : {64, 768, 2048, 2880, 7168, 14336}) {
          for (bool gated : {false, true}) {
            cuda::gemm::GemmDesc d;
            d.stage = stage == 0 ? cuda::gemm::GemmStage::Gemm1 : cuda::gemm::GemmStage::Gemm2;
            d.num_experts = E;
            d.max_rows = rows;
            d.max_rows_per_expert = rows;
            d.n = n;
            d.k = 2048;
            d.gated = gated && stage == 0;
            d.gate_up_group = d.gated ? 8 : 0;
            d.validate();
            const auto c = cuda::gemm::select_config(d, props);
            EXPECT_TRUE(cuda::gemm::is_compiled(c))
                << c.to_string() << " for rows " << rows << " E " << E << " n " << n;
            EXPECT_EQ(c, cuda::gemm::select_config(d, props)) << "not a pure function";
            ++checked;
          }
        }
      }
    }
  }
  // An unknown config is refused with a message that lists the compiled ones.
  cuda::gemm::GemmDesc d;
  d.num_experts = 1;
  d.max_rows = 1;
  d.max_rows_per_expert = 1;
  d.n = 64;
  d.k = 64;
  cuda::gemm::GemmConfig bad{96, 96, 32, 3, 2, 2};
  try {
    cuda::gemm::launch_grouped_gemm(d, bad, {}, nullptr);
    ADD_FAILURE() << "an uncompiled config was launched";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(compiled[0].to_string()), std::string::npos)
        << e.what();
  }
  std::printf("checked %d descs; compiled configs:", checked);
  for (const auto& c : compiled) std::printf(" %s", c.to_string().c_str());
  std::printf("\n");
}

// A grouped GEMM problem driven straight through grouped_gemm.h, with a host-built work list.
struct GemmProblem {
  int E = 0;
  int64_t H = 0, I = 0;
  std::vector<int32_t> counts;
  int64_t rows = 0;
  DeviceTensor row_begin, row_count, x, w13, w2, act, y, b13, b2;
  std::vector<DeviceTensor> tiles;  // per config

  GemmProblem(int e, int64_t h, int64_t i, std::vector<int32_t> cnt, bool biases,
              uint64_t seed)
      : E(e), H(h), I(i), counts(std::move(cnt)) {
    std::vector<int32_t> begin(static_cast<size_t>(E));
    for (int j = 0; j < E; ++j) {
      begin[j] = static_cast<int32_t>(rows);
      rows += counts[j];
    }
    row_begin = upload_i32(begin);
    row_count = upload_i32(counts);
    for (const auto& c : cuda::gemm::compiled_configs()) tiles.push_back(tiles_for(c));
    x.reset(DType::BF16, {std::max<int64_t>(rows, 1), H});
    w13.reset(DType::BF16, {E, 2 * I, H});
    w2.reset(DType::BF16, {E, H, I});
    act.reset(DType::BF16, {std::max<int64_t>(rows, 1), I});
    y.reset(DType::BF16, {std::max<int64_t>(rows, 1), H});
    synth::fill_device(x.view(), seed, 1, 1.0f);
    synth::fill_device(w13.view(), seed, 2, 1.0f / std::sqrt(float(H)));
    synth::fill_device(w2.view(), seed, 3, 1.0f / std::sqrt(float(I)));
    if (biases) {
      b13.reset(DType::F32, {E, 2 * I});
      b2.reset(DType::F32, {E, H});
      synth::fill_device(b13.view(), seed, 4, 0.05f);
      synth::fill_device(b2.view(), seed, 5, 0.05f);
    }
    MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  // The work list's tile offsets for `c` (its tail rows included), as experts.cu builds them.
  DeviceTensor tiles_for(const cuda::gemm::GemmConfig& c) const {
    std::vector<int32_t> t(static_cast<size_t>(E + 1), 0);
    for (int j = 0; j < E; ++j) {
      t[j + 1] = t[j] + cuda::gemm::row_tiles(counts[j], c.block_m, c.tail_m);
    }
    return upload_i32(t);
  }
  static DeviceTensor upload_i32(const std::vector<int32_t>& v) {
    HostTensor h(DType::I32, {static_cast<int64_t>(v.size())});
    std::memcpy(h.view().data, v.data(), v.size() * 4);
    return DeviceTensor::from_host(h);
  }
  cuda::gemm::GemmDesc desc(bool gemm1) const {
    cuda::gemm::GemmDesc d;
    d.stage = gemm1 ? cuda::gemm::GemmStage::Gemm1 : cuda::gemm::GemmStage::Gemm2;
    d.num_experts = E;
    d.max_rows = rows;
    d.max_rows_per_expert = *std::max_element(counts.begin(), counts.end());
    d.n = gemm1 ? I : H;
    d.k = gemm1 ? H : I;
    d.gated = gemm1;
    d.gate_up_group = gemm1 ? 8 : 0;
    return d;
  }
  cuda::gemm::GemmArgs args(bool gemm1, size_t config_index) const {
    return args_with(gemm1, tiles[config_index]);
  }
  cuda::gemm::GemmArgs args_with(bool gemm1, const DeviceTensor& tile_offsets) const {
    cuda::gemm::GemmArgs a;
    a.tile_offsets = tile_offsets.data<int32_t>();
    a.row_begin = row_begin.data<int32_t>();
    a.row_count = row_count.data<int32_t>();
    if (gemm1) {
      a.a = x.data<__nv_bfloat16>();
      a.lda = H;
      a.b = w13.data<__nv_bfloat16>();
      a.b_expert_stride = 2 * I * H;
      a.ldb = H;
      // w13 is read as GateUpInterleaved with G = 8 (random weights: any layout will do), the
      // one gated layout both kernel families read.
      ExpertWeights w;
      w.w2 = w2.view();  // intermediate() comes from w2
      w.layout = WeightLayout::GateUpInterleaved;
      w.interleave_rows = 8;
      a.gate_up = cuda::gemm::GateUpMap::from(w, I);
      a.bias = b13.data<float>();
      a.bias_expert_stride = 2 * I;
      a.activation.kind = static_cast<int>(Activation::Swiglu);
      a.c = act.data<__nv_bfloat16>();
      a.ldc = I;
    } else {
      a.a = act.data<__nv_bfloat16>();
      a.lda = I;
      a.b = w2.data<__nv_bfloat16>();
      a.b_expert_stride = H * I;
      a.ldb = I;
      a.bias = b2.data<float>();
      a.bias_expert_stride = H;
      a.c = y.data<__nv_bfloat16>();
      a.ldc = H;
    }
    return a;
  }
};

TEST_F(GpuExperts, GemmConfigsAgreeBitwise) {
  if (!has_gpu()) GTEST_SKIP() << "drives the CUDA GEMMs directly";
  // Configs of one kernel family walk K in the same k16 order, so every output element is
  // the same sum: bitwise equal. Across families (mma.sync vs wgmma) the tensor cores may
  // round a k16 step's sum differently: equal within bf16 rounding.
  const uint64_t seed = test::seed(31);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> cnt(0, 300);
  std::vector<int32_t> counts(12);
  for (auto& c : counts) c = cnt(rng);
  counts[3] = 0;
  counts[5] = 1;
  counts[7] = 128;
  counts[8] = 257;   // two wide tiles, the second of one row; one tile with tail rows
  counts[9] = 80;    // narrow: one tile with all 16 tail rows
  counts[10] = 288;  // wide: one tile with all 32 tail rows
  counts[11] = 289;  // wide with tail rows: 256 + 33
  counts[2] = 65;    // narrow with tail rows: one tile of 65
  GemmProblem g(12, 256, 192, counts, true, seed);
  std::vector<HostTensor> acts, ys;
  // The compiled bf16 configs (the FP8 ones run FP8 problems only: test_gpu_fp8_experts, the
  // W4A16 ones NVFP4 weights only: test_gpu_nvfp4_experts), then the sm90 ones with tail rows
  // (a run-time option) that run this bf16 problem.
  std::vector<cuda::gemm::GemmConfig> configs;
  for (const auto& c : cuda::gemm::compiled_configs()) {
    if (c.nvfp4) continue;
    if (cuda::gemm::config_runs(g.desc(true), c) || c.arch != 90) configs.push_back(c);
  }
  for (const auto& c : cuda::gemm::compiled_configs()) {
    if (c.arch != 90 || cuda::gemm::sm90_tail_rows(c) == 0 ||
        !cuda::gemm::config_runs(g.desc(true), c)) {
      continue;
    }
    cuda::gemm::GemmConfig t = c;
    t.tail_m = cuda::gemm::sm90_tail_rows(c);
    configs.push_back(t);
  }
  const cuda::gemm::DeviceProps props = cuda::gemm::DeviceProps::query(0);
  std::vector<size_t> ran;
  for (size_t c = 0; c < configs.size(); ++c) {
    if (configs[c].arch == 90 && !(props.cc_major == 9 && props.cc_minor == 0)) continue;
    g.act.fill_bytes(0xFF);
    g.y.fill_bytes(0xFF);
    const DeviceTensor tiles = g.tiles_for(configs[c]);
    cuda::gemm::launch_grouped_gemm(g.desc(true), configs[c], g.args_with(true, tiles), nullptr);
    cuda::gemm::launch_grouped_gemm(g.desc(false), configs[c], g.args_with(false, tiles), nullptr);
    MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
    acts.push_back(first_rows(g.act.to_host(), g.rows));
    ys.push_back(first_rows(g.y.to_host(), g.rows));
    ran.push_back(c);
    double sumsq = 0;
    for (double v : test::to_double(ys.back())) sumsq += v * v;
    EXPECT_TRUE(std::isfinite(sumsq) && sumsq > 0) << configs[c].to_string() << ": unwritten rows";
    double asq = 0;
    for (double v : test::to_double(acts.back())) asq += v * v;
    EXPECT_TRUE(std::isfinite(asq) && asq > 0) << configs[c].to_string() << ": unwritten act rows";
  }
  for (size_t i = 1; i < ran.size(); ++i) {
    const auto& ci = configs[ran[i]];
    size_t ref = 0;  // the first config of the same family
    while (configs[ran[ref]].arch != ci.arch) ++ref;
    const auto& cr = configs[ran[ref]];
    const UlpReport ra = ulp_report(acts[i], acts[0]);
    const UlpReport ry = ulp_report(ys[i], ys[0]);
    std::printf("%s vs %s: GEMM1 %lld differ (max %lld ulp), GEMM2 %lld differ (max %lld ulp)\n",
                ci.to_string().c_str(), configs[ran[0]].to_string().c_str(),
                (long long)ra.differ, (long long)ra.max_ulp, (long long)ry.differ,
                (long long)ry.max_ulp);
    if (ref != i) {
      EXPECT_TRUE(test::bitwise_equal(acts[i], acts[ref]))
          << ci.to_string() << " vs " << cr.to_string() << " (GEMM1)";
      EXPECT_TRUE(test::bitwise_equal(ys[i], ys[ref]))
          << ci.to_string() << " vs " << cr.to_string() << " (GEMM2)";
    }
    EXPECT_LT(rel_l2(acts[i], acts[0]), 4e-3) << ci.to_string() << " (GEMM1)";
    EXPECT_LT(rel_l2(ys[i], ys[0]), 4e-3) << ci.to_string() << " (GEMM2)";
  }
}

// Throughput of the two GEMMs at large shapes, with cudaEvents (median of 5 timings of
// 10 launches each). Informational: prints one line per (shape, GEMM, config).
TEST_F(GpuExperts, GemmThroughput) {
  if (!has_gpu()) GTEST_SKIP() << "times the CUDA GEMMs";
  struct Shape {
    const char* name;
    int E;
    int64_t rows_per_expert, H, I;
  };
  const Shape shapes[] = {{"mixtral T=4096 (E=8, 1024 rows/expert)", 8, 1024, 4096, 14336},
                          {"mixtral T=16384 (E=8, 4096 rows/expert)", 8, 4096, 4096, 14336},
                          {"qwen3 T=4096 (E=128, 256 rows/expert)", 128, 256, 2048, 768}};
  // MODMOE_GEMM_PROFILE=1: no timing, one launch of the selected config per GEMM (6 launches:
  // what bench/gpu_profile_experts.sh hands to ncu).
  const char* profile_env = std::getenv("MODMOE_GEMM_PROFILE");
  const bool profile = profile_env != nullptr && std::strcmp(profile_env, "1") == 0;
  cudaDeviceProp prop{};
  MODMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("GPU: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaEvent_t start, stop;
  MODMOE_CUDA_CHECK(cudaEventCreate(&start));
  MODMOE_CUDA_CHECK(cudaEventCreate(&stop));
  for (const Shape& s : shapes) {
    GemmProblem g(s.E, s.H, s.I, std::vector<int32_t>(s.E, static_cast<int32_t>(s.rows_per_expert)),
                  false, 7);
    cuda::gemm::DeviceProps props = cuda::gemm::DeviceProps::query(0);
    const auto configs = cuda::gemm::compiled_configs();
    for (bool gemm1 : {true, false}) {
      const auto d = g.desc(gemm1);
      const auto chosen = cuda::gemm::select_config(d, props);
      const double flops = 2.0 * double(g.rows) * double(gemm1 ? 2 * s.I : s.H) *
                           double(gemm1 ? s.H : s.I);
      for (size_t c = 0; c < configs.size(); ++c) {
        if (!cuda::gemm::config_runs(d, configs[c])) continue;  // FP8 / W4A16 tiles, off-Hopper
        if (configs[c].arch == 90 && !(props.cc_major == 9 && props.cc_minor == 0)) continue;
        const auto a = g.args(gemm1, c);
        if (profile) {
          // One launch of the selected tile, for a profiler (no tail rows: the work list here
          // is built without them, and these uniform counts are multiples of the tile).
          cuda::gemm::GemmConfig base = chosen;
          base.split_k = 1;
          base.tail_m = 0;
          if (!(base == configs[c])) continue;
          cuda::gemm::launch_grouped_gemm(d, base, a, nullptr);
          MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
          std::printf("[ profile  ] %s %s %s\n", s.name, gemm1 ? "GEMM1" : "GEMM2",
                      base.to_string().c_str());
          continue;
        }
        for (int w = 0; w < 3; ++w) cuda::gemm::launch_grouped_gemm(d, configs[c], a, nullptr);
        std::vector<float> ms;
        for (int rep = 0; rep < 5; ++rep) {
          MODMOE_CUDA_CHECK(cudaEventRecord(start));
          for (int it = 0; it < 10; ++it) cuda::gemm::launch_grouped_gemm(d, configs[c], a, nullptr);
          MODMOE_CUDA_CHECK(cudaEventRecord(stop));
          MODMOE_CUDA_CHECK(cudaEventSynchronize(stop));
          float t = 0;
          MODMOE_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
          ms.push_back(t / 10);
        }
        std::sort(ms.begin(), ms.end());
        std::printf("[ gemm     ] %-40s %s %-18s %8.3f ms %7.1f TFLOP/s%s\n", s.name,
                    gemm1 ? "GEMM1" : "GEMM2", configs[c].to_string().c_str(), ms[2],
                    flops / (ms[2] * 1e-3) / 1e12, configs[c] == chosen ? "  (selected)" : "");
      }
    }
  }
  MODMOE_CUDA_CHECK(cudaEventDestroy(start));
  MODMOE_CUDA_CHECK(cudaEventDestroy(stop));
}

// ---------------------------------------------------------------------------------------
// Small integers: bitwise equal to the reference
// ---------------------------------------------------------------------------------------

struct BitwiseCase {
  Spec spec;
  Mode mode;
};

std::vector<BitwiseCase> bitwise_cases() {
  std::vector<BitwiseCase> v;
  auto base = [](const char* name) {
    Spec s;
    s.name = name;
    s.small_int = true;
    s.act = Activation::Relu2;
    return s;
  };
  {
    Spec s = base("relu2_finalize_bias_lora");
    s.biases = true;
    s.lora = true;
    v.push_back({s, Mode{true, true, true, true}});
  }
  {
    Spec s = base("relu2_nofinalize_packed_ep");
    s.num_experts = 16;
    s.top_k = 4;
    s.tokens = 300;
    s.ep_size = 4;
    s.ep_rank = 1;
    s.topk = TopkForm::Packed;
    s.invalid_ids = true;
    v.push_back({s, Mode{false, true, true, false}});
  }
  {
    Spec s = base("relu2_bf16_weights_rounded");
    s.topk = TopkForm::BF16;
    s.bf16_routing = true;
    s.tokens = 129;
    v.push_back({s, Mode{true, true, false, true}});
  }
  {
    Spec s = base("relu2_fp32_weights_rounded");
    s.bf16_routing = true;
    v.push_back({s, Mode{true, true, false, false}});
  }
  {
    Spec s = base("relu2_router_weight_on_input");
    s.top_k = 1;
    s.on_input = true;
    s.pow2_weights = true;
    s.tokens = 70;
    v.push_back({s, Mode{true, true, true, true}});
  }
  {
    Spec s = base("relu2_batched_bias");
    s.batched = true;
    s.biases = true;
    s.tokens = 150;
    v.push_back({s, Mode{false, false, false, false}});
  }
  {
    // Large enough that GEMM2 selects the 128-row tile.
    Spec s = base("relu2_large_tiles");
    s.hidden = 1024;
    s.inter = 128;
    s.tokens = 2048;
    v.push_back({s, Mode{true, true, true, true}});
  }
  return v;
}

class SmallIntBitwise : public GpuExpertsP<BitwiseCase> {};

TEST_P(SmallIntBitwise, EqualsReference) {
  const BitwiseCase& c = GetParam();
  const Problem p = make_problem(c.spec);
  const Side gpu = test_side(p, p.map);
  Runner runner(p, gpu, c.mode);
  const Result got = runner.run();
  const Result ref = reference_full(p, p.map, gpu, c.mode);
  if (c.spec.batched) {
    EXPECT_TRUE(test::bitwise_equal(got.gemm2_out, ref.gemm2_out)) << "gemm2_out";
    return;
  }
  if (c.mode.do_finalize) {
    EXPECT_TRUE(test::bitwise_equal(got.out, ref.out)) << "out";
  }
  if (!c.mode.do_finalize || c.mode.with_meta) expect_metadata_equal(got, ref);
  if (!c.mode.do_finalize || c.mode.with_gemm2) {
    const int64_t P = permuted_rows(ref, p.map.num_local_experts);
    EXPECT_TRUE(test::bitwise_equal(first_rows(got.gemm2_out, P), first_rows(ref.gemm2_out, P)))
        << "gemm2_out, P = " << P;
  }
  if (c.mode.with_act) {
    const int64_t P = permuted_rows(ref, p.map.num_local_experts);
    EXPECT_TRUE(test::bitwise_equal(first_rows(got.act, P), first_rows(ref.act, P)))
        << "gemm1_activation_output, P = " << P;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SmallIntBitwise, ::testing::ValuesIn(bitwise_cases()),
                         [](const auto& info) { return info.param.spec.name; });

// Gated activations on small integers: GEMM1 is exact, so the activation outputs may differ
// only where the GPU's expf/erff (2 ulp) round differently from the host's: rare, 1 bf16 ulp.
class SmallIntGated : public GpuExpertsP<Activation> {};

TEST_P(SmallIntGated, ActivationWithinOneUlp) {
  Spec s;
  s.name = activation_name(GetParam());
  s.small_int = true;
  s.act = GetParam();
  s.hidden = 64;
  s.inter = 128;
  s.tokens = 90;
  s.biases = true;
  s.lora = true;
  s.order = GateUpOrder::UpGate;
  s.salt = 40 + static_cast<int>(GetParam());
  const Problem p = make_problem(s);
  const Side gpu = test_side(p, p.map);
  const Mode mode{true, true, true, false};
  Runner runner(p, gpu, mode);
  const Result got = runner.run();
  const Result ref = reference_full(p, p.map, gpu, mode);
  const int64_t P = permuted_rows(ref, p.map.num_local_experts);
  const HostTensor act_got = first_rows(got.act, P);
  const HostTensor act_ref = first_rows(ref.act, P);
  const UlpReport r = ulp_report(act_got, act_ref);
  const double act_err = rel_l2(act_got, act_ref);
  const double out_err = rel_l2(got.out, ref.out);
  std::printf("activation outputs: %lld of %lld differ, max %lld ulp, rel L2 %.3g; out rel L2 "
              "%.3g\n", (long long)r.differ, (long long)(P * s.inter), (long long)r.max_ulp,
              act_err, out_err);
  if (GetParam() == Activation::Geglu) {
    // NOTE: 1 + erf(x) cancels for x < -4, where a 2-ulp difference of erff becomes a large
    // relative one on a value near zero; only the norm is meaningful there.
    EXPECT_LT(act_err, 1e-3);
  } else {
    EXPECT_LE(r.max_ulp, 1);
    EXPECT_LE(r.differ, P * s.inter / 100 + 1);
  }
  EXPECT_LT(out_err, 2e-3);
  expect_metadata_equal(got, ref);
}

INSTANTIATE_TEST_SUITE_P(Acts, SmallIntGated,
                         ::testing::Values(Activation::Swiglu, Activation::SwigluOai,
                                           Activation::Geglu),
                         [](const auto& info) { return std::string(activation_name(info.param)); });

// ---------------------------------------------------------------------------------------
// Random inputs at the presets' shapes
// ---------------------------------------------------------------------------------------

struct PresetCase {
  std::string preset;
  int64_t tokens;
};

std::vector<PresetCase> preset_cases() {
  std::vector<PresetCase> v;
  for (const Preset& p : presets()) {
    for (int64_t t : {1, 7, 77, 1000, 4096}) v.push_back({p.name, t});
  }
  return v;
}

std::string case_name(const std::string& preset, int64_t t) {
  std::string n;
  for (char c : preset) n += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return n + "_T" + std::to_string(t);
}

class Presets : public GpuExpertsP<PresetCase> {};

TEST_P(Presets, MatchReference) {
  const PresetCase& c = GetParam();
  Preset pr = find_preset(c.preset);
  if (dry_run()) {
    if (c.tokens > 77) GTEST_SKIP() << "dry run: the CPU side would take too long";
    pr = pr.scaled_down(256, 128);
  }
  Spec s;
  s.name = case_name(c.preset, c.tokens);
  s.num_experts = pr.num_experts;
  s.top_k = pr.top_k;
  s.hidden = pr.hidden;
  s.inter = pr.intermediate;  // every preset at its real shape (mixtral too: I = 14336)
  s.tokens = c.tokens;
  s.act = pr.activation;
  s.biases = pr.has_biases;
  if (pr.num_experts == 256) {  // deepseek: expert parallel, E_local = 32
    s.ep_size = 8;
    s.ep_rank = 3;
  }
  s.device_weights = true;
  // NOTE: the reference runs on 16 tokens spread over the batch (all of them for T <= 16),
  // one token per thread; a token's out row depends on that token alone.
  s.sample_tokens = 16;
  s.salt = 100 + static_cast<uint64_t>(c.tokens);
  const Problem p = make_problem(s);
  const Side gpu = test_side(p, p.map);
  Runner runner(p, gpu, Mode{});
  const Result got = runner.run();
  const std::vector<int64_t> tokens = sample_tokens(p.M(), s.sample_tokens);
  const HostTensor ref = reference_rows(p, p.map, gpu, tokens);
  const HostTensor mine = take_rows(got.out, tokens);
  const double err = rel_l2(mine, ref);
  std::printf("%s: E=%d k=%d H=%lld I=%lld %s, E_local %d, %zu tokens checked: rel L2 %.3g\n",
              s.name.c_str(), s.num_experts, s.top_k, (long long)s.hidden, (long long)s.inter,
              activation_name(s.act), p.map.num_local_experts, tokens.size(), err);
  EXPECT_LT(err, kTol);
  // Every row of out was written (poisoned rows are NaN).
  double all = 0;
  for (double v : test::to_double(got.out)) all += v * v;
  EXPECT_TRUE(std::isfinite(all)) << "an out row was not written";
}

INSTANTIATE_TEST_SUITE_P(All, Presets, ::testing::ValuesIn(preset_cases()),
                         [](const auto& info) {
                           return case_name(info.param.preset, info.param.tokens);
                         });

// ---------------------------------------------------------------------------------------
// Random inputs, features one by one (full reference, same permutation)
// ---------------------------------------------------------------------------------------

Spec medium(const char* name) {
  Spec s;
  s.name = name;
  s.num_experts = 16;
  s.top_k = 4;
  s.hidden = 256;
  s.inter = 192;
  s.tokens = 200;
  return s;
}

void expect_close(const Problem& p, const Mode& mode) {
  const Side gpu = test_side(p, p.map);
  Runner runner(p, gpu, mode);
  const Result got = runner.run();
  const Result ref = reference_full(p, p.map, gpu, mode);
  if (p.s.batched) {
    EXPECT_LT(rel_l2(got.gemm2_out, ref.gemm2_out), kTol) << "gemm2_out";
    return;
  }
  if (mode.do_finalize) EXPECT_LT(rel_l2(got.out, ref.out), kTol) << "out";
  if (!mode.do_finalize || mode.with_meta) expect_metadata_equal(got, ref);
  const int64_t P = permuted_rows(ref, p.map.num_local_experts);
  if (!mode.do_finalize || mode.with_gemm2) {
    EXPECT_LT(rel_l2(first_rows(got.gemm2_out, P), first_rows(ref.gemm2_out, P)), kTol)
        << "gemm2_out";
  }
  if (mode.with_act) {
    EXPECT_LT(rel_l2(first_rows(got.act, P), first_rows(ref.act, P)), kTol)
        << "gemm1_activation_output";
  }
}

struct FeatureCase {
  Spec spec;
  Mode mode;
};

std::vector<FeatureCase> feature_cases() {
  std::vector<FeatureCase> v;
  const Mode all{true, true, true, true};
  {
    Spec s = medium("swiglu_gateup");
    v.push_back({s, all});
  }
  {
    Spec s = medium("geglu_upgate_bias");
    s.act = Activation::Geglu;
    s.order = GateUpOrder::UpGate;
    s.biases = true;
    v.push_back({s, all});
  }
  {
    Spec s = medium("swiglu_oai_interleaved_per_expert");
    s.act = Activation::SwigluOai;
    s.layout = WeightLayout::GateUpInterleaved;
    s.interleave = 8;
    s.per_expert_act = true;
    s.biases = true;
    s.x_std = 1.0f;  // gate/up reach the per-expert limits (0.3 .. 1.5)
    v.push_back({s, all});
  }
  {
    Spec s = medium("swiglu_oai_constants_bias");
    s.act = Activation::SwigluOai;
    s.biases = true;
    s.x_std = 3.0f;  // gate/up reach the default limit 7
    v.push_back({s, all});
  }
  {
    Spec s = medium("relu2_bias");
    s.act = Activation::Relu2;
    s.biases = true;
    v.push_back({s, all});
  }
  {
    Spec s = medium("lora_gateup");
    s.lora = true;
    v.push_back({s, all});
  }
  {
    Spec s = medium("lora_upgate_interleaved16");
    s.lora = true;
    s.order = GateUpOrder::UpGate;
    s.layout = WeightLayout::GateUpInterleaved;
    s.interleave = 16;
    v.push_back({s, all});
  }
  {
    Spec s = medium("lora_relu2");
    s.lora = true;
    s.act = Activation::Relu2;
    v.push_back({s, all});
  }
  {
    Spec s = medium("packed_topk_invalid_ids");
    s.topk = TopkForm::Packed;
    s.invalid_ids = true;
    v.push_back({s, all});
  }
  {
    Spec s = medium("bf16_topk_no_finalize");
    s.topk = TopkForm::BF16;
    v.push_back({s, Mode{false, true, true, false}});
  }
  {
    Spec s = medium("no_finalize_ep2");
    s.ep_size = 2;
    s.ep_rank = 1;
    s.biases = true;
    v.push_back({s, Mode{false, true, true, false}});
  }
  {
    Spec s = medium("batched_swiglu");
    s.batched = true;
    s.tokens = 100;
    v.push_back({s, Mode{false}});
  }
  {
    Spec s = medium("batched_oai_bias_per_expert");
    s.batched = true;
    s.act = Activation::SwigluOai;
    s.biases = true;
    s.per_expert_act = true;
    s.x_std = 1.0f;
    s.tokens = 64;
    v.push_back({s, Mode{false}});
  }
  {
    Spec s = medium("router_weight_on_input");
    s.top_k = 1;
    s.on_input = true;
    s.tokens = 150;
    v.push_back({s, all});
  }
  {
    Spec s = medium("one_token");
    s.tokens = 1;
    v.push_back({s, all});
  }
  return v;
}

class Features : public GpuExpertsP<FeatureCase> {};

TEST_P(Features, MatchReference) {
  const FeatureCase& c = GetParam();
  Spec s = c.spec;
  s.salt = 200 + std::hash<std::string>{}(s.name) % 1000;
  expect_close(make_problem(s), c.mode);
}

INSTANTIATE_TEST_SUITE_P(Cases, Features, ::testing::ValuesIn(feature_cases()),
                         [](const auto& info) { return info.param.spec.name; });

// ---------------------------------------------------------------------------------------
// Expert parallel, invalid ids, batched edges, determinism, graphs, M = 0
// ---------------------------------------------------------------------------------------

TEST_F(GpuExperts, ExpertParallelSlicesSumToSingleSlice) {
  Spec s = medium("ep");
  s.biases = true;
  s.tokens = 150;
  s.salt = 300;
  const Problem p = make_problem(s);
  const Side whole = test_side(p, p.map);
  Runner single(p, whole, Mode{});
  const std::vector<double> ref = test::to_double(single.run().out);
  for (int ep : {2, 4}) {
    std::vector<double> sum(ref.size(), 0.0);
    for (int r = 0; r < ep; ++r) {
      const ExpertMap map = ExpertMap::for_rank(s.num_experts, ep, r);
      const Side side = test_side(p, map);
      Runner runner(p, side, Mode{});
      const std::vector<double> part = test::to_double(runner.run().out);
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    const double err = test::rel_l2(sum, ref);
    std::printf("ep_size %d: sum of slices vs one slice: rel L2 %.3g\n", ep, err);
    EXPECT_LT(err, kTol) << "ep_size " << ep;
  }
}

TEST_F(GpuExperts, InvalidAndRemoteIdsContributeNothing) {
  Spec s;
  s.name = "invalid_ids";
  s.small_int = true;
  s.act = Activation::Relu2;
  s.num_experts = 16;
  s.top_k = 4;
  s.tokens = 120;
  s.ep_size = 4;
  s.ep_rank = 2;
  s.invalid_ids = true;
  s.salt = 400;
  Problem p = make_problem(s);
  const Mode mode{true, true, false, false};
  Result first;
  {
    const Side gpu = test_side(p, p.map);
    Runner runner(p, gpu, mode);
    first = runner.run();
    const Result ref = reference_full(p, p.map, gpu, mode);
    EXPECT_TRUE(test::bitwise_equal(first.out, ref.out)) << "out vs reference";
    expect_metadata_equal(first, ref);
  }
  // Rows with no local expert are exactly zero; non-local slots are -1 with weight 0.
  int64_t empty_rows = 0;
  for (int64_t m = 0; m < p.M(); ++m) {
    bool any_local = false;
    for (int j = 0; j < s.top_k; ++j) {
      const int id = p.slot(m, j).first;
      any_local |= p.map.is_local(id);
      if (!p.map.is_local(id)) {
        EXPECT_EQ(first.e2p.data<int32_t>()[m * s.top_k + j], -1) << "slot " << m << "," << j;
        EXPECT_EQ(first.expert_weights.data<float>()[m * s.top_k + j], 0.0f);
      }
    }
    if (any_local) continue;
    ++empty_rows;
    for (int64_t h = 0; h < s.hidden; ++h) {
      ASSERT_EQ(first.out.data<uint16_t>()[m * s.hidden + h], 0) << "row " << m << " col " << h;
    }
  }
  std::printf("%lld of %lld rows have no local expert\n", (long long)empty_rows,
              (long long)p.M());
  EXPECT_GT(empty_rows, 0);
  // Swapping one kind of non-local id for another changes no bit.
  auto* ids = p.ids.data<int32_t>();
  for (int64_t x = 0; x < p.M() * s.top_k; ++x) {
    if (p.map.is_local(ids[x])) continue;
    ids[x] = ids[x] == -1 ? s.num_experts : (ids[x] == s.num_experts ? 0 : -1);
  }
  const Side gpu = test_side(p, p.map);
  Runner runner(p, gpu, mode);
  const Result second = runner.run();
  EXPECT_TRUE(test::bitwise_equal(second.out, first.out));
  EXPECT_TRUE(test::bitwise_equal(second.e2p, first.e2p));
}

TEST_F(GpuExperts, BatchedCorruptCountsAreClamped) {
  if (!has_gpu()) GTEST_SKIP() << "the reference rejects such counts on the host";
  Spec s = medium("batched_corrupt");
  s.batched = true;
  s.tokens = 40;
  s.salt = 500;
  Problem p = make_problem(s);
  const Side gpu = [&] {
    Problem bad = make_problem(s);
    bad.counts.data<int32_t>()[2] = 1000;  // > max_m
    bad.counts.data<int32_t>()[3] = -7;
    return test_side(bad, bad.map);
  }();
  Runner runner(p, gpu, Mode{false});
  const Result got = runner.run();
  p.counts.data<int32_t>()[2] = static_cast<int32_t>(s.tokens);
  p.counts.data<int32_t>()[3] = 0;
  const Result ref = reference_full(p, p.map, gpu, Mode{false});
  EXPECT_LT(rel_l2(got.gemm2_out, ref.gemm2_out), kTol);
  // Expert 3's rows are all zero (count clamped to 0).
  const HostTensor& g2 = got.gemm2_out;
  for (int64_t i = 3 * s.tokens * s.hidden; i < 4 * s.tokens * s.hidden; ++i) {
    ASSERT_EQ(g2.data<uint16_t>()[i], 0) << "element " << i;
  }
}

TEST_F(GpuExperts, RepeatedRunsAndGraphReplayAreBitwiseEqual) {
  Spec s = medium("determinism");
  s.tokens = 333;
  s.biases = true;
  s.lora = true;
  s.topk = TopkForm::Packed;
  s.invalid_ids = true;
  s.salt = 600;
  const Problem p = make_problem(s);
  const Side gpu = test_side(p, p.map);
  for (const Mode mode : {Mode{true, true, true, true}, Mode{false, true, true, false}}) {
    Runner runner(p, gpu, mode);
    const Result a = runner.run();
    for (int rep = 0; rep < 3; ++rep) {
      const Result b = runner.run();
      EXPECT_TRUE(test::bitwise_equal(b.out, a.out)) << "run " << rep;
      EXPECT_TRUE(test::bitwise_equal(b.gemm2_out, a.gemm2_out)) << "run " << rep;
      EXPECT_TRUE(test::bitwise_equal(b.act, a.act)) << "run " << rep;
      EXPECT_TRUE(test::bitwise_equal(b.e2p, a.e2p)) << "run " << rep;
    }
    if (!has_gpu()) continue;
    const std::vector<Result> replays = runner.graph_replays(2);
    for (size_t rep = 0; rep < replays.size(); ++rep) {
      const Result& g = replays[rep];
      EXPECT_TRUE(test::bitwise_equal(g.out, a.out)) << "graph replay " << rep;
      EXPECT_TRUE(test::bitwise_equal(g.gemm2_out, a.gemm2_out)) << "graph replay " << rep;
      EXPECT_TRUE(test::bitwise_equal(g.act, a.act)) << "graph replay " << rep;
      EXPECT_TRUE(test::bitwise_equal(g.expert_weights, a.expert_weights));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The sm90 kernel (TMA + wgmma) forced into each of its configs, and split-K
// ---------------------------------------------------------------------------------------

bool is_sm90() {
  if (!has_gpu()) return false;
  const cuda::gemm::DeviceProps p = cuda::gemm::DeviceProps::query(0);
  return p.cc_major == 9 && p.cc_minor == 0;
}

using test::ScopedEnv;

std::string sm90_config_name(bool wide) {
  for (const auto& c : cuda::gemm::compiled_configs()) {
    if (c.arch == 90 && (c.block_m > 64) == wide) return c.to_string();
  }
  return "none";
}

void expect_bitwise(const Problem& p, const Mode& mode) {
  const Side gpu = test_side(p, p.map);
  Runner runner(p, gpu, mode);
  const Result got = runner.run();
  const Result ref = reference_full(p, p.map, gpu, mode);
  if (p.s.batched) {
    EXPECT_TRUE(test::bitwise_equal(got.gemm2_out, ref.gemm2_out)) << "gemm2_out";
    return;
  }
  if (mode.do_finalize) EXPECT_TRUE(test::bitwise_equal(got.out, ref.out)) << "out";
  if (!mode.do_finalize || mode.with_meta) expect_metadata_equal(got, ref);
  const int64_t P = permuted_rows(ref, p.map.num_local_experts);
  if (!mode.do_finalize || mode.with_gemm2) {
    EXPECT_TRUE(test::bitwise_equal(first_rows(got.gemm2_out, P), first_rows(ref.gemm2_out, P)))
        << "gemm2_out, P = " << P;
  }
  if (mode.with_act) {
    EXPECT_TRUE(test::bitwise_equal(first_rows(got.act, P), first_rows(ref.act, P)))
        << "gemm1_activation_output, P = " << P;
  }
}

struct Sm90Case {
  bool wide;
  BitwiseCase c;
};

std::vector<Sm90Case> sm90_bitwise_cases() {
  std::vector<Sm90Case> v;
  for (bool wide : {false, true}) {
    for (const BitwiseCase& c : bitwise_cases()) v.push_back({wide, c});
  }
  return v;
}

class Sm90SmallIntBitwise : public GpuExpertsP<Sm90Case> {};

// Every small-integer case of SmallIntBitwise (non-gated GEMM1, both GEMMs on the sm90 kernel)
// with each sm90 config forced.
TEST_P(Sm90SmallIntBitwise, EqualsReference) {
  if (!is_sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
  const Sm90Case& c = GetParam();
  ScopedEnv force("MODMOE_GEMM_CONFIG", sm90_config_name(c.wide));
  expect_bitwise(make_problem(c.c.spec), c.c.mode);
}

INSTANTIATE_TEST_SUITE_P(Cases, Sm90SmallIntBitwise, ::testing::ValuesIn(sm90_bitwise_cases()),
                         [](const auto& info) {
                           return std::string(info.param.wide ? "wide_" : "narrow_") +
                                  info.param.c.spec.name;
                         });

// Gated GEMM1 on the sm90 kernel: GateUpInterleaved with G = 8, small integers, so GEMM1's
// sums are exact and the activation outputs may differ from the host's only where expf rounds
// differently (1 bf16 ulp, rarely). Both configs, with and without split-K.
struct Sm90GatedCase {
  std::string name;
  bool wide;
  int split;
  Activation act;
  int64_t tokens, hidden, inter;
};

class Sm90Gated : public GpuExpertsP<Sm90GatedCase> {};

TEST_P(Sm90Gated, InterleavedG8WithinOneUlp) {
  if (!is_sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
  const Sm90GatedCase& c = GetParam();
  ScopedEnv force("MODMOE_GEMM_CONFIG", sm90_config_name(c.wide));
  ScopedEnv split("MODMOE_GEMM_SPLIT_K", std::to_string(c.split));
  Spec s;
  s.name = c.name;
  s.small_int = true;
  s.act = c.act;
  s.hidden = c.hidden;
  s.inter = c.inter;
  s.tokens = c.tokens;
  s.biases = true;
  s.lora = true;
  s.layout = WeightLayout::GateUpInterleaved;
  s.interleave = 8;
  s.salt = 900 + std::hash<std::string>{}(c.name) % 100;
  const Problem p = make_problem(s);
  const Side gpu = test_side(p, p.map);
  const Mode mode{true, true, true, true};
  Runner runner(p, gpu, mode);
  const Result got = runner.run();
  const Result ref = reference_full(p, p.map, gpu, mode);
  const int64_t P = permuted_rows(ref, p.map.num_local_experts);
  const HostTensor act_got = first_rows(got.act, P);
  const HostTensor act_ref = first_rows(ref.act, P);
  const UlpReport r = ulp_report(act_got, act_ref);
  const double out_err = rel_l2(got.out, ref.out);
  std::printf("%s: activation outputs %lld of %lld differ, max %lld ulp; out rel L2 %.3g\n",
              c.name.c_str(), (long long)r.differ, (long long)(P * s.inter), (long long)r.max_ulp,
              out_err);
  EXPECT_LE(r.max_ulp, 1);
  EXPECT_LE(r.differ, P * s.inter / 100 + 1);
  EXPECT_LT(out_err, 2e-3);
  expect_metadata_equal(got, ref);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, Sm90Gated,
    ::testing::Values(
        Sm90GatedCase{"narrow_swiglu", false, 1, Activation::Swiglu, 90, 64, 128},
        Sm90GatedCase{"wide_swiglu", true, 1, Activation::Swiglu, 300, 192, 192},
        Sm90GatedCase{"narrow_oai", false, 1, Activation::SwigluOai, 70, 128, 64},
        Sm90GatedCase{"wide_oai", true, 1, Activation::SwigluOai, 200, 64, 128},
        // ~275 and ~75 rows per expert: tiles with tail rows (on by default).
        Sm90GatedCase{"wide_tail_swiglu", true, 1, Activation::Swiglu, 1100, 128, 128},
        Sm90GatedCase{"narrow_tail_oai", false, 1, Activation::SwigluOai, 300, 128, 64},
        // Decode shapes: <= 16 rows per expert, K long enough for 3 and 4 slices (k-blocks
        // of 64, at least 4 per slice).
        Sm90GatedCase{"split3_swiglu", false, 3, Activation::Swiglu, 5, 1024, 64},
        Sm90GatedCase{"split4_swiglu_both", false, 4, Activation::Swiglu, 2, 1024, 1024},
        Sm90GatedCase{"split2_oai", false, 2, Activation::SwigluOai, 1, 512, 512}),
    [](const auto& info) { return info.param.name; });

// Split-K on small integers (Relu2: every value exact): bitwise equal to the reference, and to
// itself from run to run and under graph replay.
TEST_F(GpuExperts, Sm90SplitKBitwiseAndDeterministic) {
  if (!is_sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
  ScopedEnv force("MODMOE_GEMM_CONFIG", sm90_config_name(false));
  for (int split : {2, 3, 8}) {
    ScopedEnv sk("MODMOE_GEMM_SPLIT_K", std::to_string(split));
    Spec s;
    s.name = "split_relu2";
    s.small_int = true;
    s.act = Activation::Relu2;
    s.num_experts = 16;
    s.top_k = 4;
    s.tokens = 3;  // 12 rows: at most 12 per expert
    // NOTE: sizes that keep every partial sum an integer below 2^24 (exact in any order):
    // GEMM1 splits 2..8 ways (32 k-blocks), GEMM2 at most 2 (8 k-blocks).
    s.hidden = 2048;
    s.inter = 512;
    s.biases = true;
    s.salt = 950 + split;
    const Problem p = make_problem(s);
    const Mode mode{true, true, true, true};
    expect_bitwise(p, mode);
    const Side gpu = test_side(p, p.map);
    Runner runner(p, gpu, mode);
    const Result a = runner.run();
    for (int rep = 0; rep < 3; ++rep) {
      const Result b = runner.run();
      EXPECT_TRUE(test::bitwise_equal(b.out, a.out)) << "split " << split << " run " << rep;
      EXPECT_TRUE(test::bitwise_equal(b.act, a.act)) << "split " << split << " run " << rep;
    }
  }
}

// Random inputs through the path a Hopper user gets: prepare_weights (GateUpInterleaved,
// G = 8) and the selected configs, at decode, middle and prefill sizes of the presets.
struct Sm90PresetCase {
  std::string preset;
  int64_t tokens;
  std::string force;  // "" = selected
};

class Sm90Presets : public GpuExpertsP<Sm90PresetCase> {};

TEST_P(Sm90Presets, MatchReference) {
  if (!is_sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
  const Sm90PresetCase& c = GetParam();
  std::unique_ptr<ScopedEnv> force;
  if (!c.force.empty()) force = std::make_unique<ScopedEnv>("MODMOE_GEMM_CONFIG", c.force);
  const Preset pr = find_preset(c.preset);
  Spec s;
  s.name = case_name(c.preset, c.tokens);
  s.num_experts = pr.num_experts;
  s.top_k = pr.top_k;
  s.hidden = pr.hidden;
  s.inter = pr.intermediate;
  s.tokens = c.tokens;
  s.act = pr.activation;
  s.biases = pr.has_biases;
  if (pr.num_experts == 256) {
    s.ep_size = 8;
    s.ep_rank = 5;
  }
  s.device_weights = true;
  s.sample_tokens = 16;
  s.salt = 1100 + static_cast<uint64_t>(c.tokens);
  const Problem p = make_problem(s);
  const Side gpu = test_side(p, p.map);
  // The kernel layout, as at load time.
  DeviceTensor w13i(DType::BF16, {p.map.num_local_experts, p.rows13, s.hidden});
  DeviceTensor w2i(DType::BF16, {p.map.num_local_experts, s.hidden, s.inter});
  DeviceTensor b13i, b2i;
  ExpertWeights prepared;
  prepared.w13 = w13i.view();
  prepared.w2 = w2i.view();
  if (gpu.ew.w13_bias.defined()) {
    b13i.reset(DType::F32, {p.map.num_local_experts, p.rows13});
    b2i.reset(DType::F32, {p.map.num_local_experts, s.hidden});
    prepared.w13_bias = b13i.view();
    prepared.w2_bias = b2i.view();
  }
  prepare_weights(gpu.ew, prepared);
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  Side prep;
  prep.map = gpu.map;
  prep.in = gpu.in;
  prep.ew = prepared;
  prep.act = gpu.act;
  Runner runner(p, prep, Mode{});
  const Result got = runner.run();
  const std::vector<int64_t> tokens = sample_tokens(p.M(), s.sample_tokens);
  const HostTensor ref = reference_rows(p, p.map, gpu, tokens);
  const double err = rel_l2(take_rows(got.out, tokens), ref);
  std::printf("%s %s: E_local %d, %zu tokens checked: rel L2 %.3g\n", s.name.c_str(),
              c.force.empty() ? "(selected)" : c.force.c_str(), p.map.num_local_experts,
              tokens.size(), err);
  EXPECT_LT(err, kTol);
  double all = 0;
  for (double v : test::to_double(got.out)) all += v * v;
  EXPECT_TRUE(std::isfinite(all)) << "an out row was not written";
  // Run to run: the same bits.
  const Result again = runner.run();
  EXPECT_TRUE(test::bitwise_equal(again.out, got.out)) << "second run differs";
}

INSTANTIATE_TEST_SUITE_P(
    All, Sm90Presets,
    ::testing::Values(Sm90PresetCase{"qwen3-30b-a3b", 1, ""}, Sm90PresetCase{"qwen3-30b-a3b", 16, ""},
                      Sm90PresetCase{"qwen3-30b-a3b", 1000, ""},
                      Sm90PresetCase{"qwen3-30b-a3b", 4096, ""},
                      Sm90PresetCase{"mixtral-8x7b", 1, ""}, Sm90PresetCase{"mixtral-8x7b", 3000, ""},
                      Sm90PresetCase{"deepseek-v3", 1, ""}, Sm90PresetCase{"deepseek-v3", 700, ""},
                      Sm90PresetCase{"gpt-oss-120b", 1, ""}, Sm90PresetCase{"gpt-oss-120b", 2000, ""},
                      Sm90PresetCase{"qwen3-30b-a3b", 77, "sm90_256x128x64_s4"},
                      Sm90PresetCase{"gpt-oss-120b", 300, "sm90_64x128x64_s8"}),
    [](const auto& info) {
      return case_name(info.param.preset, info.param.tokens) +
             (info.param.force.empty() ? "" : (info.param.force.find("256") != std::string::npos
                                                    ? "_wide"
                                                    : "_narrow"));
    });

// Graph replay of the sm90 path (decode with split-K, and wide tiles): same bits as eager.
TEST_F(GpuExperts, Sm90GraphReplayIsBitwiseEqual) {
  if (!is_sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
  for (const bool decode : {true, false}) {
    Spec s = medium(decode ? "sm90_graph_decode" : "sm90_graph_wide");
    s.layout = WeightLayout::GateUpInterleaved;
    s.interleave = 8;
    s.biases = true;
    s.hidden = 1024;
    s.inter = decode ? 512 : 256;
    s.tokens = decode ? 3 : 700;
    s.salt = decode ? 1201 : 1202;
    std::unique_ptr<ScopedEnv> force, split;
    if (decode) {
      force = std::make_unique<ScopedEnv>("MODMOE_GEMM_CONFIG", sm90_config_name(false));
      split = std::make_unique<ScopedEnv>("MODMOE_GEMM_SPLIT_K", "3");
    } else {
      force = std::make_unique<ScopedEnv>("MODMOE_GEMM_CONFIG", sm90_config_name(true));
    }
    const Problem p = make_problem(s);
    const Side gpu = test_side(p, p.map);
    const Mode mode{true, true, true, true};
    Runner runner(p, gpu, mode);
    const Result a = runner.run();
    const Result ref = reference_full(p, p.map, gpu, mode);
    EXPECT_LT(rel_l2(a.out, ref.out), kTol) << s.name;
    const std::vector<Result> replays = runner.graph_replays(3);
    for (size_t rep = 0; rep < replays.size(); ++rep) {
      const Result& g = replays[rep];
      EXPECT_TRUE(test::bitwise_equal(g.out, a.out)) << s.name << " replay " << rep;
      EXPECT_TRUE(test::bitwise_equal(g.gemm2_out, a.gemm2_out)) << s.name << " replay " << rep;
      EXPECT_TRUE(test::bitwise_equal(g.act, a.act)) << s.name << " replay " << rep;
    }
  }
}

// Tail rows (GemmConfig::tail_m): the last row tile of an expert takes up to 16 (narrow) or
// 32 (wide) rows past block_m. Small integers, bitwise equal to the reference, with the tail on
// and off, through the gather (standard GEMM1) and TMA (batched GEMM1, every GEMM2) producers.
// Counts per expert around 75 (narrow) and 275-300 (wide) land on both sides of each limit.
struct TailCase {
  std::string name;
  bool wide;
  bool tail;
  bool batched;
  int64_t tokens;
};

class Sm90TailRows : public GpuExpertsP<TailCase> {};

TEST_P(Sm90TailRows, EqualsReference) {
  if (!is_sm90()) GTEST_SKIP() << "needs an sm_90 GPU";
  const TailCase& c = GetParam();
  ScopedEnv force("MODMOE_GEMM_CONFIG", sm90_config_name(c.wide));
  ScopedEnv tail("MODMOE_GEMM_TAIL", c.tail ? "1" : "0");
  Spec s;
  s.name = c.name;
  s.small_int = true;
  s.act = Activation::Relu2;
  s.biases = true;
  s.lora = !c.batched;
  s.batched = c.batched;
  s.tokens = c.tokens;
  s.salt = 1300 + std::hash<std::string>{}(c.name) % 100;
  const Problem p = make_problem(s);
  expect_bitwise(p, c.batched ? Mode{false, false, false, false} : Mode{true, true, true, true});
}

std::vector<TailCase> tail_cases() {
  std::vector<TailCase> v;
  for (bool tail : {true, false}) {
    const std::string t = tail ? "_tail" : "_notail";
    // E = 8, k = 2: 2 * tokens / 8 rows per expert.
    v.push_back({"narrow_std" + t, false, tail, false, 300});   // ~75 per expert
    v.push_back({"narrow_batched" + t, false, tail, true, 80});  // counts 0, 80, random
    v.push_back({"wide_std" + t, true, tail, false, 1100});     // ~275 per expert
    v.push_back({"wide_std300" + t, true, tail, false, 1200});  // ~300: 256 + ~44
    v.push_back({"wide_batched" + t, true, tail, true, 300});   // counts 0, 300, random
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, Sm90TailRows, ::testing::ValuesIn(tail_cases()),
                         [](const auto& info) { return info.param.name; });

// Both permute paths of the stage, whichever the default takes at a size: the one-block
// permute_prepare_kernel (MODMOE_FUSED_PERMUTE=1) and the chunked permute kernels with the
// separate work-list kernel (=0), bitwise equal to the reference on every small-integer case,
// metadata included.
class OneBlockPermute : public GpuExpertsP<BitwiseCase> {};

TEST_P(OneBlockPermute, EqualsReference) {
  const BitwiseCase& c = GetParam();
  ScopedEnv one_block("MODMOE_FUSED_PERMUTE", "1");
  expect_bitwise(make_problem(c.spec), c.mode);
}

TEST_P(OneBlockPermute, ChunkedPathEqualsReference) {
  const BitwiseCase& c = GetParam();
  ScopedEnv chunked("MODMOE_FUSED_PERMUTE", "0");
  expect_bitwise(make_problem(c.spec), c.mode);
}

INSTANTIATE_TEST_SUITE_P(Cases, OneBlockPermute, ::testing::ValuesIn(bitwise_cases()),
                         [](const auto& info) { return info.param.spec.name; });

TEST_F(GpuExperts, EmptyBatch) {
  for (const bool batched : {false, true}) {
    Spec s = medium(batched ? "empty_batched" : "empty");
    s.tokens = batched ? 16 : 0;
    s.batched = batched;
    s.salt = 700;
    Problem p = make_problem(s);
    if (batched) {
      for (int e = 0; e < p.map.num_local_experts; ++e) p.counts.data<int32_t>()[e] = 0;
    }
    const Side gpu = test_side(p, p.map);
    for (const Mode mode : {Mode{true}, Mode{false}}) {
      Runner runner(p, gpu, mode);
      const Result got = runner.run();
      if (batched) {
        for (int64_t i = 0; i < got.gemm2_out.numel(); ++i) {
          ASSERT_EQ(got.gemm2_out.data<uint16_t>()[i], 0) << "element " << i;
        }
      } else if (!mode.do_finalize) {
        for (int e = 0; e <= p.map.num_local_experts; ++e) {
          EXPECT_EQ(got.offsets.data<int64_t>()[e], 0) << "expert_first_token_offset " << e;
        }
      }
      if (batched) break;  // batched has one mode
    }
  }
}

}  // namespace
}  // namespace modmoe
