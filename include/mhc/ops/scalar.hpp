#pragma once
/// \file
/// Per-token scalar kernels: the single source of the arithmetic of SPEC.md sections 2 to 5. Every
/// backend path (unfused ops, fused pre, the layer's fused backward) calls these same functions in the
/// same order, which is what makes fused and unfused results bit-identical. No checks here: callers
/// validate at the API boundary.

#include <cmath>
#include <limits>
#include <type_traits>

#include "mhc/core/config.hpp"
#include "mhc/core/dtype.hpp"
#include "mhc/core/options.hpp"

namespace mhc {

/// Number of mixing coefficients per token for n streams: n pre, n post, n*n comb.
template <int N>
inline constexpr int coeff_count = N * (N + 2);

/// Elements of scratch one Sinkhorn backward replay needs for an n x n matrix and `iters` iterations.
MHC_HOST_DEVICE constexpr index_t sinkhorn_scratch_size(int n, int iters) {
  return index_t(n) * n + (2 * index_t(iters) - 1) * (index_t(n) * n + n);
}

namespace scalar {

/// Precise logistic function 1 / (1 + exp(-a)).
template <class F>
MHC_HOST_DEVICE MHC_INLINE F sigmoid(F a) {
  return F(1) / (F(1) + std::exp(-a));
}

/// Group of coefficient j: 0 = pre, 1 = post, 2 = comb.
template <int N>
MHC_HOST_DEVICE constexpr int group_of(int j) {
  return j < N ? 0 : (j < 2 * N ? 1 : 2);
}

// ---------------------------------------------------------------------------------------------
// Sinkhorn-Knopp (SPEC.md section 3), comb orientation: P[i*N + o].

/// Row softmax with the row maximum subtracted: P = exp(L - max) / sum.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void row_softmax(const F* L, F* P) {
  for (int i = 0; i < N; ++i) {
    F m = L[i * N];
    for (int o = 1; o < N; ++o) m = L[i * N + o] > m ? L[i * N + o] : m;
    F s = F(0);
    for (int o = 0; o < N; ++o) {
      P[i * N + o] = std::exp(L[i * N + o] - m);
      s += P[i * N + o];
    }
    for (int o = 0; o < N; ++o) P[i * N + o] = P[i * N + o] / s;
  }
}

/// A normalisation denominator: sum + eps, with an exact 0 (possible only with eps = 0, when every
/// entry of a row or column underflowed) replaced by 1 so the all-zero line stays zero instead of
/// becoming 0/0 = NaN. No finite result of SPEC.md section 3 changes; finite logits always give a
/// finite result.
template <class F>
MHC_HOST_DEVICE MHC_INLINE F nonzero(F den) {
  return den == F(0) ? F(1) : den;
}

/// Row step: P[i][o] /= (sum_o P[i][o] + eps). Writes the denominators to d[N] when d is not null.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void normalize_rows(F* P, F eps, F* d) {
  for (int i = 0; i < N; ++i) {
    F s = P[i * N];
    for (int o = 1; o < N; ++o) s += P[i * N + o];
    const F den = nonzero(s + eps);
    if (d) d[i] = den;
    for (int o = 0; o < N; ++o) P[i * N + o] = P[i * N + o] / den;
  }
}

/// Column step: P[i][o] /= (sum_i P[i][o] + eps). Writes the denominators to d[N] when d is not null.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void normalize_cols(F* P, F eps, F* d) {
  for (int o = 0; o < N; ++o) {
    F s = P[o];
    for (int i = 1; i < N; ++i) s += P[i * N + o];
    const F den = nonzero(s + eps);
    if (d) d[o] = den;
    for (int i = 0; i < N; ++i) P[i * N + o] = P[i * N + o] / den;
  }
}

/// The steps of sinkhorn after the row softmax, in place on P: +eps, column step, then iters-1 rounds
/// of row step + column step. F is a float type, or a vector of them with the same arithmetic per
/// lane (the CPU backend's several tokens at once).
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void sinkhorn_normalize(F* P, int iters, F eps) {
  for (int k = 0; k < N * N; ++k) P[k] += eps;
  normalize_cols<N>(P, eps, static_cast<F*>(nullptr));
  for (int it = 1; it < iters; ++it) {
    normalize_rows<N>(P, eps, static_cast<F*>(nullptr));
    normalize_cols<N>(P, eps, static_cast<F*>(nullptr));
  }
}

/// Sinkhorn-Knopp projection of logits L (n x n, comb orientation) into P, exactly as SPEC.md
/// section 3: softmax, +eps, column step, then iters-1 rounds of row step + column step.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void sinkhorn(const F* L, F* P, int iters, F eps) {
  row_softmax<N>(L, P);
  sinkhorn_normalize<N>(P, iters, eps);
}

/// Gradient of one normalisation step Y = X / (S + eps) along rows (by_rows) or columns, in place:
/// g <- (g - sum_axis(g * Y)) / d.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void normalize_backward(F* g, const F* Y, const F* d, bool by_rows) {
  for (int a = 0; a < N; ++a) {
    F dot = F(0);
    for (int b = 0; b < N; ++b) {
      const int k = by_rows ? a * N + b : b * N + a;
      dot += g[k] * Y[k];
    }
    for (int b = 0; b < N; ++b) {
      const int k = by_rows ? a * N + b : b * N + a;
      g[k] = (g[k] - dot) / d[a];
    }
  }
}

/// sinkhorn_backward given the row softmax S0 of the logits: replays the normalisation steps into Y
/// ((2 iters - 1)(n*n + n) elements: each step's output, then its denominators), then walks them
/// backwards. gL may alias gP. F is a float type, or a vector of them with the same arithmetic per
/// lane (the CPU backend's several tokens at once).
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void sinkhorn_backward_softmax(const F* S0, const F* gP, F* gL, int iters, F eps, F* Y) {
  constexpr int NN = N * N;
  const int steps = 2 * iters - 1;  // normalisation steps: col, (row, col) * (iters - 1)
  const F* prev = S0;
  for (int k = 0; k < steps; ++k) {
    F* Yk = Y + index_t(k) * (NN + N);
    for (int e = 0; e < NN; ++e) Yk[e] = k == 0 ? prev[e] + eps : prev[e];
    if (k % 2 == 0)
      normalize_cols<N>(Yk, eps, Yk + NN);
    else
      normalize_rows<N>(Yk, eps, Yk + NN);
    prev = Yk;
  }
  F g[NN];
  for (int e = 0; e < NN; ++e) g[e] = gP[e];
  for (int k = steps - 1; k >= 0; --k) {
    const F* Yk = Y + index_t(k) * (NN + N);
    normalize_backward<N>(g, Yk, Yk + NN, /*by_rows=*/k % 2 != 0);
  }
  // the +eps after the softmax passes the gradient unchanged; softmax backward per row
  for (int i = 0; i < N; ++i) {
    F dot = F(0);
    for (int o = 0; o < N; ++o) dot += g[i * N + o] * S0[i * N + o];
    for (int o = 0; o < N; ++o) gL[i * N + o] = S0[i * N + o] * (g[i * N + o] - dot);
  }
}

/// Exact Sinkhorn backward by replay: recomputes the forward from L keeping every intermediate in
/// `scratch` (sinkhorn_scratch_size(N, iters) elements), then walks the steps backwards. gL may alias gP.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void sinkhorn_backward(const F* L, const F* gP, F* gL, int iters, F eps, F* scratch) {
  row_softmax<N>(L, scratch);
  sinkhorn_backward_softmax<N>(scratch, gP, gL, iters, eps, scratch + N * N);
}

/// The same exact Sinkhorn backward with no scratch: each step's output and denominators are recomputed
/// from L when the backward walk reaches it (O(iters^2) small steps, everything in registers; the GPU's
/// on-chip replay). The replayed values are the forward's bit for bit, so gL equals sinkhorn_backward's
/// bit for bit. gL may alias gP.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void sinkhorn_backward_replay(const F* L, const F* gP, F* gL, int iters, F eps) {
  constexpr int NN = N * N;
  const int steps = 2 * iters - 1;
  F g[NN];
  for (int e = 0; e < NN; ++e) g[e] = gP[e];
  for (int k = steps - 1; k >= 0; --k) {
    F Y[NN], d[N];
    row_softmax<N>(L, Y);
    for (int e = 0; e < NN; ++e) Y[e] += eps;
    for (int q = 0; q <= k; ++q) {
      if (q % 2 == 0)
        normalize_cols<N>(Y, eps, d);
      else
        normalize_rows<N>(Y, eps, d);
    }
    normalize_backward<N>(g, Y, d, /*by_rows=*/k % 2 != 0);
  }
  F S0[NN];
  row_softmax<N>(L, S0);
  for (int i = 0; i < N; ++i) {
    F dot = F(0);
    for (int o = 0; o < N; ++o) dot += g[i * N + o] * S0[i * N + o];
    for (int o = 0; o < N; ++o) gL[i * N + o] = S0[i * N + o] * (g[i * N + o] - dot);
  }
}

// ---------------------------------------------------------------------------------------------
// RMS-scaled projection (SPEC.md section 2 steps 1-2).

/// Number of independent fp32 accumulation lanes of the projection and the sum of squares; the lane
/// of element k is k % projection_lanes, lanes are combined in a fixed tree.
inline constexpr int projection_lanes = 8;

template <class F>
MHC_HOST_DEVICE MHC_INLINE F combine_lanes(const F* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/// Elements of x converted to compute precision at a time by project (a multiple of projection_lanes).
inline constexpr index_t projection_chunk = 1024;

/// One (token, row) piece of the projection over a chunk of w elements already in compute precision:
/// acc[l] += p[i] * xb[i] for the elements i of lane l, in increasing i.
template <class F>
MHC_HOST_DEVICE MHC_INLINE void project_row(const F* p, const F* xb, index_t w, F* acc) {
  constexpr int W = projection_lanes;
  const index_t full = w / W * W;
  F a[W];
  for (int l = 0; l < W; ++l) a[l] = acc[l];
  for (index_t i = 0; i < full; i += W)
    for (int l = 0; l < W; ++l) a[l] += p[i + l] * xb[i + l];
  for (index_t i = full; i < w; ++i) a[i - full] += p[i] * xb[i];
  for (int l = 0; l < W; ++l) acc[l] = a[l];
}

/// Converts a chunk of w elements of one token to compute precision (xb) and adds their squares to the
/// lanes sq[l], in increasing element order.
template <class T, class F>
MHC_HOST_DEVICE MHC_INLINE void load_chunk(const T* x, index_t w, F* xb, F* sq) {
  constexpr int W = projection_lanes;
  const index_t full = w / W * W;
  for (index_t i = 0; i < w; ++i) xb[i] = storage_traits<T>::load(x[i]);
  for (index_t i = 0; i < full; i += W)
    for (int l = 0; l < W; ++l) sq[l] += xb[i + l] * xb[i + l];
  for (index_t i = full; i < w; ++i) sq[i - full] += xb[i] * xb[i];
}

/// u[j] = sum_k phi[j*K + k] * x[k] for j < M, and s = sum_k x[k]^2, in compute precision. Element k
/// goes to lane k % projection_lanes of its row, lanes accumulate in increasing k and are combined by
/// combine_lanes; this order is fixed whatever the chunking or the loop order around project_row, so
/// every caller (including the CPU backend's multi-token loop) gets the same bits.
template <int M, class T, class F>
MHC_HOST_DEVICE MHC_INLINE void project(const T* x, index_t K, const F* phi, F* u, F& s) {
  constexpr int W = projection_lanes;
  static_assert(projection_chunk % W == 0, "chunk must keep the lane of each element");
  F acc[M][W];
  F sq[W];
  for (int l = 0; l < W; ++l) {
    sq[l] = F(0);
    for (int j = 0; j < M; ++j) acc[j][l] = F(0);
  }
  F xb[projection_chunk];
  for (index_t k0 = 0; k0 < K; k0 += projection_chunk) {
    const index_t w = K - k0 < projection_chunk ? K - k0 : projection_chunk;
    load_chunk(x + k0, w, xb, sq);
    for (int j = 0; j < M; ++j) project_row(phi + index_t(j) * K + k0, xb, w, acc[j]);
  }
  s = combine_lanes(sq);
  for (int j = 0; j < M; ++j) u[j] = combine_lanes(acc[j]);
}

/// r = 1 / sqrt(s / K + eps).
template <class F>
MHC_HOST_DEVICE MHC_INLINE F rstd(F s, index_t K, F eps) {
  return F(1) / std::sqrt(s / F(K) + eps);
}

/// rstd when the plain sum of squares overflowed: r = 2^-e / sqrt(sum((x 2^-e)^2) / K + eps 2^-2e),
/// with 2^e just above max |x| (the scaling is exact). Finite for every finite x; 0 when some x is
/// infinite, as the plain formula gives.
template <class T, class F>
MHC_HOST_DEVICE F rstd_rescaled(const T* x, index_t K, F eps) {
  F m = F(0);
  for (index_t k = 0; k < K; ++k) m = std::fmax(m, std::fabs(storage_traits<T>::load(x[k])));
  if (!(m <= std::numeric_limits<F>::max())) return F(0);
  int e = 0;
  (void)std::frexp(m, &e);
  const F scale = std::ldexp(F(1), -e);
  F s = F(0);
  for (index_t k = 0; k < K; ++k) {
    const F v = storage_traits<T>::load(x[k]) * scale;
    s += v * v;
  }
  return scale / std::sqrt(s / F(K) + eps * scale * scale);
}

/// r = 1 / sqrt(s / K + eps) for the sum of squares s of the K values x: rstd(s, K, eps), unless s
/// overflowed to infinity, where rstd_rescaled recomputes it without overflow. A finite s keeps its
/// bits: the check costs one comparison per token.
template <class T, class F>
MHC_HOST_DEVICE MHC_INLINE F rstd_of(const T* x, index_t K, F s, F eps) {
  if (s > std::numeric_limits<F>::max()) return rstd_rescaled(x, K, eps);
  return rstd(s, K, eps);
}

/// The RMS-scaled projection of one token: writes u = phi x (M values) and returns
/// r = 1 / sqrt(sum(x^2) / K + eps_rms) (finite for any finite x, see rstd_of).
template <int M, class T, class F>
MHC_HOST_DEVICE MHC_INLINE F rms_projection(const T* x, index_t K, const F* phi, F eps_rms, F* u) {
  F s;
  project<M>(x, K, phi, u, s);
  return rstd_of(x, K, s, eps_rms);
}

/// Backward of the RMS-scaled projection for one token, given gz (gradient of z = r * u):
/// writes gu[j] = gz_j * r and returns gs = -(sum_j gz_j u_j) r^3 / (2K).
template <int M, class F>
MHC_HOST_DEVICE MHC_INLINE F projection_backward_coeffs(const F* gz, const F* u, F r, index_t K, F* gu) {
  F gr = F(0);
  for (int j = 0; j < M; ++j) {
    gu[j] = gz[j] * r;
    gr += gz[j] * u[j];
  }
  return -gr * (r * r * r) / (F(2) * F(K));
}

/// Residual gradient of the projection over elements [k0, k0 + w) of one token:
/// out[l] = (sum_j gu_j * phi[j][k0 + l], accumulated j = 0..M-1) + 2 x[l] gs.
template <int M, class T, class F>
MHC_HOST_DEVICE MHC_INLINE void projection_input_grad(const F* gu, const F* phi, index_t K, index_t k0, index_t w,
                                                      const T* x, F gs, F* out) {
  for (index_t l = 0; l < w; ++l) out[l] = F(0);
  for (int j = 0; j < M; ++j) {
    const F g = gu[j];
    const F* p = phi + index_t(j) * K + k0;
    for (index_t l = 0; l < w; ++l) out[l] += g * p[l];
  }
  for (index_t l = 0; l < w; ++l) out[l] += F(2) * storage_traits<T>::load(x[l]) * gs;
}

/// Per-token reductions over the hidden dimension in the backward (grad of pre, post and comb) use the
/// projection's lanes: element c goes to lane c % projection_lanes, lanes accumulate in increasing c and
/// are combined by combine_lanes, so the loops vectorise and every caller gets the same bits.

/// Hidden-dimension block of the per-token backward kernels. Each stream's block is first copied to
/// a local buffer, one stream after the other: the streams of a token lie exactly C elements apart,
/// so reading all of them at every c makes their addresses collide in the cache sets (and alias
/// modulo 4 KiB with the stores) when C is a multiple of 1024.
inline constexpr index_t backward_block = 256;

/// Writes w compute-precision values to storage with ordinary stores, rounding each once. The mixing
/// kernels take the row writer as a policy so a backend may write large outputs differently (for
/// example with non-temporal stores) without touching the arithmetic.
struct plain_store {
  /// dst[l] = round(src[l]) for l < w.
  template <class T, class F>
  static MHC_HOST_DEVICE MHC_INLINE void row(T* dst, const F* src, index_t w) {
    for (index_t l = 0; l < w; ++l) dst[l] = storage_traits<T>::store(src[l]);
  }
};

/// dst[i][l] = src[i*C + c0 + l] in compute precision, for i < N and l < w.
template <int N, class T, class F>
MHC_HOST_DEVICE MHC_INLINE void load_streams(const T* src, index_t C, index_t c0, index_t w, F (*dst)[backward_block]) {
  for (int i = 0; i < N; ++i)
    for (index_t l = 0; l < w; ++l) dst[i][l] = storage_traits<T>::load(src[index_t(i) * C + c0 + l]);
}

/// grad_pre in pieces, for a caller that does more per block: grad_pre_begin, then grad_pre_block
/// for the blocks b0 = 0, backward_block, ... in order (w = min(backward_block, C - b0)), then
/// grad_pre_end; the same bits as grad_pre (each lane sums its elements in order).
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void grad_pre_begin(F (*acc)[projection_lanes]) {
  for (int m = 0; m < N; ++m)
    for (int l = 0; l < projection_lanes; ++l) acc[m][l] = F(0);
}

/// One block of grad_pre: acc[m][l] += gy[c] R[m][c] for c in [b0, b0 + w), lane l = (c - b0) % 8.
template <int N, class T, class F>
MHC_HOST_DEVICE MHC_INLINE void grad_pre_block(const T* R, const T* gy, index_t C, index_t b0, index_t w,
                                               F (*acc)[projection_lanes]) {
  constexpr int W = projection_lanes;
  static_assert(backward_block % W == 0, "a block must keep the lane of each element");
  // Storage other than the compute type is converted to local buffers first; the compute type is
  // read in place.
  constexpr bool convert = !std::is_same_v<T, F>;
  constexpr index_t BB = convert ? backward_block : 1;
  F xbuf[N][BB], gbuf[1][BB];
  const F* xq[N];
  const F* g;
  if constexpr (convert) {
    load_streams<N>(R, C, b0, w, xbuf);
    load_streams<1>(gy, C, b0, w, gbuf);
    for (int m = 0; m < N; ++m) xq[m] = xbuf[m];
    g = gbuf[0];
  } else {
    for (int m = 0; m < N; ++m) xq[m] = R + index_t(m) * C + b0;
    g = gy + b0;
  }
  const index_t full = w / W * W;
  for (int m = 0; m < N; ++m) {  // each lane still adds its elements in increasing c
    const F* x = xq[m];
    F a[W];
    for (int l = 0; l < W; ++l) a[l] = acc[m][l];
    for (index_t c0 = 0; c0 < full; c0 += W)
      for (int l = 0; l < W; ++l) a[l] += g[c0 + l] * x[c0 + l];
    for (index_t c = full; c < w; ++c) a[c - full] += g[c] * x[c];
    for (int l = 0; l < W; ++l) acc[m][l] = a[l];
  }
}

/// gpre[m] from the lanes of grad_pre_block.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void grad_pre_end(F (*acc)[projection_lanes], F* gpre) {
  for (int m = 0; m < N; ++m) gpre[m] = combine_lanes(acc[m]);
}

/// gpre[m] = sum_c gy[c] R[m][c] for one token (R: N streams of C values).
template <int N, class T, class F>
MHC_HOST_DEVICE MHC_INLINE void grad_pre(const T* R, const T* gy, index_t C, F* gpre) {
  F acc[N][projection_lanes];
  grad_pre_begin<N>(acc);
  for (index_t b0 = 0; b0 < C; b0 += backward_block)
    grad_pre_block<N>(R, gy, C, b0, C - b0 < backward_block ? C - b0 : backward_block, acc);
  grad_pre_end<N>(acc, gpre);
}

/// Backward of post for one token over its whole hidden dimension, given gR' (gRout):
/// gy[c] = sum_o post_o gR'[o][c] (o in order, rounded once); gpost[o] = sum_c y[c] gR'[o][c];
/// gcomb[i][o] = sum_c R[i][c] gR'[o][c]; and, when gR is not null,
/// gR[i][c] += sum_o comb[i][o] gR'[o][c] (o in order from the first product, rounded once).
template <int N, class T, class F, class Store = plain_store>
MHC_HOST_DEVICE MHC_INLINE void post_backward(const F* post_w, const F* comb, const T* y, const T* R, const T* gRout,
                                              index_t C, T* gR, T* gy, F* gpost, F* gcomb) {
  constexpr int W = projection_lanes;
  F gp[N][W], gc[N * N][W];
  for (int l = 0; l < W; ++l) {
    for (int o = 0; o < N; ++o) gp[o][l] = F(0);
    for (int k = 0; k < N * N; ++k) gc[k][l] = F(0);
  }
  // Storage other than the compute type is converted a block at a time into local buffers first
  // (then every value is converted once, not once per use). Only local memory is written inside the
  // column loop (gy goes to a block buffer first), so the compiler can vectorise across lanes
  // without proving that gy does not alias the inputs.
  constexpr bool convert = !std::is_same_v<T, F>;
  constexpr index_t BB = convert ? backward_block : 1;
  for (index_t b0 = 0; b0 < C; b0 += backward_block) {
    const index_t w = C - b0 < backward_block ? C - b0 : backward_block;
    F out[backward_block];
    F gbuf[N][BB], xbuf[N][BB], ybuf[1][BB];
    const F* gq[N];  // row o of gR' from b0, in compute precision
    const F* xq[N];
    const F* yq;
    if constexpr (convert) {
      load_streams<N>(gRout, C, b0, w, gbuf);
      load_streams<N>(R, C, b0, w, xbuf);
      load_streams<1>(y, C, b0, w, ybuf);
      for (int i = 0; i < N; ++i) gq[i] = gbuf[i], xq[i] = xbuf[i];
      yq = ybuf[0];
    } else {
      for (int i = 0; i < N; ++i) gq[i] = gRout + index_t(i) * C + b0, xq[i] = R + index_t(i) * C + b0;
      yq = y + b0;
    }
    auto column = [&](index_t l, int lane) MHC_ALWAYS_INLINE_LAMBDA {  // element b0 + l
      F g[N], xr[N];
      for (int o = 0; o < N; ++o) g[o] = gq[o][l];
      for (int i = 0; i < N; ++i) xr[i] = xq[i][l];
      const F yc = yq[l];
      F acc = post_w[0] * g[0];
      for (int o = 1; o < N; ++o) acc += post_w[o] * g[o];
      out[l] = acc;
      for (int o = 0; o < N; ++o) gp[o][lane] += yc * g[o];
      for (int i = 0; i < N; ++i)
        for (int o = 0; o < N; ++o) gc[i * N + o][lane] += xr[i] * g[o];
    };
    const index_t full = w / W * W;
    for (index_t c0 = 0; c0 < full; c0 += W)
      for (int l = 0; l < W; ++l) column(c0 + l, l);
    for (index_t l = full; l < w; ++l) column(l, int(l - full));
    Store::row(gy + b0, out, w);
    if (gR)
      for (int i = 0; i < N; ++i) {
        T* gi = gR + index_t(i) * C + b0;
        for (index_t l = 0; l < w; ++l) {
          F a = comb[i * N] * gq[0][l];
          for (int o = 1; o < N; ++o) a += comb[i * N + o] * gq[o][l];
          out[l] = storage_traits<T>::load(gi[l]) + a;
        }
        Store::row(gi, out, w);
      }
  }
  for (int o = 0; o < N; ++o) gpost[o] = combine_lanes(gp[o]);
  for (int k = 0; k < N * N; ++k) gcomb[k] = combine_lanes(gc[k]);
}

// ---------------------------------------------------------------------------------------------
// Gates: from (u, r) to pre, post and comb logits / comb (SPEC.md section 2 steps 3-4, section 5).

/// Mapping-specific coefficient step. `out_comb` receives the comb logits L for the manifold mapping
/// (Sinkhorn follows) and the comb matrix itself for the unconstrained one.
template <class Mapping>
struct gates;

/// mHC gates.
template <>
struct gates<manifold> {
  static constexpr bool needs_sinkhorn = true;  ///< comb output are logits to project

  /// a_j = alpha_g z_j + bias_j; pre = sigmoid + eps_pre; post = post_mult * sigmoid; L = a.
  template <int N, class F>
  static MHC_HOST_DEVICE MHC_INLINE void forward(const F* u, F r, const F* alpha, const F* bias, F eps_pre,
                                                 F post_mult, F* pre, F* post, F* out_comb) {
    for (int j = 0; j < coeff_count<N>; ++j) {
      const F z = r * u[j];
      const F a = alpha[group_of<N>(j)] * z + bias[j];
      if (j < N)
        pre[j] = sigmoid(a) + eps_pre;
      else if (j < 2 * N)
        post[j - N] = post_mult * sigmoid(a);
      else
        out_comb[j - 2 * N] = a;
    }
  }

  /// From the gradients of pre, post and comb logits (gL) to gz (gradient of z), gb (gradient of the
  /// bias, = ga) and the per-token alpha terms ga3[g] = sum_{j in g} ga_j z_j.
  template <int N, class F>
  static MHC_HOST_DEVICE MHC_INLINE void backward(const F* u, F r, const F* alpha, const F* bias, F post_mult,
                                                  const F* gpre, const F* gpost, const F* gL, F* gz, F* gb,
                                                  F* ga3) {
    ga3[0] = ga3[1] = ga3[2] = F(0);
    for (int j = 0; j < coeff_count<N>; ++j) {
      const int g = group_of<N>(j);
      const F z = r * u[j];
      F ga;
      if (g == 2) {
        ga = gL[j - 2 * N];
      } else {
        const F sg = sigmoid(alpha[g] * z + bias[j]);
        const F dsg = sg * (F(1) - sg);
        ga = g == 0 ? gpre[j] * dsg : gpost[j - N] * post_mult * dsg;
      }
      gb[j] = ga;
      gz[j] = ga * alpha[g];
      ga3[g] += ga * z;
    }
  }
};

/// HC gates (tanh-gated, no projection).
template <>
struct gates<unconstrained> {
  static constexpr bool needs_sinkhorn = false;  ///< comb output is the matrix itself

  /// coefficient_j = alpha_g tanh(z_j) + bias_j.
  template <int N, class F>
  static MHC_HOST_DEVICE MHC_INLINE void forward(const F* u, F r, const F* alpha, const F* bias, F /*eps_pre*/,
                                                 F /*post_mult*/, F* pre, F* post, F* out_comb) {
    for (int j = 0; j < coeff_count<N>; ++j) {
      const F z = r * u[j];
      const F c = alpha[group_of<N>(j)] * std::tanh(z) + bias[j];
      if (j < N)
        pre[j] = c;
      else if (j < 2 * N)
        post[j - N] = c;
      else
        out_comb[j - 2 * N] = c;
    }
  }

  /// gz_j = g_j alpha_g (1 - tanh^2 z_j); gb_j = g_j; ga3[g] = sum_{j in g} g_j tanh(z_j).
  template <int N, class F>
  static MHC_HOST_DEVICE MHC_INLINE void backward(const F* u, F r, const F* alpha, const F* /*bias*/,
                                                  F /*post_mult*/, const F* gpre, const F* gpost, const F* gcomb,
                                                  F* gz, F* gb, F* ga3) {
    ga3[0] = ga3[1] = ga3[2] = F(0);
    for (int j = 0; j < coeff_count<N>; ++j) {
      const int g = group_of<N>(j);
      const F th = std::tanh(r * u[j]);
      const F gc = g == 0 ? gpre[j] : (g == 1 ? gpost[j - N] : gcomb[j - 2 * N]);
      gb[j] = gc;
      gz[j] = gc * alpha[g] * (F(1) - th * th);
      ga3[g] += gc * th;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Head gates (SPEC.md section 2, "head").

/// Head weight of stream m: h = sigmoid(alpha_head * (r * u) + bias_head) + eps_pre.
template <class F>
MHC_HOST_DEVICE MHC_INLINE F head_weight(F u, F r, F alpha, F bias, F eps_pre) {
  return sigmoid(alpha * (r * u) + bias) + eps_pre;
}

/// Head gate backward for one token, from gh (gradient of the n head weights): writes gb = ga and
/// gz = ga * alpha_head (ga = gh * sg * (1 - sg)) and returns sum_m ga_m z_m (the alpha_head term).
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE F head_gates_backward(const F* gh, const F* u, F r, F alpha, const F* bias, F* gz, F* gb) {
  F a1 = F(0);
  for (int m = 0; m < N; ++m) {
    const F z = r * u[m];
    const F sg = sigmoid(alpha * z + bias[m]);
    const F ga = gh[m] * sg * (F(1) - sg);
    gb[m] = ga;
    gz[m] = ga * alpha;
    a1 += ga * z;
  }
  return a1;
}

// ---------------------------------------------------------------------------------------------
// Stream mixing (SPEC.md section 2 steps 6 and 8), over a range [c0, c1) of the hidden dimension.

/// Hidden-dimension block of the mixing kernels: every stream's block of R is read before any output
/// of the block is written, which keeps in-place post (Rout == R) exact and lets the c loops vectorise.
inline constexpr index_t mix_block = 256;

/// y[c] = sum_m pre_m R[m][c], accumulated m = 0..N-1 from the first product, rounded once.
template <int N, class T, class F, class Store = plain_store>
MHC_HOST_DEVICE MHC_INLINE void pre_apply(const F* pre, const T* R, index_t C, T* y, index_t c0, index_t c1) {
  using st = storage_traits<T>;
  for (index_t b0 = c0; b0 < c1; b0 += mix_block) {
    const index_t w = c1 - b0 < mix_block ? c1 - b0 : mix_block;
    F acc[mix_block];
    for (index_t l = 0; l < w; ++l) {
      F a = pre[0] * st::load(R[b0 + l]);
      for (int m = 1; m < N; ++m) a += pre[m] * st::load(R[index_t(m) * C + b0 + l]);
      acc[l] = a;
    }
    Store::row(y + b0, acc, w);
  }
}

/// One column c of post: out[o] = post_o y + sum_i comb[i][o] r[i] (r[i] = R[i][c]), the accumulator
/// starting at post_o y and adding i = 0..N-1 in order: the arithmetic of post below, one column at a time.
template <int N, class F>
MHC_HOST_DEVICE MHC_INLINE void post_column(const F* post_w, const F* comb, F y, const F* r, F* out) {
  for (int o = 0; o < N; ++o) {
    F acc = post_w[o] * y;
    for (int i = 0; i < N; ++i) acc += comb[i * N + o] * r[i];
    out[o] = acc;
  }
}

/// R'[o][c] = post_o y[c] + sum_i comb[i][o] R[i][c], the accumulator starting at post_o y[c] and
/// adding i = 0..N-1 in order, rounded once. Rout may equal R.
template <int N, class T, class F, class Store = plain_store>
MHC_HOST_DEVICE MHC_INLINE void post(const F* post_w, const F* comb, const T* y, const T* R, index_t C, T* Rout,
                                     index_t c0, index_t c1) {
  using st = storage_traits<T>;
  for (index_t b0 = c0; b0 < c1; b0 += mix_block) {
    const index_t w = c1 - b0 < mix_block ? c1 - b0 : mix_block;
    F acc[N][mix_block];
    for (index_t l = 0; l < w; ++l) {
      F r[N];
      for (int i = 0; i < N; ++i) r[i] = st::load(R[index_t(i) * C + b0 + l]);
      const F yl = st::load(y[b0 + l]);
      for (int o = 0; o < N; ++o) {
        F a = post_w[o] * yl;
        for (int i = 0; i < N; ++i) a += comb[i * N + o] * r[i];
        acc[o][l] = a;
      }
    }
    for (int o = 0; o < N; ++o) Store::row(Rout + index_t(o) * C + b0, acc[o], w);
  }
}

}  // namespace scalar
}  // namespace mhc
