// `modmoe info`: what this build is and what it sees.
#include <cstdio>
#include <string>
#include <vector>

#include "args.h"
#include "modmoe/modmoe.h"

namespace modmoe::app {

int run_info(const std::vector<std::string>& argv) {
  const Args args(argv, {}, {});
  std::printf("modmoe %s\n", version());
  std::printf("CUDA backend: %s\n", built_with_cuda() ? "yes" : "no (CPU reference only)");
  std::string archs;
  for (const auto& a : compiled_architectures()) archs += (archs.empty() ? "" : ", ") + a;
  std::printf("compiled architectures: %s\n", archs.empty() ? "none" : archs.c_str());
  const auto gpus = list_gpus();
  if (gpus.empty()) std::printf("GPUs: none found\n");
  for (const auto& g : gpus) {
    std::printf("GPU %d: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.1f MiB\n", g.index, g.name.c_str(),
                g.sm_major, g.sm_minor, g.num_sms, g.memory_bytes / 1073741824.0,
                g.l2_bytes / 1048576.0);
  }
  return 0;
}

}  // namespace modmoe::app
