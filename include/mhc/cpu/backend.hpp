#pragma once
/// \file
/// backend_traits<cpu>: the CPU implementation of every op in mhc/ops/ops.hpp. Arguments arrive
/// validated. Every per-token computation is a call into mhc/ops/scalar.hpp, so the fused and unfused
/// paths share their arithmetic; work is split into pieces that do not depend on the thread count and
/// reductions over tokens run in token order, so results are bit-identical for any thread count.

#include <algorithm>

#include "mhc/core/backend.hpp"
#include "mhc/core/dtype.hpp"
#include "mhc/core/options.hpp"
#include "mhc/cpu/cpu.hpp"
#include "mhc/cpu/mixing.hpp"
#include "mhc/cpu/projection.hpp"
#include "mhc/cpu/sinkhorn.hpp"
#include "mhc/cpu/stream.hpp"
#include "mhc/ops/scalar.hpp"
#include "mhc/ops/validate.hpp"

namespace mhc {

/// The CPU (Eigen types, C++17 loops, thread pool) implementation of the ops.
template <>
struct backend_traits<cpu> {
  /// The ops' buffers live in host memory (the API may read small inputs such as alpha to validate them).
  static constexpr bool host_memory = true;

  /// Tokens per parallel piece so that each piece touches at least ~32K elements.
  static index_t token_grain(index_t per_token) { return std::max<index_t>(1, 32768 / std::max<index_t>(1, per_token)); }

  /// Calls fn(t, c0, c1) over the T x C elements, split in contiguous ranges (also inside a token,
  /// so a single token's hidden dimension is shared by the threads).
  /// With a row writer Store, the loop is compiled only for the writer's instruction set (with_isa).
  template <class Store = void, class Fn>
  static void token_ranges(const cpu& be, index_t T, index_t C, Fn&& fn) {
    be.parallel_for(T * C, 16384, [&](index_t b, index_t e, int) {
      with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
        for (index_t i = b; i < e;) {
          const index_t t = i / C, c0 = i % C, c1 = std::min(C, c0 + (e - i));
          fn(t, c0, c1);
          i += c1 - c0;
        }
        detail::stream_fence();
      });
    });
  }

  /// Runs the always-inline lambda fn() with the kernels of be.isa(). Given the row writer Store that
  /// with_row_writer picked for `be`, the body is compiled only for the writer's instruction set (the
  /// AVX2 writer exactly when be runs the AVX2 kernels), not for both: one body per writer.
  template <class Store = void, class Fn>
  static MHC_INLINE void with_isa(const cpu& be, Fn&& fn) {
    if constexpr (std::is_void_v<Store>) {
      detail::with_isa(be.isa(), fn);
    } else {
      (void)be;
#if MHC_HAVE_AVX2_KERNELS
      if constexpr (Store::avx2) {
        detail::run_avx2(fn);
        return;
      }
#endif
      if constexpr (!Store::avx2) fn();
    }
  }

  /// Calls fn(store) with the row writer for an output of `bytes` bytes: streaming stores when the
  /// output is large and no input aliases it (in place, the lines are in the cache already), ordinary
  /// stores otherwise; the AVX2 writer (16 bf16 values or 8 floats per iteration) where `be` runs the
  /// AVX2 kernels.
  template <class Fn>
  static void with_row_writer(const cpu& be, index_t bytes, bool in_place, Fn&& fn) {
    const bool stream = !in_place && bytes >= detail::streaming_threshold_bytes;
#if MHC_HAVE_AVX2_KERNELS
    if (be.isa() == cpu_isa::avx2) {
      if (stream) return fn(detail::simd_store<true, true>{});
      return fn(detail::simd_store<false, true>{});
    }
#endif
    (void)be;
    if (stream)
      fn(detail::simd_store<true>{});
    else
      fn(detail::simd_store<false>{});
  }

  // ------------------------------------------------------------------------------------- expand

  template <int N, class T>
  static void expand(const cpu& be, shape s, const T* h, T* R) {
    const index_t C = s.hidden;
    token_ranges(be, s.tokens, C, [&](index_t t, index_t c0, index_t c1) MHC_ALWAYS_INLINE_LAMBDA {
      for (int m = 0; m < N; ++m) std::copy(h + t * C + c0, h + t * C + c1, R + (t * N + m) * C + c0);
    });
  }

  /// gh[c] = sum_m gR[m][c] in stream order: pre apply's kernels with unit weights (1 x v is v, so
  /// the sums and their rounding are the same bits).
  template <int N, class T>
  static void expand_backward(const cpu& be, shape s, const T* gR, T* gh) {
    using F = compute_t<T>;
    const index_t C = s.hidden;
    F ones[N];
    for (F& v : ones) v = F(1);
    with_row_writer(be, s.tokens * C * index_t(sizeof(T)), false, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      token_ranges<Store>(be, s.tokens, C, [&](index_t t, index_t c0, index_t c1) MHC_ALWAYS_INLINE_LAMBDA {
        pre_apply_columns<N, Store>(ones, gR + t * N * C, C, gh + t * C, c0, c1);
      });
    });
  }

  // --------------------------------------------------------------------------------- projection

  /// The RMS-scaled projection (scalar::rms_projection's bits) of tokens [b, e) in blocks of
  /// detail::projection_block: writes u[t*M..] and r[t], then calls fn(t0, nt) for each block.
  template <int M, class T, class F, class Fn>
  static MHC_INLINE void projection_groups(const cpu& be, index_t b, index_t e, const T* R, index_t K,
                                           const F* phi, F eps_rms, F* u, F* r, Fn&& fn) {
    constexpr int TB = detail::projection_block;
    for (index_t t0 = b; t0 < e; t0 += TB) {
      const int nt = static_cast<int>(std::min<index_t>(TB, e - t0));
      const T* x[TB];
      F sq[TB];
      for (int a = 0; a < nt; ++a) x[a] = R + (t0 + a) * K;
      detail::project_tokens<M>(be.isa(), x, nt, K, phi, u + t0 * M, sq, t0 + 2 * TB <= e);
      for (int a = 0; a < nt; ++a) r[t0 + a] = scalar::rstd_of(x[a], K, sq[a], eps_rms);
      fn(t0, nt);
    }
  }

  /// Rows of phi per piece of projection_rows_split.
  static constexpr int split_rows = 4;

  /// The projection (u and r) of a few tokens (decode: at most detail::projection_block) with its M
  /// rows split over the threads in pieces of split_rows rows, where that reads less of phi per thread
  /// than splitting the tokens: each row's sum runs in the same order whichever rows are computed with
  /// it (scalar::rms_projection), so the bits are those of projection_groups. Returns false, doing
  /// nothing, where the tokens are to be split (or there is one thread).
  template <int M, class T, class F>
  static bool projection_rows_split(const cpu& be, index_t tokens, const T* R, index_t K, const F* phi, F eps_rms,
                                    F* u, F* r) {
    constexpr int TB = detail::projection_block, RB = split_rows, blocks = (M + RB - 1) / RB;
    const index_t threads = be.threads();
    if (threads < 2 || tokens < 1 || tokens > TB || blocks < 2) return false;
    // Passes over phi (or over the rows of a piece): one per group of projection_tokens tokens and one
    // per token left over. The row split wins when its slowest piece makes fewer passes, in rows:
    // at C = 4096 (fp32, 2 threads) projection T = 1: 26 -> 15 us, T = 4: 53 -> 21 us, T = 5-7:
    // 79 -> 36-67 us; T = 2 and T = 8 keep the token split (27 against 30 us, 30 against 40 us).
    const auto passes = [](index_t n) { return n / detail::projection_tokens + n % detail::projection_tokens; };
    const index_t pieces = std::min(threads, tokens), row_pieces = std::min<index_t>(threads, blocks);
    index_t token_passes = 0;  // of the token split's slowest piece (parallel_for's split)
    for (index_t w = 0; w < pieces; ++w)
      token_passes = std::max(token_passes, passes(tokens * (w + 1) / pieces - tokens * w / pieces));
    if (passes(tokens) * ((blocks + row_pieces - 1) / row_pieces) >= token_passes * blocks) return false;
    const int nt = int(tokens);
    const T* x[TB];
    for (int a = 0; a < nt; ++a) x[a] = R + a * K;
    F sq[TB];
    be.parallel_for(blocks, 1, [&](index_t b0, index_t b1, int) {
      detail::with_isa(be.isa(), [&]() MHC_ALWAYS_INLINE_LAMBDA {
        for (index_t blk = b0; blk < b1; ++blk) {
          const int j0 = int(blk) * RB;
          F ub[TB * RB], sb[TB];
          if (j0 + RB <= M)
            detail::project_tokens<RB>(be.isa(), x, nt, K, phi + index_t(j0) * K, ub, sb, false);
          else if constexpr (M % RB != 0)
            detail::project_tokens<M % RB>(be.isa(), x, nt, K, phi + index_t(j0) * K, ub, sb, false);
          const int rows = std::min(RB, M - j0);
          for (int a = 0; a < nt; ++a)
            for (int j = 0; j < rows; ++j) u[a * M + j0 + j] = ub[a * rows + j];
          if (blk == 0)
            for (int a = 0; a < nt; ++a) sq[a] = sb[a];
        }
      });
    });
    for (int a = 0; a < nt; ++a) r[a] = scalar::rstd_of(x[a], K, sq[a], eps_rms);
    return true;
  }

  template <int N, class T, class F>
  static void projection(const cpu& be, shape s, const T* R, const F* phi, F eps_rms, F* u, F* r) {
    constexpr int M = coeff_count<N>;
    const index_t K = N * s.hidden;
    if (projection_rows_split<M>(be, s.tokens, R, K, phi, eps_rms, u, r)) return;
    be.parallel_for(s.tokens, token_grain(K * M), [&](index_t b, index_t e, int) {
      detail::with_isa(be.isa(), [&]() MHC_ALWAYS_INLINE_LAMBDA {
        projection_groups<M>(be, b, e, R, K, phi, eps_rms, u, r, [](index_t, int) MHC_ALWAYS_INLINE_LAMBDA {});
      });
    });
  }

  /// grad_phi[j][k] = sum_t (gz[t][j] * r[t]) x_t[k], in token order, split over fixed column blocks.
  template <int M, class T, class F>
  static void accumulate_grad_phi(const cpu& be, index_t tokens, index_t K, const T* R, const F* gz, const F* r,
                                  F* gphi) {
    const index_t grain = std::max<index_t>(1, 4096 / std::max<index_t>(1, tokens));
#if MHC_HAVE_AVX2_KERNELS
    if constexpr (std::is_same_v<F, float> && M > 4)
      if (be.isa() == cpu_isa::avx2 && detail::avx512vl_kernels()) {
        constexpr index_t WB = detail::grad_phi_wide_block<M>;
        be.parallel_for((K + WB - 1) / WB, grain, [&](index_t b0, index_t b1, int) {
          for (index_t blk = b0; blk < b1; ++blk) {
            const index_t kn = std::min((blk + 1) * WB, K);
            detail::accumulate_grad_phi_block_avx512<M>(tokens, K, R, gz, r, blk * WB, kn - blk * WB, kn,
                                                        blk + 1 < b1 ? std::min(WB, K - kn) : 0, gphi);
          }
        });
        return;
      }
#endif
    constexpr index_t B = detail::grad_phi_block;
    const index_t blocks = (K + B - 1) / B;
    be.parallel_for(blocks, grain, [&](index_t b0, index_t b1, int) {
#if MHC_HAVE_AVX2_KERNELS
      if constexpr (std::is_same_v<F, float> && M <= 4)
        if (be.isa() == cpu_isa::avx2)
          return detail::accumulate_grad_phi_range_avx2<M>(tokens, K, R, gz, r, b0 * B, std::min(b1 * B, K), gphi);
#endif
      for (index_t blk = b0; blk < b1; ++blk)
        detail::accumulate_grad_phi_block<M>(be.isa(), tokens, K, R, gz, r, blk * B, std::min(B, K - blk * B), gphi);
    });
  }

  template <int N, class T, class F>
  static void projection_backward(const cpu& be, shape s, const T* R, const F* phi, const F* u, const F* r,
                                  const F* gz, T* gR, F* gphi) {
    constexpr int M = coeff_count<N>;
    const index_t K = N * s.hidden;
#if MHC_HAVE_AVX2_KERNELS
    if constexpr (std::is_same_v<F, float> && M > 4)
      if (be.isa() == cpu_isa::avx2 && detail::avx512vl_kernels()) {
        // One pass over R, split over blocks of columns: each block's input gradient and grad_phi.
        const index_t wb = detail::column_block_width(K, detail::grad_phi_wide_block<M>, 128, be.threads());
        const index_t blocks = (K + wb - 1) / wb;
        be.parallel_for(blocks, 1, [&](index_t b0, index_t b1, int) {
          for (index_t blk = b0; blk < b1; ++blk) {
            const index_t k0 = blk * wb;
            detail::projection_backward_block_avx512<M>(s.tokens, K, R, phi, u, r, gz, gR, gphi, k0,
                                                        std::min(wb, K - k0), blk + 1 < b1 ? k0 + wb : -1);
          }
        });
        return;
      }
#endif
    be.parallel_for(s.tokens, token_grain(K * M), [&](index_t b, index_t e, int) {
      detail::with_isa(be.isa(), [&]() MHC_ALWAYS_INLINE_LAMBDA {
        // A slab of tokens at a time: their coefficients, then each panel of phi packed once for
        // all of them, its G-token kernel, and the gradient of those elements written.
        constexpr int G = detail::input_grad_tokens, S = detail::backward_slab;
        constexpr index_t W = detail::panel_width<M, F>(1);
        detail::phi_panel<M, F, W> pn;
        for (index_t t0 = b; t0 < e; t0 += S) {
          const int nt = int(std::min<index_t>(S, e - t0));
          F gu[S * M], gs[S];
          for (int a = 0; a < nt; ++a)
            gs[a] = scalar::projection_backward_coeffs<M>(gz + (t0 + a) * M, u + (t0 + a) * M, r[t0 + a], K, gu + a * M);
          for (index_t k0 = 0; k0 < K; k0 += W) {
            const index_t w = std::min(W, K - k0);
            pn.load(be.isa(), phi, K, k0, w, nt);
            for (int a = 0; a < nt; a += G) {
              const int ng = std::min(G, nt - a);
              F pg[G][W];
              F* pgs[G];
              const T* xs[G];
              for (int q = 0; q < ng; ++q) pgs[q] = pg[q], xs[q] = R + (t0 + a + q) * K + k0;
              // Prefetched as the kernel runs: the rows of R the next call reads, and these tokens'
              // rows of gR, updated after it.
              detail::prefetch_rows<T> pf;
              const bool more = a + G < nt;
              const index_t tn = more ? t0 + a + G : (k0 + W < K ? t0 : t0 + S), kn = more || k0 + W >= K ? k0 : k0 + W;
              for (index_t q = 0; q < G && tn + q < e; ++q) pf.add(R + (tn + q) * K + (tn >= t0 + S ? 0 : kn));
              for (int q = 0; q < ng; ++q) pf.add(gR + (t0 + a + q) * K + k0);
              detail::projection_input_grad_tokens<M>(be.isa(), pn, ng, gu + a * M, xs, gs + a, pgs, pf);
              for (int q = 0; q < ng; ++q) detail::accumulate_row(be.isa(), gR + (t0 + a + q) * K + k0, pg[q], w);
            }
          }
        }
      });
    });
    accumulate_grad_phi<M>(be, s.tokens, K, R, gz, r, gphi);
  }

  // -------------------------------------------------------------------------------------- gates

  template <int N, class Mapping, class F>
  static void gates(const cpu& be, index_t tokens, const F* u, const F* r, const F* alpha, const F* bias,
                    const config& cfg, F* pre, F* post, F* comb) {
    constexpr int M = coeff_count<N>;
    const F eps_pre = static_cast<F>(cfg.eps_pre), post_mult = static_cast<F>(cfg.post_mult);
    be.parallel_for(tokens, 1024, [&](index_t b, index_t e, int) {
      for (index_t t = b; t < e; ++t)
        scalar::gates<Mapping>::template forward<N>(u + t * M, r[t], alpha, bias, eps_pre, post_mult, pre + t * N,
                                                    post + t * N, comb + t * N * N);
    });
  }

  /// The gates backward of nt consecutive tokens (pointers at the first one's values), with the
  /// Sinkhorn replay of the manifold mapping: detail::sinkhorn_backward_tokens, several tokens at
  /// once with the AVX2 kernels. scratch: detail::sinkhorn_tokens_scratch_size elements.
  template <int N, class Mapping, class F>
  static void gates_backward_tokens(cpu_isa isa, index_t nt, const F* u, const F* r, const F* alpha, const F* bias,
                                    const config& cfg, const F* gpre, const F* gpost, const F* gcomb, F* gz, F* gb,
                                    F* ga3, F* scratch) {
    constexpr int M = coeff_count<N>, NN = N * N, V = detail::sinkhorn_lanes;
    const F post_mult = static_cast<F>(cfg.post_mult);
    if constexpr (scalar::gates<Mapping>::needs_sinkhorn) {
      for (index_t t0 = 0; t0 < nt; t0 += V) {
        const int nv = int(std::min<index_t>(V, nt - t0));
        F L[V * NN], gL[V * NN];
        for (int a = 0; a < nv; ++a) {
          const index_t t = t0 + a;
          F pre_tmp[N], post_tmp[N];
          scalar::gates<Mapping>::template forward<N>(u + t * M, r[t], alpha, bias, static_cast<F>(cfg.eps_pre),
                                                      post_mult, pre_tmp, post_tmp, L + a * NN);
        }
        detail::sinkhorn_backward_tokens<N>(isa, nv, L, gcomb + t0 * NN, gL, cfg.sinkhorn_iters,
                                            static_cast<F>(cfg.eps_sinkhorn), scratch);
        for (int a = 0; a < nv; ++a) {
          const index_t t = t0 + a;
          scalar::gates<Mapping>::template backward<N>(u + t * M, r[t], alpha, bias, post_mult, gpre + t * N,
                                                       gpost + t * N, gL + a * NN, gz + t * M, gb + t * M, ga3 + t * 3);
        }
      }
    } else {
      (void)isa, (void)scratch;
      for (index_t t = 0; t < nt; ++t)
        scalar::gates<Mapping>::template backward<N>(u + t * M, r[t], alpha, bias, post_mult, gpre + t * N,
                                                     gpost + t * N, gcomb + t * NN, gz + t * M, gb + t * M, ga3 + t * 3);
    }
  }

  /// galpha[g] = sum_t ga3[t][g], gbias[j] = sum_t gb[t][j], in token order.
  template <int M, class F>
  static void reduce_alpha_bias(index_t tokens, const F* gb, const F* ga3, int groups, F* galpha, F* gbias) {
    for (int g = 0; g < groups; ++g) galpha[g] = F(0);
    for (int j = 0; j < M; ++j) gbias[j] = F(0);
    for (index_t t = 0; t < tokens; ++t) {
      for (int g = 0; g < groups; ++g) galpha[g] += ga3[t * groups + g];
      for (int j = 0; j < M; ++j) gbias[j] += gb[t * M + j];
    }
  }

  template <int N, class F>
  static index_t sinkhorn_backward_workspace_size(const cpu& be, index_t /*tokens*/, int iters) {
    return index_t(be.threads()) * detail::sinkhorn_tokens_scratch_size(N, iters);
  }

  template <int N, class F>
  static index_t gates_backward_workspace_size(const cpu& be, index_t tokens, int iters) {
    return tokens * (coeff_count<N> + 3) + sinkhorn_backward_workspace_size<N, F>(be, tokens, iters);
  }

  template <int N, class Mapping, class F>
  static void gates_backward(const cpu& be, index_t tokens, const F* u, const F* r, const F* alpha, const F* bias,
                             const config& cfg, const F* gpre, const F* gpost, const F* gcomb, F* gz, F* galpha,
                             F* gbias, F* ws) {
    constexpr int M = coeff_count<N>;
    F* gb = ws;
    F* ga3 = gb + tokens * M;
    F* scratch = ga3 + tokens * 3;
    const index_t per_worker = detail::sinkhorn_tokens_scratch_size(N, cfg.sinkhorn_iters);
    be.parallel_for(tokens, 64, [&](index_t b, index_t e, int w) {
      gates_backward_tokens<N, Mapping>(be.isa(), e - b, u + b * M, r + b, alpha, bias, cfg, gpre + b * N,
                                        gpost + b * N, gcomb + b * N * N, gz + b * M, gb + b * M, ga3 + b * 3,
                                        scratch + w * per_worker);
    });
    reduce_alpha_bias<M>(tokens, gb, ga3, 3, galpha, gbias);
  }

  // ----------------------------------------------------------------------------------- sinkhorn

  template <int N, class F>
  static void sinkhorn(const cpu& be, index_t tokens, const F* L, F* P, int iters, F eps) {
    be.parallel_for(tokens, 512, [&](index_t b, index_t e, int) {
      detail::sinkhorn_tokens<N>(be.isa(), e - b, L + b * N * N, P + b * N * N, iters, eps);
    });
  }

  template <int N, class F>
  static void sinkhorn_backward(const cpu& be, index_t tokens, const F* L, const F* gP, int iters, F eps, F* gL,
                                F* ws) {
    const index_t per_worker = detail::sinkhorn_tokens_scratch_size(N, iters);
    be.parallel_for(tokens, 64, [&](index_t b, index_t e, int w) {
      detail::sinkhorn_backward_tokens<N>(be.isa(), e - b, L + b * N * N, gP + b * N * N, gL + b * N * N, iters, eps,
                                          ws + w * per_worker);
    });
  }

  // ---------------------------------------------------------------------------------- pre apply

  /// Whether the row writer Store runs the AVX2 mixing kernels (mhc/cpu/mixing.hpp) for storage T.
  template <class Store, class T, class F>
  static constexpr bool avx2_mixing() {
#if MHC_HAVE_AVX2_KERNELS
    return Store::avx2 && std::is_same_v<F, float> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>);
#else
    return false;
#endif
  }

  /// scalar::pre_apply over columns [c0, c1) of one token, with the AVX2 kernel where Store runs it
  /// (for bf16, its AVX-512 BF16 variant where the processor has one).
  template <int N, class Store, class T, class F>
  static MHC_INLINE void pre_apply_columns(const F* pre, const T* R, index_t C, T* y, index_t c0, index_t c1) {
#if MHC_HAVE_AVX2_KERNELS
    if constexpr (avx2_mixing<Store, T, F>() && std::is_same_v<T, bf16>)
      if (detail::avx512bf16_kernels())
        return detail::pre_apply_bf16_avx512<N, Store::non_temporal>(pre, R, C, y, c0, c1);
    if constexpr (avx2_mixing<Store, T, F>())
      return detail::pre_apply_avx2<N, Store::non_temporal>(pre, R, C, y, c0, c1);
#endif
    scalar::pre_apply<N, T, F, Store>(pre, R, C, y, c0, c1);
  }

  template <int N, class T, class F>
  static void pre_apply(const cpu& be, shape s, const F* pre, const T* R, T* y) {
    const index_t C = s.hidden;
    with_row_writer(be, s.tokens * C * index_t(sizeof(T)), false, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      token_ranges<Store>(be, s.tokens, C, [&](index_t t, index_t c0, index_t c1) MHC_ALWAYS_INLINE_LAMBDA {
        pre_apply_columns<N, Store>(pre + t * N, R + t * N * C, C, y + t * C, c0, c1);
      });
    });
  }

  template <int N, class T, class F>
  static void pre_apply_backward(const cpu& be, shape s, const F* pre, const T* R, const T* gy, T* gR, F* gpre) {
    using st = storage_traits<T>;
    const index_t C = s.hidden;
    // gR is read and written (+=): ordinary stores, the row writer rounds to T.
    with_row_writer(be, 0, true, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      be.parallel_for(s.tokens, token_grain(N * C), [&](index_t b, index_t e, int) {
#if MHC_HAVE_AVX2_KERNELS
        if constexpr (avx2_mixing<Store, T, F>()) {
          for (index_t t = b; t < e; ++t)
            detail::pre_apply_backward_avx2<N, Store>(pre + t * N, R + t * N * C, gy + t * C, C, gR + t * N * C,
                                                      gpre + t * N);
          return;
        }
#endif
        with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
          // One pass per token: each block's grad_pre lanes, then the block's gR, so all the
          // token's streams are read together.
          for (index_t t = b; t < e; ++t) {
            const T* x = R + t * N * C;
            const T* g = gy + t * C;
            T* out = gR + t * N * C;
            constexpr index_t B = scalar::backward_block;
            F acc[N][scalar::projection_lanes], buf[B];
            scalar::grad_pre_begin<N>(acc);
            for (index_t c0 = 0; c0 < C; c0 += B) {
              const index_t w = std::min(B, C - c0);
              scalar::grad_pre_block<N>(x, g, C, c0, w, acc);
              for (int m = 0; m < N; ++m) {
                T* o = out + index_t(m) * C + c0;
                for (index_t l = 0; l < w; ++l) buf[l] = st::load(o[l]) + pre[t * N + m] * st::load(g[c0 + l]);
                Store::row(o, buf, w);
              }
            }
            scalar::grad_pre_end<N>(acc, gpre + t * N);
          }
        });
      });
    });
  }

  // ---------------------------------------------------------------------------------- fused pre

  template <int N, class Mapping, class T, class F>
  static void pre(const cpu& be, shape s, const T* R, const F* phi, const F* alpha, const F* bias, const config& cfg,
                  T* y, F* pre_w, F* post_w, F* comb, F* u, F* r) {
    constexpr int M = coeff_count<N>;
    const index_t C = s.hidden, K = N * C;
    const F eps_rms = static_cast<F>(cfg.eps_rms), eps_pre = static_cast<F>(cfg.eps_pre);
    const F post_mult = static_cast<F>(cfg.post_mult), eps_sk = static_cast<F>(cfg.eps_sinkhorn);
    with_row_writer(be, s.tokens * C * index_t(sizeof(T)), false, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      // After the projection of tokens [t0, t0 + nt): their gates and pre apply.
      const auto rest = [&](index_t t0, int nt) MHC_ALWAYS_INLINE_LAMBDA {
        for (index_t t = t0; t < t0 + nt; ++t)
          scalar::gates<Mapping>::template forward<N>(u + t * M, r[t], alpha, bias, eps_pre, post_mult,
                                                      pre_w + t * N, post_w + t * N, comb + t * N * N);
        if constexpr (scalar::gates<Mapping>::needs_sinkhorn)
          detail::sinkhorn_tokens<N>(be.isa(), nt, comb + t0 * N * N, comb + t0 * N * N, cfg.sinkhorn_iters, eps_sk);
        for (index_t t = t0; t < t0 + nt; ++t)
          pre_apply_columns<N, Store>(pre_w + t * N, R + t * K, C, y + t * C, 0, C);
      };
      if (projection_rows_split<M>(be, s.tokens, R, K, phi, eps_rms, u, r)) {
        with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
          rest(0, int(s.tokens));
          detail::stream_fence();
        });
        return;
      }
      be.parallel_for(s.tokens, token_grain(K * M), [&](index_t b, index_t e, int) {
        with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
          projection_groups<M>(be, b, e, R, K, phi, eps_rms, u, r, rest);
          detail::stream_fence();
        });
      });
    });
  }

  template <int N, class F>
  static index_t pre_backward_workspace_size(const cpu& be, index_t tokens, int iters) {
    return tokens * coeff_count<N> + gates_backward_workspace_size<N, F>(be, tokens, iters);
  }

  template <int N, class Mapping, class T, class F>
  static void pre_backward(const cpu& be, shape s, const T* R, const F* phi, const F* alpha, const F* bias,
                           const config& cfg, const F* pre_w, const F* comb, const F* u, const F* r, const F* gpost,
                           const F* gcomb, const T* gRout, const T* gy_in, T* gR, F* gphi, F* galpha, F* gbias,
                           F* ws) {
    using st = storage_traits<T>;
    constexpr int M = coeff_count<N>;
    const index_t C = s.hidden, K = N * C, tokens = s.tokens;
    F* gz = ws;
    F* gb = gz + tokens * M;
    F* ga3 = gb + tokens * M;
    F* scratch = ga3 + tokens * 3;
    const index_t per_worker = detail::sinkhorn_tokens_scratch_size(N, cfg.sinkhorn_iters);
#if MHC_HAVE_AVX2_KERNELS
    const bool wide = be.isa() == cpu_isa::avx2 && detail::avx512vl_kernels();
#endif
    // The gates backward of the nt <= backward_slab tokens from t0 on worker w: grad_pre from the
    // rows of R, then gz, gb and ga3.
    const auto gates_slab = [&](index_t t0, int nt, int w) MHC_ALWAYS_INLINE_LAMBDA {
      F gpre[detail::backward_slab * N];
      for (int a = 0; a < nt; ++a)
        detail::grad_pre<N>(be.isa(), R + (t0 + a) * K, gy_in + (t0 + a) * C, C, gpre + a * N);
      gates_backward_tokens<N, Mapping>(be.isa(), nt, u + t0 * M, r + t0, alpha, bias, cfg, gpre, gpost + t0 * N,
                                        gcomb + t0 * N * N, gz + t0 * M, gb + t0 * M, ga3 + t0 * 3,
                                        scratch + w * per_worker);
    };
    bool gphi_done = false;  // grad_phi written by the column blocks of the wide path
    // gR is written once, not read (unless in place): streaming stores when it is large.
    with_row_writer(be, tokens * K * index_t(sizeof(T)), gR == gRout, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
    using Store = decltype(store);
#if MHC_HAVE_AVX2_KERNELS
    if constexpr (detail::avx2_row_types<T, F> && detail::pre_backward_columns<N, M>)
      if (wide && tokens < detail::column_split_tokens * be.threads()) {
        // Few tokens per thread (decode, short sequences): two passes, over the tokens their gates
        // backward (gz), then over blocks of columns the input gradient, the mixing and grad_phi of
        // each block, all threads busy however few the tokens. (At T = 1, C = 4096, 2 threads:
        // 116 -> 56 us; more tokens than column_split_tokens per thread ran slower than the token
        // split below, which reads each slab's rows of R while they are cached.)
        constexpr int S = detail::backward_slab;
        be.parallel_for(tokens, token_grain(K * M), [&](index_t b, index_t e, int w) {
          for (index_t t0 = b; t0 < e; t0 += S) gates_slab(t0, int(std::min<index_t>(S, e - t0)), w);
        });
        constexpr index_t W = detail::pre_backward_block<N, M>;
        const index_t wc = detail::column_block_width(C, W, 64, be.threads()), blocks = (C + wc - 1) / wc;
        be.parallel_for(blocks, 1, [&](index_t b0, index_t b1, int) {
          for (index_t blk = b0; blk < b1; ++blk) {
            const index_t c0 = blk * wc;
            detail::pre_backward_block_avx512<N, M, W, Store>(tokens, C, R, phi, comb, pre_w, u, r, gz, gRout, gy_in,
                                                              gR, gphi, c0, std::min(wc, C - c0),
                                                              blk + 1 < b1 ? c0 + wc : -1);
          }
          detail::stream_fence();
        });
        gphi_done = true;
        return;
      }
#endif
    be.parallel_for(tokens, token_grain(K * M), [&](index_t b, index_t e, int w) {
      with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
        // A slab of tokens at a time (see projection_backward): first their gates backward and
        // projection coefficients, then block by block of c the N panels of phi, packed once for the
        // slab, and G tokens at a time the whole gradient of the block.
        constexpr int G = detail::input_grad_tokens, S = detail::backward_slab;
        constexpr index_t W = detail::panel_width<M, F>(N);
        detail::phi_panel<M, F, W> pn[N];
        for (index_t t0 = b; t0 < e; t0 += S) {
          const int nt = int(std::min<index_t>(S, e - t0));
          F gu[S * M], gs[S];
          gates_slab(t0, nt, w);
          for (int a = 0; a < nt; ++a) {
            const index_t t = t0 + a;
            gs[a] = scalar::projection_backward_coeffs<M>(gz + t * M, u + t * M, r[t], K, gu + a * M);
          }
          for (index_t c0 = 0; c0 < C; c0 += W) {
            const index_t width = std::min(W, C - c0);
            for (int i = 0; i < N; ++i) pn[i].load(be.isa(), phi, K, index_t(i) * C + c0, width, nt);
            // The columns of phi the next block packs (the next slab's first block after the last), to
            // L2 over this block's kernel calls: read from L3, the packing stalled on them (fp32 at
            // T = C = 4096, medians of 6 alternating runs: 40.0 -> 39.1 ms).
            // (Up to 1024 rows, n <= 9: the row lists live on the stack.)
            constexpr int PR = M * N <= 1024 ? M * N : 1;
            detail::spread_prefetch<PR, 2> ppf;
            if constexpr (M * N <= 1024) {
              const index_t cn = c0 + W < C ? c0 + W : 0, wn = std::min(W, C - cn);
              const F* rows[PR];
              for (int i = 0; i < N; ++i)
                for (int j = 0; j < M; ++j) rows[i * M + j] = phi + index_t(j) * K + index_t(i) * C + cn;
              ppf.set(rows, PR, wn * index_t(sizeof(F)), (nt + G - 1) / G * N);
            }
            for (int a = 0; a < nt; a += G) {
              const int ng = std::min(G, nt - a);
              alignas(64) F pg[G][N][W];  // projection term of each token and stream over this block of c
              for (int i = 0; i < N; ++i) {
                ppf.step();
                F* pgs[G];
                const T* xs[G];
                for (int q = 0; q < ng; ++q) pgs[q] = pg[q][i], xs[q] = R + (t0 + a + q) * K + index_t(i) * C + c0;
                // Prefetched as the kernel runs: the rows of R the next call reads (the next stream,
                // else the next group's first), and what the mixing below reads of these tokens.
                detail::prefetch_rows<T> pf;
                index_t tn = t0 + a, kn = index_t(i + 1) * C + c0;  // the next stream
                if (i + 1 == N) {
                  if (a + G < nt) tn = t0 + a + G, kn = c0;  // the next group
                  else if (c0 + W < C) tn = t0, kn = c0 + W;  // the next block
                  else tn = t0 + S, kn = 0;                   // the next slab
                }
                for (index_t q = 0; q < G && tn + q < e; ++q) pf.add(R + (tn + q) * K + kn);
                for (int q = 0; q < ng; ++q) pf.add(gRout + (t0 + a + q) * K + index_t(i) * C + c0);
                if (i == 0)
                  for (int q = 0; q < ng; ++q) pf.add(gy_in + (t0 + a + q) * C + c0);
                detail::projection_input_grad_tokens<M>(be.isa(), pn[i], ng, gu + a * M, xs, gs + a, pgs, pf);
              }
              for (int q = 0; q < ng; ++q) {
                const index_t t = t0 + a + q;
                const F* cb = comb + t * N * N;
                const F* pw = pre_w + t * N;
                const T* go = gRout + t * K;
                const T* gy = gy_in + t * C;
                // The block is computed into ob before any of it is written: in place (gR == gR')
                // stays exact, and with no store to caller memory inside the loop it vectorises.
                alignas(64) F ob[N][W];
                bool mixed = false;  // ob computed by the 512-bit kernel
#if MHC_HAVE_AVX2_KERNELS
                if constexpr (detail::avx2_row_types<T, F>)
                  if (wide) {
                    detail::pre_backward_mix_avx512<N, W>(cb, pw, go + c0, gy + c0, C, width, pg[q], ob);
                    mixed = true;
                  }
#endif
                if (!mixed)
                  for (index_t l = 0; l < width; ++l) {
                    const index_t c = c0 + l;
                    F g[N];
                    for (int o = 0; o < N; ++o) g[o] = st::load(go[index_t(o) * C + c]);
                    const F gyc = st::load(gy[c]);
                    for (int i = 0; i < N; ++i) {
                      F acc = cb[i * N] * g[0];
                      for (int o = 1; o < N; ++o) acc += cb[i * N + o] * g[o];
                      acc += pw[i] * gyc;
                      acc += pg[q][i][l];
                      ob[i][l] = acc;
                    }
                  }
                T* out = gR + t * K;
                for (int i = 0; i < N; ++i) Store::row(out + index_t(i) * C + c0, ob[i], width);
              }
            }
          }
        }
        detail::stream_fence();
      });
    });
    });
    reduce_alpha_bias<M>(tokens, gb, ga3, 3, galpha, gbias);
    if (!gphi_done) accumulate_grad_phi<M>(be, tokens, K, R, gz, r, gphi);
  }

  // --------------------------------------------------------------------------------------- post

  template <int N, class T, class F>
  static void post(const cpu& be, shape s, const F* post_w, const F* comb, const T* y, const T* R, T* Rout) {
    const index_t C = s.hidden;
#if MHC_HAVE_AVX2_KERNELS
    const bool avx512_bf16 = detail::avx512bf16_kernels();
#endif
    with_row_writer(be, s.tokens * N * C * index_t(sizeof(T)), Rout == R, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      token_ranges<Store>(be, s.tokens, C, [&](index_t t, index_t c0, index_t c1) MHC_ALWAYS_INLINE_LAMBDA {
#if MHC_HAVE_AVX2_KERNELS
        if constexpr (avx2_mixing<Store, T, F>() && std::is_same_v<T, bf16>)
          if (avx512_bf16)
            return detail::post_bf16_avx512<N, Store::non_temporal>(post_w + t * N, comb + t * N * N, y + t * C,
                                                                    R + t * N * C, C, Rout + t * N * C, c0, c1);
        if constexpr (avx2_mixing<Store, T, F>())
          return detail::post_avx2<N, Store::non_temporal>(post_w + t * N, comb + t * N * N, y + t * C, R + t * N * C,
                                                           C, Rout + t * N * C, c0, c1);
#endif
        scalar::post<N, T, F, Store>(post_w + t * N, comb + t * N * N, y + t * C, R + t * N * C, C, Rout + t * N * C,
                                     c0, c1);
      });
    });
  }

  /// The decode seam: post, then the fused pre on its output (two passes on the CPU; the GPU fuses them).
  template <int N, class Mapping, class T, class F>
  static void post_pre(const cpu& be, shape s, const F* post_w, const F* comb, const T* y, const T* R, T* Rout,
                       const F* phi, const F* alpha, const F* bias, const config& cfg, T* y_next, F* pre_w,
                       F* post_next, F* comb_next, F* u, F* r) {
    post<N>(be, s, post_w, comb, y, R, Rout);
    pre<N, Mapping>(be, s, static_cast<const T*>(Rout), phi, alpha, bias, cfg, y_next, pre_w, post_next, comb_next, u,
                    r);
  }

  template <int N, class T, class F>
  static void post_backward(const cpu& be, shape s, const F* post_w, const F* comb, const T* y, const T* R,
                            const T* gRout, T* gR, T* gy, F* gpost, F* gcomb) {
    const index_t C = s.hidden;
    // gR is read and written (+=), gy is small next to the streams: ordinary stores.
#if MHC_HAVE_AVX2_KERNELS
    const bool wide = detail::avx512vl_kernels();
#endif
    with_row_writer(be, 0, true, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      be.parallel_for(s.tokens, token_grain(N * C), [&](index_t b, index_t e, int) {
#if MHC_HAVE_AVX2_KERNELS
        if constexpr (avx2_mixing<Store, T, F>()) {
          for (index_t t = b; t < e; ++t) {
            auto kernel = wide ? detail::post_backward_avx512vl<N, Store, T> : detail::post_backward_avx2<N, Store, T>;
            kernel(post_w + t * N, comb + t * N * N, y + t * C, R + t * N * C, gRout + t * N * C, C,
                   gR ? gR + t * N * C : nullptr, gy + t * C, gpost + t * N, gcomb + t * N * N);
          }
          return;
        }
#endif
        with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
          for (index_t t = b; t < e; ++t)
            scalar::post_backward<N, T, F, Store>(post_w + t * N, comb + t * N * N, y + t * C, R + t * N * C,
                                                  gRout + t * N * C, C, gR ? gR + t * N * C : nullptr, gy + t * C,
                                                  gpost + t * N, gcomb + t * N * N);
        });
      });
    });
  }

  // --------------------------------------------------------------------------------------- head

  template <int N, class T, class F>
  static void head(const cpu& be, shape s, const T* R, const F* phi, F alpha, const F* bias, F eps_rms, F eps_pre,
                   T* out, F* h, F* u, F* r) {
    const index_t C = s.hidden, K = N * C;
    // As the fused pre: each block of tokens is projected, then mixed while its streams are still in
    // the cache, written with the row writer (streaming stores for a large output).
    with_row_writer(be, s.tokens * C * index_t(sizeof(T)), false, [&](auto store) MHC_ALWAYS_INLINE_LAMBDA {
      using Store = decltype(store);
      be.parallel_for(s.tokens, token_grain(K * N), [&](index_t b, index_t e, int) {
        with_isa<Store>(be, [&]() MHC_ALWAYS_INLINE_LAMBDA {
          projection_groups<N>(be, b, e, R, K, phi, eps_rms, u, r, [&](index_t t0, int nt) MHC_ALWAYS_INLINE_LAMBDA {
            for (index_t t = t0; t < t0 + nt; ++t) {
              for (int m = 0; m < N; ++m)
                h[t * N + m] = scalar::head_weight(u[t * N + m], r[t], alpha, bias[m], eps_pre);
              pre_apply_columns<N, Store>(h + t * N, R + t * K, C, out + t * C, 0, C);
            }
          });
          detail::stream_fence();
        });
      });
    });
  }

  template <int N, class F>
  static index_t head_backward_workspace_size(const cpu&, index_t tokens) {
    return tokens * (2 * N + 1);
  }

  template <int N, class T, class F>
  static void head_backward(const cpu& be, shape s, const T* R, const F* phi, F alpha, const F* bias, const F* h,
                            const F* u, const F* r, const T* gout, T* gR, F* gphi, F* galpha, F* gbias, F* ws) {
    const index_t C = s.hidden, K = N * C, tokens = s.tokens;
    F* gz = ws;
    F* gb = gz + tokens * N;
    F* ga1 = gb + tokens * N;
#if MHC_HAVE_AVX2_KERNELS
    const bool wide = be.isa() == cpu_isa::avx2 && detail::avx512vl_kernels();
#endif
    be.parallel_for(tokens, token_grain(K * N), [&](index_t b, index_t e, int) {
      detail::with_isa(be.isa(), [&]() MHC_ALWAYS_INLINE_LAMBDA {
      for (index_t t = b; t < e; ++t) {
        const T* x = R + t * K;
        const T* go = gout + t * C;
        F gh[N];
        detail::grad_pre<N>(be.isa(), x, go, C, gh);
        ga1[t] = scalar::head_gates_backward<N>(gh, u + t * N, r[t], alpha, bias, gz + t * N, gb + t * N);
        F gu[N];
        const F gs = scalar::projection_backward_coeffs<N>(gz + t * N, u + t * N, r[t], K, gu);
        T* out = gR + t * K;
        constexpr index_t W = 512;
        F pg[W];
        for (int m = 0; m < N; ++m)
          for (index_t c0 = 0; c0 < C; c0 += W) {
            const index_t w = std::min(W, C - c0), k0 = index_t(m) * C + c0;
            // gR two blocks ahead (the rows follow one another in memory, into the next token's; not
            // past this range's last row): its loads below stalled on memory without it (fp32 33 ->
            // 24 ms at T = C = 4096). The 512-bit bf16 kernel takes them a line per step, spread over
            // the block (bf16 14.4 -> 14.0 ms, median of 5 alternating runs), the others at once here.
            const bool ahead = k0 + 3 * W <= (e - t) * K;
            bool spread = false;
#if MHC_HAVE_AVX2_KERNELS
            spread = std::is_same_v<T, bf16> && wide;
#endif
            if (ahead && !spread)
              for (index_t l = 0; l < W; l += 64 / index_t(sizeof(T)))
                __builtin_prefetch(out + k0 + 2 * W + l, 1, 3);
            index_t done = 0;  // columns the 512-bit kernel did (whole groups of 32)
#if MHC_HAVE_AVX2_KERNELS
            // bf16 only: 10% faster there (20.7 -> 18.6 ms at T = C = 4096); fp32 is bound by memory,
            // not by the conversions and passes this saves, and was no faster.
            if constexpr (std::is_same_v<T, bf16> && std::is_same_v<F, float>)
              if (wide) {
                done = detail::head_update_block_avx512<N>(gu, phi, K, k0, w, x + k0, gs, out + k0, go + c0,
                                                           h[t * N + m], ahead && spread ? out + k0 + 2 * W : nullptr);
              }
#endif
            if (done < w) {
              detail::projection_input_grad<N>(be.isa(), gu, phi, K, k0 + done, w - done, x + k0 + done, gs, pg);
              detail::head_update_row(be.isa(), out + k0 + done, go + c0 + done, h[t * N + m], pg, w - done);
            }
          }
      }
      });
    });
    reduce_alpha_bias<N>(tokens, gb, ga1, 1, galpha, gbias);
    accumulate_grad_phi<N>(be, tokens, K, R, gz, r, gphi);
  }
};

}  // namespace mhc
