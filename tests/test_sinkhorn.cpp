// Sinkhorn-Knopp projection (SPEC.md section 3): the properties every implementation must keep,
// checked on mhc::ops::sinkhorn<N, F> with F the compute type of each storage type of
// mhc_test::cpu_types (fp32 for float and bf16 storage, fp64 for double).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common.hpp"
#include "finite_diff.hpp"

namespace {

using mhc::index_t;
using mhc_test::buffer;
using mhc_test::for_each_n;
using mhc_test::normal;

template <class P>
class Sinkhorn : public ::testing::Test {};
TYPED_TEST_SUITE(Sinkhorn, mhc_test::test_types, mhc_test::param_names);

/// sinkhorn on `tokens` matrices through backend buffers (out of place).
template <class B, int N, class F>
std::vector<F> project(const B& be, index_t tokens, const std::vector<F>& L, int iters, double eps) {
  buffer<B, F> Lb(L.size()), P(L.size(), F(-7));
  Lb.host() = L;
  Lb.to_device();
  P.to_device();
  mhc::ops::sinkhorn<N, F>(be, tokens, Lb.cview(), P.view(), iters, eps);
  P.to_host();
  return P.host();
}

template <class B, int N, class F>
std::vector<F> project_backward(const B& be, index_t tokens, const std::vector<F>& L, const std::vector<F>& gP,
                                int iters, double eps, bool in_place = false) {
  buffer<B, F> Lb(L.size()), g(gP.size()), gL(L.size(), F(-7));
  Lb.host() = L;
  g.host() = gP;
  buffer<B, F> ws(std::size_t(mhc::ops::sinkhorn_backward_workspace_size<N, F>(be, tokens, iters)));
  Lb.to_device();
  g.to_device();
  gL.to_device();
  mhc::ops::sinkhorn_backward<N, F>(be, tokens, Lb.cview(), g.cview(), iters, eps, in_place ? g.view() : gL.view(),
                                    ws.view());
  auto& out = in_place ? g : gL;
  out.to_host();
  return out.host();
}

template <class F>
std::vector<F> random_logits(std::size_t count, double scale, std::uint64_t seed) {
  return mhc_test::to<F>(normal(count, scale, seed));
}

/// Row sums (axis 0) or column sums (axis 1) of matrix t, accumulated in double.
template <int N, class F>
std::vector<double> sums(const std::vector<F>& P, index_t t, bool rows) {
  std::vector<double> s(N, 0.0);
  for (int i = 0; i < N; ++i)
    for (int o = 0; o < N; ++o) s[rows ? i : o] += double(P[t * N * N + i * N + o]);
  return s;
}

/// max over tokens and lines of |sum - 1|.
template <int N, class F>
double max_sum_error(const std::vector<F>& P, index_t tokens, bool rows) {
  double e = 0;
  for (index_t t = 0; t < tokens; ++t)
    for (double s : sums<N>(P, t, rows)) e = std::max(e, std::abs(s - 1.0));
  return e;
}

template <class F>
constexpr double ulp() {
  return double(std::numeric_limits<F>::epsilon());
}

std::string at(int n, int iters, double eps) {
  return "n=" + std::to_string(n) + " iters=" + std::to_string(iters) + " eps=" + std::to_string(eps);
}

// ------------------------------------------------------------------------------------------ tests

// Entries > 0 (and finite), column sums = 1 to rounding (the last step normalises the columns; with
// eps > 0 the column sum is S / (S + eps), so 1 - O(eps)), row sums within 1e-3 at t = 20 for N(0,1)
// logits.
TYPED_TEST(Sinkhorn, PositiveColumnSumsExactRowSumsClose) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 32;
    const auto L = random_logits<F>(tokens * N * N, 1.0, 10 + N);
    for (int iters : {1, 3, 20})
      for (double eps : {0.0, 1e-6}) {
        const auto P = project<B, N, F>(be, tokens, L, iters, eps);
        for (std::size_t k = 0; k < P.size(); ++k) {
          ASSERT_TRUE(std::isfinite(double(P[k]))) << at(N, iters, eps) << " k=" << k;
          ASSERT_GT(P[k], F(0)) << at(N, iters, eps) << " k=" << k;
        }
        // S >= ~1/n after a row step; at t = 1, S is a column sum of the softmax (+ n eps), as small
        // as a few 1e-2 for these logits.
        const double col_tol = 2 * N * ulp<F>() + (iters == 1 ? 100 : 4) * eps;
        EXPECT_LE(max_sum_error<N>(P, tokens, false), col_tol) << at(N, iters, eps);
        if (iters == 20) {
          EXPECT_LE(max_sum_error<N>(P, tokens, true), 1e-3) << at(N, iters, eps);
        }
      }
  });
}

// Adding a constant to any row of L leaves the output unchanged (to rounding).
TYPED_TEST(Sinkhorn, RowShiftInvariance) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 16;
    const auto L = random_logits<F>(tokens * N * N, 1.0, 20 + N);
    const auto shift = normal(tokens * N, 4.0, 30 + N);
    auto Ls = L;
    for (index_t t = 0; t < tokens; ++t)
      for (int i = 0; i < N; ++i)
        for (int o = 0; o < N; ++o) Ls[t * N * N + i * N + o] += static_cast<F>(shift[t * N + i]);
    for (int iters : {1, 20})
      for (double eps : {0.0, 1e-6}) {
        const auto P = mhc_test::to_double(project<B, N, F>(be, tokens, L, iters, eps));
        const auto Ps = mhc_test::to_double(project<B, N, F>(be, tokens, Ls, iters, eps));
        // the shifted logits themselves carry a rounding of ~ulp * |L + c|, which moves P relatively
        EXPECT_TRUE(mhc_test::all_close(Ps, P, 0, 64 * ulp<F>())) << at(N, iters, eps);
      }
  });
}

// Consequence of the shift invariance: the gradient of the logits has zero row sums.
TYPED_TEST(Sinkhorn, GradientHasZeroRowSums) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 16;
    const auto L = random_logits<F>(tokens * N * N, 1.0, 40 + N);
    const auto gP = random_logits<F>(tokens * N * N, 1.0, 50 + N);
    for (int iters : {1, 3, 20})
      for (double eps : {0.0, 1e-6}) {
        const auto gL = project_backward<B, N, F>(be, tokens, L, gP, iters, eps);
        double scale = 0;
        for (F v : gL) scale = std::max(scale, std::abs(double(v)));
        ASSERT_TRUE(std::isfinite(scale)) << at(N, iters, eps);
        if (N > 1) {
          EXPECT_GT(scale, 1e-3) << at(N, iters, eps);  // not trivially zero
        }
        for (index_t t = 0; t < tokens; ++t) {
          const auto rs = sums<N>(gL, t, true);
          for (int i = 0; i < N; ++i)
            EXPECT_LE(std::abs(rs[i]), 8 * N * ulp<F>() * std::max(scale, 1.0)) << at(N, iters, eps) << " t=" << t;
        }
        // in place (grad_logits == grad_comb) equals out of place, bit for bit
        EXPECT_TRUE(mhc_test::bit_equal(project_backward<B, N, F>(be, tokens, L, gP, iters, eps, true), gL))
            << at(N, iters, eps);
      }
  });
}

// Products of doubly stochastic matrices are doubly stochastic (within the truncation tolerance).
TYPED_TEST(Sinkhorn, ProductIsDoublyStochastic) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 16;
    const auto A = project<B, N, F>(be, tokens, random_logits<F>(tokens * N * N, 1.0, 60 + N), 20, 1e-6);
    const auto Bm = project<B, N, F>(be, tokens, random_logits<F>(tokens * N * N, 1.0, 70 + N), 20, 1e-6);
    std::vector<double> AB(A.size(), 0.0);
    for (index_t t = 0; t < tokens; ++t)
      for (int i = 0; i < N; ++i)
        for (int o = 0; o < N; ++o)
          for (int k = 0; k < N; ++k)
            AB[t * N * N + i * N + o] += double(A[t * N * N + i * N + k]) * double(Bm[t * N * N + k * N + o]);
    for (double v : AB) EXPECT_GT(v, 0.0);
    EXPECT_LE(max_sum_error<N>(AB, tokens, false), 2e-3) << "n=" << N;
    EXPECT_LE(max_sum_error<N>(AB, tokens, true), 2e-3) << "n=" << N;
  });
}

// The row-sum error (the truncation error of the last column step) shrinks as t grows.
TYPED_TEST(Sinkhorn, ConvergesMonotonicallyInIterations) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 16;
    const auto L = random_logits<F>(tokens * N * N, 1.0, 80 + N);
    for (double eps : {0.0, 1e-6}) {
      std::vector<double> err;
      for (int iters : {1, 5, 10, 20, 50, 100})
        err.push_back(max_sum_error<N>(project<B, N, F>(be, tokens, L, iters, eps), tokens, true));
      const double slack = 4 * N * ulp<F>();
      for (std::size_t k = 1; k < err.size(); ++k)
        EXPECT_LE(err[k], err[k - 1] + slack) << "n=" << N << " eps=" << eps << " step " << k;
      EXPECT_GT(err[0], 1e-2) << "n=" << N << " (the test needs logits far from doubly stochastic)";
      // at t = 100 only rounding (and, with eps > 0, the O(eps) bias of the fixed point) remains
      EXPECT_LE(err.back(), 8 * N * ulp<F>() + 4 * N * eps) << "n=" << N << " eps=" << eps;
    }
  });
}

// eps = 0, t = 1 is a row softmax followed by one column normalisation: compare with that formula
// computed independently in double.
TYPED_TEST(Sinkhorn, OneIterationIsColumnNormalisedSoftmax) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 16;
    const auto L = random_logits<F>(tokens * N * N, 2.0, 90 + N);
    std::vector<double> want(L.size());
    for (index_t t = 0; t < tokens; ++t) {
      double E[N][N];
      for (int i = 0; i < N; ++i) {
        double rs = 0;
        for (int o = 0; o < N; ++o) rs += (E[i][o] = std::exp(double(L[t * N * N + i * N + o])));
        for (int o = 0; o < N; ++o) E[i][o] /= rs;
      }
      for (int o = 0; o < N; ++o) {
        double cs = 0;
        for (int i = 0; i < N; ++i) cs += E[i][o];
        for (int i = 0; i < N; ++i) want[t * N * N + i * N + o] = E[i][o] / cs;
      }
    }
    const auto got = mhc_test::to_double(project<B, N, F>(be, tokens, L, 1, 0.0));
    EXPECT_TRUE(mhc_test::all_close(got, want, 0, 16 * ulp<F>())) << "n=" << N;
  });
}

// The identity is reachable: logits s*I approach I as s grows.
TYPED_TEST(Sinkhorn, IdentityReachable) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (double eps : {0.0, 1e-6}) {
      double prev = std::numeric_limits<double>::infinity();
      for (double s : {2.0, 5.0, 10.0, 20.0, 50.0}) {
        std::vector<F> L(N * N, F(0));
        for (int i = 0; i < N; ++i) L[i * N + i] = static_cast<F>(s);
        const auto P = project<B, N, F>(be, 1, L, 20, eps);
        double err = 0;
        for (int i = 0; i < N; ++i)
          for (int o = 0; o < N; ++o) err = std::max(err, std::abs(double(P[i * N + o]) - (i == o ? 1.0 : 0.0)));
        if (N > 1 && eps == 0.0) {
          EXPECT_LT(err, prev) << "n=" << N << " s=" << s;
        } else {  // n = 1 is exact at every s; with eps > 0 the off-diagonal floor is ~eps
          EXPECT_LE(err, prev + 2 * ulp<F>()) << "n=" << N << " s=" << s << " eps=" << eps;
        }
        if (s == 50.0) {
          EXPECT_LE(err, 2 * N * ulp<F>() + 2 * N * eps) << "n=" << N << " eps=" << eps;
        }
        prev = err;
      }
    }
  });
}

// Any finite logits, however large, give a finite, positive result with column sums ~1 (eps > 0).
TYPED_TEST(Sinkhorn, ExtremeFiniteLogits) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const F big = static_cast<F>(1e30), huge = static_cast<F>(3e38), fmax = std::numeric_limits<F>::max();
    // Matrices (one token each): uniform rows of one extreme value, alternating signs, mixed rows.
    std::vector<std::vector<F>> cases;
    for (F v : {big, -big, huge, -huge, fmax, -fmax}) cases.push_back(std::vector<F>(N * N, v));
    for (F v : {big, huge, fmax}) {
      std::vector<F> alt(N * N), mixed(N * N), onecol(N * N);
      for (int i = 0; i < N; ++i)
        for (int o = 0; o < N; ++o) {
          alt[i * N + o] = ((i + o) % 2 ? -v : v);
          mixed[i * N + o] = i % 3 == 0 ? v : (i % 3 == 1 ? -v : F(o) - F(1.5));
          onecol[i * N + o] = o == 0 ? v : -v;  // every row puts all its mass on column 0
        }
      cases.push_back(alt);
      cases.push_back(mixed);
      cases.push_back(onecol);
    }
    std::vector<F> all;
    for (const auto& c : cases) all.insert(all.end(), c.begin(), c.end());
    const index_t tokens = index_t(cases.size());
    for (int iters : {1, 3, 20}) {
      const auto P = project<B, N, F>(be, tokens, all, iters, 1e-6);
      for (std::size_t k = 0; k < P.size(); ++k) {
        ASSERT_TRUE(std::isfinite(double(P[k]))) << "n=" << N << " iters=" << iters << " case " << k / (N * N);
        ASSERT_GT(P[k], F(0)) << "n=" << N << " iters=" << iters << " case " << k / (N * N);
      }
      // After one column step a column that only holds the +eps floor sums to n/(n+1); from t = 2 on
      // every column sum S is O(1) before the last column step, so the sums are 1 - O(eps).
      if (iters > 1) {
        EXPECT_LE(max_sum_error<N>(P, tokens, false), 1e-4) << "n=" << N << " iters=" << iters;
      }
    }
  });
}

// eps = 0 (the paper's Eq. 9) with logits far apart: every softmax entry of a column can underflow to
// 0, and the column step would divide 0 by 0. The library keeps such a column at zero (its
// denominator 0 is replaced by 1), so finite logits still give a finite result, and the gradient by
// replay is finite as well. Columns that keep mass still sum to 1.
TYPED_TEST(Sinkhorn, ZeroEpsUnderflowedColumnStaysFinite) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (F v : {F(1e30), F(3e38)}) {  // exp(-2v) underflows in float and double
      std::vector<F> L(N * N);
      for (int i = 0; i < N; ++i)
        for (int o = 0; o < N; ++o) L[i * N + o] = o == 0 ? v : -v;  // all mass on column 0
      for (int iters : {1, 20}) {
        const auto P = project<B, N, F>(be, 1, L, iters, 0.0);
        for (int k = 0; k < N * N; ++k) {
          ASSERT_TRUE(std::isfinite(double(P[k]))) << at(N, iters, 0.0) << " v=" << double(v) << " k=" << k;
          ASSERT_GE(P[k], F(0)) << at(N, iters, 0.0);
          if (k % N != 0) {
            EXPECT_EQ(P[k], F(0)) << "underflowed column must stay zero, " << at(N, iters, 0.0);
          }
        }
        EXPECT_NEAR(sums<N>(P, 0, false)[0], 1.0, 8 * ulp<F>()) << at(N, iters, 0.0);
        const auto gL = project_backward<B, N, F>(be, 1, L, random_logits<F>(N * N, 1.0, 11), iters, 0.0);
        for (int k = 0; k < N * N; ++k) ASSERT_TRUE(std::isfinite(double(gL[k]))) << at(N, iters, 0.0);
      }
    }
  });
}

// n = 1. The row softmax of a 1x1 matrix is exactly 1 (exp(0) / exp(0)), whatever the logit. Then
// P = 1 + eps, and every one of the 2t - 1 normalisation steps (column, then row/column pairs) maps
// x -> x / (x + eps). With y = 1/x this is y -> 1 + eps*y, so from y0 = 1/(1 + eps) after m steps
// y_m = (1 - eps^m) / (1 - eps) + eps^m y0 (eps != 1), i.e. x_m = 1 / y_m. For t = 1 that is
// (1 + eps)/(1 + 2 eps); as t grows it tends to the fixed point x = 1 - eps (about 1/(1 + eps)); with
// eps = 0 it is exactly 1.
TYPED_TEST(Sinkhorn, SingleStreamClosedForm) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  const std::vector<F> L = {F(0), F(3.5), F(-2), static_cast<F>(1e30), static_cast<F>(-3e38),
                            std::numeric_limits<F>::max()};
  for (double eps : {0.0, 1e-6, 1e-3, 0.25})
    for (int iters : {1, 2, 3, 20}) {
      const int m = 2 * iters - 1;
      // the recurrence, in double
      double x = 1.0 + double(static_cast<F>(eps));
      for (int k = 0; k < m; ++k) x = x / (x + double(static_cast<F>(eps)));
      // the closed form
      const double e = double(static_cast<F>(eps)), em = std::pow(e, m);
      const double y = (e == 0.0 ? 1.0 : (1.0 - em) / (1.0 - e)) + em / (1.0 + e);
      EXPECT_NEAR(x, 1.0 / y, 1e-14) << "eps=" << eps << " iters=" << iters;
      if (iters == 1) {
        EXPECT_NEAR(x, (1.0 + e) / (1.0 + 2.0 * e), 1e-15);
      }
      if (eps == 0.0) {
        EXPECT_EQ(x, 1.0);
      }
      const auto P = project<B, 1, F>(be, index_t(L.size()), L, iters, eps);
      for (std::size_t t = 0; t < L.size(); ++t)
        EXPECT_NEAR(double(P[t]), x, 4 * m * ulp<F>()) << "eps=" << eps << " iters=" << iters << " L=" << double(L[t]);
    }
}

// In place (comb == logits) equals out of place, bit for bit.
TYPED_TEST(Sinkhorn, InPlaceMatchesOutOfPlace) {
  using B = typename TypeParam::backend;
  using F = typename TypeParam::compute;
  if (!mhc_test::backend_available<B>()) GTEST_SKIP() << "no device";
  const B be = mhc_test::make_backend<B>();
  for_each_n<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    const index_t tokens = 37;
    const auto L = random_logits<F>(tokens * N * N, 1.0, 110 + N);
    for (int iters : {1, 20})
      for (double eps : {0.0, 1e-6}) {
        const auto out = project<B, N, F>(be, tokens, L, iters, eps);
        buffer<B, F> io(L.size());
        io.host() = L;
        io.to_device();
        mhc::ops::sinkhorn<N, F>(be, tokens, io.cview(), io.view(), iters, eps);
        io.to_host();
        EXPECT_TRUE(mhc_test::bit_equal(io.host(), out)) << at(N, iters, eps);
      }
  });
}

// The scratch-free replay (the GPU's Sinkhorn backward) equals the scratch version bit for bit.
template <int N>
void replay_equals_scratch() {
  std::vector<double> scratch_d;
  for (int iters : {1, 2, 20})
    for (double eps : {0.0, 1e-6})
      for (std::uint64_t seed : {1u, 2u, 3u}) {
        const auto L = mhc_test::to<float>(mhc_test::normal(N * N, 3.0, seed * 31 + N));
        const auto gP = mhc_test::to<float>(mhc_test::normal(N * N, 1.0, seed * 37 + N));
        std::vector<float> scratch(mhc::sinkhorn_scratch_size(N, iters)), a(N * N), b(N * N);
        mhc::scalar::sinkhorn_backward<N>(L.data(), gP.data(), a.data(), iters, float(eps), scratch.data());
        mhc::scalar::sinkhorn_backward_replay<N>(L.data(), gP.data(), b.data(), iters, float(eps));
        EXPECT_TRUE(mhc_test::bit_equal(a, b)) << "n=" << N << " iters=" << iters << " eps=" << eps;
      }
}

TEST(SinkhornReplay, EqualsScratchBackwardBitForBit) {
  replay_equals_scratch<1>();
  replay_equals_scratch<2>();
  replay_equals_scratch<4>();
  replay_equals_scratch<8>();
}

}  // namespace

// The CPU backend's Sinkhorn and Sinkhorn backward of eight tokens at once (one per lane of an AVX2
// vector) equal the baseline kernel's one token at a time bit for bit: token counts around a multiple of eight (the
// unused lanes of the last group), out of place and in place, logits large enough that whole columns
// underflow to exact zeros (eps = 0: the nonzero() denominators, without which 0 / 0 would make
// NaNs), and a NaN and an Inf in two tokens' logits (those tokens' results are NaN, the same bits).
template <int N>
void lanes_equal_scalar() {
  for (index_t tokens : {1, 7, 8, 9, 29})
    for (int iters : {1, 20})
      for (double eps : {0.0, 1e-6}) {
        auto L = mhc_test::to<float>(mhc_test::normal(std::size_t(tokens * N * N), 40.0, 71 + tokens * N));
        const auto gP = mhc_test::to<float>(mhc_test::normal(std::size_t(tokens * N * N), 1.0, 73 + tokens));
        if (tokens > 8) {
          L[std::size_t(3 * N * N + 1 % (N * N))] = std::numeric_limits<float>::quiet_NaN();
          L[std::size_t(8 * N * N)] = std::numeric_limits<float>::infinity();
        }
        if (N > 1)  // the last token's column 0 underflows in every row: its sum is an exact 0 at eps = 0
          for (int i = 0; i < N; ++i) L[std::size_t((tokens - 1) * N * N + i * N)] = -1000.0f;
        const mhc::cpu base(1, mhc::cpu_isa::baseline), wide(2, mhc::cpu_isa::avx2);
        const auto ref = project_backward<mhc::cpu, N, float>(base, tokens, L, gP, iters, eps);
        for (float v : ref) ASSERT_FALSE(std::isnan(v) && tokens <= 8) << "a NaN from finite logits";
        for (bool in_place : {false, true})
          EXPECT_TRUE(mhc_test::bit_equal(ref, project_backward<mhc::cpu, N, float>(wide, tokens, L, gP, iters, eps,
                                                                                     in_place)))
              << at(N, iters, eps) << " tokens=" << tokens << (in_place ? " in place" : "");
        EXPECT_TRUE(mhc_test::bit_equal(project<mhc::cpu, N, float>(base, tokens, L, iters, eps),
                                        project<mhc::cpu, N, float>(wide, tokens, L, iters, eps)))
            << "forward, " << at(N, iters, eps) << " tokens=" << tokens;
      }
}

TEST(SinkhornLanes, EqualScalarBitForBit) {
  if (!mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) GTEST_SKIP() << "this processor or build has no AVX2 kernels";
  lanes_equal_scalar<1>();
  lanes_equal_scalar<2>();
  lanes_equal_scalar<3>();
  lanes_equal_scalar<4>();
  lanes_equal_scalar<8>();
}
