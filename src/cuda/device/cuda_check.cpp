#include "cuda/device/cuda_check.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace modmoe::cuda_detail {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  std::ostringstream os;
  os << "modmoe: CUDA error " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err)
     << ") from `" << call << "` [" << file << ":" << line << "]";
  throw Error(os.str());
}

bool sync_after_launch() {
  static const bool enabled = [] {
    const char* v = std::getenv("MODMOE_SYNC_LAUNCHES");
    return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
  }();
  return enabled;
}

}  // namespace modmoe::cuda_detail
