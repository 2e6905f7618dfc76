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
// SIMD: one implementation of the algorithm (Kernel<S>) over three instruction sets (S): AVX-512
// and AVX2 where the compiler targets them (-march=native), and plain C++ (one lane) anywhere.
// The widest one that divides D runs by default; `lanes` picks one (the tests run them all).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

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
void paged_decode_f32(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                      torch::Tensor block_tables, torch::Tensor seq_lens, double scale, int64_t lanes) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat, "float32 query and out");
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
}
