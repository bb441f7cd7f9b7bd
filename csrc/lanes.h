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

// Two vectors of float32 lanes from 2 * kLanes bfloat16 values (their bits) stored
// interleaved, exactly: 32-bit word l holds lane l of the first vector in its low half and lane
// l of the second in its high half, and a bfloat16 is the upper half of the float32 with the
// same value. One load and two cheap bit operations per pair of vectors.
inline void load_bfloat16_pair(const uint16_t* p, Lanes& first, Lanes& second) {
#if defined(__AVX512F__)
  const __m512i words = _mm512_loadu_si512(p);
  first = (Lanes)_mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
  second = (Lanes)_mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
#elif defined(__AVX2__)
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  first = (Lanes)_mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
  second = (Lanes)_mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#else
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint32_t low = static_cast<uint32_t>(p[2 * l]) << 16, high = static_cast<uint32_t>(p[2 * l + 1]) << 16;
    std::memcpy(&first[l], &low, sizeof(float));
    std::memcpy(&second[l], &high, sizeof(float));
  }
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
