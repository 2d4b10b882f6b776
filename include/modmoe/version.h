// Build facts, for `modmoe info` and bug reports.
#pragma once

#include <string>
#include <vector>

namespace modmoe {

const char* version();
// Whether this build has the CUDA backend, and the architectures it was compiled for
// ("sm_90a", "sm_100a").
bool built_with_cuda();
std::vector<std::string> compiled_architectures();

struct GpuInfo {
  int index = 0;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  int num_sms = 0;
  size_t memory_bytes = 0;
  size_t l2_bytes = 0;
};
// The GPUs this process sees; empty without CUDA or without a GPU (never throws).
std::vector<GpuInfo> list_gpus();

}  // namespace modmoe
