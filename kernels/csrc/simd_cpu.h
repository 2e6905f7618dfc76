// Vector instruction sets for the CPU kernels (kernels/csrc/paged_decode_cpu.cpp): one struct per
// set with the same static members, so a kernel is written once as a template over S.
//   V, W:        the vector type and its float32 lanes (1 for Scalar);
//   kRows:       query rows per value-sum pass (their accumulators must fit in the registers);
//   kScoreRows:  query rows sharing each K load in the scores (likewise);
//   load/store:  float32, or bfloat16 bits widened to float32 (bf16 is the top half of a float32);
//   sum_lanes:   lane i of the result = the sum of x[i]'s lanes, for W vectors at once.
// AVX-512 and AVX2 exist where the compiler targets them (-march=native); Scalar everywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kRows = 4;  // query rows per value-sum pass: 4 x 4 accumulators of 32 registers
  static constexpr int kScoreRows = 3;  // query rows per K load in the scores: 3 x 8 accumulators + 3 q + 1 k
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {  // 16 bfloat16 -> float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V floor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  // 2^n for integer-valued n in [-126, 127]: n + 127 is the biased exponent.
  static V pow2(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static V zero_below(V x, float lo, V y) {  // y where x >= lo, else 0
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(lo), _CMP_GE_OQ), y);
  }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  // Lane i of the result is the sum of x[i]'s 16 lanes: pairs are interleaved and added, halving
  // the partial sums each step (4 steps, 45 instructions for 16 sums).
  static V sum_lanes(const V* x) {
    V a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0 x1 x0 x1] partials of x[2i], x[2i+1]
      a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane k: lane-k partials of x[4i .. 4i+3]
      const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
      const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
      b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    for (int i = 0; i < 2; ++i)  // add 128-bit lanes 0+1 and 2+3 of two quads
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kRows = 2;  // 2 x 4 accumulators of 16 registers
  static constexpr int kScoreRows = 1;  // 8 accumulators + q + k: a second row would spill
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {  // 8 bfloat16 -> float32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V floor(V a) { return _mm256_floor_ps(a); }
  static V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static V zero_below(V x, float lo, V y) { return _mm256_and_ps(_mm256_cmp_ps(x, set1(lo), _CMP_GE_OQ), y); }
  static float hmax(V a) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
  }
  static float hsum(V a) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
  }
  static V sum_lanes(const V* x) {  // lane i = sum of x[i]: hadd twice per 128-bit lane, then add the halves
    const V t0 = _mm256_hadd_ps(x[0], x[1]), t1 = _mm256_hadd_ps(x[2], x[3]);
    const V t2 = _mm256_hadd_ps(x[4], x[5]), t3 = _mm256_hadd_ps(x[6], x[7]);
    const V u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
};
#endif

struct Scalar {  // any CPU, any head_dim
  using V = float;
  static constexpr int W = 1;
  static constexpr int kRows = 2;
  static constexpr int kScoreRows = 1;
  static V load(const float* p) { return *p; }
  static V load(const uint16_t* p) {  // bfloat16 -> float32
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  }
  static void store(float* p, V v) { *p = v; }
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V floor(V a) { return std::floor(a); }
  static V pow2(V n) {
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  }
  static V zero_below(V x, float lo, V y) { return x >= lo ? y : 0.f; }
  static float hmax(V a) { return a; }
  static float hsum(V a) { return a; }
  static V sum_lanes(const V* x) { return x[0]; }
};

}  // namespace
