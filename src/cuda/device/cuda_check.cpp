#include "cuda/device/cuda_check.h"

#include <sstream>

#include "core/check.h"

namespace modmoe::cuda_detail {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  std::ostringstream os;
  os << "modmoe: CUDA error " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err)
     << ") from `" << call << "` [" << file << ":" << line << "]";
  throw Error(os.str());
}

bool sync_after_launch() {
  static const bool enabled = [] {
    return check::env_switch("MODMOE_SYNC_LAUNCHES").value_or(false);
  }();
  return enabled;
}

}  // namespace modmoe::cuda_detail
