#pragma once
/// \file
/// Sinkhorn-Knopp and its backward for several tokens at once (SPEC.md section 3): with AVX2, eight
/// tokens, one per lane of a vector, through scalar::sinkhorn_normalize and
/// scalar::sinkhorn_backward_softmax. Every lane does those functions' arithmetic in IEEE single
/// precision (each +, -, *, / rounded once, nothing contracted), and the softmax stays the scalar one
/// per token, so each token gets scalar::sinkhorn's and scalar::sinkhorn_backward's bits. One token at
/// a time, the 16 divisions of each normalisation step (n = 4; 39 steps forward, 78 for the backward's
/// replay and walk at 20 iterations) waited on each other; eight tokens share them.

#include <type_traits>

#include "mhc/core/config.hpp"
#include "mhc/cpu/isa.hpp"
#include "mhc/ops/scalar.hpp"

namespace mhc {
namespace detail {

/// Tokens per group of sinkhorn_tokens and sinkhorn_backward_tokens.
inline constexpr int sinkhorn_lanes = 8;

/// Elements of scratch sinkhorn_backward_tokens needs: a token's for each lane.
constexpr index_t sinkhorn_tokens_scratch_size(int n, int iters) {
  return index_t(sinkhorn_lanes) * sinkhorn_scratch_size(n, iters);
}

#if MHC_HAVE_AVX2_KERNELS
/// Eight floats, one token's per lane, with the arithmetic of scalar::sinkhorn_normalize and
/// scalar::sinkhorn_backward_softmax. Plain GCC vector code (no target attribute, so the scalar
/// templates can be instantiated with it), compiled for AVX2 inside sinkhorn_forward_lanes and
/// sinkhorn_backward_lanes. Aligned as a float, so the scratch may be any float buffer.
struct __attribute__((may_alias)) f32x8 {
  typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
  v8 v;
  f32x8() = default;
  MHC_INLINE f32x8(float s) : v(v8{s, s, s, s, s, s, s, s}) {}  // NOLINT: implicit, as F(0) in the templates
  // No function takes or returns a bare v8: outside AVX code its argument ABI would differ (-Wpsabi).
  MHC_INLINE friend f32x8 operator+(const f32x8& a, const f32x8& b) {
    f32x8 r;
    r.v = a.v + b.v;
    return r;
  }
  MHC_INLINE friend f32x8 operator-(const f32x8& a, const f32x8& b) {
    f32x8 r;
    r.v = a.v - b.v;
    return r;
  }
  MHC_INLINE friend f32x8 operator*(const f32x8& a, const f32x8& b) {
    f32x8 r;
    r.v = a.v * b.v;
    return r;
  }
  MHC_INLINE friend f32x8 operator/(const f32x8& a, const f32x8& b) {
    f32x8 r;
    r.v = a.v / b.v;
    return r;
  }
  MHC_INLINE f32x8& operator+=(const f32x8& b) {
    v = v + b.v;
    return *this;
  }
};

/// scalar::nonzero per lane: an exact 0 becomes 1 (found by argument-dependent lookup).
MHC_INLINE f32x8 nonzero(const f32x8& den) {
  const f32x8 one(1.0f), zero(0.0f);
  f32x8 r;
  r.v = den.v == zero.v ? one.v : den.v;
  return r;
}

/// Eight tokens' row softmaxes (scalar, one token at a time) into the lanes of S: token a of the nt
/// <= 8 at L + a*n*n; the unused lanes repeat the last token.
template <int N>
MHC_INLINE void softmax_lanes(int nt, const float* L, f32x8* S) {
  constexpr int NN = N * N;
  for (int a = 0; a < sinkhorn_lanes; ++a) {
    const int src = a < nt ? a : nt - 1;
    float s[NN];
    scalar::row_softmax<N>(L + src * NN, s);
    for (int e = 0; e < NN; ++e) S[e].v[a] = s[e];
  }
}

/// scalar::sinkhorn for nt <= 8 tokens, one per lane (L, P: nt consecutive n x n matrices; P may
/// alias L).
template <int N>
MHC_TARGET_AVX2 void sinkhorn_forward_lanes(int nt, const float* L, float* P, int iters, float eps) {
  constexpr int NN = N * N;
  f32x8 X[NN];
  softmax_lanes<N>(nt, L, X);
  scalar::sinkhorn_normalize<N>(X, iters, f32x8(eps));
  for (int a = 0; a < nt; ++a)
    for (int e = 0; e < NN; ++e) P[a * NN + e] = X[e].v[a];
}

/// scalar::sinkhorn_backward for nt <= 8 tokens, one per lane (L, gP, gL: nt consecutive n x n
/// matrices; gL may alias gP). The unused lanes repeat the last token and are not written.
template <int N>
MHC_TARGET_AVX2 void sinkhorn_backward_lanes(int nt, const float* L, const float* gP, float* gL, int iters, float eps,
                                             float* scratch) {
  constexpr int NN = N * N;
  f32x8 S0[NN], g[NN];
  softmax_lanes<N>(nt, L, S0);
  for (int a = 0; a < sinkhorn_lanes; ++a)
    for (int e = 0; e < NN; ++e) g[e].v[a] = gP[(a < nt ? a : nt - 1) * NN + e];
  scalar::sinkhorn_backward_softmax<N>(S0, g, g, iters, f32x8(eps), reinterpret_cast<f32x8*>(scratch));
  for (int a = 0; a < nt; ++a)
    for (int e = 0; e < NN; ++e) gL[a * NN + e] = g[e].v[a];
}
#endif

/// scalar::sinkhorn for nt tokens (L, P: nt consecutive n x n matrices; P may alias L) with the
/// kernels of `isa`: the same bits.
template <int N, class F>
inline void sinkhorn_tokens(cpu_isa isa, index_t nt, const F* L, F* P, int iters, F eps) {
  constexpr int NN = N * N;
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (isa == cpu_isa::avx2) {
      for (index_t a = 0; a < nt; a += sinkhorn_lanes)
        sinkhorn_forward_lanes<N>(int(nt - a < sinkhorn_lanes ? nt - a : sinkhorn_lanes), L + a * NN, P + a * NN, iters, eps);
      return;
    }
#endif
  (void)isa;
  for (index_t a = 0; a < nt; ++a) scalar::sinkhorn<N>(L + a * NN, P + a * NN, iters, eps);
}

/// scalar::sinkhorn_backward for nt tokens (L, gP, gL: nt consecutive n x n matrices; gL may alias
/// gP) with the kernels of `isa`: the same bits. scratch: sinkhorn_tokens_scratch_size elements.
template <int N, class F>
inline void sinkhorn_backward_tokens(cpu_isa isa, index_t nt, const F* L, const F* gP, F* gL, int iters, F eps,
                                     F* scratch) {
  constexpr int NN = N * N;
#if MHC_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<F, float>)
    if (isa == cpu_isa::avx2) {
      for (index_t a = 0; a < nt; a += sinkhorn_lanes)
        sinkhorn_backward_lanes<N>(int(nt - a < sinkhorn_lanes ? nt - a : sinkhorn_lanes), L + a * NN, gP + a * NN,
                                   gL + a * NN, iters, eps, scratch);
      return;
    }
#endif
  (void)isa;
  for (index_t a = 0; a < nt; ++a)
    scalar::sinkhorn_backward<N>(L + a * NN, gP + a * NN, gL + a * NN, iters, eps, scratch);
}

}  // namespace detail
}  // namespace mhc
