// One vector register of float32 lanes, shared by the CPU ops' register-tiled products.
//
// AVX-512: 16 lanes, else 8 (the library is built for the host CPU). GCC/Clang vector
// extensions: arithmetic with a scalar broadcasts it.
#pragma once

#include <cstdint>
#include <cstring>

namespace tree_pruned {

#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_lanes(float* p, const Lanes& v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace tree_pruned
