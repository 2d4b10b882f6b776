// Loader and comparator for the golden routing data in tests/data/routing/ (see its README.md).
// Header-only and backend-free: it reads the JSON files into host vectors and compares host
// arrays, so the CPU and the CUDA routing tests share it.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#include "common/test_util.h"

#include <nlohmann/json.hpp>

#ifndef MODMOE_TEST_DATA_DIR
#error "MODMOE_TEST_DATA_DIR must point at tests/data (tests/CMakeLists.txt defines it)"
#endif

namespace modmoe::test {

struct RoutingGoldenCase {
  std::string label;
  int num_tokens = 0;   // T
  int num_experts = 0;  // E
  int top_k = 0;        // k
  int n_group = 0;      // DeepSeekV3 only, else 0
  int topk_group = 0;   // DeepSeekV3 only, else 0
  float routed_scaling_factor = 1.0f;  // DeepSeekV3 only, else 1
  std::string logits_dtype;            // "float32", or "bf16" when logits and bias are exact in bf16
  std::vector<float> logits;           // [T, E]
  std::vector<float> bias;             // [E], empty when the case has none
  std::vector<int32_t> topk_ids;       // [T, k], each row sorted by descending weight
  std::vector<float> topk_weights;     // [T, k], aligned with topk_ids

  bool bf16_exact() const { return logits_dtype == "bf16"; }
};

struct RoutingGolden {
  int method = -1;   // FlashInfer RoutingMethodType value
  std::string name;  // "Default", "DeepSeekV3", ...
  std::string path;  // the file it came from
  std::vector<RoutingGoldenCase> cases;
};

// The six golden files, in method order.
inline std::vector<std::string> routing_golden_files() {
  return {"routing_m0_default.json",  "routing_m1_renormalize.json",
          "routing_m2_deepseekv3.json", "routing_m3_llama4.json",
          "routing_m4_renormalize_naive.json", "routing_m5_topk.json"};
}

namespace detail {

inline std::vector<float> golden_floats(const nlohmann::json& j, size_t expected,
                                        const std::string& what) {
  std::vector<float> out;
  out.reserve(expected);
  auto append = [&](const nlohmann::json& v) {
    // NOTE: the files write 9 significant digits, so double -> float is exact.
    out.push_back(static_cast<float>(v.get<double>()));
  };
  for (const auto& v : j) {
    if (v.is_array()) {
      for (const auto& x : v) append(x);
    } else {
      append(v);
    }
  }
  if (out.size() != expected) {
    throw std::runtime_error("routing golden: '" + what + "' has " + std::to_string(out.size()) +
                             " values, expected " + std::to_string(expected));
  }
  return out;
}

}  // namespace detail

// Loads `file_name` (e.g. "routing_m2_deepseekv3.json") from MODMOE_TEST_DATA_DIR/routing.
// Throws std::runtime_error (or nlohmann::json::exception) on a missing or malformed file.
inline RoutingGolden load_routing_golden(const std::string& file_name) {
  RoutingGolden g;
  g.path = test_data_dir() + "/routing/" + file_name;
  std::ifstream in(g.path);
  if (!in) throw std::runtime_error("routing golden: cannot open " + g.path);
  const nlohmann::json doc = nlohmann::json::parse(in);
  if (doc.at("format").get<std::string>() != "moe-routing-goldens/1") {
    throw std::runtime_error("routing golden: unknown format in " + g.path);
  }
  g.method = doc.at("method").get<int>();
  g.name = doc.at("name").get<std::string>();
  for (const auto& jc : doc.at("cases")) {
    RoutingGoldenCase c;
    c.label = jc.at("label").get<std::string>();
    c.num_tokens = jc.at("T").get<int>();
    c.num_experts = jc.at("E").get<int>();
    c.top_k = jc.at("k").get<int>();
    if (!jc.at("n_group").is_null()) c.n_group = jc.at("n_group").get<int>();
    if (!jc.at("topk_group").is_null()) c.topk_group = jc.at("topk_group").get<int>();
    if (!jc.at("routed_scaling_factor").is_null()) {
      c.routed_scaling_factor = static_cast<float>(jc.at("routed_scaling_factor").get<double>());
    }
    c.logits_dtype = jc.at("logits_dtype").get<std::string>();
    const size_t t = static_cast<size_t>(c.num_tokens);
    const size_t e = static_cast<size_t>(c.num_experts);
    const size_t k = static_cast<size_t>(c.top_k);
    const std::string where = g.path + " case '" + c.label + "' ";
    c.logits = detail::golden_floats(jc.at("logits"), t * e, where + "logits");
    if (!jc.at("bias").is_null()) c.bias = detail::golden_floats(jc.at("bias"), e, where + "bias");
    c.topk_weights = detail::golden_floats(jc.at("topk_weights"), t * k, where + "topk_weights");
    for (const auto& row : jc.at("topk_ids")) {
      for (const auto& id : row) c.topk_ids.push_back(id.get<int32_t>());
    }
    if (c.topk_ids.size() != t * k) {
      throw std::runtime_error(where + "topk_ids has " + std::to_string(c.topk_ids.size()) +
                               " values, expected " + std::to_string(t * k));
    }
    g.cases.push_back(std::move(c));
  }
  return g;
}

// The weight tolerance the README sets: 1e-6 relative, and exact for TopK (method 5), whose
// weights are copies of the logits.
inline double routing_golden_rel_tol(int method) { return method == 5 ? 0.0 : 1e-6; }

// Compares one routed output with a golden case. ids: [T, k] int32, weights: [T, k] fp32, both
// row-major host arrays. Each output row is sorted by descending weight (ties: ascending id)
// before the comparison, so any row order passes; ids must then match exactly and weights
// within |w - w_ref| <= rel_tol * |w_ref|. rel_tol < 0 picks routing_golden_rel_tol(method).
// A NaN weight (e.g. an unwritten, poisoned slot) or an id outside [0, E) fails. The message
// names the case, the row and the slot of the first mismatch.
inline ::testing::AssertionResult compare_routing_to_golden(const RoutingGolden& golden,
                                                            const RoutingGoldenCase& c,
                                                            const int32_t* ids,
                                                            const float* weights,
                                                            double rel_tol = -1.0) {
  if (rel_tol < 0) rel_tol = routing_golden_rel_tol(golden.method);
  const int k = c.top_k;
  auto row_string = [k](const int32_t* row_ids, const float* row_w) {
    std::ostringstream os;
    os.precision(9);
    os << "{";
    for (int j = 0; j < k; ++j) os << (j ? ", " : "") << row_ids[j] << ":" << row_w[j];
    os << "}";
    return os.str();
  };
  std::vector<int> order(static_cast<size_t>(k));
  std::vector<int32_t> sorted_ids(static_cast<size_t>(k));
  std::vector<float> sorted_w(static_cast<size_t>(k));
  for (int t = 0; t < c.num_tokens; ++t) {
    const int32_t* row_ids = ids + static_cast<size_t>(t) * k;
    const float* row_w = weights + static_cast<size_t>(t) * k;
    const int32_t* ref_ids = c.topk_ids.data() + static_cast<size_t>(t) * k;
    const float* ref_w = c.topk_weights.data() + static_cast<size_t>(t) * k;
    auto fail = [&](int slot) {
      return ::testing::AssertionFailure()
             << golden.name << " (method " << golden.method << ") case '" << c.label << "' row "
             << t << " slot " << slot << ": got " << row_string(row_ids, row_w) << ", expected "
             << row_string(ref_ids, ref_w) << " (rows compared after sorting by weight)";
    };
    for (int j = 0; j < k; ++j) {
      if (std::isnan(row_w[j]) || row_ids[j] < 0 || row_ids[j] >= c.num_experts) return fail(j);
    }
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      if (row_w[a] != row_w[b]) return row_w[a] > row_w[b];
      return row_ids[a] < row_ids[b];
    });
    for (int j = 0; j < k; ++j) {
      sorted_ids[j] = row_ids[order[j]];
      sorted_w[j] = row_w[order[j]];
    }
    for (int j = 0; j < k; ++j) {
      const double w = sorted_w[j];
      const double ref = ref_w[j];
      if (sorted_ids[j] != ref_ids[j] || !(std::fabs(w - ref) <= rel_tol * std::fabs(ref))) {
        std::ostringstream os;
        os.precision(9);
        os << ", sorted slot " << j << " has id " << sorted_ids[j] << " weight " << sorted_w[j]
           << " vs id " << ref_ids[j] << " weight " << ref_w[j];
        os.precision(3);
        os << " (rel diff " << std::fabs(w - ref) / std::fabs(ref) << ", tol " << rel_tol << ")";
        return fail(j) << os.str();
      }
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace modmoe::test
