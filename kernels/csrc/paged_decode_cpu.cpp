// Paged decode attention for CPUs, computed in float32 over a float32 or bfloat16 KV cache: reads
// each sequence's K/V rows in place through its block table (no gathered copy), once per KV head
// for the whole GQA group of query heads. A bfloat16 row is widened to float32 as it is loaded
// (a 16-bit shift: bf16 is the top half of a float32), so a bf16 cache moves half the bytes.
//
// Layouts and semantics: kernels/reference.py (paged_decode_attention).
//   query, out        float32 [B, Hq, D], head_dim innermost (batch and head strides may be anything)
//   key/value cache   float32 or bfloat16 [num_blocks, block_size, Hkv, D], contiguous: a slot's Hkv * D
//                     elements are adjacent
//   block_tables      int32 [B, max_blocks];  seq_lens int32 [B], 1 <= len <= max_blocks * block_size
//   query head q reads KV head q / G, G = Hq / Hkv (Hugging Face repeat_kv grouping).
// Invariants:
//   * a sequence's slots at or past its length are never used (they may hold anything, NaN included):
//     tail lanes of a tile re-read the last valid row, their scores are overwritten with -inf, and
//     the value pass stops at the length;
//   * scores, softmax and the value sum are float32; softmax subtracts the row max, as the reference;
//   * each K/V row is read once per (sequence, KV head), for all G query heads of the group.
//
// Per run of KV heads h0..h1 of one sequence, in tiles of W tokens (W = vector lanes):
//   1. scores: per query row, W dot products kept as W vector accumulators and summed into one
//      vector of W scores at once (a transpose-add), not one horizontal sum per score; each K row
//      loaded once for up to 3 query rows (AVX-512);
//   2. softmax per row over the whole context, with a vectorized polynomial exp (~1 ulp);
//   3. values: out_row += p[t] * V[t], each V row loaded once for up to 4 query rows.
// Each tile prefetches the K (then V) lines of a tile ahead: blocks sit at random places in the
// cache and the hardware prefetchers alone leave the kernel bound by memory latency.
// The heads of a run share each tile's slots, so a run of all heads streams every slot's K (then V)
// rows as one contiguous Hkv * D piece. Threads get contiguous runs of about equal token counts.
//
// SIMD: one implementation of the algorithm (Kernel<S>, kernels/csrc/paged_decode_kernel.h) over
// three instruction sets (S, kernels/csrc/simd_cpu.h): AVX-512 and AVX2 where the compiler targets
// them (-march=native), and plain C++ (one lane) anywhere. The widest one that divides D runs by
// default; `lanes` picks one (the tests run them all). This file checks the tensors and binds it,
// and binds the fused layer ops of kernels/csrc/layer_ops_cpu.h into the same module.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "layer_ops_cpu.h"
#include "paged_decode_kernel.h"
#include "simd_cpu.h"

namespace {

std::vector<int64_t> compiled_lanes() {  // widest first
  std::vector<int64_t> lanes;
#if defined(__AVX512F__)
  lanes.push_back(Avx512::W);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  lanes.push_back(Avx2::W);
#endif
  lanes.push_back(Scalar::W);
  return lanes;
}

// f(S{}) for the instruction set of `lanes` floats, which must be one of compiled_lanes().
template <class F>
void dispatch(int64_t lanes, F&& f) {
  const auto compiled = compiled_lanes();
  TORCH_CHECK(std::find(compiled.begin(), compiled.end(), lanes) != compiled.end(), "lanes ", lanes,
              " not compiled here");
#if defined(__AVX512F__)
  if (lanes == Avx512::W) return f(Avx512{});
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (lanes == Avx2::W) return f(Avx2{});
#endif
  f(Scalar{});
}

}  // namespace

// lanes: 0 for the widest compiled instruction set that divides head_dim, else one of compiled_lanes().
// query/out float32; the caches float32 or bfloat16 (both the same).
// A bfloat16 query and out (the model's dtype) are widened here and the result rounded back, in
// one call from Python rather than three.
void paged_decode_f32(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                      torch::Tensor block_tables, torch::Tensor seq_lens, double scale, int64_t lanes) {
  if (query.scalar_type() == torch::kBFloat16 && out.scalar_type() == torch::kBFloat16) {
    auto result = torch::empty(query.sizes(), query.options().dtype(torch::kFloat));
    paged_decode_f32(result, query.to(torch::kFloat), key_cache, value_cache, block_tables, seq_lens, scale, lanes);
    out.copy_(result);
    return;
  }
  TORCH_CHECK(query.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat,
              "float32 query and out, or both bfloat16");
  const auto cache_type = key_cache.scalar_type();
  TORCH_CHECK((cache_type == torch::kFloat || cache_type == torch::kBFloat16) &&
              value_cache.scalar_type() == cache_type, "float32 or bfloat16 caches, both the same");
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "query/out [B, Hq, D], caches [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && block_tables.is_contiguous(), "int32 block tables");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt && seq_lens.is_contiguous(), "int32 seq_lens");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head_dim must be the innermost axis");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t num_blocks = key_cache.size(0), bs = key_cache.size(1), Hkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && out.sizes() == query.sizes() && Hq % Hkv == 0, "shapes disagree");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "one block table row and length per sequence");
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // the kernel reads through these unchecked
    TORCH_CHECK(lens[b] >= 1 && (lens[b] + bs - 1) / bs <= max_blocks, "seq_len out of range of the block table");
    for (int64_t i = 0; i < (lens[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(bt[b * max_blocks + i] >= 0 && bt[b * max_blocks + i] < num_blocks, "block id out of range");
  }
  if (lanes == 0)
    for (int64_t w : compiled_lanes())
      if (D % w == 0) {
        lanes = w;
        break;
      }
  TORCH_CHECK(D % lanes == 0, "lanes ", lanes, " does not divide head_dim ", D);
  auto problem = [&](auto* cache_elem) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(cache_elem)>>;
    return Problem<T>{query.data_ptr<float>(), static_cast<const T*>(key_cache.data_ptr()),
                      static_cast<const T*>(value_cache.data_ptr()), out.data_ptr<float>(), bt, lens, Hkv, Hq / Hkv, D,
                      bs, max_blocks, Hkv * D, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                      static_cast<float>(scale)};
  };
  if (cache_type == torch::kBFloat16) {
    const auto p = problem(static_cast<const uint16_t*>(nullptr));
    dispatch(lanes, [&](auto isa) { Kernel<decltype(isa), uint16_t>::run(p, B); });
  } else {
    const auto p = problem(static_cast<const float*>(nullptr));
    dispatch(lanes, [&](auto isa) { Kernel<decltype(isa), float>::run(p, B); });
  }
}

// For the tests: the kernels' exp, elementwise, with the instruction set of `lanes` floats.
torch::Tensor exp_f32(torch::Tensor x, int64_t lanes) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && lanes > 0 && x.numel() % lanes == 0,
              "contiguous float32, a multiple of lanes elements");
  auto y = torch::empty_like(x);
  dispatch(lanes, [&](auto isa) {
    using S = decltype(isa);
    for (int64_t i = 0; i < x.numel(); i += S::W)
      S::store(y.data_ptr<float>() + i, Kernel<S>::exp(S::load(x.data_ptr<float>() + i)));
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_f32", &paged_decode_f32, "paged decode attention in float32, float32 or bfloat16 cache, CPU",
        py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("lanes") = 0);
  m.def("compiled_lanes", &compiled_lanes, "vector widths (floats) this build has kernels for, widest first");
  m.def("exp_f32", &exp_f32, "the kernels' exp (for the tests)", py::arg("x"), py::arg("lanes"));
  m.def("rms_norm", &rms_norm_cpu, "out = RMSNorm(x) * weight; with residual: residual += x in place first",
        py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("rope_write_kv", &rope_write_kv_cpu, "RoPE on q and k of a fused qkv, K/V written to their slots",
        py::arg("q_out"), py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"));
  m.def("silu_mul", &silu_mul_cpu, "out = SiLU(gate) * up of a fused gate_up", py::arg("out"), py::arg("gate_up"));
}
