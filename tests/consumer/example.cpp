// Route 4 tokens over 8 experts and run the experts stage on the CPU reference backend.
// The same calls run on a GPU when the views point at CUDA memory (Device::cuda()).
#include <cmath>
#include <cstdio>
#include <vector>

#include <modmoe/modmoe.h>

int main() {
  using namespace modmoe;
  const int T = 4, E = 8, k = 2, H = 64, I = 64;

  std::vector<float> logits(T * E);
  std::vector<uint16_t> x(T * H), w13(E * 2 * I * H), w2(E * H * I);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(0.7f * i);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float_to_bf16_bits(0.1f * std::cos(0.3f * i));
  for (size_t i = 0; i < w13.size(); ++i) w13[i] = float_to_bf16_bits(0.1f * std::sin(0.01f * i));
  for (size_t i = 0; i < w2.size(); ++i) w2[i] = float_to_bf16_bits(0.1f * std::cos(0.02f * i));

  // Stage 1: routing (Mixtral style: top-2 of the logits, softmax over the two).
  std::vector<int32_t> ids(T * k);
  std::vector<float> weights(T * k);
  RoutingParams routing;
  routing.method = RoutingMethod::Renormalize;
  routing.num_experts = E;
  routing.top_k = k;
  route(make_view(logits.data(), DType::F32, {T, E}), TensorView{}, routing,
        make_view(ids.data(), DType::I32, {T, k}), make_view(weights.data(), DType::F32, {T, k}));

  // Stage 3: the modular experts on these tokens, finalized into out [T, H].
  ExpertWeights w;
  w.w13 = make_view(w13.data(), DType::BF16, {E, 2 * I, H});  // [E, 2I, H], gate rows first
  w.w2 = make_view(w2.data(), DType::BF16, {E, H, I});
  ExpertsInputs in;
  in.hidden = make_view(x.data(), DType::BF16, {T, H});
  in.topk_ids = make_view(ids.data(), DType::I32, {T, k});
  in.topk_weights = make_view(weights.data(), DType::F32, {T, k});
  std::vector<uint16_t> out(T * H);
  ExpertsOutputs outs;
  outs.out = make_view(out.data(), DType::BF16, {T, H});
  experts(in, w, ExpertMap::single(E), ExpertsOptions{}, outs);

  std::printf("token 0 -> experts %d, %d (weights %.3f, %.3f); out[0][0] = %.5f\n", ids[0],
              ids[1], weights[0], weights[1], bf16_bits_to_float(out[0]));

  // Bad input is an error that names the argument, never a silent no-op.
  try {
    routing.top_k = 9;
    route(make_view(logits.data(), DType::F32, {T, E}), TensorView{}, routing,
          make_view(ids.data(), DType::I32, {T, k}), make_view(weights.data(), DType::F32, {T, k}));
  } catch (const Error& e) {
    std::printf("example: ok (rejected top_k = 9: %.60s...)\n", e.what());
    return 0;
  }
  return 1;
}
