// One vector register of float32 lanes, shared by the CPU ops' register-tiled products.
//
// AVX-512: 16 lanes, else 8 (the library is built for the host CPU). GCC/Clang vector
// extensions: arithmetic with a scalar broadcasts it.
#pragma once

#include <immintrin.h>

#include <cmath>
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

// kLanes bfloat16 values (their bits) widened to float32, exactly: a bfloat16 is the upper
// half of the float32 with the same value.
inline Lanes load_bfloat16_lanes(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (Lanes)_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
#elif defined(__AVX2__)
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (Lanes)_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
#else
  Lanes v;
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint32_t bits = static_cast<uint32_t>(p[l]) << 16;
    std::memcpy(&v[l], &bits, sizeof(float));
  }
  return v;
#endif
}

// a * b + c per lane, rounded once. Explicit because a product that must give the same bits
// in every tile shape cannot leave fusing to the compiler: GCC contracted `acc += a * b` to an
// FMA in some tile shapes of the AVX2 build and not in others.
inline Lanes fma_lanes(const Lanes& a, const Lanes& b, const Lanes& c) {
#if defined(__AVX512F__)
  return (Lanes)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (Lanes)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  Lanes r;
  for (int64_t l = 0; l < kLanes; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}

}  // namespace tree_pruned
