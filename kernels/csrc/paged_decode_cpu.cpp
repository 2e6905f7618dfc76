// Paged decode attention for CPUs, float32: reads each sequence's K/V rows in place through its
// block table (no gathered copy), once per KV head for the whole GQA group of query heads.
// Layouts and semantics: kernels/reference.py (paged_decode_attention); slots at or past a
// sequence's length are never read, so they may hold anything.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

void paged_decode_f32(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                      torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat && key_cache.scalar_type() == torch::kFloat &&
              value_cache.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && block_tables.is_contiguous(), "int32 block tables");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt && seq_lens.is_contiguous(), "int32 seq_lens");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head_dim must be the innermost axis");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t bs = key_cache.size(1), Hkv = key_cache.size(2), G = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const float* q = query.data_ptr<float>();
  const float* kc = key_cache.data_ptr<float>();
  const float* vc = value_cache.data_ptr<float>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const int64_t q_sb = query.stride(0), q_sh = query.stride(1), o_sb = out.stride(0), o_sh = out.stride(1);
  const int64_t slot_floats = Hkv * D;
  const float fscale = static_cast<float>(scale);
  // One task per (sequence, KV head): its G query heads share every K/V row read.
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && (lens[b] + bs - 1) / bs <= max_blocks, "seq_len out of range of the block table");
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [G, L]
    std::vector<float> acc(G * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / Hkv, h = idx % Hkv;
      const int64_t L = lens[b];
      scores.assign(G * L, 0.f);
      const float* qb = q + b * q_sb + h * G * q_sh;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t blk = bt[b * max_blocks + l / bs];
        const float* k = kc + (blk * bs + l % bs) * slot_floats + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * q_sh;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
          scores[g * L + l] = s * fscale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax in float32, max-subtracted
        float* sg = scores.data() + g * L;
        float m = *std::max_element(sg, sg + L);
        float sum = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          sg[l] = std::exp(sg[l] - m);
          sum += sg[l];
        }
        const float inv = 1.f / sum;
        for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t blk = bt[b * max_blocks + l / bs];
        const float* v = vc + (blk * bs + l % bs) * slot_floats + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + l];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* og = o + b * o_sb + (h * G + g) * o_sh;
        for (int64_t d = 0; d < D; ++d) og[d] = acc[g * D + d];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_f32", &paged_decode_f32, "paged decode attention, float32, CPU");
}
