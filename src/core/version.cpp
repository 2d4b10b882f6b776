#include "modmoe/version.h"

#include <sstream>

#ifdef MODMOE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace modmoe {

const char* version() { return MODMOE_VERSION; }

bool built_with_cuda() {
#ifdef MODMOE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::string> compiled_architectures() {
  std::vector<std::string> out;
  std::stringstream ss(MODMOE_ARCHS);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::vector<GpuInfo> list_gpus() {
  std::vector<GpuInfo> out;
#ifdef MODMOE_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    GpuInfo g;
    g.index = i;
    g.name = prop.name;
    g.sm_major = prop.major;
    g.sm_minor = prop.minor;
    g.num_sms = prop.multiProcessorCount;
    g.memory_bytes = prop.totalGlobalMem;
    g.l2_bytes = static_cast<size_t>(prop.l2CacheSize);
    out.push_back(g);
  }
#endif
  return out;
}

}  // namespace modmoe
