#pragma once
/// \file
/// AVX2 kernels of the stream mixing. Forward (SPEC.md section 2 steps 6 and 8): pre_apply and post,
/// sixteen columns at a time with the loads, the arithmetic, the bf16 rounding and the stores in
/// registers. Each output element is computed with scalar::pre_apply's and scalar::post's products and
/// sums in the same order (no fused multiply-add: the target has no FMA), and rounded with
/// storage_traits<bf16>::store's arithmetic, so the bits are those of the scalar kernels.
///
/// bf16 columns are widened with an unpack against zero, which leaves sixteen columns in the order
/// 0-3, 8-11 (the low vector) and 4-7, 12-15 (the high one); the signed pack that narrows them puts
/// them back in order, so no permute is needed either way. A chunk whose outputs hold a NaN (the
/// vector rounding does not give the quiet NaN 0x7FC0) is recomputed by the scalar kernel: nothing of
/// the chunk has been written yet, so this holds in place too (post with Rout == R).
///
/// Backward (SPEC.md section 4): post_backward and pre_apply_backward per token, eight columns per
/// vector in the column order (their sums over the hidden dimension keep element c in lane c % 8),
/// each value converted once.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "mhc/core/config.hpp"
#include "mhc/core/dtype.hpp"
#include "mhc/cpu/isa.hpp"
#include "mhc/cpu/projection.hpp"
#include "mhc/cpu/stream.hpp"
#include "mhc/ops/scalar.hpp"

namespace mhc {
namespace detail {

#if MHC_HAVE_AVX2_KERNELS

/// Sixteen values of storage type T as two vectors of floats: for float, columns 0-7 and 8-15; for
/// bf16, columns 0-3, 8-11 and 4-7, 12-15 (narrow_mix16_avx2 undoes the order).
template <class T>
MHC_TARGET_AVX2 MHC_INLINE void load_mix16_avx2(const T* p, __m256& lo, __m256& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i zero = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
  }
}

/// Whether the outputs lo, hi need the scalar rounding (a NaN in bf16 storage; never for float).
template <class T>
MHC_TARGET_AVX2 MHC_INLINE __m256 mix_nan_avx2(__m256 lo, __m256 hi) {
  if constexpr (std::is_same_v<T, float>) {
    (void)lo, (void)hi;
    return _mm256_setzero_ps();
  } else {
    return _mm256_cmp_ps(lo, hi, _CMP_UNORD_Q);  // true where either lane is a NaN
  }
}

/// Sixteen floats in load_mix16_avx2's order (no NaN) as the bits of sixteen values of T: for float
/// two vectors, for bf16 one (rounded; the signed pack restores the column order).
template <class T>
struct mix16_bits {
  __m256i v[std::is_same_v<T, float> ? 2 : 1];  ///< columns 0-15 in order, 32 bytes each
};

template <class T>
MHC_TARGET_AVX2 MHC_INLINE mix16_bits<T> narrow_mix16_avx2(__m256 lo, __m256 hi) {
  if constexpr (std::is_same_v<T, float>)
    return {{_mm256_castps_si256(lo), _mm256_castps_si256(hi)}};
  else
    return {{_mm256_packs_epi32(bf16_round_avx2(lo), bf16_round_avx2(hi))}};
}

/// Bytes of output per row that one iteration of the mixing kernels writes: one cache line, so that
/// streaming stores fill whole lines one after the other (lines left partly written while other rows
/// are written are flushed as partial writes, which made post four times slower).
inline constexpr index_t mix_line = 64;

/// How far ahead (bytes) the bf16 mixing kernels prefetch each row they read, to L2: the hardware
/// prefetchers kept too few lines in flight for these streams of 2-byte elements. pre_apply/bf16 at
/// T = C = 4096: 3.93-4.18 -> 3.49-3.83 ms, post/bf16 5.86-6.53 -> 5.52-6.13 ms (8 alternating runs
/// each); fp32 did not change and takes none.
inline constexpr index_t mix_prefetch_ahead = 1024;

/// Prefetches to L2 the line `ahead` bytes past p (the address computed as an integer: it may lie
/// past the buffer, where a prefetch does nothing).
template <class T>
MHC_INLINE void prefetch_ahead(const T* p, index_t ahead) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(ahead)), 0, 2);
}

/// The bf16 mixing kernels' prefetch at column c: the same column mix_prefetch_ahead bytes on, to L2,
/// in each of the N rows of R (C apart) and, where given, in y. (fp32 rows: none; they gained nothing.)
template <int N, class T>
MHC_INLINE void prefetch_mix_rows(const T* R, index_t C, index_t c, const T* y = nullptr) {
  if constexpr (std::is_same_v<T, bf16>) {
    for (int m = 0; m < N; ++m) prefetch_ahead(R + index_t(m) * C + c, mix_prefetch_ahead);
    if (y != nullptr) prefetch_ahead(y + c, mix_prefetch_ahead);
  }
}

/// Writes one line (mix_line bytes) of a row: S groups of sixteen values; with NonTemporal dst is
/// 64-byte aligned and the stores are streaming.
template <bool NonTemporal, class T, int S>
MHC_TARGET_AVX2 MHC_INLINE void store_mix_line_avx2(T* dst, const mix16_bits<T> (&b)[S]) {
  auto* p = reinterpret_cast<__m256i*>(dst);
  for (int s = 0; s < S; ++s)
    for (const __m256i& v : b[s].v) {
      if (NonTemporal)
        _mm256_stream_si256(p++, v);
      else
        _mm256_storeu_si256(p++, v);
    }
}

/// Where the vector body of an output row starting at column c0 of dst begins: c0 without streaming
/// stores, otherwise the first column whose address is 64-byte aligned (at most c1). Returns -1 when
/// streaming stores cannot be used for rows `row_stride` elements apart (dst not aligned to its
/// element, or rows aligned differently); the caller then uses ordinary stores.
template <bool NonTemporal, class T>
MHC_INLINE index_t mix_body_start(const T* dst, index_t row_stride, index_t c0, index_t c1) {
  if constexpr (!NonTemporal) {
    (void)dst, (void)row_stride, (void)c1;
    return c0;
  } else {
    const auto addr = reinterpret_cast<std::uintptr_t>(dst + c0);
    if (addr % sizeof(T) != 0 || (row_stride * index_t(sizeof(T))) % mix_line != 0) return -1;
    const index_t head = index_t((mix_line - addr % mix_line) % mix_line / sizeof(T));
    return c1 - c0 < head ? c1 : c0 + head;
  }
}

/// scalar::pre_apply over columns [c0, c1) of one token (the same bits): y[c] = sum_m pre_m R[m][c].
template <int N, bool NonTemporal, class T>
MHC_TARGET_AVX2 void pre_apply_avx2(const float* pre, const T* R, index_t C, T* y, index_t c0, index_t c1) {
  constexpr int S = int(mix_line / index_t(sizeof(T))) / 16;  // groups of sixteen columns per line
  constexpr index_t cols = 16 * S;
  const index_t body = mix_body_start<NonTemporal>(y, 0, c0, c1);
  if (body < 0) return pre_apply_avx2<N, false>(pre, R, C, y, c0, c1);
  scalar::pre_apply<N, T, float, scalar::plain_store>(pre, R, C, y, c0, body);
  __m256 w[N];
  _Pragma("GCC unroll 16")
  for (int m = 0; m < N; ++m) w[m] = _mm256_set1_ps(pre[m]);
  index_t c = body;
  for (; c + cols <= c1; c += cols) {
    prefetch_mix_rows<N>(R, C, c);
    mix16_bits<T> out[S];
    __m256 nan = _mm256_setzero_ps();
    _Pragma("GCC unroll 16")
    for (int s = 0; s < S; ++s) {
      __m256 lo, hi, xl, xh;
      load_mix16_avx2(R + c + 16 * s, xl, xh);
      lo = _mm256_mul_ps(w[0], xl);
      hi = _mm256_mul_ps(w[0], xh);
      _Pragma("GCC unroll 16")
      for (int m = 1; m < N; ++m) {
        load_mix16_avx2(R + index_t(m) * C + c + 16 * s, xl, xh);
        lo = _mm256_add_ps(lo, _mm256_mul_ps(w[m], xl));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(w[m], xh));
      }
      nan = _mm256_or_ps(nan, mix_nan_avx2<T>(lo, hi));
      out[s] = narrow_mix16_avx2<T>(lo, hi);
    }
    if (_mm256_movemask_ps(nan) != 0)
      scalar::pre_apply<N, T, float, scalar::plain_store>(pre, R, C, y, c, c + cols);
    else
      store_mix_line_avx2<NonTemporal>(y + c, out);
  }
  scalar::pre_apply<N, T, float, scalar::plain_store>(pre, R, C, y, c, c1);
}

/// A line of 32 bf16 values at p widened exactly to floats, as the unpacks leave them: lo holds
/// columns 8k..8k+3 in its quadword pair k, hi columns 8k+4..8k+7 (pack_bf16_line_avx512 restores
/// the order).
MHC_TARGET_AVX512BF16 MHC_INLINE void widen_bf16_line_avx512(const bf16* p, __m512& lo, __m512& hi) {
  const __m512i zero = _mm512_setzero_si512(), v = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
}

/// Whether a line's sums (lo, hi as widen_bf16_line_avx512 leaves them) hold a NaN or a subnormal,
/// which the AVX-512 BF16 conversion rounds differently from storage_traits<bf16>::store.
MHC_TARGET_AVX512BF16 MHC_INLINE bool odd_bf16_sums_avx512(__m512 lo, __m512 hi) {
  return (unsigned(_mm512_fpclass_ps_mask(lo, 0xA1)) | unsigned(_mm512_fpclass_ps_mask(hi, 0xA1))) != 0;
}

/// The line's sums rounded to bf16 (nearest even) with the columns back in order.
MHC_TARGET_AVX512BF16 MHC_INLINE __m512i pack_bf16_line_avx512(__m512 lo, __m512 hi) {
  // The unpacks leave columns 8k..8k+3 in quadword k of the low half of the conversion and 8k+4..8k+7
  // in quadword 4 + k of the high half: this permutation puts the 32 columns back in order.
  const __m512i order = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
  // (the zero-masking form: the plain one starts from an undefined vector, which GCC 12 warns about)
  return _mm512_maskz_permutexvar_epi64(0xFF, order, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

/// Writes a packed line to dst, with a streaming store when NonTemporal.
template <bool NonTemporal>
MHC_TARGET_AVX512BF16 MHC_INLINE void store_bf16_line_avx512(bf16* dst, __m512i v) {
  if constexpr (NonTemporal)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
  else
    _mm512_storeu_si512(dst, v);
}

/// pre_apply_avx2 for bf16 storage with AVX-512 (the same bits): a line of y (32 columns) per step,
/// the products and sums of pre_apply_avx2 in 512-bit registers, rounded to bf16 by the AVX-512 BF16
/// conversion (round to nearest even, as the row writer). Lines with a NaN or subnormal sum, which
/// the conversion treats differently, are redone by scalar::pre_apply.
template <int N, bool NonTemporal>
MHC_TARGET_AVX512BF16 __attribute__((noinline)) void pre_apply_bf16_avx512(const float* pre, const bf16* R, index_t C,
                                                                           bf16* y, index_t c0, index_t c1) {
  constexpr index_t cols = mix_line / index_t(sizeof(bf16));
  const index_t body = mix_body_start<NonTemporal>(y, 0, c0, c1);
  if (body < 0) return pre_apply_bf16_avx512<N, false>(pre, R, C, y, c0, c1);
  scalar::pre_apply<N, bf16, float, scalar::plain_store>(pre, R, C, y, c0, body);
  __m512 w[N];
  for (int m = 0; m < N; ++m) w[m] = _mm512_set1_ps(pre[m]);
  index_t c = body;
  for (; c + cols <= c1; c += cols) {
    prefetch_mix_rows<N>(R, C, c);
    __m512 lo, hi;
    widen_bf16_line_avx512(R + c, lo, hi);
    lo = _mm512_mul_ps(w[0], lo);
    hi = _mm512_mul_ps(w[0], hi);
    MHC_KEEP_IN_REGISTER(lo);
    MHC_KEEP_IN_REGISTER(hi);
    for (int m = 1; m < N; ++m) {
      __m512 pl, ph;
      widen_bf16_line_avx512(R + index_t(m) * C + c, pl, ph);
      pl = _mm512_mul_ps(w[m], pl);
      ph = _mm512_mul_ps(w[m], ph);
      MHC_KEEP_IN_REGISTER(pl);
      MHC_KEEP_IN_REGISTER(ph);
      lo = _mm512_add_ps(lo, pl);
      hi = _mm512_add_ps(hi, ph);
    }
    if (odd_bf16_sums_avx512(lo, hi)) {
      scalar::pre_apply<N, bf16, float, scalar::plain_store>(pre, R, C, y, c, c + cols);
      continue;
    }
    store_bf16_line_avx512<NonTemporal>(y + c, pack_bf16_line_avx512(lo, hi));
  }
  scalar::pre_apply<N, bf16, float, scalar::plain_store>(pre, R, C, y, c, c1);
}

/// scalar::post over columns [c0, c1) of one token (the same bits; Rout may equal R):
/// R'[o][c] = post_o y[c] + sum_i comb[i][o] R[i][c]. Every stream's columns of a line are loaded
/// before any output of the line is written.
template <int N, bool NonTemporal, class T>
MHC_TARGET_AVX2 void post_avx2(const float* post_w, const float* comb, const T* y, const T* R, index_t C, T* Rout,
                               index_t c0, index_t c1) {
  constexpr int S = int(mix_line / index_t(sizeof(T))) / 16;
  constexpr index_t cols = 16 * S;
  const index_t body = mix_body_start<NonTemporal>(Rout, C, c0, c1);
  if (body < 0) return post_avx2<N, false>(post_w, comb, y, R, C, Rout, c0, c1);
  scalar::post<N, T, float, scalar::plain_store>(post_w, comb, y, R, C, Rout, c0, body);
  // Broadcast once: the stores (through may_alias vector types) would otherwise make the compiler
  // reload and broadcast every coefficient in every iteration.
  __m256 kp[N], kc[N * N];
  for (int o = 0; o < N; ++o) kp[o] = _mm256_set1_ps(post_w[o]);
  for (int k = 0; k < N * N; ++k) kc[k] = _mm256_set1_ps(comb[k]);
  index_t c = body;
  for (; c + cols <= c1; c += cols) {
    prefetch_mix_rows<N>(R, C, c, y);
    mix16_bits<T> out[N][S];
    __m256 nan = _mm256_setzero_ps();
    _Pragma("GCC unroll 16")
    for (int s = 0; s < S; ++s) {
      __m256 rl[N], rh[N], yl, yh;
      _Pragma("GCC unroll 16")
      for (int i = 0; i < N; ++i) load_mix16_avx2(R + index_t(i) * C + c + 16 * s, rl[i], rh[i]);
      load_mix16_avx2(y + c + 16 * s, yl, yh);
      _Pragma("GCC unroll 16")
      for (int o = 0; o < N; ++o) {
        __m256 lo = _mm256_mul_ps(kp[o], yl), hi = _mm256_mul_ps(kp[o], yh);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < N; ++i) {
          lo = _mm256_add_ps(lo, _mm256_mul_ps(kc[i * N + o], rl[i]));
          hi = _mm256_add_ps(hi, _mm256_mul_ps(kc[i * N + o], rh[i]));
        }
        nan = _mm256_or_ps(nan, mix_nan_avx2<T>(lo, hi));
        out[o][s] = narrow_mix16_avx2<T>(lo, hi);
      }
    }
    if (_mm256_movemask_ps(nan) != 0) {
      scalar::post<N, T, float, scalar::plain_store>(post_w, comb, y, R, C, Rout, c, c + cols);
      continue;
    }
    _Pragma("GCC unroll 16")
    for (int o = 0; o < N; ++o) store_mix_line_avx2<NonTemporal>(Rout + index_t(o) * C + c, out[o]);
  }
  scalar::post<N, T, float, scalar::plain_store>(post_w, comb, y, R, C, Rout, c, c1);
}

/// post_avx2 for bf16 storage with 512-bit vectors and the AVX-512 bf16 conversion (the same bits):
/// one line of 32 columns per row and iteration. The conversion rounds to nearest even like
/// storage_traits<bf16>::store but flushes subnormals and keeps NaN payloads, so a line with such an
/// output goes to the scalar code.
template <int N, bool NonTemporal>
MHC_TARGET_AVX512BF16 __attribute__((noinline)) void post_bf16_avx512(const float* post_w, const float* comb,
                                                                      const bf16* y, const bf16* R, index_t C,
                                                                      bf16* Rout, index_t c0, index_t c1) {
  constexpr index_t cols = mix_line / index_t(sizeof(bf16));
  const index_t body = mix_body_start<NonTemporal>(Rout, C, c0, c1);
  if (body < 0) return post_bf16_avx512<N, false>(post_w, comb, y, R, C, Rout, c0, c1);
  scalar::post<N, bf16, float, scalar::plain_store>(post_w, comb, y, R, C, Rout, c0, body);
  __m512 kp[N], kc[N * N];
  for (int o = 0; o < N; ++o) kp[o] = _mm512_set1_ps(post_w[o]);
  for (int k = 0; k < N * N; ++k) kc[k] = _mm512_set1_ps(comb[k]);
  index_t c = body;
  for (; c + cols <= c1; c += cols) {
    prefetch_mix_rows<N>(R, C, c, y);
    __m512 rl[N], rh[N], yl, yh;
    for (int i = 0; i < N; ++i) widen_bf16_line_avx512(R + index_t(i) * C + c, rl[i], rh[i]);
    widen_bf16_line_avx512(y + c, yl, yh);
    __m512i out[N];
    bool odd = false;  // outputs the conversion would round differently: NaN or subnormal
    for (int o = 0; o < N; ++o) {
      __m512 lo = _mm512_mul_ps(kp[o], yl), hi = _mm512_mul_ps(kp[o], yh);
      MHC_KEEP_IN_REGISTER(lo);
      MHC_KEEP_IN_REGISTER(hi);
      for (int i = 0; i < N; ++i) {
        __m512 pl = _mm512_mul_ps(kc[i * N + o], rl[i]), ph = _mm512_mul_ps(kc[i * N + o], rh[i]);
        MHC_KEEP_IN_REGISTER(pl);
        MHC_KEEP_IN_REGISTER(ph);
        lo = _mm512_add_ps(lo, pl);
        hi = _mm512_add_ps(hi, ph);
      }
      odd |= odd_bf16_sums_avx512(lo, hi);
      out[o] = pack_bf16_line_avx512(lo, hi);
    }
    if (odd) {
      scalar::post<N, bf16, float, scalar::plain_store>(post_w, comb, y, R, C, Rout, c, c + cols);
      continue;
    }
    for (int o = 0; o < N; ++o) store_bf16_line_avx512<NonTemporal>(Rout + index_t(o) * C + c, out[o]);
  }
  scalar::post<N, bf16, float, scalar::plain_store>(post_w, comb, y, R, C, Rout, c, c1);
}

/// scalar::combine_lanes of the eight lanes of v.
MHC_TARGET_AVX2 MHC_INLINE float combine_lanes_avx2(__m256 v) {
  alignas(32) float lanes[scalar::projection_lanes];
  _mm256_store_ps(lanes, v);
  return scalar::combine_lanes(lanes);
}

/// scalar::post_backward for one token (the same bits; Store writes gy and gR), eight columns per
/// 256-bit vector. Element c is in lane c % 8 of every vector, as in scalar::post_backward's lanes,
/// and each lane's accumulators (gpost: N, gcomb: N*N) add their products in increasing c, so the
/// 8-lane sums are the scalar ones; every product is kept opaque so a caller compiled with FMA cannot
/// contract it. Inlined into post_backward_avx2 and, with AVX-512VL's 32 registers (all N + N*N
/// accumulators and a column's gR' stay in registers for N = 4), post_backward_avx512vl.
template <int N, class Store, class T>
MHC_TARGET_AVX2 MHC_INLINE void post_backward_token_avx2(const float* post_w, const float* comb, const T* y,
                                                         const T* R, const T* gRout, index_t C, T* gR, T* gy,
                                                         float* gpost, float* gcomb) {
  constexpr int W = scalar::projection_lanes;
  constexpr index_t BB = scalar::backward_block;
  static_assert(W == 8 && BB % W == 0, "one 256-bit vector holds the eight lanes");
  constexpr bool convert = !std::is_same_v<T, float>;
  __m256 gp[N], gc[N * N];
  for (int o = 0; o < N; ++o) gp[o] = _mm256_setzero_ps();
  for (int k = 0; k < N * N; ++k) gc[k] = _mm256_setzero_ps();
  alignas(32) float out[BB];
  alignas(32) float gbuf[convert ? N : 1][convert ? BB : 1];  // gR' of the block as floats (bf16 only)
  for (index_t b0 = 0; b0 < C; b0 += BB) {
    const index_t w = C - b0 < BB ? C - b0 : BB, full = w / W * W;
    // gR' row o of the block, as floats.
    auto grow = [&](int o) MHC_ALWAYS_INLINE_LAMBDA -> const float* {
      if constexpr (convert)
        return gbuf[o];
      else
        return gRout + index_t(o) * C + b0;
    };
    // bf16: the next block of the 2N + 1 rows read here (4 KiB apart when C is a multiple of 2048:
    // more streams than the hardware prefetchers keep ahead of), to L2, spread over this block's
    // steps. post_backward/bf16 at T = C = 4096: 10.5 -> 9.2-9.9 ms, against the same prefetches
    // issued at once before each block. fp32 was slower with them (17.2-17.4 -> 17.8-18.3 ms).
    spread_prefetch<2 * N + 1, 2> pf;
    if (convert && b0 + BB < C) {
      const index_t n0 = b0 + BB;
      const T* rows[2 * N + 1];
      for (int i = 0; i < N; ++i) rows[i] = gRout + index_t(i) * C + n0, rows[N + i] = R + index_t(i) * C + n0;
      rows[2 * N] = y + n0;
      pf.set(rows, 2 * N + 1, std::min(BB, C - n0) * index_t(sizeof(T)), full / W);
    }
    for (index_t l = 0; l < full; l += W) {
      pf.step();
      __m256 g[N];
      _Pragma("GCC unroll 16")
      for (int o = 0; o < N; ++o) {
        g[o] = load8_avx2(gRout + index_t(o) * C + b0 + l);
        if constexpr (convert)
          if (gR) _mm256_store_ps(gbuf[o] + l, g[o]);
      }
      const __m256 yc = load8_avx2(y + b0 + l);
      __m256 acc = _mm256_mul_ps(_mm256_set1_ps(post_w[0]), g[0]);
      MHC_KEEP_IN_REGISTER(acc);
      _Pragma("GCC unroll 16")
      for (int o = 1; o < N; ++o) {
        __m256 p = _mm256_mul_ps(_mm256_set1_ps(post_w[o]), g[o]);
        MHC_KEEP_IN_REGISTER(p);
        acc = _mm256_add_ps(acc, p);
      }
      _mm256_store_ps(out + l, acc);
      _Pragma("GCC unroll 16")
      for (int o = 0; o < N; ++o) {
        __m256 p = _mm256_mul_ps(yc, g[o]);
        MHC_KEEP_IN_REGISTER(p);
        gp[o] = _mm256_add_ps(gp[o], p);
      }
      _Pragma("GCC unroll 16")
      for (int i = 0; i < N; ++i) {
        const __m256 x = load8_avx2(R + index_t(i) * C + b0 + l);
        _Pragma("GCC unroll 16")
        for (int o = 0; o < N; ++o) {
          __m256 p = _mm256_mul_ps(x, g[o]);
          MHC_KEEP_IN_REGISTER(p);
          gc[i * N + o] = _mm256_add_ps(gc[i * N + o], p);
        }
      }
    }
    if (full < w) {  // the last block's last w - full columns, lane l - full (as the scalar tail)
      alignas(32) float ap[N][W], ac[N * N][W];
      for (int o = 0; o < N; ++o) _mm256_store_ps(ap[o], gp[o]);
      for (int k = 0; k < N * N; ++k) _mm256_store_ps(ac[k], gc[k]);
      for (index_t l = full; l < w; ++l) {
        const int lane = int(l - full);
        float g[N];
        for (int o = 0; o < N; ++o) {
          g[o] = storage_traits<T>::load(gRout[index_t(o) * C + b0 + l]);
          if constexpr (convert) gbuf[o][l] = g[o];
        }
        const float yc = storage_traits<T>::load(y[b0 + l]);
        float acc = post_w[0] * g[0];
        for (int o = 1; o < N; ++o) acc += post_w[o] * g[o];
        out[l] = acc;
        for (int o = 0; o < N; ++o) ap[o][lane] += yc * g[o];
        for (int i = 0; i < N; ++i) {
          const float x = storage_traits<T>::load(R[index_t(i) * C + b0 + l]);
          for (int o = 0; o < N; ++o) ac[i * N + o][lane] += x * g[o];
        }
      }
      for (int o = 0; o < N; ++o) gp[o] = _mm256_load_ps(ap[o]);
      for (int k = 0; k < N * N; ++k) gc[k] = _mm256_load_ps(ac[k]);
    }
    Store::row(gy + b0, out, w);
    if (gR)
      for (int i = 0; i < N; ++i) {
        T* gi = gR + index_t(i) * C + b0;
        __m256 k[N];
        _Pragma("GCC unroll 16")
        for (int o = 0; o < N; ++o) k[o] = _mm256_set1_ps(comb[i * N + o]);
        for (index_t l = 0; l < full; l += W) {
          __m256 a = _mm256_mul_ps(k[0], _mm256_loadu_ps(grow(0) + l));
          MHC_KEEP_IN_REGISTER(a);
          _Pragma("GCC unroll 16")
          for (int o = 1; o < N; ++o) {
            __m256 p = _mm256_mul_ps(k[o], _mm256_loadu_ps(grow(o) + l));
            MHC_KEEP_IN_REGISTER(p);
            a = _mm256_add_ps(a, p);
          }
          _mm256_store_ps(out + l, _mm256_add_ps(load8_avx2(gi + l), a));
        }
        for (index_t l = full; l < w; ++l) {
          float a = comb[i * N] * grow(0)[l];
          for (int o = 1; o < N; ++o) a += comb[i * N + o] * grow(o)[l];
          out[l] = storage_traits<T>::load(gi[l]) + a;
        }
        Store::row(gi, out, w);
      }
  }
  for (int o = 0; o < N; ++o) gpost[o] = combine_lanes_avx2(gp[o]);
  for (int k = 0; k < N * N; ++k) gcomb[k] = combine_lanes_avx2(gc[k]);
}

/// post_backward_token_avx2 compiled for AVX2.
template <int N, class Store, class T>
MHC_TARGET_AVX2 void post_backward_avx2(const float* post_w, const float* comb, const T* y, const T* R,
                                        const T* gRout, index_t C, T* gR, T* gy, float* gpost, float* gcomb) {
  post_backward_token_avx2<N, Store>(post_w, comb, y, R, gRout, C, gR, gy, gpost, gcomb);
}

/// post_backward_token_avx2 compiled with AVX-512VL's 32 registers (the same bits).
template <int N, class Store, class T>
MHC_TARGET_AVX512VL void post_backward_avx512vl(const float* post_w, const float* comb, const T* y, const T* R,
                                                const T* gRout, index_t C, T* gR, T* gy, float* gpost,
                                                float* gcomb) {
  post_backward_token_avx2<N, Store>(post_w, comb, y, R, gRout, C, gR, gy, gpost, gcomb);
}

/// scalar::pre_apply_backward's per-token loop (backend_traits<cpu>::pre_apply_backward; the same bits;
/// Store writes gR): gpre[m] = sum_c gy[c] R[m][c] in scalar::grad_pre's lanes (element c in lane
/// c % 8, each lane in increasing c) and gR[m][c] += pre_m gy[c], eight columns per vector, gy
/// converted once per column. Products are kept opaque (no contraction).
template <int N, class Store, class T>
MHC_TARGET_AVX2 void pre_apply_backward_avx2(const float* pre, const T* R, const T* gy, index_t C, T* gR,
                                             float* gpre) {
  constexpr int W = scalar::projection_lanes;
  constexpr index_t BB = scalar::backward_block;
  static_assert(W == 8 && BB % W == 0, "one 256-bit vector holds the eight lanes");
  __m256 acc[N], kp[N];
  for (int m = 0; m < N; ++m) acc[m] = _mm256_setzero_ps(), kp[m] = _mm256_set1_ps(pre[m]);
  alignas(32) float buf[N][BB];
  for (index_t b0 = 0; b0 < C; b0 += BB) {
    const index_t w = C - b0 < BB ? C - b0 : BB, full = w / W * W;
    for (index_t l = 0; l < full; l += W) {
      const __m256 g = load8_avx2(gy + b0 + l);
      _Pragma("GCC unroll 16")
      for (int m = 0; m < N; ++m) {
        __m256 p = _mm256_mul_ps(g, load8_avx2(R + index_t(m) * C + b0 + l));
        MHC_KEEP_IN_REGISTER(p);
        acc[m] = _mm256_add_ps(acc[m], p);
        __m256 q = _mm256_mul_ps(kp[m], g);
        MHC_KEEP_IN_REGISTER(q);
        _mm256_store_ps(buf[m] + l, _mm256_add_ps(load8_avx2(gR + index_t(m) * C + b0 + l), q));
      }
    }
    if (full < w) {  // the last block's last w - full columns, lane l - full (as grad_pre_block)
      alignas(32) float a[N][W];
      for (int m = 0; m < N; ++m) _mm256_store_ps(a[m], acc[m]);
      for (index_t l = full; l < w; ++l) {
        const float g = storage_traits<T>::load(gy[b0 + l]);
        for (int m = 0; m < N; ++m) {
          a[m][l - full] += g * storage_traits<T>::load(R[index_t(m) * C + b0 + l]);
          buf[m][l] = storage_traits<T>::load(gR[index_t(m) * C + b0 + l]) + pre[m] * g;
        }
      }
      for (int m = 0; m < N; ++m) acc[m] = _mm256_load_ps(a[m]);
    }
    for (int m = 0; m < N; ++m) Store::row(gR + index_t(m) * C + b0, buf[m], w);
  }
  for (int m = 0; m < N; ++m) gpre[m] = combine_lanes_avx2(acc[m]);
}

/// scalar::grad_pre with AVX2 (the same bits): gpre[m] = sum_c gy[c] R[m][c], element c in lane c % 8,
/// each lane in increasing c, the N streams' lane sums side by side (N independent chains of
/// additions, and N + 1 rows read at once) and gy converted once per column.
template <int N, class T>
MHC_TARGET_AVX2 void grad_pre_avx2(const T* R, const T* gy, index_t C, float* gpre) {
  constexpr int W = scalar::projection_lanes;
  static_assert(W == 8, "one 256-bit vector holds the eight lanes");
  __m256 acc[N];
  for (int m = 0; m < N; ++m) acc[m] = _mm256_setzero_ps();
  const index_t full = C / W * W;
  for (index_t c = 0; c < full; c += W) {
    const __m256 g = load8_avx2(gy + c);
    _Pragma("GCC unroll 16")
    for (int m = 0; m < N; ++m) {
      __m256 p = _mm256_mul_ps(g, load8_avx2(R + index_t(m) * C + c));
      MHC_KEEP_IN_REGISTER(p);
      acc[m] = _mm256_add_ps(acc[m], p);
    }
  }
  if (full < C) {  // the last C - full columns, lane c - full (as grad_pre_block)
    alignas(32) float a[N][W];
    for (int m = 0; m < N; ++m) _mm256_store_ps(a[m], acc[m]);
    for (index_t c = full; c < C; ++c) {
      const float g = storage_traits<T>::load(gy[c]);
      for (int m = 0; m < N; ++m) a[m][c - full] += g * storage_traits<T>::load(R[index_t(m) * C + c]);
    }
    for (int m = 0; m < N; ++m) acc[m] = _mm256_load_ps(a[m]);
  }
  for (int m = 0; m < N; ++m) gpre[m] = combine_lanes_avx2(acc[m]);
}

/// accumulate_row with AVX2, eight at a time: fp32 written straight back; bf16 sums into p, then the
/// AVX2 row writer (its rounding).
template <class T>
MHC_TARGET_AVX2 void accumulate_row_avx2(T* g, float* p, index_t w) {
  constexpr bool direct = std::is_same_v<T, float>;
  float* dst = direct ? reinterpret_cast<float*>(g) : p;
  index_t l = 0;
  for (; l + 8 <= w; l += 8) _mm256_storeu_ps(dst + l, _mm256_add_ps(load8_avx2(g + l), _mm256_loadu_ps(p + l)));
  for (; l < w; ++l) dst[l] = storage_traits<T>::load(g[l]) + p[l];
  if constexpr (!direct) store_row_avx2<false>(g, p, w);
}

/// head_update_row with AVX2, eight at a time (the product kept opaque): fp32 written straight back;
/// bf16 sums into p, then the AVX2 row writer (its rounding).
template <class T>
MHC_TARGET_AVX2 void head_update_row_avx2(T* g, const T* go, float h, float* p, index_t w) {
  constexpr bool direct = std::is_same_v<T, float>;
  float* dst = direct ? reinterpret_cast<float*>(g) : p;
  const __m256 hv = _mm256_set1_ps(h);
  index_t l = 0;
  for (; l + 8 <= w; l += 8) {
    __m256 q = _mm256_mul_ps(hv, load8_avx2(go + l));
    MHC_KEEP_IN_REGISTER(q);
    _mm256_storeu_ps(dst + l, _mm256_add_ps(_mm256_add_ps(load8_avx2(g + l), q), _mm256_loadu_ps(p + l)));
  }
  for (; l < w; ++l) dst[l] = (storage_traits<T>::load(g[l]) + h * storage_traits<T>::load(go[l])) + p[l];
  if constexpr (!direct) store_row_avx2<false>(g, p, w);
}

/// Sixteen columns of pre_backward_mix_avx512 from their loaded values (g: the N rows of gR', y: gy).
template <int N, index_t W>
MHC_TARGET_AVX512VL MHC_INLINE void pre_backward_mix16_avx512(const __m512 (&cb)[N][N], const __m512 (&pw)[N],
                                                              const __m512 (&g)[N], __m512 y, const float (*pg)[W],
                                                              float (*ob)[W], index_t l) {
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    __m512 acc = _mm512_mul_ps(cb[i][0], g[0]);
    MHC_KEEP_IN_REGISTER(acc);  // every product whole: a product, then a sum, never a fused multiply-add
#pragma GCC unroll 8
    for (int o = 1; o < N; ++o) {
      __m512 m = _mm512_mul_ps(cb[i][o], g[o]);
      MHC_KEEP_IN_REGISTER(m);
      acc = _mm512_add_ps(acc, m);
    }
    __m512 m = _mm512_mul_ps(pw[i], y);
    MHC_KEEP_IN_REGISTER(m);
    acc = _mm512_add_ps(acc, m);
    _mm512_store_ps(ob[i] + l, _mm512_add_ps(acc, _mm512_load_ps(pg[i] + l)));
  }
}

/// pre_backward's mixing of one token over w <= W columns with 512-bit vectors (go: its rows of gR'
/// from the block's first column, C apart; gy likewise): ob[i][l] = ((sum_o comb[i][o] go[o][l]) +
/// pre[i] gy[l]) + pg[i][l], the sum from o = 0 up, as the scalar loop (the same bits). The N x N + N
/// coefficients stay in registers (N = 4: 20 of AVX-512's 32). The last w % 16 columns are copied to
/// zero-padded vectors first (ob and pg have room: W is a multiple of 16).
template <int N, index_t W, class T>
MHC_TARGET_AVX512VL void pre_backward_mix_avx512(const float* comb, const float* pre_w, const T* go, const T* gy,
                                                 index_t C, index_t w, const float (*pg)[W], float (*ob)[W]) {
  static_assert(W % 16 == 0, "whole vectors of ob and pg");
  __m512 cb[N][N], pw[N], g[N];
  for (int i = 0; i < N; ++i) {
    pw[i] = _mm512_set1_ps(pre_w[i]);
    for (int o = 0; o < N; ++o) cb[i][o] = _mm512_set1_ps(comb[i * N + o]);
  }
  index_t l = 0;
  for (; l + 16 <= w; l += 16) {
#pragma GCC unroll 8
    for (int o = 0; o < N; ++o) g[o] = load16_avx512(go + index_t(o) * C + l);
    pre_backward_mix16_avx512<N, W>(cb, pw, g, load16_avx512(gy + l), pg, ob, l);
  }
  if (l < w) {
    T rest[N + 1][16] = {};
    for (index_t e = l; e < w; ++e) {
      for (int o = 0; o < N; ++o) rest[o][e - l] = go[index_t(o) * C + e];
      rest[N][e - l] = gy[e];
    }
    for (int o = 0; o < N; ++o) g[o] = load16_avx512(rest[o]);
    pre_backward_mix16_avx512<N, W>(cb, pw, g, load16_avx512(rest[N]), pg, ob, l);
  }
}

/// Sixteen floats rounded to bf16 exactly as storage_traits<bf16>::store (nearest even; a NaN becomes
/// the quiet NaN of its sign), with 512-bit integer operations.
MHC_TARGET_AVX512VL MHC_INLINE __m256i bf16_round_avx512(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  // (the zero-masking forms: the plain ones start from an undefined vector, which GCC 12 warns about)
  const __m512i hi = _mm512_maskz_srli_epi32(0xFFFF, u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  __m512i r = _mm512_maskz_srli_epi32(0xFFFF, _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(
      r, nan, _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7FC0)));
  return _mm512_maskz_cvtepi32_epi16(0xFFFF, r);
}

/// head_backward's update of gR over the whole groups of 32 columns of a block with 512-bit registers,
/// the projection term kept in registers: for l < w / 32 * 32,
/// v = (load(g[l]) + h load(go[l])) + ((sum_j gu[j] phi[j][k0 + l]) + (2 x[l]) gs), the sum from zero
/// and j = 0 up, every product opaque: the bits of projection_input_grad then head_update_row, then
/// rounded to bf16 in registers and written back to g[l] (the row writer's bits). bf16 only: for fp32,
/// bound by memory, it was no faster than the AVX2 path. Step l also prefetches (for writing) the line
/// at ahead + l, unless ahead is null. Returns the columns done.
template <int M>
MHC_TARGET_AVX512VL index_t head_update_block_avx512(const float* gu, const float* phi, index_t K, index_t k0,
                                                     index_t w, const bf16* x, float gs, bf16* g, const bf16* go,
                                                     float h, const bf16* ahead) {
  const index_t full = w / 32 * 32;
  const __m512 two = _mm512_set1_ps(2.0f), gsv = _mm512_set1_ps(gs), hv = _mm512_set1_ps(h);
  for (index_t l = 0; l < full; l += 32) {
    if (ahead != nullptr) __builtin_prefetch(ahead + l, 1, 3);
    __m512 o[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const float* ph = phi + k0 + l;
#pragma GCC unroll 8
    for (int j = 0; j < M; ++j, ph += K)
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) o[v] = add_broadcast_product_avx512(o[v], gu + j, _mm512_loadu_ps(ph + 16 * v));
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const index_t c = l + 16 * v;
      __m512 sx = _mm512_mul_ps(_mm512_mul_ps(two, load16_avx512(x + c)), gsv);
      __m512 hg = _mm512_mul_ps(hv, load16_avx512(go + c));
      MHC_KEEP_IN_REGISTER(sx);
      MHC_KEEP_IN_REGISTER(hg);
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(load16_avx512(g + c), hg), _mm512_add_ps(o[v], sx));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(g + c), bf16_round_avx512(sum));
    }
  }
  return full;
}

#endif  // MHC_HAVE_AVX2_KERNELS

/// Whether T is a storage type the AVX2 row writer takes (fp32, bf16) with fp32 compute F.
template <class T, class F>
inline constexpr bool avx2_row_types =
    std::is_same_v<F, float> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>);

/// g[l] = round(load(g[l]) + p[l]) for l < w (p is scratch: it may be overwritten), with the kernels
/// of `isa` (the same bits for every isa). The AVX2 loop is written out: GCC at -O2 leaves the plain
/// one scalar.
template <class T, class F>
inline void accumulate_row(cpu_isa isa, T* g, F* p, index_t w) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (avx2_row_types<T, F>)
    if (isa == cpu_isa::avx2) return accumulate_row_avx2(g, p, w);
#endif
  (void)isa;
  using st = storage_traits<T>;
  for (index_t l = 0; l < w; ++l) g[l] = st::store(st::load(g[l]) + p[l]);
}

/// g[l] = round((load(g[l]) + h load(go[l])) + p[l]) for l < w (head_backward's update of gR; p is
/// scratch: it may be overwritten), with the kernels of `isa` (the same bits for every isa).
template <class T, class F>
inline void head_update_row(cpu_isa isa, T* g, const T* go, F h, F* p, index_t w) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (avx2_row_types<T, F>)
    if (isa == cpu_isa::avx2) return head_update_row_avx2(g, go, h, p, w);
#endif
  (void)isa;
  using st = storage_traits<T>;
  for (index_t l = 0; l < w; ++l) {
    F acc = st::load(g[l]) + h * st::load(go[l]);
    acc += p[l];
    g[l] = st::store(acc);
  }
}

#if MHC_HAVE_AVX2_KERNELS
/// Tokens per tile of projection_backward_block_avx512: their input gradient, then their grad_phi
/// terms while their rows of the block are still cached.
inline constexpr int backward_tile = 16;

/// The coefficients of the tokens [t0, t0 + nt) of a backward tile (tile index a = t - t0): gs[a] and
/// gu[a*M..] (scalar::projection_backward_coeffs) for the input gradient, g[a*M + j] = gz * r for
/// grad_phi (as accumulate_grad_phi_block_avx512 forms it).
template <int M>
MHC_INLINE void backward_tile_coeffs(index_t t0, int nt, index_t K, const float* gz, const float* u, const float* r,
                                     float* g, float* gu, float* gs) {
  for (int a = 0; a < nt; ++a) {
    const index_t t = t0 + a;
    gs[a] = scalar::projection_backward_coeffs<M>(gz + t * M, u + t * M, r[t], K, gu + a * M);
    for (int j = 0; j < M; ++j) g[a * M + j] = gz[t * M + j] * r[t];
  }
}

/// acc[j][0..w) (rows RW apart) += g[a*M + j] * x_a[0..w) for the nt tokens of a tile in order (x:
/// the first token's row, rows K apart): grad_phi_tiles_avx512 on the rows in place for the whole
/// groups of 32 columns, the rest staged with zero padding in xt.
template <int M, index_t RW, class T>
MHC_TARGET_AVX512VL MHC_INLINE void grad_phi_tile_columns(const float* g, const T* x, index_t K, index_t w, int nt,
                                                          float* acc, float (*xt)[32]) {
  const index_t full = w / 32 * 32;
  grad_phi_tiles_avx512<M, RW>(g, x, K, full, nt, acc, grad_phi_prefetch{});
  if (full < w) {
    for (int a = 0; a < nt; ++a) grad_phi_stage_row_avx2<32>(x + a * K + full, w - full, xt[a]);
    grad_phi_tiles_avx512<M, RW>(g, xt[0], 32, 32, nt, acc + full, grad_phi_prefetch{});
  }
}

/// projection_backward for the columns [k0, k0 + w) of every token (w <= grad_phi_wide_block<M>),
/// with 512-bit kernels: the input gradient added to gR and grad_phi[j][k0 .. k0 + w) written. A
/// tile of tokens at a time: their coefficients (scalar::projection_backward_coeffs), four at a time
/// their input gradient over the packed panel of phi (packed once for all the tokens), then their
/// grad_phi terms added to the block's accumulators from the rows of R the input gradient just read
/// (L1 or L2, not memory: R is read from memory once, not once per pass). Per element the same
/// products and sums in the same order as the separate passes (the input gradient of each element
/// is its own; grad_phi sums tokens in order from zero, kept in fp32 between tiles): the same bits.
/// Prefetched as the kernel runs: the rows of R the next call reads (at k_next, the caller's next
/// block, after the last tile; k_next < 0: none) and the rows of gR it then updates.
template <int M, class T>
MHC_TARGET_AVX512VL void projection_backward_block_avx512(index_t tokens, index_t K, const T* R, const float* phi,
                                                          const float* u, const float* r, const float* gz, T* gR,
                                                          float* gphi, index_t k0, index_t w, index_t k_next) {
  constexpr index_t B = grad_phi_wide_block<M>;
  constexpr int TT = backward_tile, G = input_grad_tokens;
  static_assert(TT % G == 0, "whole groups per tile");
  alignas(64) float acc[M][B];
  alignas(64) float xt[TT][32];  // the staged last columns of grad_phi
  alignas(64) float pg[G][B];
  float g[TT * M], gu[TT * M], gs[TT];
  phi_panel<M, float, B> pn;
  pn.load(cpu_isa::avx2, phi, K, k0, w, int(tokens < G ? tokens : G));
  const index_t cols = (w + 31) / 32 * 32;
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < cols; l += 16) _mm512_store_ps(acc[j] + l, _mm512_setzero_ps());
  for (index_t t0 = 0; t0 < tokens; t0 += TT) {
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    backward_tile_coeffs<M>(t0, nt, K, gz, u, r, g, gu, gs);
    for (int a = 0; a < nt; a += G) {
      const int ng = nt - a < G ? nt - a : G;
      float* pgs[G];
      const T* xs[G];
      for (int q = 0; q < ng; ++q) pgs[q] = pg[q], xs[q] = R + (t0 + a + q) * K + k0;
      prefetch_rows<T> pf;
      index_t tn = t0 + a + G, kn = k0;  // the next group's first token, and its column
      if (tn >= tokens) tn = 0, kn = k_next;
      if (kn >= 0)
        for (index_t q = 0; q < G && tn + q < tokens; ++q) pf.add(R + (tn + q) * K + kn);
      for (int q = 0; q < ng; ++q) pf.add(gR + (t0 + a + q) * K + k0);
      projection_input_grad_tokens<M>(cpu_isa::avx2, pn, ng, gu + a * M, xs, gs + a, pgs, pf);
      for (int q = 0; q < ng; ++q) accumulate_row(cpu_isa::avx2, gR + (t0 + a + q) * K + k0, pg[q], w);
    }
    grad_phi_tile_columns<M, B>(g, R + t0 * K + k0, K, w, nt, acc[0], xt);
  }
  for (int j = 0; j < M; ++j)
    for (index_t l = 0; l < w; ++l) gphi[index_t(j) * K + k0 + l] = acc[j][l];
}

/// pre_backward (the wide path) for the columns [c0, c0 + w) of every stream of every token (w <=
/// W, pre_backward_block), once the gates backward has written gz: per tile of tokens their projection
/// coefficients, four tokens at a time the input gradient of each stream over its packed panel of phi
/// (packed once for all the tokens), the mixing (pre_backward_mix_avx512) and gR's block written
/// through Store, then the tile's grad_phi terms from the rows of R just read, into the block's
/// accumulators (grad_phi[j][i C + c0 .. + w) written at the end). The products and sums of the
/// token-split loop and of accumulate_grad_phi, in the same order: the same bits. Prefetched as the
/// kernels run: the rows of R the next call reads (the next block's at c_next after the last tile;
/// c_next < 0: none) and what the mixing then reads.
template <int N, int M, index_t W, class Store, class T>
MHC_TARGET_AVX512VL void pre_backward_block_avx512(index_t tokens, index_t C, const T* R, const float* phi,
                                                   const float* comb, const float* pre_w, const float* u,
                                                   const float* r, const float* gz, const T* gRout, const T* gy_in,
                                                   T* gR, float* gphi, index_t c0, index_t w, index_t c_next) {
  constexpr int TT = backward_tile, G = input_grad_tokens;
  constexpr index_t RW = N * W;
  static_assert(W % 32 == 0 && TT % G == 0, "whole tiles of 32 columns, whole groups per tile");
  const index_t K = N * C;
  alignas(64) float acc[M][RW];
  alignas(64) float xt[TT][32];  // the staged last columns of grad_phi
  alignas(64) float pg[G][N][W];
  alignas(64) float ob[N][W];
  float g[TT * M], gu[TT * M], gs[TT];
  phi_panel<M, float, W> pn[N];
  for (int i = 0; i < N; ++i) pn[i].load(cpu_isa::avx2, phi, K, index_t(i) * C + c0, w, int(tokens < G ? tokens : G));
  const index_t cols = (w + 31) / 32 * 32;
  for (int j = 0; j < M; ++j)
    for (int i = 0; i < N; ++i)
      for (index_t l = 0; l < cols; l += 16) _mm512_store_ps(acc[j] + i * W + l, _mm512_setzero_ps());
  for (index_t t0 = 0; t0 < tokens; t0 += TT) {
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    backward_tile_coeffs<M>(t0, nt, K, gz, u, r, g, gu, gs);
    for (int a = 0; a < nt; a += G) {
      const int ng = nt - a < G ? nt - a : G;
      for (int i = 0; i < N; ++i) {
        float* pgs[G];
        const T* xs[G];
        for (int q = 0; q < ng; ++q) pgs[q] = pg[q][i], xs[q] = R + (t0 + a + q) * K + index_t(i) * C + c0;
        prefetch_rows<T> pf;
        index_t tn = t0 + a, kn = index_t(i + 1) * C + c0;  // the next stream
        if (i + 1 == N) {
          tn = t0 + a + G, kn = c0;  // the next group
          if (tn >= tokens) tn = 0, kn = c_next;
        }
        if (kn >= 0)
          for (index_t q = 0; q < G && tn + q < tokens; ++q) pf.add(R + (tn + q) * K + kn);
        for (int q = 0; q < ng; ++q) pf.add(gRout + (t0 + a + q) * K + index_t(i) * C + c0);
        if (i == 0)
          for (int q = 0; q < ng; ++q) pf.add(gy_in + (t0 + a + q) * C + c0);
        projection_input_grad_tokens<M>(cpu_isa::avx2, pn[i], ng, gu + a * M, xs, gs + a, pgs, pf);
      }
      for (int q = 0; q < ng; ++q) {
        const index_t t = t0 + a + q;
        pre_backward_mix_avx512<N, W>(comb + t * N * N, pre_w + t * N, gRout + t * K + c0, gy_in + t * C + c0, C, w,
                                      pg[q], ob);
        for (int i = 0; i < N; ++i) Store::row(gR + t * K + index_t(i) * C + c0, ob[i], w);
      }
    }
    for (int i = 0; i < N; ++i)
      grad_phi_tile_columns<M, RW>(g, R + t0 * K + index_t(i) * C + c0, K, w, nt, acc[0] + i * W, xt);
  }
  for (int j = 0; j < M; ++j)
    for (int i = 0; i < N; ++i)
      for (index_t l = 0; l < w; ++l) gphi[index_t(j) * K + index_t(i) * C + c0 + l] = acc[j][i * W + l];
}

/// Tokens per thread below which pre_backward splits its input gradient over blocks of columns
/// (pre_backward_block_avx512) rather than over the tokens. With the column split, at 2 threads and
/// C = 1280 to 7168, T = 64 ran 10-30% faster, T = 128 about even, T = 256 and 512 5-25% slower.
inline constexpr index_t column_split_tokens = 64;

/// The widest column block of pre_backward_block_avx512 for N streams (M rows of phi): half the
/// panel width of the token-split loop, a multiple of 32. At T = 1, C = 4096 (2 threads) the half
/// took 56 us against 73-82 us for the whole width; T = 16 and 64 ran the same.
template <int N, int M>
inline constexpr index_t pre_backward_block = std::max<index_t>(32, panel_width<M, float>(N) / 2 / 32 * 32);

/// Whether pre_backward takes the column split for N streams: where its accumulators and panels (on
/// the stack) take at most 96 KiB, about 115 KiB of stack in all (n = 2..6; at n = 7 and 8 the
/// narrowest block would take 113 and 160 KiB, and the token split stays; n = 1 has M = 3 rows).
template <int N, int M>
inline constexpr bool pre_backward_columns = M > 4 && 2 * M * N * pre_backward_block<N, M> * 4 <= 98304;

/// Column block width of the backward ops' column split over `threads` threads, for `extent`
/// columns: `widest`, halved while that leaves fewer than two blocks per thread, down to `narrowest`
/// (and not below it; a widest below it stays). The bits do not depend on it.
inline index_t column_block_width(index_t extent, index_t widest, index_t narrowest, index_t threads) {
  index_t w = widest;
  while (w > narrowest && (extent + w - 1) / w < 2 * threads) w = std::max(narrowest, w / 2);
  return w;
}
#endif

/// scalar::grad_pre with the kernels of `isa` (the same bits for every isa).
template <int N, class T, class F>
inline void grad_pre(cpu_isa isa, const T* R, const T* gy, index_t C, F* gpre) {
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (isa == cpu_isa::avx2) return grad_pre_avx2<N>(R, gy, C, gpre);
#endif
  (void)isa;
  scalar::grad_pre<N>(R, gy, C, gpre);
}

}  // namespace detail
}  // namespace mhc
