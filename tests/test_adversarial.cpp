// Adversarial inputs: what the library does with NaN, Inf, huge magnitudes and degenerate
// configurations, and that results are bit-identical across runs and thread counts. Each test states
// the documented behaviour it checks (README "Guarantees", docs/HARDENING.md). Buffer aliasing is
// covered exhaustively in test_errors.cpp (every output overlapping every other buffer is rejected,
// every documented in-place form is accepted and bit-identical).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "common.hpp"

namespace {

using mhc::index_t;
constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();

/// A read-only view of a whole vector.
template <class V>
mhc::view<const V> cv(const std::vector<V>& v) {
  return mhc::view<const V>(v.data(), index_t(v.size()));
}

/// A writable view of a whole vector.
template <class V>
mhc::view<V> mv(std::vector<V>& v) {
  return mhc::view<V>(v.data(), index_t(v.size()));
}

template <class V>
bool all_finite(const std::vector<V>& v, std::size_t begin = 0, std::size_t end = SIZE_MAX) {
  end = std::min(end, v.size());
  for (std::size_t i = begin; i < end; ++i)
    if (!std::isfinite(static_cast<double>(v[i]))) return false;
  return true;
}

template <class V>
bool same_bits(const std::vector<V>& a, const std::vector<V>& b, std::size_t begin, std::size_t end) {
  return std::memcmp(a.data() + begin, b.data() + begin, (end - begin) * sizeof(V)) == 0;
}

/// One layer forward (identity-free sublayer y = tanh(x)) and backward on float data, with
/// everything it produces kept for comparison.
template <int N, class Mapping = mhc::manifold>
struct layer_run {
  using layer_t = mhc::layer<mhc::cpu, N, float, Mapping>;
  std::vector<float> out, grad, pre, post, comb;
  typename layer_t::parameters grads;

  layer_run(layer_t& layer, index_t tokens, const std::vector<float>& R, const std::vector<float>& gout) {
    auto ctx = layer.make_context(tokens);
    out.assign(R.size(), 0.0f);
    grad.assign(R.size(), 0.0f);
    const auto vR = mhc::view<const float>(R.data(), index_t(R.size()));
    layer.forward(ctx, tokens, vR,
                  [](mhc::view<const float> x, mhc::view<float> y) {
                    for (index_t i = 0; i < x.size(); ++i) y[i] = std::tanh(x[i]);
                  },
                  mhc::view<float>(out.data(), index_t(out.size())));
    grads = layer.make_gradients();
    const auto y = ctx.layer_output();
    layer.backward(ctx, vR, mhc::view<const float>(gout.data(), index_t(gout.size())),
                   [&y](mhc::view<const float> gy, mhc::view<float> gx) {
                     for (index_t i = 0; i < gy.size(); ++i) gx[i] = gy[i] * (1.0f - y[i] * y[i]);
                   },
                   mhc::view<float>(grad.data(), index_t(grad.size())), grads);
    pre.assign(ctx.pre().data(), ctx.pre().data() + ctx.pre().size());
    post.assign(ctx.post().data(), ctx.post().data() + ctx.post().size());
    comb.assign(ctx.comb().data(), ctx.comb().data() + ctx.comb().size());
  }
};

/// A layer with parameters like trained ones (SPEC.md section 7, phi larger so z matters).
template <int N, class Mapping = mhc::manifold>
mhc::layer<mhc::cpu, N, float, Mapping> make_layer(index_t C, const mhc::config& cfg = {}, int threads = 2) {
  mhc::layer<mhc::cpu, N, float, Mapping> layer(mhc::cpu(threads), C, cfg);
  auto& p = layer.params();
  p.phi = mhc_test::to<float>(mhc_test::normal(p.phi.size(), 1e-2, 21));
  p.bias = mhc_test::to<float>(mhc_test::normal(p.bias.size(), 0.1, 22));
  const auto a = mhc_test::normal(3, 0.1, 23);
  for (int g = 0; g < 3; ++g) p.alpha[std::size_t(g)] = static_cast<float>(a[std::size_t(g)]);
  return layer;
}

constexpr int n4 = 4;
constexpr index_t C16 = 16, K16 = n4 * C16, T3 = 3;

std::vector<float> residual(index_t tokens, index_t K, std::uint64_t seed = 1) {
  return mhc_test::to<float>(mhc_test::normal(std::size_t(tokens * K), 1.0, seed));
}

// ------------------------------------------------------------------------------ NaN and Inf

// Documented: a NaN or Inf anywhere in token t's residual makes token t's outputs (layer input,
// residual out, coefficients) non-finite and leaves every other token's outputs and residual
// gradients bit-identical. Parameter gradients are sums over tokens, so they become non-finite.
template <class Mapping>
void expect_token_isolation(float bad) {
  auto layer = make_layer<n4, Mapping>(C16);
  const auto R = residual(T3, K16), gout = residual(T3, K16, 2);
  auto Rbad = R;
  Rbad[std::size_t(K16 + 5)] = bad;  // token 1, stream 0, c = 5
  const layer_run<n4, Mapping> clean(layer, T3, R, gout), poisoned(layer, T3, Rbad, gout);
  const std::size_t K = K16;
  for (std::size_t t : {std::size_t(0), std::size_t(2)}) {
    EXPECT_TRUE(same_bits(clean.out, poisoned.out, t * K, (t + 1) * K)) << "token " << t;
    EXPECT_TRUE(same_bits(clean.grad, poisoned.grad, t * K, (t + 1) * K)) << "token " << t;
    EXPECT_TRUE(same_bits(clean.comb, poisoned.comb, t * n4 * n4, (t + 1) * n4 * n4)) << "token " << t;
  }
  EXPECT_FALSE(all_finite(poisoned.out, K, 2 * K));
  EXPECT_FALSE(all_finite(poisoned.comb, n4 * n4, 2 * n4 * n4));
  EXPECT_FALSE(all_finite(poisoned.grads.phi));
}

TEST(Adversarial, NanInResidualPoisonsOnlyItsToken) {
  expect_token_isolation<mhc::manifold>(nan_f);
  expect_token_isolation<mhc::unconstrained>(nan_f);
}

TEST(Adversarial, InfInResidualPoisonsOnlyItsToken) {
  expect_token_isolation<mhc::manifold>(inf_f);
  expect_token_isolation<mhc::unconstrained>(-inf_f);
}

// Documented: a non-finite phi (or bias) entry reaches every token; nothing crashes. A NaN makes the
// coefficient NaN; an Inf saturates its gate (z = +-inf, sigmoid = 0 or 1, so pre = eps_pre or
// 1 + eps_pre). Non-finite alpha is rejected by the ops. mhc::check_finite on the parameters names
// the bad element instead.
TEST(Adversarial, NonFiniteParameterReachesEveryTokenAndCheckFiniteNamesIt) {
  for (float bad : {nan_f, inf_f}) {
    auto layer = make_layer<n4>(C16);
    layer.params().phi[std::size_t(2 * K16 + 3)] = bad;  // row 2 (a pre coefficient), k = 3
    const auto R = residual(T3, K16), gout = residual(T3, K16, 2);
    const layer_run<n4> run(layer, T3, R, gout);
    const float eps_pre = float(layer.options().eps_pre);
    for (index_t t = 0; t < T3; ++t) {
      const float p2 = run.pre[std::size_t(t * n4 + 2)];
      if (std::isnan(bad))
        EXPECT_TRUE(std::isnan(p2)) << "token " << t;
      else
        EXPECT_TRUE(p2 == eps_pre || p2 == 1.0f + eps_pre) << "token " << t << ": " << p2;
    }
    try {
      mhc::check_finite(layer.params());
      ADD_FAILURE() << "check_finite accepted a non-finite phi";
    } catch (const mhc::error& e) {
      EXPECT_EQ(e.op(), "check_finite");
      EXPECT_EQ(e.argument(), "phi[" + std::to_string(2 * K16 + 3) + "]");
    }
  }
  auto bad_alpha = make_layer<n4>(C16);
  bad_alpha.params().alpha[1] = nan_f;
  const auto R = residual(1, K16);
  EXPECT_THROW(layer_run<n4>(bad_alpha, 1, R, R), mhc::error);
  auto good = make_layer<n4>(C16);
  EXPECT_NO_THROW(mhc::check_finite(good.params()));
}

TEST(Adversarial, CheckFiniteNamesFirstBadIndex) {
  const std::vector<float> v = {1.0f, 2.0f, inf_f, nan_f};
  try {
    mhc::check_finite("residual", mhc::view<const float>(v.data(), 4));
    ADD_FAILURE() << "no throw";
  } catch (const mhc::error& e) {
    EXPECT_EQ(e.argument(), "residual[2]");
    EXPECT_NE(std::string(e.what()).find("inf"), std::string::npos) << e.what();
  }
  EXPECT_EQ(mhc::first_non_finite(mhc::view<const float>(v.data(), 2)), -1);
  const std::vector<mhc::bf16> b = {mhc::bf16(1.0f), mhc::bf16(nan_f)};
  EXPECT_EQ(mhc::first_non_finite(mhc::view<const mhc::bf16>(b.data(), 2)), 1);
}

// Documented Sinkhorn behaviour on non-finite logits, per token: NaN or +Inf make that token's comb
// NaN; -Inf is a zero weight (exp(-inf) = 0) and the result stays finite and doubly stochastic when
// eps > 0. Other tokens are bit-identical.
TEST(Adversarial, SinkhornNonFiniteLogits) {
  const mhc::cpu be(2);
  constexpr int n = 4, nn = n * n;
  const auto L = mhc_test::to<float>(mhc_test::normal(3 * nn, 1.0, 5));
  std::vector<float> clean(L.size());
  mhc::ops::sinkhorn<n, float>(be, 3, mhc::view<const float>(L.data(), 3 * nn), mhc::view<float>(clean.data(), 3 * nn),
                               20, 1e-6);
  for (float bad : {nan_f, inf_f, -inf_f}) {
    auto Lb = L;
    Lb[nn + 6] = bad;  // token 1, row 1, column 2
    std::vector<float> got(L.size());
    mhc::ops::sinkhorn<n, float>(be, 3, mhc::view<const float>(Lb.data(), 3 * nn), mhc::view<float>(got.data(), 3 * nn),
                                 20, 1e-6);
    EXPECT_TRUE(same_bits(clean, got, 0, nn));
    EXPECT_TRUE(same_bits(clean, got, 2 * nn, 3 * nn));
    if (bad < 0) {
      ASSERT_TRUE(all_finite(got, nn, 2 * nn));
      for (int o = 0; o < n; ++o) {
        double col = 0;
        for (int i = 0; i < n; ++i) col += got[std::size_t(nn + i * n + o)];
        EXPECT_NEAR(col, 1.0, 1e-5);
      }
      EXPECT_LT(got[nn + 6], 1e-4f);  // the masked entry keeps only the eps floor
    } else {
      for (int k = nn; k < 2 * nn; ++k) EXPECT_TRUE(std::isnan(got[std::size_t(k)])) << k;
    }
  }
}

// --------------------------------------------------------------------------------- magnitudes

// Documented range: the RMS statistic is finite and accurate for every finite residual. The fp32
// sum of squares overflows once |x| exceeds about 1.8e19 / sqrt(K); the library then recomputes it
// scaled by a power of two (inputs whose sum is finite keep their bits). Checked at the very edge:
// every element at +-FLT_MAX.
TEST(Adversarial, RmsOfHugeResidualDoesNotOverflow) {
  const mhc::cpu be(2);
  constexpr int n = 4;
  const index_t C = 8, K = n * C, M = mhc::coeff_count<n>;
  const std::vector<float> phi = mhc_test::to<float>(mhc_test::normal(std::size_t(M * K), 1e-2, 3));
  const auto base = residual(1, K, 4);
  for (double mag : {1.0, 1e19, 1e30, 1e38, double(std::numeric_limits<float>::max())}) {
    std::vector<float> R(base.size());
    for (std::size_t k = 0; k < R.size(); ++k)
      R[k] = mag == 1.0 ? base[k] : static_cast<float>(base[k] >= 0 ? mag : -mag) * (k % 3 == 0 ? 1.0f : 0.5f);
    std::vector<float> proj(static_cast<std::size_t>(M)), rstd(1);
    mhc::ops::projection<n, float>(be, {1, C}, mhc::view<const float>(R.data(), K), mhc::view<const float>(phi.data(), M * K),
                                   0.0, mhc::view<float>(proj.data(), M), mhc::view<float>(rstd.data(), 1));
    double s = 0;
    for (float x : R) s += double(x) * double(x);
    const double want = 1.0 / std::sqrt(s / double(K));
    ASSERT_TRUE(std::isfinite(rstd[0]) && rstd[0] > 0) << "magnitude " << mag;
    EXPECT_NEAR(rstd[0] / want, 1.0, 1e-5) << "magnitude " << mag;
  }
}

// Scale invariance through the whole forward: multiplying the residual by 2^100 (far past the
// overflow of the plain sum of squares) leaves the coefficients unchanged up to rounding (eps_rms = 0),
// and the forward stays finite. Documented limit of the backward: its RMS term sums grad_z * proj,
// which grows as |x|^2, so gradients are finite up to about |x| = 1e17; checked at 2^50.
TEST(Adversarial, CoefficientsOfHugeResidualMatchTheScaledDownOnes) {
  mhc::config cfg;
  cfg.eps_rms = 0;
  auto layer = make_layer<n4>(C16, cfg);
  const auto R = residual(T3, K16), gout = residual(T3, K16, 2);
  auto Rbig = R, Rmid = R;
  for (auto& x : Rbig) x = std::ldexp(x, 100);
  for (auto& x : Rmid) x = std::ldexp(x, 50);
  const layer_run<n4> small(layer, T3, R, gout), big(layer, T3, Rbig, gout), mid(layer, T3, Rmid, gout);
  const auto close = [](const std::vector<float>& a, const std::vector<float>& b) {
    return mhc_test::all_close(mhc_test::to_double(a), mhc_test::to_double(b), 1e-5, 1e-5);
  };
  EXPECT_TRUE(close(small.pre, big.pre));
  EXPECT_TRUE(close(small.post, big.post));
  EXPECT_TRUE(close(small.comb, big.comb));
  EXPECT_TRUE(all_finite(big.out));
  EXPECT_TRUE(all_finite(mid.grad) && all_finite(mid.grads.phi) && all_finite(mid.grads.bias));
}

// ------------------------------------------------------------------- degenerate configurations

// eps_rms = eps_pre = eps_sinkhorn = 0: finite results on nonzero tokens (the paper's Eq. 9).
// Documented exception: an all-zero token with eps_rms = 0 has r = 1/0 = inf and z = inf * 0 = NaN;
// only that token's outputs are NaN.
TEST(Adversarial, AllEpsZero) {
  mhc::config cfg;
  cfg.eps_rms = cfg.eps_pre = cfg.eps_sinkhorn = 0;
  auto layer = make_layer<n4>(C16, cfg);
  auto R = residual(T3, K16);
  const auto gout = residual(T3, K16, 2);
  const layer_run<n4> run(layer, T3, R, gout);
  EXPECT_TRUE(all_finite(run.out) && all_finite(run.grad) && all_finite(run.grads.phi));
  for (std::size_t k = 0; k < std::size_t(K16); ++k) R[std::size_t(2 * K16) + k] = 0.0f;  // token 2 all zero
  const layer_run<n4> zero(layer, T3, R, gout);
  EXPECT_TRUE(same_bits(run.out, zero.out, 0, 2 * K16));
  EXPECT_FALSE(all_finite(zero.pre, 2 * n4, 3 * n4));
  cfg.eps_rms = 1e-20;  // DeepSeek-V4.1's value: the zero token is fine again
  auto layer2 = make_layer<n4>(C16, cfg);
  const layer_run<n4> eps(layer2, T3, R, gout);
  EXPECT_TRUE(all_finite(eps.out) && all_finite(eps.grad) && all_finite(eps.grads.phi));
}

// One Sinkhorn iteration, n = 1 and C = 1 (and all three at once) through the whole layer, both
// mappings: finite, comb columns sum to 1 (manifold), and the run is repeatable bit for bit.
template <int N, class Mapping>
void expect_small_layer_ok(index_t C, int iters) {
  mhc::config cfg;
  cfg.sinkhorn_iters = iters;
  auto layer = make_layer<N, Mapping>(C, cfg);
  const index_t K = N * C;
  const auto R = residual(T3, K), gout = residual(T3, K, 2);
  const layer_run<N, Mapping> a(layer, T3, R, gout), b(layer, T3, R, gout);
  EXPECT_TRUE(all_finite(a.out) && all_finite(a.grad) && all_finite(a.grads.phi) && all_finite(a.grads.bias));
  EXPECT_TRUE(mhc_test::bit_equal(a.out, b.out) && mhc_test::bit_equal(a.grad, b.grad) &&
              mhc_test::bit_equal(a.grads.phi, b.grads.phi));
  if (std::is_same_v<Mapping, mhc::manifold>)
    for (index_t t = 0; t < T3; ++t)
      for (int o = 0; o < N; ++o) {
        double col = 0;
        for (int i = 0; i < N; ++i) col += a.comb[std::size_t(t * N * N + i * N + o)];
        EXPECT_NEAR(col, 1.0, 1e-5) << "N " << N << " C " << C << " iters " << iters;
      }
}

TEST(Adversarial, OneIterationNEqualsOneCEqualsOne) {
  expect_small_layer_ok<4, mhc::manifold>(C16, 1);
  expect_small_layer_ok<1, mhc::manifold>(C16, 20);
  expect_small_layer_ok<4, mhc::manifold>(1, 20);
  expect_small_layer_ok<1, mhc::manifold>(1, 1);
  expect_small_layer_ok<1, mhc::unconstrained>(1, 1);
  expect_small_layer_ok<3, mhc::unconstrained>(1, 20);
}

// Values the configuration check must refuse before anything runs: non-finite or negative eps,
// eps and post_mult beyond fp32 (they would become infinite in the compute type), iters < 1.
TEST(Adversarial, ConfigurationsOutsideTheRangeThrow) {
  const auto bad = [](auto edit) {
    mhc::config c;
    edit(c);
    EXPECT_THROW((mhc::layer<mhc::cpu, 4, float>(mhc::cpu(1), 8, c)), mhc::error);
  };
  bad([](mhc::config& c) { c.eps_sinkhorn = 1e300; });
  bad([](mhc::config& c) { c.eps_rms = std::numeric_limits<double>::infinity(); });
  bad([](mhc::config& c) { c.eps_pre = -1e-30; });
  bad([](mhc::config& c) { c.post_mult = -1e39; });
  bad([](mhc::config& c) { c.post_mult = std::numeric_limits<double>::quiet_NaN(); });
  bad([](mhc::config& c) { c.sinkhorn_iters = 0; });
  mhc::config edge;
  edge.eps_sinkhorn = double(std::numeric_limits<float>::max());
  EXPECT_NO_THROW((mhc::layer<mhc::cpu, 4, float>(mhc::cpu(1), 8, edge)));
  const mhc::cpu be(1);
  std::vector<float> L(16), P(16);
  EXPECT_THROW((mhc::ops::sinkhorn<4, float>(be, 1, mhc::view<const float>(L.data(), 16), mhc::view<float>(P.data(), 16),
                                             20, 1e39)),
               mhc::error);
  EXPECT_THROW((mhc::layer<mhc::cpu, 4, float, mhc::unconstrained>(mhc::cpu(1), 8)).reset_parameters(-1),
               mhc::error);
}

// ---------------------------------------------------------------------------------- determinism

// Identical inputs give bit-identical outputs, coefficients and gradients (residual and parameters)
// across repeated runs and across 1, 2, 3, 4 and 7 threads, for the whole layer (both mappings,
// enough tokens that every thread count splits the work differently, and few tokens with a long C,
// where the CPU backend splits the hidden dimension instead).
template <class Mapping>
void expect_layer_deterministic(index_t tokens, index_t C) {
  const index_t K = n4 * C;
  const auto R = residual(tokens, K), gout = residual(tokens, K, 2);
  auto ref_layer = make_layer<n4, Mapping>(C, {}, 1);
  const layer_run<n4, Mapping> ref(ref_layer, tokens, R, gout);
  for (int threads : {1, 2, 3, 4, 7}) {
    auto layer = make_layer<n4, Mapping>(C, {}, threads);
    for (int rep = 0; rep < 2; ++rep) {
      const layer_run<n4, Mapping> got(layer, tokens, R, gout);
      SCOPED_TRACE(::testing::Message() << "threads " << threads << " rep " << rep << " T " << tokens << " C " << C);
      EXPECT_TRUE(mhc_test::bit_equal(ref.out, got.out));
      EXPECT_TRUE(mhc_test::bit_equal(ref.grad, got.grad));
      EXPECT_TRUE(mhc_test::bit_equal(ref.comb, got.comb));
      EXPECT_TRUE(mhc_test::bit_equal(ref.grads.phi, got.grads.phi));
      EXPECT_TRUE(mhc_test::bit_equal(ref.grads.bias, got.grads.bias));
      EXPECT_TRUE(std::memcmp(ref.grads.alpha.data(), got.grads.alpha.data(), sizeof(float) * 3) == 0);
    }
  }
}

TEST(Determinism, LayerForwardBackwardAcrossThreadCounts) {
  expect_layer_deterministic<mhc::manifold>(61, 24);
  expect_layer_deterministic<mhc::unconstrained>(61, 24);
  expect_layer_deterministic<mhc::manifold>(2, 3000);
}

// The standalone ops not covered by the layer path, the same way.
/// Every output of the standalone ops (expand, Sinkhorn backward, head and its backward in fp32 and
/// bf16, the projection and its backward) with `threads`
/// threads and the kernels of `isa`, concatenated.
std::vector<float> standalone_outputs(int threads, mhc::cpu_isa isa, index_t C) {
  constexpr int n = 4;
  // 133 tokens: grad_phi of the head (4 rows) goes through tiles of 64 tokens, its partial sums kept in
  // grad_phi between them; two whole tiles and a partial one.
  const index_t tokens = 133, K = n * C;
  const auto h = residual(tokens, C, 7), R = residual(tokens, K, 8), gR = residual(tokens, K, 9);
  const auto L = mhc_test::to<float>(mhc_test::normal(std::size_t(tokens * n * n), 1.0, 10));
  const auto gcomb = mhc_test::to<float>(mhc_test::normal(L.size(), 1.0, 11));
  const auto phi_head = mhc_test::to<float>(mhc_test::normal(std::size_t(n * K), 1e-2, 12));
  const std::vector<float> bias_head = {0.1f, -0.2f, 0.3f, 0.0f};
  const auto gout = residual(tokens, C, 13);
  {
    const mhc::cpu be(threads, isa);
    const auto tn = static_cast<std::size_t>(tokens * n);
    std::vector<float> e(R.size()), eb(h.size()), gL(L.size()), out(h.size()), hw(tn), hp(tn),
        hr(static_cast<std::size_t>(tokens)), gRh(R.size(), 0.0f), gphi(phi_head.size()), ga(1),
        gb(static_cast<std::size_t>(n));
    mhc::ops::expand<n, float>(be, {tokens, C}, cv(h), mv(e));
    mhc::ops::expand_backward<n, float>(be, {tokens, C}, cv(gR), mv(eb));
    std::vector<float> ws(std::size_t(mhc::ops::sinkhorn_backward_workspace_size<n, float>(be, tokens, 20)));
    mhc::ops::sinkhorn_backward<n, float>(be, tokens, cv(L), cv(gcomb), 20, 1e-6, mv(gL), mv(ws));
    mhc::ops::head<n, float>(be, {tokens, C}, cv(R), cv(phi_head), 0.5, cv(bias_head), 1e-6, 1e-6, mv(out), mv(hw),
                             mv(hp), mv(hr));
    std::vector<float> hws(std::size_t(mhc::ops::head_backward_workspace_size<n, float>(be, tokens)));
    mhc::ops::head_backward<n, float>(be, {tokens, C}, cv(R), cv(phi_head), 0.5, cv(bias_head), cv(hw), cv(hp), cv(hr),
                                      cv(gout), mv(gRh), mv(gphi), mv(ga), mv(gb), mv(hws));
    // The projection and its backward with n(n+2) = 24 rows (the fused ops cover them through the
    // layer; here the standalone ops, with gR accumulated into).
    constexpr int m = n * (n + 2);
    const auto phi = mhc_test::to<float>(mhc_test::normal(std::size_t(m * K), 1e-2, 14));
    const auto gz = mhc_test::to<float>(mhc_test::normal(std::size_t(tokens * m), 1.0, 15));
    std::vector<float> proj(std::size_t(tokens * m)), rstd(static_cast<std::size_t>(tokens)), gRp(gR),
        gphip(phi.size());
    mhc::ops::projection<n, float>(be, {tokens, C}, cv(R), cv(phi), 1e-6, mv(proj), mv(rstd));
    mhc::ops::projection_backward<n, float>(be, {tokens, C}, cv(R), cv(phi), cv(proj), cv(rstd), cv(gz), mv(gRp),
                                            mv(gphip));
    // The head and its backward in bf16 storage (head_backward has a 512-bit kernel for bf16 only).
    using bf = mhc::bf16;
    const std::vector<bf> Rb(R.begin(), R.end()), goutb(gout.begin(), gout.end());
    std::vector<bf> outb(h.size()), gRb(R.size(), bf(0.25f));
    std::vector<float> hwb(tn), hpb(tn), hrb(static_cast<std::size_t>(tokens)), gphib(phi_head.size()), gab(1),
        gbb(static_cast<std::size_t>(n));
    mhc::ops::head<n, bf>(be, {tokens, C}, cv(Rb), cv(phi_head), 0.5, cv(bias_head), 1e-6, 1e-6, mv(outb), mv(hwb),
                          mv(hpb), mv(hrb));
    mhc::ops::head_backward<n, bf>(be, {tokens, C}, cv(Rb), cv(phi_head), 0.5, cv(bias_head), cv(hwb), cv(hpb),
                                   cv(hrb), cv(goutb), mv(gRb), mv(gphib), mv(gab), mv(gbb), mv(hws));
    // The projection backward in bf16 storage (gR rounded to bf16 after each block's sum).
    std::vector<bf> gRpb(gR.begin(), gR.end());
    std::vector<float> projb(proj.size()), rstdb(rstd.size()), gphipb(phi.size());
    mhc::ops::projection<n, bf>(be, {tokens, C}, cv(Rb), cv(phi), 1e-6, mv(projb), mv(rstdb));
    mhc::ops::projection_backward<n, bf>(be, {tokens, C}, cv(Rb), cv(phi), cv(projb), cv(rstdb), cv(gz), mv(gRpb),
                                         mv(gphipb));
    std::vector<float> gRpbf(gRpb.begin(), gRpb.end());
    std::vector<float> outbf(outb.begin(), outb.end()), gRbf(gRb.begin(), gRb.end());
    std::vector<float> all;
    for (const auto* v : {&e, &eb, &gL, &out, &hw, &hp, &hr, &gRh, &gphi, &ga, &gb, &proj, &rstd, &gRp, &gphip, &outbf,
                          &hwb, &hpb, &hrb, &gRbf, &gphib, &gab, &gbb, &projb, &rstdb, &gRpbf, &gphipb})
      all.insert(all.end(), v->begin(), v->end());
    return all;
  }
}

TEST(Determinism, StandaloneOpsAcrossThreadCounts) {
  const auto isa = mhc::default_cpu_isa();
  const auto ref = standalone_outputs(1, isa, 40);
  for (int threads : {1, 2, 3, 4, 7}) EXPECT_TRUE(mhc_test::bit_equal(ref, standalone_outputs(threads, isa, 40))) << threads;
}

// The baseline and AVX2 kernels give the same bits (K = 160: whole vectors; K = 4400: the projection's
// 1024-element chunks with a tail; K = 148: a tail past the last whole group of 16 and of 32).
TEST(Determinism, StandaloneOpsAcrossInstructionSets) {
  if (!mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) GTEST_SKIP() << "this processor or build has no AVX2 kernels";
  for (index_t C : {40, 1100, 37}) {
    const auto baseline = standalone_outputs(1, mhc::cpu_isa::baseline, C);
    EXPECT_TRUE(mhc_test::bit_equal(baseline, standalone_outputs(2, mhc::cpu_isa::avx2, C))) << "C = " << C;
    if (mhc::detail::avx512vl_supported()) {  // the plain AVX2 variants as well as the AVX-512 ones
      mhc::detail::avx512vl_allowed = false;
      EXPECT_TRUE(mhc_test::bit_equal(baseline, standalone_outputs(2, mhc::cpu_isa::avx2, C)))
          << "C = " << C << ", without AVX-512";
      mhc::detail::avx512vl_allowed = true;
    }
  }
}

// A few tokens (decode): the projection's rows are split over the threads where that reads less of
// phi per thread than splitting the tokens (1 and 3-7 tokens on 2 threads). The projection and the
// fused pre give the bits of one thread, for 1 to 9 tokens, n = 3 (15 rows: a last piece of 3 rows)
// and n = 4, fp32 and bf16, K with and without a tail past the projection's 1024-element chunks, and
// every instruction set.
template <int n, class T>
std::vector<float> decode_outputs(const mhc::cpu& be, index_t tokens, index_t C) {
  constexpr int m = n * (n + 2);
  const index_t K = n * C;
  const auto Rf = residual(tokens, K, 21);
  const std::vector<T> R(Rf.begin(), Rf.end());
  const auto phi = mhc_test::to<float>(mhc_test::normal(std::size_t(m * K), 1e-2, 22));
  const std::vector<float> alpha = {0.5f, 0.25f, 0.125f};
  const auto bias = mhc_test::to<float>(mhc_test::normal(std::size_t(m), 0.1, 23));
  const auto tm = static_cast<std::size_t>(tokens * m), tn = static_cast<std::size_t>(tokens * n);
  std::vector<float> proj(tm), rstd(static_cast<std::size_t>(tokens)), proj2(tm), rstd2(rstd.size()), pre(tn), post(tn),
      comb(tn * n);
  std::vector<T> y(static_cast<std::size_t>(tokens * C));
  mhc::ops::projection<n, T>(be, {tokens, C}, cv(R), cv(phi), 1e-6, mv(proj), mv(rstd));
  mhc::ops::pre<n, mhc::manifold, T>(be, {tokens, C}, cv(R), cv(phi), cv(alpha), cv(bias), mhc::config{}, mv(y),
                                     mv(pre), mv(post), mv(comb), mv(proj2), mv(rstd2));
  std::vector<float> all;
  for (const auto* v : {&proj, &rstd, &proj2, &rstd2, &pre, &post, &comb}) all.insert(all.end(), v->begin(), v->end());
  for (const T& v : y) all.push_back(float(v));
  return all;
}

template <int n, class T>
void expect_decode_deterministic() {
  for (index_t C : {40, 1100})
    for (index_t tokens = 1; tokens <= 9; ++tokens) {
      const auto ref = decode_outputs<n, T>(mhc::cpu(1, mhc::cpu_isa::baseline), tokens, C);
      for (const auto isa : {mhc::cpu_isa::baseline, mhc::default_cpu_isa()})
        for (int threads : {1, 2, 3, 4, 7})
          EXPECT_TRUE(mhc_test::bit_equal(ref, decode_outputs<n, T>(mhc::cpu(threads, isa), tokens, C)))
              << "n " << n << " C " << C << " tokens " << tokens << " threads " << threads << " isa "
              << mhc::to_string(isa);
    }
}

TEST(Determinism, DecodeProjectionRowSplit) {
  expect_decode_deterministic<4, float>();
  expect_decode_deterministic<3, float>();
  expect_decode_deterministic<4, mhc::bf16>();
}

// head_backward in bf16 rounds its update of gR inside the 512-bit kernel: a NaN of either sign and
// an Inf already in gR come out as the baseline writer's (the quiet NaN of the sign, the Inf), the
// same bits, and the neighbours unchanged.
TEST(Determinism, HeadBackwardBf16NonFiniteGradAcrossInstructionSets) {
  if (!mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) GTEST_SKIP() << "this processor or build has no AVX2 kernels";
  constexpr int n = 4;
  const index_t tokens = 5, C = 96, K = n * C;
  using bf = mhc::bf16;
  const auto Rf = residual(tokens, K, 41), goutf = residual(tokens, C, 42);
  const std::vector<bf> R(Rf.begin(), Rf.end()), gout(goutf.begin(), goutf.end());
  const auto phi = mhc_test::to<float>(mhc_test::normal(std::size_t(n * K), 1e-2, 43));
  const std::vector<float> bias = {0.1f, -0.2f, 0.3f, 0.0f};
  std::vector<bf> gR0(std::size_t(tokens * K), bf(0.5f));
  gR0[3] = bf(nan_f);
  gR0[std::size_t(K + 40)] = bf(-nan_f);
  gR0[std::size_t(2 * K + 70)] = bf(inf_f);
  auto run = [&](mhc::cpu_isa isa) {
    const mhc::cpu be(2, isa);
    const auto tn = std::size_t(tokens * n);
    std::vector<bf> out(std::size_t(tokens * C));
    std::vector<float> hw(tn), hp(tn), hr(static_cast<std::size_t>(tokens)), gphi(phi.size()), ga(1), gb(static_cast<std::size_t>(n));
    std::vector<float> ws(std::size_t(mhc::ops::head_backward_workspace_size<n, float>(be, tokens)));
    mhc::ops::head<n, bf>(be, {tokens, C}, cv(R), cv(phi), 0.5, cv(bias), 1e-6, 1e-6, mv(out), mv(hw), mv(hp), mv(hr));
    std::vector<bf> gR(gR0);
    mhc::ops::head_backward<n, bf>(be, {tokens, C}, cv(R), cv(phi), 0.5, cv(bias), cv(hw), cv(hp), cv(hr), cv(gout),
                                   mv(gR), mv(gphi), mv(ga), mv(gb), mv(ws));
    return gR;
  };
  const auto baseline = run(mhc::cpu_isa::baseline), avx2 = run(mhc::cpu_isa::avx2);
  EXPECT_TRUE(std::isnan(float(baseline[3])) && !std::signbit(float(baseline[3])));
  EXPECT_TRUE(std::isnan(float(baseline[std::size_t(K + 40)])) && std::signbit(float(baseline[std::size_t(K + 40)])));
  EXPECT_TRUE(std::isinf(float(baseline[std::size_t(2 * K + 70)])));
  EXPECT_TRUE(std::isfinite(float(baseline[4])));
  EXPECT_TRUE(mhc_test::bit_equal(baseline, avx2));
}

// pre_backward writes a large grad_residual with streaming stores, and in place (grad_residual ==
// grad_residual_out) with ordinary ones, in slabs of tokens whose panels of phi serve four tokens at
// a time: both give the same bits, and the same as the baseline kernels on one thread. 256 tokens of
// n = 4, C = 4096 reach the streaming size (8 MiB) in bf16 and fp32; 254 tokens leave a partial group.
// On 4 threads, 254 tokens and 9 take the split over blocks of columns (few tokens per thread).
template <class T>
void pre_backward_store_paths() {
  using F = mhc::compute_t<T>;
  constexpr int n = 4, M = mhc::coeff_count<n>;
  const index_t C = 4096, K = n * C;
  for (index_t tokens : {256, 254, 9}) {
    SCOPED_TRACE("tokens " + std::to_string(tokens));
    const auto R = mhc_test::to<T>(mhc_test::normal(std::size_t(tokens * K), 1.0, 21));
    const auto gRout = mhc_test::to<T>(mhc_test::normal(R.size(), 1.0, 22));
    const auto gy = mhc_test::to<T>(mhc_test::normal(std::size_t(tokens * C), 1.0, 23));
    const auto phi = mhc_test::to<F>(mhc_test::normal(std::size_t(M * K), 1e-2, 24));
    const auto alpha = mhc_test::to<F>(mhc_test::normal(3, 0.1, 25));
    const auto bias = mhc_test::to<F>(mhc_test::normal(std::size_t(M), 0.1, 26));
    const auto pre = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n), 1.0, 27));
    const auto comb = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n * n), 1.0, 28));
    const auto proj = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * M), 1.0, 29));
    const std::vector<F> rstd(std::size_t(tokens), F(0.5));
    const auto gpost = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n), 1.0, 30));
    const auto gcomb = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n * n), 1.0, 31));
    const mhc::config cfg;
    const auto run = [&](const mhc::cpu& be, bool in_place) {
      std::vector<T> gR = in_place ? gRout : std::vector<T>(R.size());
      std::vector<F> gphi(phi.size()), galpha(3), gbias(static_cast<std::size_t>(M)),
          ws(std::size_t(mhc::ops::pre_backward_workspace_size<n, F>(be, tokens, cfg.sinkhorn_iters)));
      mhc::ops::pre_backward<n, mhc::manifold, T>(be, {tokens, C}, cv(R), cv(phi), cv(alpha), cv(bias), cfg, cv(pre),
                                                  cv(comb), cv(proj), cv(rstd), cv(gpost), cv(gcomb),
                                                  in_place ? cv(gR) : cv(gRout), cv(gy), mv(gR), mv(gphi), mv(galpha),
                                                  mv(gbias), mv(ws));
      std::vector<float> all;
      for (const T& v : gR) all.push_back(mhc::storage_traits<T>::load(v));
      for (const auto* v : {&gphi, &galpha, &gbias}) all.insert(all.end(), v->begin(), v->end());
      return all;
    };
    const mhc::cpu two(2);
    const auto streamed = run(two, false);
    EXPECT_TRUE(mhc_test::bit_equal(streamed, run(two, true))) << "streaming stores vs in place";
    EXPECT_TRUE(mhc_test::bit_equal(streamed, run(mhc::cpu(1, mhc::cpu_isa::baseline), true)))
        << "vs the baseline kernels on one thread";
    const mhc::cpu four(4);
    EXPECT_TRUE(mhc_test::bit_equal(streamed, run(four, false))) << "4 threads";
    EXPECT_TRUE(mhc_test::bit_equal(streamed, run(four, true))) << "4 threads, in place";
  }
}

TEST(Determinism, PreBackwardStorePathsFp32) { pre_backward_store_paths<float>(); }
TEST(Determinism, PreBackwardStorePathsBf16) { pre_backward_store_paths<mhc::bf16>(); }

// post, pre_apply, post_backward, pre_apply_backward (the mixing kernels, mhc/cpu/mixing.hpp), the
// head and expand_backward (pre_apply's kernels) give the same bits on every store path: streaming
// stores (outputs of 8 MiB and more), post in place, ordinary stores where the rows are not aligned
// alike (C = 4104: rows 16 bytes off a cache line in bf16; C = 4099: odd, with a column tail), the
// AVX2 variants with and without their AVX-512 ones, thread counts that split tokens at columns off
// any line, and the baseline kernels on one thread. The inputs hold NaN, infinities and values whose
// outputs are subnormal, which the vector conversions hand to the scalar code. The head's weights of
// a token holding a NaN are NaN, and a NaN times a NaN has the sign of the operand the compiler
// put first: between the instruction sets a NaN equals any NaN (bit_equal_or_nan).
template <class T, int n>
void mixing_store_paths(index_t tokens, std::initializer_list<index_t> hidden) {
  using F = mhc::compute_t<T>;
  using st = mhc::storage_traits<T>;
  for (index_t C : hidden) {
    SCOPED_TRACE("n " + std::to_string(n) + ", C " + std::to_string(C));
    const index_t K = n * C;
    auto Rf = mhc_test::normal(std::size_t(tokens * K), 1.0, 41);
    auto yf = mhc_test::normal(std::size_t(tokens * C), 1.0, 42);
    // token 3: a NaN and an infinity in the residual; token 5: every input tiny, so the outputs are
    // subnormal (the normal weights keep them from being exactly zero).
    Rf[std::size_t(3 * K + 2 * C + 77)] = nan_f;
    Rf[std::size_t(3 * K + 1 * C + 300)] = inf_f;
    for (index_t i = 5 * K; i < 6 * K; ++i) Rf[std::size_t(i)] *= 1e-39;
    for (index_t i = 5 * C; i < 6 * C; ++i) yf[std::size_t(i)] *= 1e-39;
    const auto R = mhc_test::to<T>(Rf), y = mhc_test::to<T>(yf);
    const auto pre = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n), 1.0, 43));
    const auto post = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n), 1.0, 44));
    const auto comb = mhc_test::to<F>(mhc_test::normal(std::size_t(tokens * n * n), 1.0, 45));
    const auto gR0 = mhc_test::to<T>(mhc_test::normal(std::size_t(tokens * K), 1.0, 46));
    const auto phi_head = mhc_test::to<F>(mhc_test::normal(std::size_t(n * K), 1e-2, 47));
    const auto bias_head = mhc_test::to<F>(mhc_test::normal(std::size_t(n), 0.5, 48));
    const auto run = [&](const mhc::cpu& be, bool in_place) {
      std::vector<T> out = in_place ? R : std::vector<T>(R.size()), ya(y.size());
      mhc::ops::post<n, T>(be, {tokens, C}, cv(post), cv(comb), cv(y), in_place ? cv(out) : cv(R), mv(out));
      mhc::ops::pre_apply<n, T>(be, {tokens, C}, cv(pre), cv(R), mv(ya));
      // post_backward with gR' = R, without grad_residual and with one (added to a copy of gR0).
      std::vector<T> gy(y.size()), gy2(y.size()), gR = gR0;
      std::vector<F> gpost(post.size()), gcomb(comb.size()), gpost2(post.size()), gcomb2(comb.size());
      mhc::ops::post_backward<n, T>(be, {tokens, C}, cv(post), cv(comb), cv(y), cv(R), cv(R), mhc::view<T>{}, mv(gy),
                                    mv(gpost), mv(gcomb));
      mhc::ops::post_backward<n, T>(be, {tokens, C}, cv(post), cv(comb), cv(y), cv(R), cv(R), mv(gR), mv(gy2),
                                    mv(gpost2), mv(gcomb2));
      // pre_apply_backward with gy_in = y, added to another copy of gR0.
      std::vector<T> gRa = gR0;
      std::vector<F> gpre(pre.size());
      mhc::ops::pre_apply_backward<n, T>(be, {tokens, C}, cv(pre), cv(R), cv(y), mv(gRa), mv(gpre));
      // The head: its projection, then its weights' mix of the streams, written as pre_apply's.
      std::vector<T> yh(y.size());
      std::vector<F> hw(pre.size()), hu(pre.size()), hr(static_cast<std::size_t>(tokens));
      mhc::ops::head<n, T>(be, {tokens, C}, cv(R), cv(phi_head), 0.5, cv(bias_head), 1e-6, 1e-6, mv(yh), mv(hw),
                           mv(hu), mv(hr));
      // expand_backward: pre_apply's kernels with unit weights.
      std::vector<T> gh(y.size());
      mhc::ops::expand_backward<n, T>(be, {tokens, C}, cv(R), mv(gh));
      std::vector<float> all;
      for (const auto* v : {&out, &ya, &gy, &gy2, &gR, &gRa, &yh, &gh})
        for (const T& x : *v) all.push_back(st::load(x));
      for (const auto* v : {&gpost, &gcomb, &gpost2, &gcomb2, &gpre, &hw, &hu, &hr})
        for (const F& x : *v) all.push_back(float(x));
      return all;
    };
    const auto ref = run(mhc::cpu(1, mhc::cpu_isa::baseline), false);
    // The checks can fail: the special values reached the outputs.
    std::size_t nans = 0, subnormals = 0;
    for (float v : ref) nans += std::isnan(v) ? 1 : 0, subnormals += std::fpclassify(v) == FP_SUBNORMAL ? 1 : 0;
    EXPECT_GT(nans, 0u);
    EXPECT_GT(subnormals, 100u);
    EXPECT_TRUE(mhc_test::bit_equal(ref, run(mhc::cpu(1, mhc::cpu_isa::baseline), true))) << "baseline in place";
    if (!mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) continue;
    for (bool wide : {true, false}) {
      if (!wide && !mhc::detail::avx512vl_supported()) continue;
      mhc::detail::avx512vl_allowed = wide;
      for (const auto& [threads, in_place] : {std::pair{2, false}, std::pair{3, false}, std::pair{7, true}})
        EXPECT_TRUE(mhc_test::bit_equal_or_nan(ref, run(mhc::cpu(threads, mhc::cpu_isa::avx2), in_place)))
            << "avx2, AVX-512 variants " << (wide ? "allowed" : "off") << ", threads " << threads
            << (in_place ? ", in place" : ", streaming");
    }
    mhc::detail::avx512vl_allowed = true;
  }
}

// n = 4 with 1025 tokens: the outputs of pre_apply, the head and expand_backward reach the
// streaming size too.
TEST(Determinism, MixingStorePathsFp32) { mixing_store_paths<float, 4>(1025, {4096, 4104, 4099}); }
TEST(Determinism, MixingStorePathsBf16) { mixing_store_paths<mhc::bf16, 4>(1025, {4096, 4104, 4099}); }

// The other stream counts (post_backward's N + N*N accumulators: 2 to 72), ordinary stores only.
TEST(Determinism, MixingOtherStreamCounts) {
  mixing_store_paths<float, 1>(9, {333, 1100});
  mixing_store_paths<float, 3>(9, {333, 1100});
  mixing_store_paths<float, 8>(9, {333, 1100});
  mixing_store_paths<mhc::bf16, 1>(9, {333, 1100});
  mixing_store_paths<mhc::bf16, 3>(9, {333, 1100});
  mixing_store_paths<mhc::bf16, 8>(9, {333, 1100});
}

// The instruction set is the caller's to choose, and an unsupported one is refused without a change.
TEST(Determinism, InstructionSetSelection) {
  mhc::cpu be(1, mhc::cpu_isa::baseline);
  EXPECT_EQ(be.isa(), mhc::cpu_isa::baseline);
  EXPECT_TRUE(mhc::cpu_isa_supported(mhc::cpu_isa::baseline));
  EXPECT_STREQ(mhc::to_string(mhc::cpu_isa::avx2), "avx2");
  if (mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) {
    be.set_isa(mhc::cpu_isa::avx2);
    EXPECT_EQ(be.isa(), mhc::cpu_isa::avx2);
  } else {
    EXPECT_THROW(be.set_isa(mhc::cpu_isa::avx2), mhc::error);
    EXPECT_EQ(be.isa(), mhc::cpu_isa::baseline);
    EXPECT_THROW(mhc::cpu(1, mhc::cpu_isa::avx2), mhc::error);
  }
}

// ---------------------------------------------------------------------------------- thread pool
// (run under ThreadSanitizer by .ci/run)

// parallel_for calls f on disjoint ranges covering [0, count) exactly once, with worker ids below
// threads(), for any count, grain and thread count.
TEST(ThreadPool, ParallelForCoversEveryIndexOnce) {
  for (int threads : {1, 2, 3, 7}) {
    const mhc::cpu be(threads);
    for (index_t count : {0, 1, 5, 1000})
      for (index_t grain : {0, 1, 7, 1000}) {
        std::vector<int> hits(std::size_t(count), 0);
        std::vector<int> worker_ok(std::size_t(count), 0);
        be.parallel_for(count, grain, [&](index_t b, index_t e, int w) {
          for (index_t i = b; i < e; ++i) {
            ++hits[std::size_t(i)];
            worker_ok[std::size_t(i)] = (w >= 0 && w < threads) ? 1 : 0;
          }
        });
        for (index_t i = 0; i < count; ++i) {
          EXPECT_EQ(hits[std::size_t(i)], 1) << "threads " << threads << " count " << count << " i " << i;
          EXPECT_EQ(worker_ok[std::size_t(i)], 1);
        }
      }
  }
}

// Idle workers poll for a new job for a while (detail::pool_spin_time), then sleep. Jobs back to back
// (workers still polling), jobs after a pause longer than the polling (workers asleep), and pools
// destroyed right after a job (workers polling) each run every piece exactly once. The pool has at most
// as many threads as the processor runs at once where it runs two or more, so its workers do poll
// there (on a single hardware thread they sleep at once, and the test checks that path instead).
TEST(ThreadPool, WakesPollingAndSleepingWorkers) {
  const int threads = int(std::max(2u, std::min(4u, std::thread::hardware_concurrency())));
  const auto check = [&](const mhc::cpu& be, int round) {
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(threads));
    be.parallel_for(index_t(threads), 1, [&](index_t b, index_t e, int) {
      for (index_t i = b; i < e; ++i) hits[std::size_t(i)].fetch_add(1, std::memory_order_relaxed);
    });
    for (int i = 0; i < threads; ++i) EXPECT_EQ(hits[std::size_t(i)].load(), 1) << "round " << round << " piece " << i;
  };
  const mhc::cpu be(threads);
  for (int round = 0; round < 200; ++round) check(be, round);  // back to back
  for (int round = 0; round < 3; ++round) {
    std::this_thread::sleep_for(mhc::detail::pool_spin_time * 5);  // every worker asleep
    check(be, 1000 + round);
  }
  for (int rep = 0; rep < 20; ++rep) {  // destroyed while its workers poll
    const mhc::cpu own(threads);
    check(own, 2000 + rep);
  }
}

// Copies of a backend share one pool; callers on different threads are serialised by the pool and
// every caller gets the same bits as a sequential run. Pools are created and destroyed repeatedly.
TEST(ThreadPool, ConcurrentCallersShareOnePoolSafely) {
  const mhc::cpu shared(3);
  constexpr int callers = 4;
  const index_t C = 32, K = n4 * C;
  std::vector<std::vector<float>> inputs, expected(callers), got(callers);
  for (int c = 0; c < callers; ++c) inputs.push_back(residual(9, K, std::uint64_t(40 + c)));
  const auto forward = [&](const mhc::cpu& be, const std::vector<float>& R) {
    mhc::layer<mhc::cpu, n4, float> layer(be, C);
    auto ctx = layer.make_context(9);
    std::vector<float> out(R.size());
    layer.forward(ctx, 9, mhc::view<const float>(R.data(), index_t(R.size())),
                  [](mhc::view<const float> x, mhc::view<float> y) {
                    for (index_t i = 0; i < x.size(); ++i) y[i] = x[i];
                  },
                  mhc::view<float>(out.data(), index_t(out.size())));
    return out;
  };
  for (int c = 0; c < callers; ++c) expected[std::size_t(c)] = forward(shared, inputs[std::size_t(c)]);
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c)
    threads.emplace_back([&, c] {
      for (int rep = 0; rep < 3; ++rep) got[std::size_t(c)] = forward(shared, inputs[std::size_t(c)]);
      const mhc::cpu own(2);  // a private pool, created and destroyed while the others run
      EXPECT_TRUE(mhc_test::bit_equal(forward(own, inputs[std::size_t(c)]), expected[std::size_t(c)]));
    });
  for (auto& t : threads) t.join();
  for (int c = 0; c < callers; ++c) EXPECT_TRUE(mhc_test::bit_equal(got[std::size_t(c)], expected[std::size_t(c)]));
  for (int rep = 0; rep < 20; ++rep) {
    const mhc::cpu be(4);
    int sum = 0;
    std::mutex m;
    be.parallel_for(8, 1, [&](index_t b, index_t e, int) {
      std::lock_guard<std::mutex> lk(m);
      sum += int(e - b);
    });
    EXPECT_EQ(sum, 8);
  }
}

}  // namespace
