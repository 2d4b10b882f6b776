// Stage 1 on the GPU: route(logits) -> (topk_ids, topk_weights), methods 0-5.
//
// One warp per token. The warp stages the token's E selection keys (and, for DeepSeekV3,
// the unbiased sigmoid scores) in shared memory, then picks the k winners one at a time:
// each lane keeps the best of its own experts (e = lane + 32 * i), a warp max-reduce
// picks the overall best, and only the owner lane rescans. Every comparison is "larger
// key, then lower id", so the row comes out in descending selection score with ties toward
// the lower id (docs/HELPERS.md item 7), as the CPU reference orders it.
//
// Numerics follow the CPU reference: accurate expf (never __expf), IEEE division, and
// sums over the k picks taken in j order. The softmax denominator over all E experts is
// accumulated in double (a per-lane sum, then a fixed butterfly), so it is within one
// rounding of the exact sum whatever the CPU's summation order.
#include <cuda_bf16.h>

#include <cfloat>
#include <cstdint>

#include "backend.h"
#include "cuda/device/cuda_check.h"

namespace modmoe::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;  // tokens per block
constexpr int kMaxExperts = 512;   // E: up to 16 experts per lane
constexpr int kMaxTopK = 32;       // k: one pick per lane
constexpr int kMaxGroups = 32;     // n_group: one group per lane
constexpr unsigned kFull = 0xffffffffu;

struct RouteArgs {
  const void* logits;     // [T, E] fp32|bf16, row stride logits_stride
  const void* bias;       // [E] fp32|bf16 or nullptr (DeepSeekV3 selection bias)
  int32_t* topk_ids;      // [T, k] int32, global ids
  float* topk_weights;    // [T, k] fp32
  int64_t num_tokens;     // T
  int64_t logits_stride;  // elements between rows of logits
  int num_experts;        // E
  int top_k;              // k
  int method;             // RoutingMethod
  int n_group;            // DeepSeekV3: groups (<= 1 means no group limit)
  int topk_group;         // DeepSeekV3: groups kept
  float routed_scaling_factor;
  bool norm_topk_prob;
};

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// a ranks before b: larger key, ties toward the lower id. As in the CPU reference, NaN ranks
// first, so a NaN logit shows up in the weights instead of vanishing.
__device__ __forceinline__ bool beats(float a, int a_id, float b, int b_id) {
  const bool nan_a = isnan(a), nan_b = isnan(b);
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && a != b) return a > b;
  return a_id < b_id;
}

// The best (key, id) among this lane's candidates e = lane + 32 * i with bit i of `mask`.
__device__ __forceinline__ void lane_best(const float* key, int lane, int num_experts,
                                          uint32_t mask, float& best, int& best_id) {
  best = -INFINITY;
  best_id = INT32_MAX;
  for (int i = 0, e = lane; e < num_experts; ++i, e += 32) {
    if (((mask >> i) & 1u) && beats(key[e], e, best, best_id)) {
      best = key[e];
      best_id = e;
    }
  }
}

// Warp-wide best of the lanes' (key, id); every lane gets the winner.
__device__ __forceinline__ void warp_best(float& best, int& best_id) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(kFull, best, off);
    const int o_id = __shfl_xor_sync(kFull, best_id, off);
    if (beats(o, o_id, best, best_id)) {
      best = o;
      best_id = o_id;
    }
  }
}

// Sum of v over lanes 0..n-1, in lane order; every lane gets the same value.
__device__ __forceinline__ float sum_in_lane_order(float v, int n) {
  float s = 0.0f;
  for (int j = 0; j < n; ++j) s += __shfl_sync(kFull, v, j);
  return s;
}

template <class LogitT, class BiasT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) route_kernel(const RouteArgs args) {
  extern __shared__ float smem[];  // [kWarpsPerBlock][2][E] fp32: key, then score
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (token >= args.num_tokens) return;  // warp-uniform
  const int E = args.num_experts, k = args.top_k;
  float* key = smem + warp * 2 * E;  // [E] the selection score of each expert
  float* score = key + E;            // [E] DeepSeekV3: unbiased sigmoid
  const auto* logits = static_cast<const LogitT*>(args.logits) + token * args.logits_stride;
  const auto method = static_cast<RoutingMethod>(args.method);
  const bool softmax_first =
      method == RoutingMethod::Default || method == RoutingMethod::RenormalizeNaive;

  // 1. The selection keys.
  if (method == RoutingMethod::DeepSeekV3) {
    const auto* bias = static_cast<const BiasT*>(args.bias);
    for (int e = lane; e < E; e += 32) {
      const float s = 1.0f / (1.0f + expf(-load_f(logits, e)));
      score[e] = s;
      key[e] = bias ? s + load_f(bias, e) : s;
    }
  } else if (softmax_first) {
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) {
      const float l = load_f(logits, e);
      key[e] = l;
      m = fmaxf(m, l);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));
    double sum = 0.0;
    for (int e = lane; e < E; e += 32) {
      const float x = expf(key[e] - m);
      key[e] = x;
      sum += x;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    const float denom = static_cast<float>(sum);
    for (int e = lane; e < E; e += 32) key[e] /= denom;
  } else {
    for (int e = lane; e < E; e += 32) key[e] = load_f(logits, e);
  }
  __syncwarp();

  // 2. Candidates: bit i of `mask` is expert lane + 32 * i. DeepSeekV3 keeps only the
  //    experts of the topk_group groups with the largest top-2 sums; the others are out
  //    (as if their key were -inf, but without a key that could still be picked).
  uint32_t mask = 0;
  for (int i = 0; lane + 32 * i < E; ++i) mask |= 1u << i;
  if (method == RoutingMethod::DeepSeekV3 && args.n_group > 1) {
    const int group_size = E / args.n_group;
    float gscore = -INFINITY;
    int gid = INT32_MAX;
    if (lane < args.n_group) {
      float t1 = -INFINITY, t2 = -INFINITY;
      for (int e = lane * group_size; e < (lane + 1) * group_size; ++e) {
        const float v = key[e];
        if (v > t1 || isnan(v)) {
          t2 = t1;
          t1 = v;
        } else if (v > t2) {
          t2 = v;
        }
      }
      gscore = t1 + t2;  // group_size >= 2 (validated)
      gid = lane;
    }
    uint32_t kept = 0;
    for (int g = 0; g < args.topk_group; ++g) {
      float b = gscore;
      int b_id = gid;
      warp_best(b, b_id);
      if (b_id < 32) kept |= 1u << b_id;
      if (lane == b_id) {
        gscore = -INFINITY;
        gid = INT32_MAX;
      }
    }
    for (int i = 0; lane + 32 * i < E; ++i) {
      if (!((kept >> ((lane + 32 * i) / group_size)) & 1u)) mask &= ~(1u << i);
    }
  }

  // 3. Top-k, in order. Lane j keeps pick j.
  float best, pick_key = 0.0f;
  int best_id, pick_id = 0;
  lane_best(key, lane, E, mask, best, best_id);
  for (int j = 0; j < k; ++j) {
    float b = best;
    int b_id = best_id;
    warp_best(b, b_id);
    if (lane == j) {
      pick_key = b;
      pick_id = b_id;
    }
    if (b_id < E && b_id == best_id) {  // this lane owned the winner: drop it, rescan
      mask &= ~(1u << ((b_id - lane) / 32));
      lane_best(key, lane, E, mask, best, best_id);
    }
  }

  // 4. Weights of the picks.
  float w = 0.0f;
  switch (method) {
    case RoutingMethod::Default:
      w = pick_key;
      break;
    case RoutingMethod::RenormalizeNaive:
      w = pick_key / sum_in_lane_order(pick_key, k);
      break;
    case RoutingMethod::Renormalize: {
      const float m = __shfl_sync(kFull, pick_key, 0);  // the largest pick
      const float x = lane < k ? expf(pick_key - m) : 0.0f;
      w = x / sum_in_lane_order(x, k);
      break;
    }
    case RoutingMethod::Llama4:
      w = 1.0f / (1.0f + expf(-pick_key));
      break;
    case RoutingMethod::TopK:
      w = pick_key;
      break;
    case RoutingMethod::DeepSeekV3: {
      const float s = lane < k ? score[pick_id] : 0.0f;
      w = args.norm_topk_prob ? s / sum_in_lane_order(s, k) : s;
      w = w * args.routed_scaling_factor;
      break;
    }
  }
  if (lane < k) {
    args.topk_ids[token * k + lane] = pick_id;
    args.topk_weights[token * k + lane] = w;
  }
}

template <class LogitT>
void launch_for_bias(const RouteArgs& args, DType bias_dtype, bool has_bias, dim3 grid, size_t smem,
                     cudaStream_t stream) {
  if (!has_bias || bias_dtype == DType::F32) {
    route_kernel<LogitT, float><<<grid, kWarpsPerBlock * 32, smem, stream>>>(args);
  } else {
    route_kernel<LogitT, __nv_bfloat16><<<grid, kWarpsPerBlock * 32, smem, stream>>>(args);
  }
  MODMOE_LAUNCH_CHECK(stream);
}

}  // namespace

void route(const TensorView& logits, const TensorView& bias, const RoutingParams& params,
           const TensorView& topk_ids, const TensorView& topk_weights, Stream stream) {
  const int64_t T = logits.size(0);
  const int E = static_cast<int>(logits.size(1));
  const int k = params.top_k;
  MODMOE_CHECK(E >= 1 && E <= kMaxExperts, "cuda::route: num_experts = ", E, ": expected 1 to ",
               kMaxExperts);
  MODMOE_CHECK(k >= 1 && k <= kMaxTopK && k <= E, "cuda::route: top_k = ", k,
               ": expected 1 to min(", kMaxTopK, ", num_experts = ", E, ")");
  MODMOE_CHECK(logits.stride(1) == 1, "cuda::route: logits rows must be contiguous");
  MODMOE_CHECK(topk_ids.is_contiguous() && topk_weights.is_contiguous(),
               "cuda::route: topk_ids and topk_weights must be contiguous");
  const bool deepseek = params.method == RoutingMethod::DeepSeekV3;
  if (deepseek && params.n_group > 1) {
    MODMOE_CHECK(params.n_group <= kMaxGroups && E % params.n_group == 0,
                 "cuda::route: n_group = ", params.n_group, ": expected <= ", kMaxGroups,
                 " and a divisor of num_experts = ", E);
    MODMOE_CHECK(params.topk_group >= 1 && params.topk_group <= params.n_group &&
                     params.topk_group * (E / params.n_group) >= k,
                 "cuda::route: topk_group = ", params.topk_group,
                 ": expected 1 to n_group = ", params.n_group, " with at least top_k = ", k,
                 " experts kept");
  }
  if (T == 0) return;

  RouteArgs args{};
  args.logits = logits.data;
  args.bias = deepseek && bias.defined() ? bias.data : nullptr;
  args.topk_ids = topk_ids.ptr<int32_t>();
  args.topk_weights = topk_weights.ptr<float>();
  args.num_tokens = T;
  args.logits_stride = logits.stride(0);
  args.num_experts = E;
  args.top_k = k;
  args.method = static_cast<int>(params.method);
  args.n_group = deepseek ? params.n_group : 0;
  args.topk_group = params.topk_group;
  args.routed_scaling_factor = params.routed_scaling_factor;
  args.norm_topk_prob = params.norm_topk_prob;

  const dim3 grid(static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const size_t smem = size_t(kWarpsPerBlock) * 2 * E * sizeof(float);  // <= 16 KiB
  const bool has_bias = args.bias != nullptr;
  if (logits.dtype == DType::F32) {
    launch_for_bias<float>(args, bias.dtype, has_bias, grid, smem, stream);
  } else {
    MODMOE_CHECK(logits.dtype == DType::BF16, "cuda::route: logits dtype ",
                 dtype_name(logits.dtype), ": expected float32 or bfloat16");
    launch_for_bias<__nv_bfloat16>(args, bias.dtype, has_bias, grid, smem, stream);
  }
}

}  // namespace modmoe::cuda
