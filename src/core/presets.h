// Built-in model presets: the real MoE-layer shapes and routing of five models, used by
// `modmoe demo`, `modmoe bench` and the tests.
#pragma once

#include <string>
#include <vector>

#include "modmoe/experts.h"
#include "modmoe/routing.h"

namespace modmoe {

struct Preset {
  std::string name;
  int num_experts = 0;  // E
  int top_k = 0;
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I, per expert
  RoutingParams routing;     // method and group parameters (num_experts/top_k filled in)
  Activation activation = Activation::Swiglu;
  bool has_biases = false;   // gpt-oss: w13 and w2 biases
  std::string note;

  // The same model with H and I cut to at most `max_hidden` / `max_intermediate` (rounded to
  // multiples of 64) and E, k unchanged: what the CPU reference runs in a second or two.
  Preset scaled_down(int64_t max_hidden = 512, int64_t max_intermediate = 256) const;
  std::string shape_string() const;  // "E=256 k=8 H=7168 I=2048"
};

const std::vector<Preset>& presets();
// A preset of the given shape, routing method and activation (group parameters left unset).
Preset make_preset(const std::string& name, int num_experts, int top_k, int64_t hidden,
                   int64_t intermediate, RoutingMethod method, Activation activation,
                   const std::string& note = "");
// Throws modmoe::Error listing the known names when `name` is unknown.
const Preset& find_preset(const std::string& name);

}  // namespace modmoe
