// Float32 math shared by the CPU ops (torch library `tree_pruned`).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tree_pruned {

// exp(x) for x <= 0 (scores minus their running maximum), float32 accurate to a few ulp:
// 2^(x log2 e) split into an integer power (built in the exponent bits) and a degree-6
// polynomial on [-0.5, 0.5]. Branch-free, so the loops calling it vectorize; std::exp does not.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below, exp underflows to 0 anyway
  const float t = x * 1.44269504088896341f;
  const float k = std::nearbyint(t);
  const float f = (t - k) * 0.693147180559945309f;  // exp(x) = 2^k * exp(f), |f| <= ln2 / 2
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace tree_pruned
