#pragma once
/// \file
/// Row writers of the CPU mixing kernels: vector conversion to the storage type and, for large outputs,
/// non-temporal (streaming) stores. An ordinary store first reads the destination line into the cache
/// (write-allocate), so an op that writes W bytes moves 2W for them; a streaming store writes the line
/// straight to memory. Streaming is used only where the output is large and does not alias an input.
/// The values are the same bits as scalar::plain_store's. SSE2 intrinsics (the x86-64 baseline) under
/// `__SSE2__`, AVX2 (twice the elements per instruction) where the build carries AVX2 kernels and the
/// backend runs them; elsewhere plain_store.

#include <cstdint>
#include <type_traits>

#include "mhc/core/config.hpp"
#include "mhc/core/dtype.hpp"
#include "mhc/cpu/isa.hpp"
#include "mhc/ops/scalar.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mhc {
namespace detail {

/// The part of a row before its first 16-byte boundary, written with ordinary stores when the row
/// writer streams (streaming stores need 16-byte alignment); returns where the vector body starts,
/// or -1 when dst is not even aligned to its element and the whole row was written that way.
template <bool NonTemporal, class T, class F>
MHC_INLINE index_t row_head(T* dst, const F* src, index_t w) {
  if (!NonTemporal) return 0;
  const auto addr = reinterpret_cast<std::uintptr_t>(dst);
  if (addr % sizeof(T) != 0) return scalar::plain_store::row(dst, src, w), index_t(-1);
  index_t head = index_t((16 - addr % 16) % 16 / sizeof(T));
  if (head > w) head = w;
  scalar::plain_store::row(dst, src, head);
  return head;
}

#if MHC_HAVE_AVX2_KERNELS
/// Eight floats (no NaN) rounded to nearest even bf16 (the SSE2 writer's arithmetic, eight lanes),
/// each sign-extended from the high half of its 32-bit lane.
MHC_TARGET_AVX2 MHC_INLINE __m256i bf16_round_avx2(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}

/// bf16_round_avx2 of the eight floats at src; NaN lanes are marked in `nan`.
MHC_TARGET_AVX2 MHC_INLINE __m256i bf16_bits_avx2(const float* src, __m256& nan) {
  const __m256 f = _mm256_loadu_ps(src);
  nan = _mm256_or_ps(nan, _mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return bf16_round_avx2(f);
}

/// Stores 32 bytes at dst: with NonTemporal as two 16-byte streaming stores, so dst needs only the
/// 16-byte alignment the SSE2 writer's rows have (a row starting off a 32-byte boundary would
/// otherwise need a head of ordinary stores into the line the streaming stores then write).
template <bool NonTemporal>
MHC_TARGET_AVX2 MHC_INLINE void store32_avx2(void* dst, __m256i v) {
  if (NonTemporal) {
    _mm_stream_si128(static_cast<__m128i*>(dst), _mm256_castsi256_si128(v));
    _mm_stream_si128(static_cast<__m128i*>(dst) + 1, _mm256_extracti128_si256(v, 1));
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(dst), v);
  }
}

/// simd_store<NonTemporal>::row computed eight floats (or sixteen bf16 values) at a time with AVX2.
template <bool NonTemporal, class T>
MHC_TARGET_AVX2 inline void store_row_avx2(T* dst, const float* src, index_t w) {
  constexpr index_t per_vec = 32 / index_t(sizeof(T));
  index_t l = row_head<NonTemporal>(dst, src, w);
  if (l < 0) return;
  __m256 nan = _mm256_setzero_ps();
  for (; l + per_vec <= w; l += per_vec) {
    if constexpr (std::is_same_v<T, float>) {
      store32_avx2<NonTemporal>(dst + l, _mm256_castps_si256(_mm256_loadu_ps(src + l)));
    } else {
      // packs works within 128-bit halves: the 64-bit permute puts the sixteen values in order.
      store32_avx2<NonTemporal>(dst + l, _mm256_permute4x64_epi64(_mm256_packs_epi32(bf16_bits_avx2(src + l, nan),
                                                                                   bf16_bits_avx2(src + l + 8, nan)),
                                                                0xD8));
    }
  }
  scalar::plain_store::row(dst + l, src + l, w - l);
  if (_mm256_movemask_ps(nan) != 0) {  // rare: rewrite the row with the scalar conversion
    if (NonTemporal) _mm_sfence();
    scalar::plain_store::row(dst, src, w);
  }
}
#endif

/// Row writer of the CPU backend: with SSE2, four floats (or eight bf16 values, rounded with integer
/// vector operations) per store instruction, with Avx2 (only where the backend runs the AVX2 kernels)
/// twice as many per iteration (store_row_avx2); with NonTemporal, the 16-byte aligned body of each
/// row uses non-temporal stores (ordinary stores for the unaligned head and the tail; call stream_fence()
/// before other threads read the output). Without SSE2 it is scalar::plain_store.
template <bool NonTemporal, bool Avx2 = false>
struct simd_store {
  /// Whether row() uses the AVX2 writer: the code around it must then be compiled for AVX2
  /// (backend_traits<cpu>::with_store_isa).
  static constexpr bool avx2 = Avx2;
  /// Whether the row bodies are written with streaming (non-temporal) stores.
  static constexpr bool non_temporal = NonTemporal;

  /// dst[l] = round(src[l]) for l < w.
  template <class T, class F>
  static MHC_INLINE void row(T* dst, const F* src, index_t w) {
#if MHC_HAVE_AVX2_KERNELS
    if constexpr (Avx2 && std::is_same_v<F, float> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>))
      return store_row_avx2<NonTemporal>(dst, src, w);
#endif
#if defined(__SSE2__)
    if constexpr (std::is_same_v<F, float> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>)) {
      constexpr index_t per_vec = 16 / index_t(sizeof(T));
      index_t l = row_head<NonTemporal>(dst, src, w);
      if (l < 0) return;
      __m128 nan = _mm_setzero_ps();  // lanes that saw a NaN: the vector rounding does not handle them
      for (; l + per_vec <= w; l += per_vec) store16(dst + l, src + l, nan);
      scalar::plain_store::row(dst + l, src + l, w - l);
      if (_mm_movemask_ps(nan) != 0) {  // rare: rewrite the row with the scalar conversion
        if (NonTemporal) _mm_sfence();
        scalar::plain_store::row(dst, src, w);
      }
      return;
    }
#endif
    scalar::plain_store::row(dst, src, w);
  }

 private:
#if defined(__SSE2__)
  /// Four floats, as they are.
  static MHC_INLINE void store16(float* dst, const float* src, __m128&) {
    const __m128 v = _mm_loadu_ps(src);
    if (NonTemporal)
      _mm_stream_ps(dst, v);
    else
      _mm_storeu_ps(dst, v);
  }

  /// Four floats rounded to nearest even bf16, each sign-extended from the high half of its 32-bit lane
  /// so a signed saturating pack keeps the 16 bits exactly. NaN lanes are marked in `nan` (their
  /// result here is wrong and gets rewritten).
  static MHC_INLINE __m128i bf16_bits(const float* src, __m128& nan) {
    const __m128 f = _mm_loadu_ps(src);
    nan = _mm_or_ps(nan, _mm_cmpunord_ps(f, f));
    const __m128i u = _mm_castps_si128(f);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    return _mm_srai_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7FFF)), lsb), 16);
  }

  /// Eight floats rounded to bf16.
  static MHC_INLINE void store16(bf16* dst, const float* src, __m128& nan) {
    const __m128i v = _mm_packs_epi32(bf16_bits(src, nan), bf16_bits(src + 4, nan));
    if (NonTemporal)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst), v);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), v);
  }
#endif
};

/// Orders this thread's streaming stores before its later stores (and so before the thread pool's
/// completion signal); a no-op without SSE2.
MHC_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Output bytes from which the CPU mixing kernels write with streaming stores: an output this large
/// is not read back from the cache before it is evicted, so skipping the write-allocate read only
/// saves traffic.
inline constexpr index_t streaming_threshold_bytes = index_t(8) << 20;

}  // namespace detail
}  // namespace mhc
