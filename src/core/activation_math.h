// The activation functions in fp32, one expression each, shared by the CPU reference and the
// CUDA kernels so that both evaluate the same formula (docs/contract.md, "Weights").
// Header-only; includes no CUDA header and compiles as plain C++ or under nvcc.
#pragma once

#include <math.h>

#include "modmoe/experts.h"

#include "core/hd.h"

namespace modmoe::act {

// NOTE: written as x / (1 + exp(-x)) rather than x * sigmoid(x): one rounding fewer, and
// for x -> -inf it gives -0 instead of NaN (exp overflows to inf, x / inf = -0).
MODMOE_HD inline float silu(float x) { return x / (1.0f + expf(-x)); }

MODMOE_HD inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Exact (erf) gelu: 0.5 * x * (1 + erf(x / sqrt(2))).
MODMOE_HD inline float gelu_erf(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

// gpt-oss SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit),
// act = g * sigmoid(alpha * g) * (u + beta).
// NOTE: comparisons instead of fminf/fmaxf so that a NaN input stays NaN (as torch.clamp
// does); fminf(NaN, limit) would return limit and hide it.
MODMOE_HD inline float swiglu_oai(float gate, float up, float alpha, float beta, float limit) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  return g / (1.0f + expf(-alpha * g)) * (u + beta);
}

// relu(x)^2; non-gated, so only `gate` (the single GEMM1 output) is used. NaN stays NaN.
MODMOE_HD inline float relu2(float x) {
  const float r = x < 0.0f ? 0.0f : x;
  return r * r;
}

// The activation of one intermediate column from its fp32 GEMM1 outputs (bias and LoRA delta
// already added). `up` is ignored by the non-gated Relu2; alpha/beta/limit by all but
// SwigluOai.
MODMOE_HD inline float apply_activation(Activation kind, float gate, float up, float alpha,
                                        float beta, float limit) {
  switch (kind) {
    case Activation::Swiglu: return silu(gate) * up;
    case Activation::SwigluOai: return swiglu_oai(gate, up, alpha, beta, limit);
    case Activation::Geglu: return gelu_erf(gate) * up;
    case Activation::Relu2: return relu2(gate);
  }
  return NAN;  // unreachable for a validated kind; NaN makes a bad one visible
}

}  // namespace modmoe::act
