// One cell of `modmoe bench experts` (a model, a token count, a routing): its rotated inputs,
// and the run of one dtype's weights on them: validated against float64 first, then timed.
#pragma once

#include <string>
#include <vector>

#include "bench_weights.h"
#include "check.h"

namespace modmoe::app {

// R batches of inputs (R >= 2, more when the activations are small) so that timed replays
// never reuse one batch's activations from L2. Quantized dtypes get `hidden` quantized here,
// outside any timed region, as after a quantize-before-dispatch all-to-all.
struct CellInputs {
  int rotations = 0;
  int experts_touched = 0;  // distinct experts per batch, averaged (rounded down)
  std::vector<Buffer> hidden;  // [T, H] bf16
  // FP8 only, from quantize_activations(hidden): [T, H] e4m3 and its scales (fp8-block
  // [T, H/128], fp8-tensor [1], dynamic).
  std::vector<Buffer> hidden_q, hidden_scale;
  std::vector<Buffer> ids, wts;  // [T, k] int32 global ids, fp32 weights
  std::vector<Buffer> out;       // [T, H] bf16

  // The experts stage's inputs of batch r for weights of `dtype` (FP8: e4m3 + scale).
  ExpertsInputs inputs(int r, BenchDtype dtype) const;
  ExpertsOutputs outputs(int r) const;
};

// k distinct experts per token, uniform or Zipf-like (p ~ 1/rank over a shuffled order).
CellInputs make_cell_inputs(const Layer& layer, int64_t tokens, bool zipf, uint64_t seed,
                            BenchDtype dtype);

// One dtype's run of a cell.
struct DtypeRun {
  SampleCheck check;
  bool correct = false;
  double us = 0;             // CUDA-graph replay median per call; 0 when not timed
  std::vector<double> ab_us;  // per --ab variant
};

// Poisons the output, runs the stage once, checks `samples` sampled tokens against float64
// (check_bounds(weights.dtype, fp8_fast_accum)), then, when `timed` (CUDA builds, GPU
// tensors), times it and each --ab variant (NAME=VALUE: an environment variable set while the
// cell is timed again). fp8_fast_accum (fp8-tensor weights only): layer.options with
// ExpertsOptions::fp8_fast_accum set. Errors from the library come back with the cell and the
// dtype named.
DtypeRun run_dtype(const Layer& layer, const BenchWeights& weights, const CellInputs& in,
                   int samples, bool timed, const std::vector<std::string>& ab,
                   bool fp8_fast_accum = false);

}  // namespace modmoe::app
