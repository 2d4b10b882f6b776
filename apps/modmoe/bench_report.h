// The table and the JSON of `modmoe bench experts` (GPU runs): one row per cell as it is
// measured, then the summary. bf16 prints what it always printed; a quantized dtype adds the
// same run's bf16 time, the share of the copy ceiling on its weight bytes, and the issue's
// targets (bench_dtype.h).
#pragma once

#ifdef MODMOE_WITH_CUDA
#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "bench_cell.h"
#include "bench_common.h"

namespace modmoe::app {

struct CellResult {
  std::string model;
  bool zipf = false;
  CellShape shape;
  DtypeRun run;   // the run's dtype
  DtypeRun bf16;  // quantized dtypes: the same cell in bf16
  // nvfp4 runs, models with H and I multiples of 128: the same cell in fp8-block
  std::optional<DtypeRun> fp8;
};

class Report {
 public:
  // torch_base: bench/compare.py's baseline ({"<model>/<T>/<routing>": us, ...} plus, for a
  // quantized dtype, "dtype" and the notes "op", "note", "error"); may be empty.
  Report(BenchDtype dtype, const Ceilings& ceil, std::vector<std::string> ab,
         nlohmann::json torch_base);
  void print_header(const std::string& gpu) const;
  void add(const CellResult& c);  // prints the row and keeps it
  // Prints the summary; returns header + cells + summary (+ the torch baseline's notes).
  nlohmann::json finish(nlohmann::json header) const;

 private:
  // What the summary needs of a grid cell (uniform routing, a T of ANCHORS.md).
  struct GridCell {
    std::string key;  // "<model>/<T>"
    int64_t tokens = 0, intermediate = 0;
    double time_over_floor = 0, speedup_vs_bf16 = 0, copy_fraction = 0;
    bool correct = false;
  };
  nlohmann::json finish_quantized(nlohmann::json summary) const;

  BenchDtype dtype_;
  Ceilings ceil_;
  std::vector<std::string> ab_;
  nlohmann::json torch_base_;
  nlohmann::json cells_ = nlohmann::json::array();
  std::vector<GridCell> grid_;
};

}  // namespace modmoe::app
#endif
