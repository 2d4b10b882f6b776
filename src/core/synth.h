// Seeded synthetic data, bit-identical on the host and the device: element i of stream s is a
// pure function of (seed, s, i). The demo and the benchmarks fill weights on the GPU and the
// CPU check regenerates just the experts it needs, without copying gigabytes back.
#pragma once

#include <cstdint>

#include "core/hd.h"

namespace modmoe::synth {

MODMOE_HD inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Approximately N(0, 1): the sum of four 16-bit uniforms, centred and scaled (variance 1).
// Integer arithmetic then one float multiply, so host and device agree to the bit.
MODMOE_HD inline float normal(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t h = mix64(mix64(seed ^ (stream * 0xd1b54a32d192ed03ull)) + index);
  const int64_t sum = static_cast<int64_t>(h & 0xffff) + static_cast<int64_t>((h >> 16) & 0xffff) +
                      static_cast<int64_t>((h >> 32) & 0xffff) + static_cast<int64_t>(h >> 48);
  // Uniform on [0, 65536) has variance 65536^2 / 12; four of them: 65536^2 / 3.
  const int64_t centred = 2 * sum - 4 * 65535 + 1;  // odd, never zero
  return static_cast<float>(centred) * (1.7320508f / 131072.0f);
}

}  // namespace modmoe::synth
