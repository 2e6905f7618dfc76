// The paged decode attention algorithm (Kernel<S, E>), written once over an instruction set S
// (kernels/csrc/simd_cpu.h) and a cache element type E; kernels/csrc/paged_decode_cpu.cpp checks
// the tensors, picks S and E, and binds it. The algorithm and its invariants are described there.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd_cpu.h"

namespace {

// E: the cache's element type, float (float32) or uint16_t (bfloat16 bits).
template <class E>
struct Problem {
  const float* q;
  const E *kc, *vc;
  float* o;
  const int32_t *tables, *lens;
  int64_t Hkv, G, D, bs, max_blocks, slot_elems, q_sb, q_sh, o_sb, o_sh;  // slot_elems: Hkv * D
  float scale;
};

template <class S, class E = float>
struct Kernel {
  using V = typename S::V;
  static constexpr int W = S::W;
  static constexpr int kValueChunks = 4;  // vector accumulators per pass of the value sum

  // e^x, ~1 ulp (Cephes expf): e^x = 2^n * e^r, n = round(x log2 e), |r| <= ln2 / 2, e^r by a
  // degree-6 polynomial. x < -87.5 (2^n would leave the normal range) gives exactly 0, so -inf
  // scores (the padding lanes) get probability 0.
  static V exp(V x) {
    const V xc = S::min(S::max(x, S::set1(-87.5f)), S::set1(88.f));
    const V n = S::floor(S::fma(xc, S::set1(1.44269504088896341f), S::set1(0.5f)));
    V r = S::fma(n, S::set1(-0.693359375f), xc);  // ln 2 in two parts: r stays exact to float precision
    r = S::fma(n, S::set1(2.12194440e-4f), r);
    V y = S::set1(1.9875691500e-4f);
    y = S::fma(y, r, S::set1(1.3981999507e-3f));
    y = S::fma(y, r, S::set1(8.3334519073e-3f));
    y = S::fma(y, r, S::set1(4.1665795894e-2f));
    y = S::fma(y, r, S::set1(1.6666665459e-1f));
    y = S::fma(y, r, S::set1(5.0000001201e-1f));
    y = S::fma(y, S::mul(r, r), S::add(r, S::set1(1.f)));
    return S::zero_below(x, -87.5f, S::mul(y, S::pow2(n)));
  }

  // Scores of R query rows (q_stride apart) against the W rows of a tile: per query row W
  // independent accumulators (no dependency chain across tokens), summed across lanes together at
  // the end. The rows are walked 8 at a time so that their pointers and the R x 8 accumulators fit
  // in the registers. Each K vector is loaded, and a bfloat16 one widened, once for all R rows
  // (it was once per row); each row's sums run in the same order whatever R, so its scores are the
  // same bit for bit. out[r]: row r's W scores.
  template <int R>
  static void dot_tile(const float* q, int64_t q_stride, const E* const* rows, int64_t off, int64_t D, V* out) {
    constexpr int T = W < 8 ? W : 8;
    V acc[R][W];
#pragma GCC unroll 2
    for (int t0 = 0; t0 < W; t0 += T) {
      V a[R][T];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) a[r][t] = S::set1(0.f);
      for (int64_t d = 0; d < D; d += W) {
        V qv[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) qv[r] = S::load(q + r * q_stride + d);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          const V k = S::load(rows[t0 + t] + off + d);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) a[r][t] = S::fma(qv[r], k, a[r][t]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t0 + t] = a[r][t];
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[r] = S::sum_lanes(acc[r]);
  }

  // The scaled scores of the G query rows of KV head h against one tile, S::kScoreRows rows per K load.
  static void scores_tile(float* scores, int64_t Lp, const float* q, int64_t q_stride, const E* const* rows,
                          int64_t off, int64_t G, int64_t D, float scale) {
    V s[S::kScoreRows];
    for (int64_t g = 0; g < G;) {
      const int64_t R = std::min<int64_t>(S::kScoreRows, G - g);
      const float* qg = q + g * q_stride;
      if constexpr (S::kScoreRows >= 3) {
        if (R == 3) dot_tile<3>(qg, q_stride, rows, off, D, s);
        else if (R == 2) dot_tile<2>(qg, q_stride, rows, off, D, s);
        else dot_tile<1>(qg, q_stride, rows, off, D, s);
      } else {
        dot_tile<1>(qg, q_stride, rows, off, D, s);
      }
      for (int64_t r = 0; r < R; ++r) S::store(scores + (g + r) * Lp, S::mul(s[r], S::set1(scale)));
      g += R;
    }
  }

  // For R query rows at once, acc[r][0 .. C*W) += sum over t < n of p[r][t] * rows[t][off ..]
  // (rows R apart by acc_stride and p_stride): each V load feeds R FMAs, and the R * C
  // accumulators are independent chains, enough to hide the FMA latency.
  template <int R, int C>
  static void axpy_tile(float* acc, int64_t acc_stride, const float* p, int64_t p_stride, const E* const* rows,
                        int64_t off, int n) {
    V a[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[r][c] = S::load(acc + r * acc_stride + c * W);
    for (int t = 0; t < n; ++t) {
      const E* v = rows[t] + off;
      V vc[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) vc[c] = S::load(v + c * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V pt = S::set1(p[r * p_stride + t]);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) a[r][c] = S::fma(pt, vc[c], a[r][c]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) S::store(acc + r * acc_stride + c * W, a[r][c]);
  }

  // The value sum of the G query rows of one KV head over one tile, in groups of up to S::kRows rows.
  static void values_tile(float* acc, const float* p, int64_t Lp, const E* const* rows, int64_t off, int64_t G,
                          int64_t D, int n) {
    constexpr int C = kValueChunks;
    for (int64_t g = 0; g < G;) {
      const int64_t R = std::min<int64_t>(S::kRows, G - g);
      float* a = acc + g * D;
      const float* pr = p + g * Lp;
      for (int64_t d = 0; d < D;) {
        const bool full = d + C * W <= D;  // else one vector at a time
#define PAGEDSERVE_AXPY(r)                                                               \
  (full ? axpy_tile<r, C>(a + d, D, pr, Lp, rows, off + d, n) : axpy_tile<r, 1>(a + d, D, pr, Lp, rows, off + d, n))
        switch (R) {
          case 1: PAGEDSERVE_AXPY(1); break;
          case 2: PAGEDSERVE_AXPY(2); break;
          case 3: PAGEDSERVE_AXPY(3); break;
          default: PAGEDSERVE_AXPY(4); break;
        }
#undef PAGEDSERVE_AXPY
        d += full ? C * W : W;
      }
      g += R;
    }
  }

  // The hardware prefetchers lose this pattern (a few lines from W rows a slot apart, then a block
  // elsewhere in memory; they do not cross 4 KiB pages either): with only the current tile's misses
  // in flight, memory latency, not bandwidth, bounds the kernel (SmolLM2 shapes, batch 40, one
  // thread on the 2-core EPYC: 6.5 GB/s without these prefetches, 14 with). So each tile requests
  // the lines of a tile about kPrefetchBytes ahead, one head's part at a time, which spreads the
  // requests over the computation. Into L2 (hint 2): hint 3 (L1) lost most of the gain.
  static constexpr int64_t kPrefetchBytes = 8192;
  static void prefetch_rows(const E* cache, const int64_t* slots, int64_t slot_elems, int64_t off, int64_t len) {
    for (int t = 0; t < W; ++t) {  // every 64-byte line of [first, last]
      const uintptr_t first = reinterpret_cast<uintptr_t>(cache + slots[t] * slot_elems + off);
      const uintptr_t last = first + len * sizeof(E) - 1;
      for (uintptr_t c = first & ~uintptr_t(63); c <= last; c += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(c), 0, 2);
    }
  }

  // Query heads of KV heads h0 .. h1-1 of sequence b. scratch: grown as needed, reused.
  static void attend(const Problem<E>& p, int64_t b, int64_t h0, int64_t h1, std::vector<float>& scratch,
                     std::vector<int64_t>& slots) {
    const int64_t L = p.lens[b], Lp = (L + W - 1) / W * W, G = p.G, D = p.D, rows = (h1 - h0) * G;
    const int64_t sf = p.slot_elems;
    if (static_cast<int64_t>(scratch.size()) < rows * (Lp + D)) scratch.resize(rows * (Lp + D));
    float* scores = scratch.data();   // [rows, Lp], then probabilities in place
    float* acc = scores + rows * Lp;  // [rows, D]
    const float* q = p.q + b * p.q_sb;
    // Cache slot of every token; the tail of the last tile repeats the last valid one.
    if (static_cast<int64_t>(slots.size()) < Lp) slots.resize(Lp);
    for (int64_t l = 0, blk = 0; blk * p.bs < L; ++blk)
      for (int64_t i = 0; i < p.bs && l < L; ++i, ++l) slots[l] = p.tables[b * p.max_blocks + blk] * p.bs + i;
    std::fill(slots.begin() + L, slots.begin() + Lp, slots[L - 1]);
    const int64_t row_bytes = (h1 - h0) * D * static_cast<int64_t>(sizeof(E));
    const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (W * row_bytes)) * W;  // in tokens
    auto prefetch_first = [&](const E* cache) {
      for (int64_t l0 = 0; l0 < std::min(ahead, Lp); l0 += W)
        prefetch_rows(cache, &slots[l0], sf, h0 * D, (h1 - h0) * D);
    };

    const E* tile[W];
    prefetch_first(p.kc);
    for (int64_t l0 = 0; l0 < L; l0 += W) {
      for (int t = 0; t < W; ++t) tile[t] = p.kc + slots[l0 + t] * sf;
      for (int64_t h = h0; h < h1; ++h) {
        if (l0 + ahead < L) prefetch_rows(p.kc, &slots[l0 + ahead], sf, h * D, D);
        scores_tile(scores + (h - h0) * G * Lp + l0, Lp, q + h * G * p.q_sh, p.q_sh, tile, h * D, G, D, p.scale);
      }
    }
    prefetch_first(p.vc);

    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * Lp;
      std::fill(s + L, s + Lp, -std::numeric_limits<float>::infinity());
      V m = S::set1(-std::numeric_limits<float>::infinity());
      for (int64_t l = 0; l < Lp; l += W) m = S::max(m, S::load(s + l));
      const V mx = S::set1(S::hmax(m));
      V sum = S::set1(0.f);
      for (int64_t l = 0; l < Lp; l += W) {
        const V e = exp(S::sub(S::load(s + l), mx));
        S::store(s + l, e);
        sum = S::add(sum, e);
      }
      const V inv = S::set1(1.f / S::hsum(sum));  // >= 1: the max's own term is e^0
      for (int64_t l = 0; l < Lp; l += W) S::store(s + l, S::mul(S::load(s + l), inv));
    }

    std::fill(acc, acc + rows * D, 0.f);
    for (int64_t l0 = 0; l0 < L; l0 += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, L - l0));
      for (int t = 0; t < W; ++t) tile[t] = p.vc + slots[l0 + t] * sf;
      for (int64_t h = h0; h < h1; ++h) {
        if (l0 + ahead < L) prefetch_rows(p.vc, &slots[l0 + ahead], sf, h * D, D);
        values_tile(acc + (h - h0) * G * D, scores + (h - h0) * G * Lp + l0, Lp, tile, h * D, G, D, n);
      }
    }
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t g = 0; g < G; ++g)
        std::copy_n(acc + ((h - h0) * G + g) * D, D, p.o + b * p.o_sb + (h * G + g) * p.o_sh);
  }

  // Work units are (sequence, KV head) in order. at::parallel_for would hand each thread the same
  // number of units, but contexts differ a lot in length: here each thread gets one contiguous
  // range of about equal token count. Consecutive units of one sequence run together.
  static void run(const Problem<E>& p, int64_t B) {
    const int64_t units = B * p.Hkv;
    std::vector<int64_t> cost(units + 1, 0);  // prefix sums; + W: the per-unit fixed work
    for (int64_t u = 0; u < units; ++u) cost[u + 1] = cost[u] + p.lens[u / p.Hkv] + W;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      std::vector<int64_t> slots;
      for (int64_t part = begin; part < end; ++part) {
        auto bound = [&](int64_t k) {
          return std::lower_bound(cost.begin(), cost.end(), cost[units] * k / parts) - cost.begin();
        };
        const int64_t u_end = part + 1 == parts ? units : bound(part + 1);
        for (int64_t u = part == 0 ? 0 : bound(part); u < u_end;) {
          const int64_t b = u / p.Hkv, h0 = u % p.Hkv, h1 = std::min(p.Hkv, h0 + (u_end - u));
          attend(p, b, h0, h1, scratch, slots);
          u += h1 - h0;
        }
      }
    });
  }
};

}  // namespace
