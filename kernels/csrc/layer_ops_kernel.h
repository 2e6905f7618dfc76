// The elementwise work of a decoder layer, fused: RMSNorm (with the residual add before it),
// RoPE on q and k with the K/V cache write, and SiLU(gate) * up. Each replaces several torch ops
// (each a pass over memory and a dispatch, about 5-20 us on a CPU: at a decode step of a 135M
// model they were ~6 ms of a 37 ms step at batch 48 and ~2.5 ms of 11 ms at batch 1).
//
// Numerics are torch's op by op, so results are the same bit for bit wherever torch's are
// rounded the same way: every op torch runs in bfloat16 is computed here in float32 and rounded
// to bfloat16 (round to nearest even) at the same point, and float32 ops are not contracted into
// FMAs (the build passes -ffp-contract=off). Two places differ from torch by float32 rounding
// only: the RMSNorm sum of squares (summed in another order) and SiLU's exp (Kernel<S>::exp,
// ~1 ulp; clamped, so SiLU of x < -88 is a tiny negative number, not -0).
//
// T: float (float32) or uint16_t (bfloat16 bits). Rows are tokens; kernels/csrc/layer_ops_cpu.h
// checks the tensors and splits rows over threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float widen(float x) { return x; }
inline float widen(uint16_t bits) {  // bfloat16 is the top half of a float32
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> T: identity for float; for bfloat16 round to nearest even (NaN stays a quiet NaN),
// as c10::BFloat16 does.
template <class T>
inline T narrow(float f);
template <>
inline float narrow<float>(float f) { return f; }
template <>
inline uint16_t narrow<uint16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

// What torch holds after an op in T: the float32 value rounded to T and widened back.
template <class T>
inline float in(float f) { return widen(narrow<T>(f)); }

template <class T>
struct LayerOps {
  // out = w * T(x * rsqrt(mean(x^2) + eps)), the statistics in float32 (Hugging Face's RMSNorm:
  // x.float() normalized, rounded to T, times the weight). H elements per row.
  static void rms_norm_row(const T* x, const T* w, T* out, int64_t H, float eps) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < H; ++i) sum += widen(x[i]) * widen(x[i]);
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) out[i] = narrow<T>(widen(w[i]) * in<T>(widen(x[i]) * inv));
  }

  // residual = T(residual + x) in place, then out = rms_norm(residual).
  static void add_rms_norm_row(const T* x, T* residual, const T* w, T* out, int64_t H, float eps) {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) residual[i] = narrow<T>(widen(residual[i]) + widen(x[i]));
    rms_norm_row(residual, w, out, H, eps);
  }

  // One head's D elements: out = T(T(x * cos) + T(roll(x, D/2) * signed_sin)), the model's
  // apply_rope (roll by half, sin negated on the first half by the table).
  static void rope_head(const T* x, const T* cos, const T* sin, T* out, int64_t D) {
    const int64_t half = D / 2;
#pragma omp simd
    for (int64_t d = 0; d < half; ++d)
      out[d] = narrow<T>(in<T>(widen(x[d]) * widen(cos[d])) + in<T>(widen(x[d + half]) * widen(sin[d])));
#pragma omp simd
    for (int64_t d = half; d < D; ++d)
      out[d] = narrow<T>(in<T>(widen(x[d]) * widen(cos[d])) + in<T>(widen(x[d - half]) * widen(sin[d])));
  }

  // out = T(T(silu(gate)) * up) for I elements, given exp(-gate) already in neg_exp (float32).
  static void silu_mul_row(const T* gate, const T* up, const float* neg_exp, T* out, int64_t I) {
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      const float g = widen(gate[i]);
      out[i] = narrow<T>(in<T>(g / (1.f + neg_exp[i])) * widen(up[i]));
    }
  }
};

}  // namespace
