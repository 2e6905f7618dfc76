// Tensor checks and threading for the fused layer ops (the arithmetic: layer_ops_kernel.h);
// kernels/csrc/paged_decode_cpu.cpp binds them. Semantics, as torch code: kernels/cpu_kernels.py.
//   x, residual, out   [N, H] contiguous, float32 or bfloat16, one dtype with the weight [H]
//   qkv                [N, (Hq + 2 Hkv) * D], elements contiguous within a row (rows any stride)
//   cos, sin           [N, D] contiguous, the model's rope_tables (sin signed)
//   q_out              [N, Hq, D] contiguous (k is rotated straight into the cache)
//   caches             [num_blocks, block_size, Hkv, D] contiguous; slot_mapping int64 [N], a
//                      negative slot is a padding token, not written
//   gate_up            [N, 2 I] contiguous (gate first); out [N, I]
// Rows (tokens) are split over threads in runs of at least kGrainElems elements.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "layer_ops_kernel.h"
#include "paged_decode_kernel.h"
#include "simd_cpu.h"

namespace {

#if defined(__AVX512F__)
using WidestIsa = Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using WidestIsa = Avx2;
#else
using WidestIsa = Scalar;
#endif

constexpr int64_t kGrainElems = 8192;  // below this a thread's start costs more than its share

int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems)); }

// f(T{}) with T the element type of t: float for float32, uint16_t for bfloat16.
template <class F>
void by_dtype(const torch::Tensor& t, F&& f) {
  if (t.scalar_type() == torch::kBFloat16) return f(uint16_t{});
  TORCH_CHECK(t.scalar_type() == torch::kFloat, "float32 or bfloat16 tensors");
  f(float{});
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == b.scalar_type(), what,
              ": CPU tensors of one dtype");
}

void check_rows(const torch::Tensor& t, int64_t N, int64_t H, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == H && t.is_contiguous(), what, " must be contiguous [",
              N, ", ", H, "]");
}

// exp(-x) of n elements into out, in the widest vectors (the rest one at a time).
template <class T>
void neg_exp(const T* x, float* out, int64_t n) {
  using S = WidestIsa;
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) S::store(out + i, Kernel<S>::exp(S::sub(S::set1(0.f), S::load(x + i))));
  for (; i < n; ++i) out[i] = Kernel<Scalar>::exp(-widen(x[i]));
}

}  // namespace

// residual: undefined for a plain norm; else residual += x in place first and the norm is of the sum.
void rms_norm_cpu(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps,
                  c10::optional<torch::Tensor> residual) {
  check_same(x, out, "rms_norm x/out");
  check_same(x, weight, "rms_norm x/weight");
  const int64_t N = x.size(0), H = x.size(-1);
  check_rows(x, N, H, "x");
  check_rows(out, N, H, "out");
  if (residual) {
    check_same(x, *residual, "rms_norm x/residual");
    check_rows(*residual, N, H, "residual");
  }
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(), "weight [H]");
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    const T *xp = static_cast<const T*>(x.data_ptr()), *wp = static_cast<const T*>(weight.data_ptr());
    T *rp = residual ? static_cast<T*>(residual->data_ptr()) : nullptr, *op = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, N, grain_rows(H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (rp != nullptr) LayerOps<T>::add_rms_norm_row(xp + n * H, rp + n * H, wp, op + n * H, H, float(eps));
        else LayerOps<T>::rms_norm_row(xp + n * H, wp, op + n * H, H, float(eps));
      }
    });
  });
}

void rope_write_kv_cpu(torch::Tensor q_out, torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                       torch::Tensor key_cache, torch::Tensor value_cache, torch::Tensor slot_mapping) {
  for (const auto* t : {&q_out, &cos, &sin, &key_cache, &value_cache}) check_same(qkv, *t, "rope_write_kv");
  TORCH_CHECK(q_out.dim() == 3 && key_cache.dim() == 4 && qkv.dim() == 2,
              "q_out [N, Hq, D], qkv [N, (Hq + 2 Hkv) D], caches [blocks, block_size, Hkv, D]");
  const int64_t N = qkv.size(0), Hq = q_out.size(1), Hkv = key_cache.size(2), D = q_out.size(2);
  TORCH_CHECK(q_out.is_contiguous() && q_out.size(0) == N && D % 2 == 0, "q_out contiguous [N, Hq, D], D even");
  TORCH_CHECK(qkv.size(1) == (Hq + 2 * Hkv) * D && qkv.stride(1) == 1, "qkv rows of (Hq + 2 Hkv) * D elements");
  check_rows(cos, N, D, "cos");
  check_rows(sin, N, D, "sin");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.sizes() == value_cache.sizes() &&
              key_cache.size(2) == Hkv && key_cache.size(3) == D, "caches contiguous [blocks, block_size, Hkv, D]");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == N,
              "int64 slot_mapping [N]");
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1), slot_elems = Hkv * D, row_stride = qkv.stride(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(slots[n] < num_slots, "slot ", slots[n], " out of range");
  by_dtype(qkv, [&](auto tag) {
    using T = decltype(tag);
    const T *src = static_cast<const T*>(qkv.data_ptr()), *cp = static_cast<const T*>(cos.data_ptr()),
            *sp = static_cast<const T*>(sin.data_ptr());
    T *qp = static_cast<T*>(q_out.data_ptr()), *kc = static_cast<T*>(key_cache.data_ptr()),
      *vc = static_cast<T*>(value_cache.data_ptr());
    at::parallel_for(0, N, grain_rows(qkv.size(1)), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* row = src + n * row_stride;
        for (int64_t h = 0; h < Hq; ++h)
          LayerOps<T>::rope_head(row + h * D, cp + n * D, sp + n * D, qp + (n * Hq + h) * D, D);
        if (slots[n] < 0) continue;  // a padding token: its k is never read
        for (int64_t h = 0; h < Hkv; ++h)  // rotated straight into its slot
          LayerOps<T>::rope_head(row + (Hq + h) * D, cp + n * D, sp + n * D, kc + slots[n] * slot_elems + h * D, D);
        std::memcpy(vc + slots[n] * slot_elems, row + (Hq + Hkv) * D, slot_elems * sizeof(T));
      }
    });
  });
}

void silu_mul_cpu(torch::Tensor out, torch::Tensor gate_up) {
  check_same(gate_up, out, "silu_mul");
  const int64_t N = gate_up.size(0), I = gate_up.size(-1) / 2;
  check_rows(gate_up, N, 2 * I, "gate_up");
  check_rows(out, N, I, "out");
  by_dtype(gate_up, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = static_cast<const T*>(gate_up.data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, N, grain_rows(2 * I), [&](int64_t begin, int64_t end) {
      std::vector<float> neg_exp_row(I);
      for (int64_t n = begin; n < end; ++n) {
        const T* row = gp + n * 2 * I;
        neg_exp(row, neg_exp_row.data(), I);
        LayerOps<T>::silu_mul_row(row, row + I, neg_exp_row.data(), op + n * I, I);
      }
    });
  });
}
