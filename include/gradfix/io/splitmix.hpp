#pragma once
// splitmix64's step and finaliser: a well-mixed 64-bit function of one word. The random mask
// modes draw from it as a counter-based generator (element i's draw depends only on its
// counter, not on chunks or ranks), the generated datasets' noise likewise, and the statistics
// cache mixes its digests with it.

#include <cstdint>

namespace gradfix {

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

}  // namespace gradfix
