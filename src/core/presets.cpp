#include "core/presets.h"

#include <sstream>

#include "modmoe/error.h"

namespace modmoe {
namespace {

std::vector<Preset> build() {
  std::vector<Preset> v;
  v.push_back(make_preset("mixtral-8x7b", 8, 2, 4096, 14336, RoutingMethod::Renormalize,
                   Activation::Swiglu, "top-2 of the logits, softmax over the two"));
  v.push_back(make_preset("qwen3-30b-a3b", 128, 8, 2048, 768, RoutingMethod::RenormalizeNaive,
                   Activation::Swiglu, "softmax, top-8, renormalised"));
  Preset ds = make_preset("deepseek-v3", 256, 8, 7168, 2048, RoutingMethod::DeepSeekV3,
                   Activation::Swiglu, "sigmoid + bias, 4 of 8 groups, scaled by 2.5");
  ds.routing.n_group = 8;
  ds.routing.topk_group = 4;
  ds.routing.routed_scaling_factor = 2.5f;
  v.push_back(ds);
  Preset oss = make_preset("gpt-oss-120b", 128, 4, 2880, 2880, RoutingMethod::Renormalize,
                    Activation::SwigluOai, "SwiGLU-OAI (alpha 1.702, limit 7) with biases");
  oss.has_biases = true;
  v.push_back(oss);
  Preset glm = make_preset("glm-4.5-air", 128, 8, 4096, 1408, RoutingMethod::DeepSeekV3,
                    Activation::Swiglu, "sigmoid + bias, one group, no group limit");
  glm.routing.n_group = 1;
  glm.routing.topk_group = 1;
  glm.routing.routed_scaling_factor = 1.0f;
  v.push_back(glm);
  return v;
}

int64_t cut(int64_t value, int64_t max_value) {
  if (value <= max_value) return value;
  const int64_t r = max_value / 64 * 64;
  return r < 64 ? 64 : r;
}

}  // namespace

Preset make_preset(const std::string& name, int num_experts, int top_k, int64_t hidden,
                   int64_t intermediate, RoutingMethod method, Activation activation,
                   const std::string& note) {
  Preset p;
  p.name = name;
  p.num_experts = num_experts;
  p.top_k = top_k;
  p.hidden = hidden;
  p.intermediate = intermediate;
  p.routing.method = method;
  p.routing.num_experts = num_experts;
  p.routing.top_k = top_k;
  p.activation = activation;
  p.note = note;
  return p;
}

Preset Preset::scaled_down(int64_t max_hidden, int64_t max_intermediate) const {
  Preset p = *this;
  p.hidden = cut(hidden, max_hidden);
  p.intermediate = cut(intermediate, max_intermediate);
  if (p.hidden != hidden || p.intermediate != intermediate) p.name += " (scaled down)";
  return p;
}

std::string Preset::shape_string() const {
  std::ostringstream os;
  os << "E=" << num_experts << " k=" << top_k << " H=" << hidden << " I=" << intermediate;
  return os.str();
}

const std::vector<Preset>& presets() {
  static const std::vector<Preset> v = build();
  return v;
}

const Preset& find_preset(const std::string& name) {
  std::string known;
  for (const Preset& p : presets()) {
    if (p.name == name) return p;
    known += (known.empty() ? "" : ", ") + p.name;
  }
  MODMOE_FAIL("argument '--preset' = '", name, "': expected one of ", known);
}

}  // namespace modmoe
