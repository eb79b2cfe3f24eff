#pragma once
/// \file
/// The CPU loop order of the RMS projection (SPEC.md section 2 steps 1-2) over several tokens at once.
/// Same arithmetic as scalar::project, product for product and lane for lane, so the same bits: only
/// the loop order differs, so each chunk of phi is read from the cache once for a group of tokens and
/// each phi load in the inner kernel feeds two tokens. The inner kernel uses SSE2 intrinsics (the
/// x86-64 baseline) under `__SSE2__` and scalar::project_row elsewhere; where the build carries AVX2
/// kernels (mhc/cpu/isa.hpp) the AVX2 versions below give the same bits faster, and the overloads
/// taking a cpu_isa pick between them.

#include <cstdint>
#include <type_traits>

#include "mhc/core/config.hpp"
#include "mhc/cpu/isa.hpp"
#include "mhc/ops/scalar.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mhc {
namespace detail {

/// Tokens the projection kernels multiply at once.
inline constexpr int projection_tokens = 4;

/// Tokens project_tokens takes at once (groups of projection_tokens that share each chunk of phi).
inline constexpr int projection_block = 8;

/// c<token><row> += lanes of p<row>[i] * x<token>[i] over the w elements of a chunk: two tokens by two
/// rows of phi, so every load feeds two products. Same per-lane order as scalar::project_row.
template <class F>
MHC_INLINE void project_quad(const F* p0, const F* p1, const F* x0, const F* x1, index_t w, F* c00, F* c01, F* c10,
                             F* c11) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<F, float> && scalar::projection_lanes == 8) {
    const index_t full = w / 8 * 8;
    __m128 a00 = _mm_loadu_ps(c00), b00 = _mm_loadu_ps(c00 + 4), a01 = _mm_loadu_ps(c01), b01 = _mm_loadu_ps(c01 + 4);
    __m128 a10 = _mm_loadu_ps(c10), b10 = _mm_loadu_ps(c10 + 4), a11 = _mm_loadu_ps(c11), b11 = _mm_loadu_ps(c11 + 4);
    for (index_t i = 0; i < full; i += 8) {
      const __m128 xa0 = _mm_loadu_ps(x0 + i), xb0 = _mm_loadu_ps(x0 + i + 4);
      const __m128 xa1 = _mm_loadu_ps(x1 + i), xb1 = _mm_loadu_ps(x1 + i + 4);
      __m128 pa = _mm_loadu_ps(p0 + i), pb = _mm_loadu_ps(p0 + i + 4);
      a00 = _mm_add_ps(a00, _mm_mul_ps(pa, xa0));
      b00 = _mm_add_ps(b00, _mm_mul_ps(pb, xb0));
      a10 = _mm_add_ps(a10, _mm_mul_ps(pa, xa1));
      b10 = _mm_add_ps(b10, _mm_mul_ps(pb, xb1));
      pa = _mm_loadu_ps(p1 + i);
      pb = _mm_loadu_ps(p1 + i + 4);
      a01 = _mm_add_ps(a01, _mm_mul_ps(pa, xa0));
      b01 = _mm_add_ps(b01, _mm_mul_ps(pb, xb0));
      a11 = _mm_add_ps(a11, _mm_mul_ps(pa, xa1));
      b11 = _mm_add_ps(b11, _mm_mul_ps(pb, xb1));
    }
    _mm_storeu_ps(c00, a00), _mm_storeu_ps(c00 + 4, b00), _mm_storeu_ps(c01, a01), _mm_storeu_ps(c01 + 4, b01);
    _mm_storeu_ps(c10, a10), _mm_storeu_ps(c10 + 4, b10), _mm_storeu_ps(c11, a11), _mm_storeu_ps(c11 + 4, b11);
    p0 += full, p1 += full, x0 += full, x1 += full, w -= full;  // the tail continues the same lanes
  }
#endif
  scalar::project_row(p0, x0, w, c00);
  scalar::project_row(p1, x0, w, c01);
  scalar::project_row(p0, x1, w, c10);
  scalar::project_row(p1, x1, w, c11);
}

/// scalar::project for nt <= projection_tokens tokens (token a at x[a], K elements each), writing
/// u[a*M + j] and s[a]. The same bits as calling scalar::project on each token.
template <int M, class T, class F>
MHC_INLINE void project_tokens(const T* const* x, int nt, index_t K, const F* phi, F* u, F* s) {
  constexpr int W = scalar::projection_lanes, TB = projection_tokens;
  constexpr index_t chunk = scalar::projection_chunk;
  F acc[TB][M][W];
  F sq[TB][W];
  for (int a = 0; a < nt; ++a)
    for (int l = 0; l < W; ++l) {
      sq[a][l] = F(0);
      for (int j = 0; j < M; ++j) acc[a][j][l] = F(0);
    }
  F xb[TB][chunk];
  for (index_t k0 = 0; k0 < K; k0 += chunk) {
    const index_t w = K - k0 < chunk ? K - k0 : chunk;
    for (int a = 0; a < nt; ++a) scalar::load_chunk(x[a] + k0, w, xb[a], sq[a]);
    int a = 0;
    for (; a + 2 <= nt; a += 2) {
      int j = 0;
      for (; j + 2 <= M; j += 2) {
        const F* p = phi + index_t(j) * K + k0;
        project_quad(p, p + K, xb[a], xb[a + 1], w, acc[a][j], acc[a][j + 1], acc[a + 1][j], acc[a + 1][j + 1]);
      }
      for (; j < M; ++j)
        for (int b = a; b < a + 2; ++b) scalar::project_row(phi + index_t(j) * K + k0, xb[b], w, acc[b][j]);
    }
    for (; a < nt; ++a)
      for (int j = 0; j < M; ++j) scalar::project_row(phi + index_t(j) * K + k0, xb[a], w, acc[a][j]);
  }
  for (int a = 0; a < nt; ++a) {
    s[a] = scalar::combine_lanes(sq[a]);
    for (int j = 0; j < M; ++j) u[a * M + j] = scalar::combine_lanes(acc[a][j]);
  }
}

/// Software prefetches spread over the steps of a loop: `rows` runs of `lines` lines each (from
/// base[r]), `per` lines per step. Spread over the work, a few misses are in flight at a time; a
/// burst of a hundred fills the load queue and stalls the loop behind it (the projection's chunks:
/// fp32 14.5 -> 11.3 ms at T = C = 4096). Locality as __builtin_prefetch's: 0 NTA, 2 T1, 3 T0.
template <int Rows, int Locality>
struct spread_prefetch {
  const char* base[Rows];
  index_t lines = 0;  // lines per row
  index_t per = 0;    // lines per step
  int rows = 0;
  int a = 0;  // the row and line of the next prefetch
  index_t l = 0;
  /// n <= Rows runs of `bytes` bytes from p[r] (elements of T), over `steps` steps.
  template <class T>
  MHC_INLINE void set(const T* const* p, int n, index_t bytes, index_t steps) {
    lines = (bytes + 63) / 64;
    rows = steps > 0 && lines > 0 ? n : 0;
    if (rows == 0) return;
    per = (index_t(n) * lines + steps - 1) / steps;
    for (int r = 0; r < n; ++r) base[r] = reinterpret_cast<const char*>(p[r]);
  }
  MHC_INLINE void one() {
    __builtin_prefetch(base[a] + l * 64, 0, Locality);
    if (++l == lines) l = 0, ++a;
  }
  MHC_INLINE void step() {
    if (a < rows) {
      one();
      for (index_t n = 1; n < per && a < rows; ++n) one();
    }
  }
};

#if MHC_HAVE_AVX2_KERNELS
/// c0[a] += lanes of p0[i] * x[a][i] and c1[a] += lanes of p1[i] * x[a][i] for four tokens a over w
/// elements (a multiple of 8): four tokens by two rows of phi per register block, eight lanes in one
/// 256-bit register, a product then a sum as scalar::project_row (the same bits). phi is read once
/// for four tokens, each token's chunk feeds two rows.
MHC_TARGET_AVX2 inline void project_4x2_avx2(const float* p0, const float* p1, const float* const* x, index_t w,
                                             float* const* c0, float* const* c1) {
  __m256 a0 = _mm256_loadu_ps(c0[0]), a1 = _mm256_loadu_ps(c0[1]), a2 = _mm256_loadu_ps(c0[2]);
  __m256 a3 = _mm256_loadu_ps(c0[3]), b0 = _mm256_loadu_ps(c1[0]), b1 = _mm256_loadu_ps(c1[1]);
  __m256 b2 = _mm256_loadu_ps(c1[2]), b3 = _mm256_loadu_ps(c1[3]);
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (index_t i = 0; i < w; i += 8) {
    const __m256 p = _mm256_loadu_ps(p0 + i), q = _mm256_loadu_ps(p1 + i);
    __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i);
    MHC_KEEP_IN_REGISTER(v0);
    MHC_KEEP_IN_REGISTER(v1);
    a0 = _mm256_add_ps(a0, _mm256_mul_ps(p, v0));
    b0 = _mm256_add_ps(b0, _mm256_mul_ps(q, v0));
    a1 = _mm256_add_ps(a1, _mm256_mul_ps(p, v1));
    b1 = _mm256_add_ps(b1, _mm256_mul_ps(q, v1));
    __m256 v2 = _mm256_loadu_ps(x2 + i), v3 = _mm256_loadu_ps(x3 + i);
    MHC_KEEP_IN_REGISTER(v2);
    MHC_KEEP_IN_REGISTER(v3);
    a2 = _mm256_add_ps(a2, _mm256_mul_ps(p, v2));
    b2 = _mm256_add_ps(b2, _mm256_mul_ps(q, v2));
    a3 = _mm256_add_ps(a3, _mm256_mul_ps(p, v3));
    b3 = _mm256_add_ps(b3, _mm256_mul_ps(q, v3));
  }
  _mm256_storeu_ps(c0[0], a0), _mm256_storeu_ps(c0[1], a1), _mm256_storeu_ps(c0[2], a2), _mm256_storeu_ps(c0[3], a3);
  _mm256_storeu_ps(c1[0], b0), _mm256_storeu_ps(c1[1], b1), _mm256_storeu_ps(c1[2], b2), _mm256_storeu_ps(c1[3], b3);
}

/// project_4x2_avx2 for four rows p[0..3] (c[r][a] for row r, token a) with AVX-512VL's 32
/// registers: 16 accumulators, four rows and a token's chunk stay in registers, so each load feeds
/// four products. The same 256-bit products and sums in the same order: the same bits.
MHC_TARGET_AVX512VL inline void project_4x4_avx512vl(const float* const* p, const float* const* x, index_t w,
                                                     float* const (*c)[4]) {
  __m256 a[4][4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) a[r][t] = _mm256_loadu_ps(c[r][t]);
  const float *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3], *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (index_t i = 0; i < w; i += 8) {
    __m256 q[4] = {_mm256_loadu_ps(p0 + i), _mm256_loadu_ps(p1 + i), _mm256_loadu_ps(p2 + i), _mm256_loadu_ps(p3 + i)};
    __m256 v[4] = {_mm256_loadu_ps(x0 + i), _mm256_loadu_ps(x1 + i), _mm256_loadu_ps(x2 + i), _mm256_loadu_ps(x3 + i)};
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) MHC_KEEP_IN_REGISTER(v[t]);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t)
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        __m256 m = _mm256_mul_ps(q[r], v[t]);
        MHC_KEEP_IN_REGISTER(m);  // a product, then a sum: never one fused multiply-add
        a[r][t] = _mm256_add_ps(a[r][t], m);
      }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) _mm256_storeu_ps(c[r][t], a[r][t]);
}

/// a + b * x as a product, then a sum: the product is kept opaque, so it is never contracted into a
/// fused multiply-add (the baseline kernels round the product first; the bits must match).
MHC_TARGET_AVX512VL MHC_INLINE __m512 add_product_avx512(__m512 a, __m512 b, __m512 x) {
  __m512 m = _mm512_mul_ps(b, x);
  MHC_KEEP_IN_REGISTER(m);
  return _mm512_add_ps(a, m);
}

/// s[0] * x with s[0] broadcast from memory by the multiply itself (AVX-512's embedded broadcast): a
/// broadcast to a register first is a separate instruction, which Zen 4 executes on the pipes the
/// multiplies and sums need (grad_phi's 24-row tile ran 46% faster without it, in L1). The product
/// is opaque (asm), so it is never contracted into a fused multiply-add. AT&T and Intel syntax.
MHC_TARGET_AVX512VL MHC_INLINE __m512 mul_broadcast_avx512(const float* s, __m512 x) {
  __m512 m;
  asm("vmulps {%1%{1to16%}, %2, %0|%0, %2, %1%{1to16%}}" : "=v"(m) : "m"(*s), "v"(x));
  return m;
}

/// a + s[0] * x: mul_broadcast_avx512, then a sum.
MHC_TARGET_AVX512VL MHC_INLINE __m512 add_broadcast_product_avx512(__m512 a, const float* s, __m512 x) {
  return _mm512_add_ps(a, mul_broadcast_avx512(s, x));
}

/// Eight floats from lo in the low half of a 512-bit register and eight from hi in the high half.
MHC_TARGET_AVX512VL MHC_INLINE __m512 pair_avx512(const float* lo, const float* hi) {
  return _mm512_castpd_ps(_mm512_maskz_insertf64x4(0xFF, _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(lo))),
                                                   _mm256_castps_pd(_mm256_loadu_ps(hi)), 1));
}

/// Eight values of x as floats: fp32 as they are, bf16 widened exactly (the 16 bits moved to the top).
template <class T>
MHC_TARGET_AVX2 MHC_INLINE __m256 load8_avx2(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(x);
  } else {
    static_assert(sizeof(T) == 2, "bf16 is its 16-bit pattern");
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

/// scalar::load_chunk with AVX2: xb = x as floats, sq[l] += squares of lane l, in increasing element order.
template <class T>
MHC_TARGET_AVX2 MHC_INLINE void load_chunk_avx2(const T* x, index_t w, float* xb, float* sq) {
  const index_t full = w / 8 * 8;
  __m256 s = _mm256_loadu_ps(sq);
  for (index_t i = 0; i < full; i += 8) {
    const __m256 v = load8_avx2(x + i);
    _mm256_storeu_ps(xb + i, v);
    s = _mm256_add_ps(s, _mm256_mul_ps(v, v));
  }
  _mm256_storeu_ps(sq, s);
  for (index_t i = full; i < w; ++i) {
    xb[i] = storage_traits<T>::load(x[i]);
    sq[i - full] += xb[i] * xb[i];
  }
}

/// Floats past the end of each token's chunk in project_tokens_avx2's copy buffer: the buffers of
/// consecutive tokens then do not lie a multiple of 4 KiB apart.
inline constexpr index_t chunk_buffer_pad = 16;

/// load_chunk_avx2 for four tokens (x[a] + k0 into xb[a], squares into sq[a]) in one loop: each
/// token's sum of squares is one chain of dependent additions, and four of them run side by side.
template <class T>
MHC_TARGET_AVX2 MHC_INLINE void load_chunks4_avx2(const T* const* x, index_t k0, index_t w,
                                                  float (*xb)[scalar::projection_chunk + chunk_buffer_pad],
                                                  float (*sq)[scalar::projection_lanes]) {
  const index_t full = w / 8 * 8;
  const T *x0 = x[0] + k0, *x1 = x[1] + k0, *x2 = x[2] + k0, *x3 = x[3] + k0;
  __m256 s0 = _mm256_loadu_ps(sq[0]), s1 = _mm256_loadu_ps(sq[1]), s2 = _mm256_loadu_ps(sq[2]);
  __m256 s3 = _mm256_loadu_ps(sq[3]);
  for (index_t i = 0; i < full; i += 8) {
    __m256 v0 = load8_avx2(x0 + i), v1 = load8_avx2(x1 + i), v2 = load8_avx2(x2 + i), v3 = load8_avx2(x3 + i);
    // Opaque to the optimiser: for fp32, GCC would split the loop into four memcpy calls (rep movsq)
    // and a second pass for the squares.
    MHC_KEEP_IN_REGISTER(v0);
    MHC_KEEP_IN_REGISTER(v1);
    MHC_KEEP_IN_REGISTER(v2);
    MHC_KEEP_IN_REGISTER(v3);
    _mm256_storeu_ps(xb[0] + i, v0), _mm256_storeu_ps(xb[1] + i, v1);
    _mm256_storeu_ps(xb[2] + i, v2), _mm256_storeu_ps(xb[3] + i, v3);
    s0 = _mm256_add_ps(s0, _mm256_mul_ps(v0, v0)), s1 = _mm256_add_ps(s1, _mm256_mul_ps(v1, v1));
    s2 = _mm256_add_ps(s2, _mm256_mul_ps(v2, v2)), s3 = _mm256_add_ps(s3, _mm256_mul_ps(v3, v3));
  }
  _mm256_storeu_ps(sq[0], s0), _mm256_storeu_ps(sq[1], s1), _mm256_storeu_ps(sq[2], s2), _mm256_storeu_ps(sq[3], s3);
  for (int a = 0; a < 4; ++a)
    for (index_t i = full; i < w; ++i) {
      xb[a][i] = storage_traits<T>::load(x[a][k0 + i]);
      sq[a][i - full] += xb[a][i] * xb[a][i];
    }
}

/// Floats of one pair buffer of project_block_avx512: a chunk of two tokens, interleaved eight
/// elements at a time with the second token one group of eight ahead, plus the two half groups the
/// stagger leaves at the ends (a line, which also keeps the four buffers off each other's L1 sets).
inline constexpr index_t pair_buffer = 2 * scalar::projection_chunk + 16;

/// For the eight tokens x[0..7], staggered by one group of eight between the tokens of a pair:
/// xp[a/2][2s + l] = x[a][k0 + s - 8 + l] for even a and xp[a/2][2s + 8 + l] = x[a][k0 + s + l] for
/// odd a (s a multiple of 8, l < 8), so one 512-bit register holds group s/8 - 1 of the even token
/// and group s/8 of the odd one, which sixteen consecutive elements of a row of phi multiply with one
/// plain load (a 256-bit broadcast to both halves costs a shuffle on Zen 4). sq[a][l] += the squares
/// of lane l in increasing element order (as scalar::load_chunk), for the w / 8 * 8 elements of whole
/// groups of eight (project_block_tail takes the rest).
template <class T>
MHC_TARGET_AVX512VL MHC_INLINE void load_pairs8_avx512(const T* const* x, index_t k0, index_t w,
                                                       float (*xp)[pair_buffer],
                                                       float (*sq)[scalar::projection_lanes]) {
  const index_t full = w / 8 * 8;
  __m256 s[8];
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) s[a] = _mm256_loadu_ps(sq[a]);
  for (index_t i = 0; i < full; i += 8) {
#pragma GCC unroll 8
    for (int a = 0; a < 8; ++a) {
      __m256 v = load8_avx2(x[a] + k0 + i);
      MHC_KEEP_IN_REGISTER(v);  // opaque: GCC would split the loop into copies and a pass for the squares
      _mm256_store_ps(xp[a / 2] + 2 * i + (a % 2 == 0 ? 16 : 8), v);
      __m256 m = _mm256_mul_ps(v, v);
      MHC_KEEP_IN_REGISTER(m);  // a product, then a sum (AVX-512 targets have FMA to contract them into)
      s[a] = _mm256_add_ps(s[a], m);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) _mm256_storeu_ps(sq[a], s[a]);
  // The halves project_8xR_avx512 masks off at its first and last steps: zeros, so no register is
  // loaded from memory never written.
  for (int q = 0; q < 4; ++q) {
    _mm256_store_ps(xp[q], _mm256_setzero_ps());
    _mm256_store_ps(xp[q] + 2 * full + 8, _mm256_setzero_ps());
  }
}

/// The chunk of eight tokens project_block_avx512 copies next, to L1 (NTA: not kept in L2).
using chunk_prefetch = spread_prefetch<8, 0>;

/// a + b * x (a product, then a sum) in the lanes of `keep`, a elsewhere.
MHC_TARGET_AVX512VL MHC_INLINE __m512 add_product_avx512(__m512 a, __m512 b, __m512 x, __mmask16 keep) {
  __m512 m = _mm512_mul_ps(b, x);
  MHC_KEEP_IN_REGISTER(m);
  return _mm512_mask_add_ps(a, keep, a, m);
}

/// One step of project_8xR_avx512 at s: the even tokens' group at element s - 8, the odd tokens' at
/// s, for R rows of phi from p (K apart). Edge E = 1 (s = 0) adds only the odd tokens' half, E = 2
/// (s = w) only the even tokens'; E = 0 both.
template <int E, int R>
MHC_TARGET_AVX512VL MHC_INLINE void project_8xR_step(__m512 (&a)[R][4], const float* p, index_t K,
                                                     const float (*xp)[pair_buffer], index_t s, chunk_prefetch& pf) {
  constexpr __mmask16 keep = E == 1 ? 0xFF00 : (E == 2 ? 0x00FF : 0xFFFF);
  pf.step();
  const __m512 v[4] = {_mm512_load_ps(xp[0] + 2 * s), _mm512_load_ps(xp[1] + 2 * s), _mm512_load_ps(xp[2] + 2 * s),
                       _mm512_load_ps(xp[3] + 2 * s)};
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float* row = p + r * K;
    __m512 b;
    if constexpr (E == 0) {
      b = _mm512_loadu_ps(row + s - 8);
    } else {  // the row's eight elements at s (edge 1) or s - 8 (edge 2) in the half kept, zeros beside
      const __m256d h = _mm256_castps_pd(_mm256_loadu_ps(E == 1 ? row : row + s - 8));
      b = _mm512_castpd_ps(_mm512_maskz_insertf64x4(0xFF, _mm512_setzero_pd(), h, E == 1 ? 1 : 0));
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      if constexpr (E == 0)
        a[r][q] = add_product_avx512(a[r][q], b, v[q]);
      else
        a[r][q] = add_product_avx512(a[r][q], b, v[q], keep);
    }
  }
}

/// acc[a][j0 + r][l] += lanes of phi[j0 + r][k0 + i] * x[a][k0 + i] over w elements (a multiple
/// of 8) for eight tokens a and R rows r, from load_pairs8_avx512's staggered buffers: each 512-bit
/// register holds one row's eight lanes for two tokens, sixteen consecutive elements of the row
/// (one plain load) feed four such products, and 4R accumulators stay in registers. w / 8 + 1 steps:
/// the first adds only the odd tokens' first group, the last only the even tokens' last group (the
/// other half's sums masked; phi read for the kept half only, so nothing outside the chunk). Per
/// lane the same product, then the same sum, in the same order as scalar::project_row: the same
/// bits. Each step takes one step of pf.
template <int R, int M>
MHC_TARGET_AVX512VL inline void project_8xR_avx512(const float* p, index_t K, const float (*xp)[pair_buffer], index_t w,
                                                   float (*acc)[M][scalar::projection_lanes], int j0,
                                                   chunk_prefetch& pf) {
  __m512 a[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) a[r][q] = pair_avx512(acc[2 * q][j0 + r], acc[2 * q + 1][j0 + r]);
  if (w > 0) {
    project_8xR_step<1, R>(a, p, K, xp, 0, pf);
    for (index_t s = 8; s < w; s += 8) project_8xR_step<0, R>(a, p, K, xp, s, pf);
    project_8xR_step<2, R>(a, p, K, xp, w, pf);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      _mm256_storeu_ps(acc[2 * q][j0 + r],
                       _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(a[r][q]), 0)));
      _mm256_storeu_ps(acc[2 * q + 1][j0 + r],
                       _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(a[r][q]), 1)));
    }
}

/// Rows of phi project_8xR_avx512 takes at once (4R = 24 accumulators of AVX-512's 32 registers).
inline constexpr int projection_rows512 = 6;

/// The last w < 8 elements from k0 of project_block_avx512's eight tokens: their squares and
/// products continue the same lanes (as scalar::load_chunk and scalar::project_row). A separate
/// function, so that these scalar sums are not compiled for the caller's FMA-capable target.
template <int M, class T>
__attribute__((noinline)) void project_block_tail(const T* const* x, index_t K, const float* phi, index_t k0, index_t w,
                                                  float (*acc)[M][scalar::projection_lanes],
                                                  float (*sq)[scalar::projection_lanes]) {
  for (int a = 0; a < 8; ++a) {
    float xb[scalar::projection_lanes];
    for (index_t i = 0; i < w; ++i) {
      xb[i] = storage_traits<T>::load(x[a][k0 + i]);
      sq[a][i] += xb[i] * xb[i];
    }
    for (int r = 0; r < M; ++r) scalar::project_row(phi + index_t(r) * K + k0, xb, w, acc[a][r]);
  }
}

/// project_tokens_avx2's work for a full block of eight tokens with 512-bit registers (acc and sq
/// hold the lanes; the same bits). Chunk by chunk: the eight tokens' chunk goes to the pair buffers,
/// then six rows of phi at a time multiply all eight, and meanwhile the chunk the next copy reads
/// (the next chunk, or with `more` the next block's first, which follows in memory) is prefetched.
template <int M, class T>
MHC_TARGET_AVX512VL void project_block_avx512(const T* const* x, index_t K, const float* phi,
                                              float (*acc)[M][scalar::projection_lanes],
                                              float (*sq)[scalar::projection_lanes], bool more) {
  constexpr index_t chunk = scalar::projection_chunk;
  constexpr int R = projection_rows512;
  alignas(64) float xp[4][pair_buffer];
  for (index_t k0 = 0; k0 < K; k0 += chunk) {
    const index_t w = K - k0 < chunk ? K - k0 : chunk, full = w / 8 * 8;
    load_pairs8_avx512(x, k0, w, xp, sq);
    index_t next = -1, nw = 0;  // element offset of the next chunk from each token's x, and its length
    if (k0 + chunk < K)
      next = k0 + chunk, nw = K - k0 - chunk < chunk ? K - k0 - chunk : chunk;
    else if (more)
      next = 8 * K, nw = K < chunk ? K : chunk;
    chunk_prefetch pf;
    if (next >= 0) {
      const T* p[8];
      for (int a = 0; a < 8; ++a) p[a] = x[a] + next;
      pf.set(p, 8, nw * index_t(sizeof(T)), (M + R - 1) / R * (full / 8 + 1));  // steps of the calls below
    }
    int j = 0;
    for (; j + R <= M; j += R)
      project_8xR_avx512<R, M>(phi + index_t(j) * K + k0, K, xp, full, acc, j, pf);
    if constexpr (M % R != 0)
      project_8xR_avx512<M % R, M>(phi + index_t(j) * K + k0, K, xp, full, acc, j, pf);
    if (full < w) project_block_tail<M>(x, K, phi, k0 + full, w - full, acc, sq);
  }
}

/// project_tokens with the AVX2 kernel (fp32 compute) for nt <= projection_block tokens: the same
/// bits. Chunk by chunk of the elements, four tokens at a time: each token's chunk is copied to a
/// padded buffer (the rows of R and phi lie a multiple of 4 KiB apart and would share L1 sets), then
/// multiplied by the chunk of every row of phi, which stays in L2 for the block's next four tokens
/// (phi is read from L3 once per block, not once per four tokens). While a chunk is multiplied the
/// next one to copy (of the next four tokens, the next chunk, or with `more` the next block's
/// tokens, which follow these in memory) is prefetched.
template <int M, class T>
MHC_TARGET_AVX2 void project_tokens_avx2(const T* const* x, int nt, index_t K, const float* phi, float* u, float* s,
                                         bool more) {
  constexpr int W = scalar::projection_lanes, TB = projection_tokens, NB = projection_block;
  constexpr index_t chunk = scalar::projection_chunk, pad = chunk_buffer_pad;
  static_assert(W == 8 && TB == 4, "the kernel holds eight lanes of four tokens");
  alignas(32) float acc[NB][M][W];
  alignas(32) float sq[NB][W];
  for (int a = 0; a < NB; ++a)
    for (int l = 0; l < W; ++l) {
      sq[a][l] = 0.0f;
      for (int j = 0; j < M; ++j) acc[a][j][l] = 0.0f;
    }
  alignas(32) float xb[TB][chunk + pad];
  const float* xs[TB] = {xb[0], xb[1], xb[2], xb[3]};
  constexpr int pairs = M / 2 > 0 ? M / 2 : 1;
  const bool wide = avx512vl_kernels();
  if (wide && nt == NB) {
    static_assert(NB == 8, "the 512-bit kernel holds a block of eight tokens");
    project_block_avx512<M>(x, K, phi, acc, sq, more);
  } else {
    for (index_t k0 = 0; k0 < K; k0 += chunk) {
      const index_t w = K - k0 < chunk ? K - k0 : chunk, full = w / 8 * 8;
      for (int g = 0; g < nt; g += TB) {
        const int ng = nt - g < TB ? nt - g : TB;
        const T* const* xg = x + g;
        float(*ag)[M][W] = acc + g;
        if (ng == TB)
          load_chunks4_avx2(xg, k0, w, xb, sq + g);
        else
          for (int a = 0; a < ng; ++a) load_chunk_avx2(xg[a] + k0, w, xb[a], sq[g + a]);
        // What to prefetch, a few lines before each row pair: the chunk the next copy reads.
        const T* next[TB] = {};
        index_t nw = 0;
        if (g + TB < nt) {
          const int nn = nt - g - TB < TB ? nt - g - TB : TB;
          for (int a = 0; a < nn; ++a) next[a] = x[g + TB + a] + k0;
          nw = w;
        } else if (k0 + chunk < K) {
          for (int a = 0; a < TB && a < nt; ++a) next[a] = x[a] + k0 + chunk;
          nw = K - k0 - chunk < chunk ? K - k0 - chunk : chunk;
        } else if (more) {  // the next block: token a at x[a] + nt * K
          for (int a = 0; a < TB && a < nt; ++a) next[a] = x[a] + index_t(nt) * K;
          nw = K < chunk ? K : chunk;
        }
        const index_t lines = (nw * index_t(sizeof(T)) + 63) / 64, per = (lines + pairs - 1) / pairs;
        auto prefetch = [&](int j, int rows) MHC_ALWAYS_INLINE_LAMBDA {
          const index_t l0 = index_t(j / 2) * per, e = l0 + index_t(rows / 2) * per, l1 = e < lines ? e : lines;
          for (int a = 0; a < TB; ++a)
            if (next[a] != nullptr)
              for (index_t l = l0; l < l1; ++l)
                _mm_prefetch(reinterpret_cast<const char*>(next[a]) + l * 64, _MM_HINT_NTA);
        };
        if (ng == TB) {
          int j = 0;
          for (; wide && j + 4 <= M; j += 4) {
            prefetch(j, 4);
            const float* p[4] = {phi + index_t(j) * K + k0, phi + index_t(j + 1) * K + k0,
                                 phi + index_t(j + 2) * K + k0, phi + index_t(j + 3) * K + k0};
            float* const c[4][4] = {{ag[0][j], ag[1][j], ag[2][j], ag[3][j]},
                                    {ag[0][j + 1], ag[1][j + 1], ag[2][j + 1], ag[3][j + 1]},
                                    {ag[0][j + 2], ag[1][j + 2], ag[2][j + 2], ag[3][j + 2]},
                                    {ag[0][j + 3], ag[1][j + 3], ag[2][j + 3], ag[3][j + 3]}};
            project_4x4_avx512vl(p, xs, full, c);
            for (int a = 0; a < TB && full < w; ++a)  // the tail continues the same lanes
              for (int r = 0; r < 4; ++r) scalar::project_row(p[r] + full, xb[a] + full, w - full, ag[a][j + r]);
          }
          for (; j + 2 <= M; j += 2) {
            prefetch(j, 2);
            const float *p = phi + index_t(j) * K + k0, *q = phi + index_t(j + 1) * K + k0;
            float* c0[TB] = {ag[0][j], ag[1][j], ag[2][j], ag[3][j]};
            float* c1[TB] = {ag[0][j + 1], ag[1][j + 1], ag[2][j + 1], ag[3][j + 1]};
            project_4x2_avx2(p, q, xs, full, c0, c1);
            for (int a = 0; a < TB && full < w; ++a) {  // the tail continues the same lanes
              scalar::project_row(p + full, xb[a] + full, w - full, ag[a][j]);
              scalar::project_row(q + full, xb[a] + full, w - full, ag[a][j + 1]);
            }
          }
          for (; j < M; ++j)
            for (int a = 0; a < TB; ++a) scalar::project_row(phi + index_t(j) * K + k0, xb[a], w, ag[a][j]);
        } else {
          for (int a = 0; a < ng; ++a)
            for (int j = 0; j < M; ++j) scalar::project_row(phi + index_t(j) * K + k0, xb[a], w, ag[a][j]);
        }
      }
    }
  }
  for (int a = 0; a < nt; ++a) {
    s[a] = scalar::combine_lanes(sq[a]);
    for (int j = 0; j < M; ++j) u[a * M + j] = scalar::combine_lanes(acc[a][j]);
  }
}
#endif

/// project_tokens for nt <= projection_block tokens with the kernels of `isa` (the same bits for
/// every isa). `more`: nt == projection_block and the next projection_block tokens follow these in
/// memory (a prefetch hint).
template <int M, class T, class F>
inline void project_tokens(cpu_isa isa, const T* const* x, int nt, index_t K, const F* phi, F* u, F* s, bool more) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (isa == cpu_isa::avx2) return project_tokens_avx2<M>(x, nt, K, phi, u, s, more);
#endif
  (void)isa, (void)more;
  for (int g = 0; g < nt; g += projection_tokens)
    project_tokens<M>(x + g, nt - g < projection_tokens ? nt - g : projection_tokens, K, phi, u + g * M, s + g);
}

/// scalar::projection_input_grad in the same order (from zero, j = 0..M-1, then 2 x gs; the same bits)
/// with SSE2: rows of phi in groups of four over 16 elements at a time, the partial sums in registers
/// within a group. Four rows at a time, not all M: the rows lie K floats apart, so with K a multiple of
/// 1024 they share the L1 sets, and more than a few of them evict each other.
template <int M, class T, class F>
MHC_INLINE void projection_input_grad(const F* gu, const F* phi, index_t K, index_t k0, index_t w, const T* x, F gs,
                                      F* out) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<F, float>) {
    const index_t full = w / 16 * 16;
    for (int j0 = 0; j0 < M; j0 += 4) {
      const int j1 = j0 + 4 < M ? j0 + 4 : M;
      for (index_t l = 0; l < full; l += 16) {
        __m128 o0, o1, o2, o3;
        if (j0 == 0) {
          o0 = o1 = o2 = o3 = _mm_setzero_ps();
        } else {
          o0 = _mm_loadu_ps(out + l), o1 = _mm_loadu_ps(out + l + 4);
          o2 = _mm_loadu_ps(out + l + 8), o3 = _mm_loadu_ps(out + l + 12);
        }
        const F* p = phi + index_t(j0) * K + k0 + l;
        for (int j = j0; j < j1; ++j, p += K) {
          const __m128 g = _mm_set1_ps(gu[j]);
          o0 = _mm_add_ps(o0, _mm_mul_ps(g, _mm_loadu_ps(p)));
          o1 = _mm_add_ps(o1, _mm_mul_ps(g, _mm_loadu_ps(p + 4)));
          o2 = _mm_add_ps(o2, _mm_mul_ps(g, _mm_loadu_ps(p + 8)));
          o3 = _mm_add_ps(o3, _mm_mul_ps(g, _mm_loadu_ps(p + 12)));
        }
        _mm_storeu_ps(out + l, o0), _mm_storeu_ps(out + l + 4, o1), _mm_storeu_ps(out + l + 8, o2);
        _mm_storeu_ps(out + l + 12, o3);
      }
    }
    if (full < w) scalar::projection_input_grad<M>(gu, phi, K, k0 + full, w - full, x + full, gs, out + full);
    for (index_t l = 0; l < full; ++l) out[l] += F(2) * storage_traits<T>::load(x[l]) * gs;
    return;
  }
#endif
  scalar::projection_input_grad<M>(gu, phi, K, k0, w, x, gs, out);
}

#if MHC_HAVE_AVX2_KERNELS
/// projection_input_grad with AVX2: four rows of phi over 32 elements at a time (the same order: from
/// zero, j = 0..M-1, then 2 x gs; the same bits).
template <int M, class T>
MHC_TARGET_AVX2 void projection_input_grad_avx2(const float* gu, const float* phi, index_t K, index_t k0, index_t w,
                                                const T* x, float gs, float* out) {
  const index_t full = w / 32 * 32;
  for (int j0 = 0; j0 < M; j0 += 4) {
    const int j1 = j0 + 4 < M ? j0 + 4 : M;
    for (index_t l = 0; l < full; l += 32) {
      __m256 o0, o1, o2, o3;
      if (j0 == 0) {
        o0 = o1 = o2 = o3 = _mm256_setzero_ps();
      } else {
        o0 = _mm256_loadu_ps(out + l), o1 = _mm256_loadu_ps(out + l + 8);
        o2 = _mm256_loadu_ps(out + l + 16), o3 = _mm256_loadu_ps(out + l + 24);
      }
      const float* p = phi + index_t(j0) * K + k0 + l;
      for (int j = j0; j < j1; ++j, p += K) {
        const __m256 g = _mm256_set1_ps(gu[j]);
        o0 = _mm256_add_ps(o0, _mm256_mul_ps(g, _mm256_loadu_ps(p)));
        o1 = _mm256_add_ps(o1, _mm256_mul_ps(g, _mm256_loadu_ps(p + 8)));
        o2 = _mm256_add_ps(o2, _mm256_mul_ps(g, _mm256_loadu_ps(p + 16)));
        o3 = _mm256_add_ps(o3, _mm256_mul_ps(g, _mm256_loadu_ps(p + 24)));
      }
      _mm256_storeu_ps(out + l, o0), _mm256_storeu_ps(out + l + 8, o1), _mm256_storeu_ps(out + l + 16, o2);
      _mm256_storeu_ps(out + l + 24, o3);
    }
  }
  if (full < w) scalar::projection_input_grad<M>(gu, phi, K, k0 + full, w - full, x + full, gs, out + full);
  const __m256 two = _mm256_set1_ps(2.0f), g = _mm256_set1_ps(gs);
  for (index_t l = 0; l < full; l += 8)
    _mm256_storeu_ps(out + l,
                     _mm256_add_ps(_mm256_loadu_ps(out + l), _mm256_mul_ps(_mm256_mul_ps(two, load8_avx2(x + l)), g)));
}
#endif

/// projection_input_grad with the kernels of `isa` (the same bits for every isa).
template <int M, class T, class F>
inline void projection_input_grad(cpu_isa isa, const F* gu, const F* phi, index_t K, index_t k0, index_t w, const T* x,
                                  F gs, F* out) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (isa == cpu_isa::avx2) return projection_input_grad_avx2<M>(gu, phi, K, k0, w, x, gs, out);
#endif
  (void)isa;
  projection_input_grad<M>(gu, phi, K, k0, w, x, gs, out);
}

/// Tokens projection_input_grad_tokens handles at once.
inline constexpr int input_grad_tokens = 4;

/// The rows of phi over one block of the hidden dimension, [k0, k0 + w), for the input gradient of
/// several tokens. The AVX2 kernel reads them packed 16 elements by M rows at a time, contiguous: in
/// place, the M rows lie K floats apart, a multiple of 4 KiB when C is a multiple of 256, so all of
/// them map to the same L1 and L2 sets and the block cannot stay cached for the next tokens.
template <int M, class F, index_t W>
struct phi_panel {
  static_assert(W % 16 == 0, "the kernel packs 16 elements at a time");
  const F* phi = nullptr;
  index_t K = 0, k0 = 0, w = 0;
  bool packed = false;
  alignas(64) F v[W * M];

  /// Takes phi[j][k0 .. k0 + w) for j < M (w <= W), packed where `isa`'s kernel reads it so and
  /// `tokens` (those that will use the panel) fill at least one group of the multi-token kernel (for
  /// fewer, the one-token kernels read phi in place and packing would only copy it).
  void load(cpu_isa isa, const F* phi_, index_t K_, index_t k0_, index_t w_, int tokens) {
    phi = phi_, K = K_, k0 = k0_, w = w_;
    packed = std::is_same_v<F, float> && isa == cpu_isa::avx2 && MHC_HAVE_AVX2_KERNELS && tokens >= input_grad_tokens;
    if (!packed) return;
    // Row by row: each row of phi is read in one run, which the hardware prefetchers follow (16
    // elements of each of the M rows in turn, K apart, stalled on every load).
    for (int j = 0; j < M; ++j)
      for (index_t l = 0; l + 16 <= w; l += 16) {
        const F* src = phi + index_t(j) * K + k0 + l;
        F* dst = v + l * M + j * 16;
        for (int i = 0; i < 16; ++i) dst[i] = src[i];
      }
  }
};

/// Panel width for nb panels of M rows held at once: at most 1024 elements and about 96 KiB.
template <int M, class F>
constexpr index_t panel_width(int nb) {
  const index_t w = index_t(98304 / sizeof(F)) / (index_t(nb) * M) / 16 * 16;
  return w < 16 ? 16 : (w > 1024 ? 1024 : w);
}

/// Rows of memory a four-token input-gradient kernel prefetches as it goes: at each element l of the
/// panel it computes, element l of every row here (for example the rows the next call reads, or the
/// rows of gR its caller then updates). The hardware prefetchers do not follow these short runs
/// (rows K or C apart, a few KiB each), and the loads stall on memory without it.
template <class T>
struct prefetch_rows {
  static constexpr int capacity = 12;
  const T* row[capacity];
  int n = 0;
  void add(const T* p) {
    if (n < capacity) row[n++] = p;
  }
  /// Prefetches elements [l, l + e) of every row (e * sizeof(T) a multiple of 64 bytes or less). The
  /// addresses are computed as integers: near the end of a buffer they may lie past it (a prefetch
  /// never faults), and no pointer past it is formed.
  MHC_INLINE void at(index_t l, index_t e) const {
    for (int r = 0; r < n; ++r) {
      const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(row[r]) + std::uintptr_t(l) * sizeof(T);
      for (index_t o = 0; o < e * index_t(sizeof(T)); o += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(p + std::uintptr_t(o)), 0, 3);
    }
  }
};

/// Tokens per slab of the backward input gradient: their coefficients are computed first, then each
/// panel of phi is packed once and used for all of them.
inline constexpr int backward_slab = 64;

#if MHC_HAVE_AVX2_KERNELS
/// The elements of a panel from `full` (past the last whole group of 16) for the four tokens of
/// projection_input_grad4_avx2 / _avx512: the scalar kernel per token. Not inlined, so that these
/// scalar sums are not compiled for a caller's FMA-capable target.
template <int M, index_t W, class T>
__attribute__((noinline)) void input_grad4_tail(const phi_panel<M, float, W>& pn, const float* gu, const T* const* x,
                                                const float* gs, float* const* out, index_t full) {
  for (int a = 0; a < 4; ++a)
    scalar::projection_input_grad<M>(gu + a * M, pn.phi, pn.K, pn.k0 + full, pn.w - full, x[a] + full, gs[a],
                                     out[a] + full);
}

/// projection_input_grad for four tokens at once with AVX2 (token a: gu + a*M, x[a], gs[a], out[a])
/// over a packed panel: four tokens by 16 elements in registers through all M rows, so each load of
/// phi feeds four tokens. The same order per element (from zero, j = 0..M-1, then (2 x) gs), so the
/// same bits as the one-token kernels.
template <int M, index_t W, class T>
MHC_TARGET_AVX2 void projection_input_grad4_avx2(const phi_panel<M, float, W>& pn, const float* gu, const T* const* x,
                                                 const float* gs, float* const* out, const prefetch_rows<T>& pf) {
  const index_t w = pn.w, full = w / 16 * 16;
  const __m256 two = _mm256_set1_ps(2.0f);
  for (index_t l = 0; l < full; l += 16) {
    pf.at(l, 16);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    const float* p = pn.v + l * M;
    for (int j = 0; j < M; ++j, p += 16) {
      const __m256 p0 = _mm256_load_ps(p), p1 = _mm256_load_ps(p + 8);
      __m256 g = _mm256_broadcast_ss(gu + j);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(g, p0));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(g, p1));
      g = _mm256_broadcast_ss(gu + M + j);
      b0 = _mm256_add_ps(b0, _mm256_mul_ps(g, p0));
      b1 = _mm256_add_ps(b1, _mm256_mul_ps(g, p1));
      g = _mm256_broadcast_ss(gu + 2 * M + j);
      c0 = _mm256_add_ps(c0, _mm256_mul_ps(g, p0));
      c1 = _mm256_add_ps(c1, _mm256_mul_ps(g, p1));
      g = _mm256_broadcast_ss(gu + 3 * M + j);
      d0 = _mm256_add_ps(d0, _mm256_mul_ps(g, p0));
      d1 = _mm256_add_ps(d1, _mm256_mul_ps(g, p1));
    }
    const __m256 acc[4][2] = {{a0, a1}, {b0, b1}, {c0, c1}, {d0, d1}};
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const __m256 g = _mm256_broadcast_ss(gs + a);
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        const __m256 sx = _mm256_mul_ps(_mm256_mul_ps(two, load8_avx2(x[a] + l + 8 * v)), g);
        _mm256_storeu_ps(out[a] + l + 8 * v, _mm256_add_ps(acc[a][v], sx));
      }
    }
  }
  if (full < w) input_grad4_tail(pn, gu, x, gs, out, full);
}

/// Sixteen values of x as floats in a 512-bit register (as load8_avx2).
template <class T>
MHC_TARGET_AVX512VL MHC_INLINE __m512 load16_avx512(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(x);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    // (the zero-masking forms: the plain ones start from an undefined vector, which GCC 12 warns about)
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h), 16));
  }
}

/// Elements [l, l + 16G) of projection_input_grad4_avx512: four tokens by G packed groups of 16
/// elements in 4G accumulators through all M rows.
template <int G, int M, index_t W, class T>
MHC_TARGET_AVX512VL MHC_INLINE void input_grad4_groups_avx512(const phi_panel<M, float, W>& pn, const float* gu,
                                                              const T* const* x, const float* gs, float* const* out,
                                                              index_t l) {
  __m512 acc[4][G];
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a)
#pragma GCC unroll 2
    for (int v = 0; v < G; ++v) acc[a][v] = _mm512_setzero_ps();
  const float* p = pn.v + l * M;
  for (int j = 0; j < M; ++j, p += 16) {
    __m512 q[G];
#pragma GCC unroll 2
    for (int v = 0; v < G; ++v) q[v] = _mm512_load_ps(p + v * 16 * M);
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a)
#pragma GCC unroll 2
      for (int v = 0; v < G; ++v) acc[a][v] = add_broadcast_product_avx512(acc[a][v], gu + a * M + j, q[v]);
  }
  const __m512 two = _mm512_set1_ps(2.0f);
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    const __m512 g = _mm512_set1_ps(gs[a]);
#pragma GCC unroll 2
    for (int v = 0; v < G; ++v) {
      __m512 sx = _mm512_mul_ps(_mm512_mul_ps(two, load16_avx512(x[a] + l + 16 * v)), g);
      MHC_KEEP_IN_REGISTER(sx);
      _mm512_storeu_ps(out[a] + l + 16 * v, _mm512_add_ps(acc[a][v], sx));
    }
  }
}

/// projection_input_grad4_avx2 with 512-bit registers: four tokens by 32 elements (two packed groups
/// of 16) in eight accumulators through all M rows. The same order per element: the same bits.
template <int M, index_t W, class T>
MHC_TARGET_AVX512VL void projection_input_grad4_avx512(const phi_panel<M, float, W>& pn, const float* gu,
                                                       const T* const* x, const float* gs, float* const* out,
                                                       const prefetch_rows<T>& pf) {
  const index_t w = pn.w, full = w / 16 * 16;
  index_t l = 0;
  for (; l + 32 <= full; l += 32) {
    pf.at(l, 32);
    input_grad4_groups_avx512<2>(pn, gu, x, gs, out, l);
  }
  if (l < full) pf.at(l, 16), input_grad4_groups_avx512<1>(pn, gu, x, gs, out, l);
  if (full < w) input_grad4_tail(pn, gu, x, gs, out, full);
}
#endif

/// projection_input_grad over a panel for nt <= input_grad_tokens tokens with the kernels of `isa`
/// (token a: coefficients gu + a*M, its input from element k0 at x[a], gs[a], out[a]): the same bits
/// as one call per token.
template <int M, index_t W, class T, class F>
inline void projection_input_grad_tokens(cpu_isa isa, const phi_panel<M, F, W>& pn, int nt, const F* gu,
                                         const T* const* x, const F* gs, F* const* out,
                                         const prefetch_rows<T>& pf = {}) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (pn.packed && nt == input_grad_tokens)
      return avx512vl_kernels() ? projection_input_grad4_avx512<M, W>(pn, gu, x, gs, out, pf)
                                : projection_input_grad4_avx2<M, W>(pn, gu, x, gs, out, pf);
#endif
  (void)pf;
  for (int a = 0; a < nt; ++a)
    projection_input_grad<M>(isa, gu + a * M, pn.phi, pn.K, pn.k0, pn.w, x[a], gs[a], out[a]);
}

/// Columns of grad_phi accumulate_grad_phi_block handles at once. It reads each token's row of R in
/// runs of this many elements, rows K apart, which the hardware prefetchers do not follow: 128
/// columns (512 bytes of fp32) took 15-17% less time than 64 at C = 4096 (256 columns: no gain, the
/// tile buffer no longer fits L1).
inline constexpr index_t grad_phi_block = 128;

/// The generic loop of accumulate_grad_phi_block: four tokens per pass over the accumulators.
template <int M, class T, class F>
inline void accumulate_grad_phi_block(index_t tokens, index_t K, const T* R, const F* gz, const F* r, index_t k0,
                                      index_t w, F* gphi) {
  constexpr index_t B = grad_phi_block;
  F acc[M][B];
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < B; ++l) acc[j][l] = F(0);
  index_t t = 0;
  for (; t + 4 <= tokens; t += 4) {  // four tokens per pass over acc, added in token order
    F xb[4][B], g[4][M];
    for (int a = 0; a < 4; ++a) {
      const T* x = R + (t + a) * K + k0;
      for (index_t l = 0; l < w; ++l) xb[a][l] = storage_traits<T>::load(x[l]);
      for (int j = 0; j < M; ++j) g[a][j] = gz[(t + a) * M + j] * r[t + a];
    }
    for (int j = 0; j < M; ++j) {
      const F g0 = g[0][j], g1 = g[1][j], g2 = g[2][j], g3 = g[3][j];
      for (index_t l = 0; l < w; ++l)
        acc[j][l] = (((acc[j][l] + g0 * xb[0][l]) + g1 * xb[1][l]) + g2 * xb[2][l]) + g3 * xb[3][l];
    }
  }
  for (; t < tokens; ++t) {
    F xb[B];
    const T* x = R + t * K + k0;
    for (index_t l = 0; l < w; ++l) xb[l] = storage_traits<T>::load(x[l]);
    for (int j = 0; j < M; ++j) {
      const F g = gz[t * M + j] * r[t];
      for (index_t l = 0; l < w; ++l) acc[j][l] += g * xb[l];
    }
  }
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < w; ++l) gphi[index_t(j) * K + k0 + l] = acc[j][l];
}

#if MHC_HAVE_AVX2_KERNELS
/// acc[r][0..16) (rows RW apart) += g[t*M + r] * xb[t][0..16) (tokens XW apart) for rows r < NR and
/// tokens t < nt in order: 16 columns by NR rows of accumulators stay in registers through the tokens.
template <int NR, int M, index_t XW, index_t RW>
MHC_TARGET_AVX2 MHC_INLINE void grad_phi_tile_avx2(const float* g, const float* xb, int nt, float* acc) {
  // The loops over q are unrolled so that a[][] lives in registers (GCC at -O2 does not unroll them
  // by itself and keeps the accumulators in memory).
  __m256 a[NR][2];
#pragma GCC unroll 8
  for (int q = 0; q < NR; ++q) a[q][0] = _mm256_load_ps(acc + q * RW), a[q][1] = _mm256_load_ps(acc + q * RW + 8);
  for (int t = 0; t < nt; ++t, g += M, xb += XW) {
    const __m256 x0 = _mm256_load_ps(xb), x1 = _mm256_load_ps(xb + 8);
#pragma GCC unroll 8
    for (int q = 0; q < NR; ++q) {
      const __m256 gb = _mm256_broadcast_ss(g + q);
      a[q][0] = _mm256_add_ps(a[q][0], _mm256_mul_ps(gb, x0));
      a[q][1] = _mm256_add_ps(a[q][1], _mm256_mul_ps(gb, x1));
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < NR; ++q) _mm256_store_ps(acc + q * RW, a[q][0]), _mm256_store_ps(acc + q * RW + 8, a[q][1]);
}

/// Software prefetches spread over the token steps of a tile's kernel calls: step s, counted over all
/// of them, prefetches line s % lines of row s / lines (rows `stride` bytes apart from `base`), for
/// the first `rows` rows. Each row's lines go out together: one DRAM page at a time.
struct grad_phi_prefetch {
  std::uintptr_t base = 0;
  index_t stride = 0;
  int rows = 0, lines = 1;
  MHC_INLINE void at(int s) const {
    const int row = s / lines;
    if (row < rows)
      _mm_prefetch(reinterpret_cast<const char*>(base + std::uintptr_t(row * stride + 64 * (s - row * lines))),
                   _MM_HINT_T0);
  }
};

/// grad_phi_tile_avx2 with 512-bit registers for 32 columns: acc[r][0..32) (rows RW apart) +=
/// g[t*M + r] * x_t[0..32) (tokens xs elements apart, fp32 or bf16) for rows r < NR and tokens t < nt
/// in order. 2 * NR accumulators (of AVX-512's 32 registers) stay in registers through the tokens,
/// each load of x feeds NR rows; token step t makes prefetch step s0 + t. Per element the same
/// product, then the same sum, tokens in order: the same bits.
template <int NR, int M, index_t RW, class T>
MHC_TARGET_AVX512VL MHC_INLINE void grad_phi_tile_avx512(const float* g, const T* x, index_t xs, int nt, float* acc,
                                                         const grad_phi_prefetch& pf, int s0) {
  __m512 a[NR][2];
#pragma GCC unroll 12
  for (int q = 0; q < NR; ++q) a[q][0] = _mm512_load_ps(acc + q * RW), a[q][1] = _mm512_load_ps(acc + q * RW + 16);
  for (int t = 0; t < nt; ++t, g += M, x += xs) {
    pf.at(s0 + t);
    const __m512 x0 = load16_avx512(x), x1 = load16_avx512(x + 16);
#pragma GCC unroll 12
    for (int q = 0; q < NR; ++q) {
      a[q][0] = add_broadcast_product_avx512(a[q][0], g + q, x0);
      a[q][1] = add_broadcast_product_avx512(a[q][1], g + q, x1);
    }
  }
#pragma GCC unroll 12
  for (int q = 0; q < NR; ++q) _mm512_store_ps(acc + q * RW, a[q][0]), _mm512_store_ps(acc + q * RW + 16, a[q][1]);
}

/// acc[j][0..cols) (rows RW apart) += g[t*M + j] * x_t[0..cols) for all M rows and the nt tokens of a
/// tile (cols a multiple of 32), 32 columns by 12 rows at a time, with the prefetches of pf spread
/// over the calls.
template <int M, index_t RW, class T>
MHC_TARGET_AVX512VL void grad_phi_tiles_avx512(const float* g, const T* x, index_t xs, index_t cols, int nt,
                                               float* acc, const grad_phi_prefetch& pf) {
  constexpr int NR = 12;
  int s0 = 0;
  int j0 = 0;
  for (; j0 + NR <= M; j0 += NR)
    for (index_t l = 0; l < cols; l += 32, s0 += nt)
      grad_phi_tile_avx512<NR, M, RW>(g + j0, x + l, xs, nt, acc + j0 * RW + l, pf, s0);
  if constexpr (M % NR != 0)
    for (index_t l = 0; l < cols; l += 32, s0 += nt)
      grad_phi_tile_avx512<M % NR, M, RW>(g + j0, x + l, xs, nt, acc + j0 * RW + l, pf, s0);
}

/// One row of a grad_phi tile: the w <= B elements at x as floats into xb[0..w), zeros to B.
template <index_t B, class T>
MHC_TARGET_AVX2 MHC_INLINE void grad_phi_stage_row_avx2(const T* x, index_t w, float* xb) {
  index_t l = 0;
  if (w == B)
    for (; l < B; l += 8) {
      __m256 v = load8_avx2(x + l);
      MHC_KEEP_IN_REGISTER(v);  // opaque: GCC -O2 would turn the fp32 copy into a rep movs
      _mm256_store_ps(xb + l, v);
    }
  for (; l < w; ++l) xb[l] = storage_traits<T>::load(x[l]);
  for (; l < B; ++l) xb[l] = 0.0f;  // padding columns, never stored
}

/// acc[j][0..B) += g[t*M + j] * xb[t][0..B) for the M rows and the nt staged tokens, in token order:
/// grad_phi_tiles_avx512 when `wide`, else 16 columns by 6 rows of AVX2 accumulators at a time.
template <int M, index_t B>
MHC_TARGET_AVX2 MHC_INLINE void grad_phi_tile_step_avx2(bool wide, const float* g, const float* xb, int nt,
                                                        float (*acc)[B]) {
  constexpr int NR = 6;
  if (wide) return grad_phi_tiles_avx512<M, B>(g, xb, B, B, nt, acc[0], grad_phi_prefetch{});
  int j0 = 0;
  for (; j0 + NR <= M; j0 += NR)
    for (index_t l = 0; l < B; l += 16) grad_phi_tile_avx2<NR, M, B, B>(g + j0, xb + l, nt, acc[j0] + l);
  if constexpr (M % NR != 0)
    for (index_t l = 0; l < B; l += 16) grad_phi_tile_avx2<M % NR, M, B, B>(g + j0, xb + l, nt, acc[j0] + l);
}

/// accumulate_grad_phi_block with AVX2, the same bits (every element from zero, tokens added in order,
/// g = gz * r then g * x then the sum). A tile of tokens at a time is converted to a buffer (in place,
/// the rows of R lie a multiple of 4 KiB apart and share the L1 sets), then each 16 columns by 6 rows
/// of accumulators go through the tile's tokens in registers: each load of x feeds 6 rows. (With
/// AVX-512, rows M > 4 take accumulate_grad_phi_block_avx512, M <= 4 accumulate_grad_phi_range_avx2.)
template <int M, class T>
MHC_TARGET_AVX2 void accumulate_grad_phi_block_avx2(index_t tokens, index_t K, const T* R, const float* gz,
                                                    const float* r, index_t k0, index_t w, float* gphi) {
  constexpr index_t B = grad_phi_block;
  constexpr int TT = 64;
  alignas(64) float acc[M][B];
  alignas(64) float xb[TT][B];
  float g[TT * M];
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < B; ++l) acc[j][l] = 0.0f;
  for (index_t t0 = 0; t0 < tokens; t0 += TT) {
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    for (int a = 0; a < nt; ++a) {
      const T* x = R + (t0 + a) * K + k0;
      if (t0 + TT + a < tokens)  // the same row of the next tile (6-10% faster than without)
        for (index_t o = 0; o < w * index_t(sizeof(T)); o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(x + TT * K) + o, _MM_HINT_T0);
      grad_phi_stage_row_avx2<B>(x, w, xb[a]);
      for (int j = 0; j < M; ++j) g[a * M + j] = gz[(t0 + a) * M + j] * r[t0 + a];
    }
    grad_phi_tile_step_avx2<M, B>(false, g, xb[0], nt, acc);
  }
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < w; ++l) gphi[index_t(j) * K + k0 + l] = acc[j][l];
}

/// acc[q][0..64) += g[t*M + q] * x_t[0..64) for the M <= 4 rows and the nt tokens of a tile in order,
/// read straight from the rows of R (x: the first token's, rows K apart) with the accumulators in
/// registers, no staging buffer: for so few rows the copy to one cost more than the products. The
/// first npf rows prefetch their elements `ahead` elements on. The same bits as
/// grad_phi_tile_avx512 (a product, then a sum, tokens in order).
template <int M, index_t RW, class T>
MHC_TARGET_AVX512VL void grad_phi_rows_avx512(const T* x, index_t K, const float* g, int nt, int npf,
                                           index_t ahead, float* acc) {
  static_assert(M <= 4, "16 accumulators at most");
  __m512 a[M][4];
#pragma GCC unroll 4
  for (int q = 0; q < M; ++q)
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) a[q][h] = _mm512_load_ps(acc + q * RW + 16 * h);
  for (int t = 0; t < nt; ++t, x += K, g += M) {
    if (t < npf)
      for (index_t o = 0; o < 64 * index_t(sizeof(T)); o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(x) +
                                                   std::uintptr_t(ahead * index_t(sizeof(T)) + o)),
                     _MM_HINT_T0);
    __m512 xv[4];
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) xv[h] = load16_avx512(x + 16 * h);
#pragma GCC unroll 4
    for (int q = 0; q < M; ++q)
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) a[q][h] = add_broadcast_product_avx512(a[q][h], g + q, xv[h]);
  }
#pragma GCC unroll 4
  for (int q = 0; q < M; ++q)
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) _mm512_store_ps(acc + q * RW + 16 * h, a[q][h]);
}

/// accumulate_grad_phi_block_avx2 over the columns [k_begin, k_end) (a multiple of grad_phi_block from
/// k_begin, but for the last block), the same bits, with the loops the other way round: a tile of
/// tokens at a time through all the blocks, the partial sums kept in gphi between tiles (fp32, so
/// nothing is rounded twice). Each row of the tile is then read in one run from k_begin to k_end
/// rather than in runs of grad_phi_block elements K apart, which the memory serves at a higher rate.
template <int M, class T>
MHC_TARGET_AVX2 void accumulate_grad_phi_range_avx2(index_t tokens, index_t K, const T* R, const float* gz,
                                                    const float* r, index_t k_begin, index_t k_end, float* gphi) {
  constexpr index_t B = grad_phi_block;
  constexpr int TT = 64;
  alignas(64) float acc[M][B];
  alignas(64) float xb[TT][B];
  const bool wide = avx512vl_kernels();
  float g[TT * M];
  for (index_t t0 = 0; t0 < tokens; t0 += TT) {
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    for (int a = 0; a < nt; ++a)
      for (int j = 0; j < M; ++j) g[a * M + j] = gz[(t0 + a) * M + j] * r[t0 + a];
    for (index_t k0 = k_begin; k0 < k_end; k0 += B) {
      const index_t w = k_end - k0 < B ? k_end - k0 : B;
      for (int j = 0; j < M; ++j) {  // 8 at a time, opaque: GCC would call memcpy / memset here
        const float* gj = gphi + index_t(j) * K + k0;
        index_t l = 0;
        if (t0 == 0) {
          for (; l < B; l += 8) {
            __m256 v = _mm256_setzero_ps();
            MHC_KEEP_IN_REGISTER(v);
            _mm256_store_ps(acc[j] + l, v);
          }
          continue;
        }
        for (; l + 8 <= w; l += 8) {
          __m256 v = _mm256_loadu_ps(gj + l);
          MHC_KEEP_IN_REGISTER(v);
          _mm256_store_ps(acc[j] + l, v);
        }
        for (; l < w; ++l) acc[j][l] = gj[l];
        for (; l < B; ++l) acc[j][l] = 0.0f;  // padding columns (the last block only)
      }
      // Prefetched as the tile goes: each row's next block, else (the last block) the next tile's
      // rows from k_begin, for the first npf rows (those that exist).
      const index_t ahead = k0 + B < k_end ? B : TT * K - (k0 - k_begin);
      const int npf = k0 + B < k_end ? nt : int(std::min<index_t>(nt, std::max<index_t>(0, tokens - t0 - TT)));
      bool direct = false;  // done by grad_phi_rows_avx512, with no staging
      if constexpr (M <= 4)
        if (wide && w == B) {
          for (index_t l = 0; l < B; l += 64)
            grad_phi_rows_avx512<M, B>(R + t0 * K + k0 + l, K, g, nt, npf, ahead, acc[0] + l);
          direct = true;
        }
      if (!direct) {
        for (int a = 0; a < nt; ++a) {
          const T* x = R + (t0 + a) * K + k0;
          if (a < npf)
            for (index_t o = 0; o < B * index_t(sizeof(T)); o += 64)
              _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(x) +
                                                         std::uintptr_t(ahead * index_t(sizeof(T)) + o)),
                           _MM_HINT_T0);
          grad_phi_stage_row_avx2<B>(x, w, xb[a]);
        }
        grad_phi_tile_step_avx2<M, B>(wide, g, xb[0], nt, acc);
      }
      for (int j = 0; j < M; ++j) {
        float* gj = gphi + index_t(j) * K + k0;
        index_t l = 0;
        for (; l + 8 <= w; l += 8) {
          __m256 v = _mm256_load_ps(acc[j] + l);
          MHC_KEEP_IN_REGISTER(v);
          _mm256_storeu_ps(gj + l, v);
        }
        for (; l < w; ++l) gj[l] = acc[j][l];
      }
    }
  }
}

/// Columns of a block of accumulate_grad_phi_block_avx512 for M rows: as many as keep its M x B
/// accumulators within 48 KiB (an L1 data cache), 128 to 512, a multiple of 32. Wider blocks read
/// each row of R in longer runs: at M = 24 (n = 4), 512 columns took a third less time than 128.
template <int M>
inline constexpr index_t grad_phi_wide_block = std::max<index_t>(128, std::min<index_t>(512, 12288 / M / 32 * 32));

/// accumulate_grad_phi_block with 512-bit registers for M > 4 rows, the same bits: tiles of 16
/// tokens, read in place from the rows of R by grad_phi_tiles_avx512 (at M = 24, 16% faster in fp32
/// than copying the tile to a buffer first), but for the last w % 32 columns, which are staged with
/// zero padding. While a tile is summed, the prefetches spread over its kernel calls bring in the next
/// tile's rows, or at the last tile the first rows of the next block [k_next, k_next + w_next)
/// (w_next = 0: none).
template <int M, class T>
MHC_TARGET_AVX512VL void accumulate_grad_phi_block_avx512(index_t tokens, index_t K, const T* R, const float* gz,
                                                          const float* r, index_t k0, index_t w, index_t k_next,
                                                          index_t w_next, float* gphi) {
  constexpr index_t B = grad_phi_wide_block<M>;
  constexpr int TT = 16;
  alignas(64) float acc[M][B];
  alignas(64) float xt[TT][32];  // the staged last columns
  float g[TT * M];
  const index_t full = w / 32 * 32, cols = (w + 31) / 32 * 32;
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < cols; l += 16) _mm512_store_ps(acc[j] + l, _mm512_setzero_ps());
  for (index_t t0 = 0; t0 < tokens; t0 += TT) {
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    for (int a = 0; a < nt; ++a)
      for (int j = 0; j < M; ++j) g[a * M + j] = gz[(t0 + a) * M + j] * r[t0 + a];
    grad_phi_prefetch pf;
    const T* next = t0 + TT < tokens ? R + (t0 + TT) * K + k0 : R + k_next;
    const index_t next_w = t0 + TT < tokens ? w : w_next;
    if (next_w > 0) {
      const std::uintptr_t a0 = reinterpret_cast<std::uintptr_t>(next);
      pf.base = a0 & ~std::uintptr_t(63);
      pf.stride = K * index_t(sizeof(T));
      pf.lines = int((a0 - pf.base + std::uintptr_t(next_w) * sizeof(T) + 63) / 64);
      pf.rows = int(std::min<index_t>(TT, t0 + TT < tokens ? tokens - t0 - TT : tokens));
    }
    grad_phi_tiles_avx512<M, B>(g, R + t0 * K + k0, K, full, nt, acc[0], pf);
    if (full < w) {
      for (int a = 0; a < nt; ++a) grad_phi_stage_row_avx2<32>(R + (t0 + a) * K + k0 + full, w - full, xt[a]);
      grad_phi_tiles_avx512<M, B>(g, xt[0], 32, 32, nt, acc[0] + full, grad_phi_prefetch{});
    }
  }
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < w; ++l) gphi[index_t(j) * K + k0 + l] = acc[j][l];
}
#endif

/// grad_phi[j][k0 .. k0 + w) = sum_t (gz[t][j] * r[t]) x_t[k], tokens in order (w <= grad_phi_block),
/// with the kernels of `isa` (the same bits for every isa).
template <int M, class T, class F>
inline void accumulate_grad_phi_block(cpu_isa isa, index_t tokens, index_t K, const T* R, const F* gz, const F* r,
                                      index_t k0, index_t w, F* gphi) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (isa == cpu_isa::avx2) return accumulate_grad_phi_block_avx2<M>(tokens, K, R, gz, r, k0, w, gphi);
#endif
  (void)isa;
  accumulate_grad_phi_block<M>(tokens, K, R, gz, r, k0, w, gphi);
}

}  // namespace detail
}  // namespace mhc
