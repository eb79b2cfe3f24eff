// Bit-exactness contracts (SPEC.md section 7, DESIGN.md "Fused equals unfused"):
//   - the fused pre (ops::pre) writes exactly what the unfused chain ops::coefficients + ops::pre_apply
//     writes, bit for bit, for every storage type, both mappings, n in {1, 2, 3, 4, 8} and odd shapes;
//   - the decode seam ops::post_pre writes exactly what ops::post then ops::pre write;
//   - mhc::layer's pre writes exactly what ops::pre writes, and layer::forward with a callable equals
//     pre, the callable, then post;
//   - results do not depend on the CPU thread count (1, 2 or 3 threads) for pre, post and the layer's
//     backward.

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.hpp"

namespace {

using mhc_test::bit_equal;
using mhc_test::buffer;
using mhc_test::make_buffer;
using mhc_test::normal;
using mhc_test::to;
using vec = std::vector<double>;

template <int... Ns, class Fn>
void for_streams(Fn&& f) {
  (f(mhc::streams<Ns>{}), ...);
}

template <class B, class T>
buffer<B, T> zeros(std::size_t n) {
  buffer<B, T> b(n);
  b.to_device();
  return b;
}

std::uint64_t next_seed() {
  static std::uint64_t s = 5000;
  return s += 13;
}

std::string label(int n, int tokens, int C, const char* mapping, const mhc::config& cfg) {
  return "n=" + std::to_string(n) + " T=" + std::to_string(tokens) + " C=" + std::to_string(C) + " mapping=" + mapping +
         " iters=" + std::to_string(cfg.sinkhorn_iters) + " eps_rms=" + mhc::detail::to_text(cfg.eps_rms) +
         " eps_sinkhorn=" + mhc::detail::to_text(cfg.eps_sinkhorn);
}

/// One sublayer's inputs (SPEC.md section 7 style), on backend B.
template <class B, class T>
struct inputs {
  using F = mhc::compute_t<T>;
  buffer<B, T> R;
  buffer<B, F> phi, alpha, bias;
  inputs(int tokens, int n, int C, double phi_scale, std::uint64_t seed)
      : R(make_buffer<B, T>(normal(std::size_t(tokens) * n * C, 1.0, seed))),
        phi(make_buffer<B, F>(normal(std::size_t(n) * (n + 2) * n * C, phi_scale, seed + 1))),
        alpha(make_buffer<B, F>(normal(3, 0.1, seed + 2))),
        bias(make_buffer<B, F>(normal(std::size_t(n) * (n + 2), 0.1, seed + 3))) {}
};

/// Everything the pre step writes.
template <class B, class T>
struct pre_outputs {
  using F = mhc::compute_t<T>;
  buffer<B, T> y;
  buffer<B, F> pre, post, comb, proj, rstd;
  pre_outputs(int tokens, int n, int C)
      : y(zeros<B, T>(std::size_t(tokens) * C)),
        pre(zeros<B, F>(tokens * n)),
        post(zeros<B, F>(tokens * n)),
        comb(zeros<B, F>(tokens * n * n)),
        proj(zeros<B, F>(tokens * n * (n + 2))),
        rstd(zeros<B, F>(tokens)) {}
  void to_host() {
    y.to_host();
    for (auto* b : {&pre, &post, &comb, &proj, &rstd}) b->to_host();
  }
};

template <class B, class T>
void expect_same(const pre_outputs<B, T>& a, const pre_outputs<B, T>& b, const char* what) {
  EXPECT_TRUE(bit_equal(a.y.host(), b.y.host())) << what << ": layer input";
  EXPECT_TRUE(bit_equal(a.pre.host(), b.pre.host())) << what << ": pre";
  EXPECT_TRUE(bit_equal(a.post.host(), b.post.host())) << what << ": post";
  EXPECT_TRUE(bit_equal(a.comb.host(), b.comb.host())) << what << ": comb";
  EXPECT_TRUE(bit_equal(a.proj.host(), b.proj.host())) << what << ": proj";
  EXPECT_TRUE(bit_equal(a.rstd.host(), b.rstd.host())) << what << ": rstd";
}

template <int N, class Mapping, class T, class B>
void run_fused(const B& be, mhc::shape s, const inputs<B, T>& in, const mhc::config& cfg, pre_outputs<B, T>& out) {
  mhc::ops::pre<N, Mapping, T>(be, s, in.R.cview(), in.phi.cview(), in.alpha.cview(), in.bias.cview(), cfg,
                               out.y.view(), out.pre.view(), out.post.view(), out.comb.view(), out.proj.view(),
                               out.rstd.view());
  out.to_host();
}

template <int N, class Mapping, class T, class B>
void run_unfused(const B& be, mhc::shape s, const inputs<B, T>& in, const mhc::config& cfg, pre_outputs<B, T>& out) {
  mhc::ops::coefficients<N, Mapping, T>(be, s, in.R.cview(), in.phi.cview(), in.alpha.cview(), in.bias.cview(), cfg,
                                        out.pre.view(), out.post.view(), out.comb.view(), out.proj.view(),
                                        out.rstd.view());
  mhc::ops::pre_apply<N, T>(be, s, out.pre.cview(), in.R.cview(), out.y.view());
  out.to_host();
}

std::vector<mhc::config> config_cases() {
  mhc::config v4;  // DeepSeek-V4 defaults
  mhc::config odd = v4;
  odd.sinkhorn_iters = 1;
  odd.eps_rms = 1e-20;
  odd.eps_sinkhorn = 0;
  mhc::config paper = v4;
  paper.eps_sinkhorn = 0;
  paper.eps_pre = 0;
  paper.post_mult = 1.0;
  return {v4, odd, paper};
}

template <class P>
class Fused : public ::testing::Test {};
TYPED_TEST_SUITE(Fused, mhc_test::test_types, mhc_test::param_names);

#define MHC_SKIP_WITHOUT_DEVICE() \
  if (!mhc_test::backend_available<typename TypeParam::backend>()) GTEST_SKIP() << "no device"

template <class B, class T, class Mapping>
void fused_equals_unfused() {
  const B be = mhc_test::make_backend<B>();
  const auto cfgs = config_cases();
  struct shape_case {
    int tokens, hidden;
  };
  for_streams<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (shape_case sc : std::vector<shape_case>{{1, 1}, {13, 1}, {1, 37}, {13, 37}, {2, 4096}})
      for (std::size_t ci = 0; ci < cfgs.size(); ++ci)
        for (double phi_scale : {1e-4, 0.05}) {
          if (sc.hidden == 4096 && (ci > 0 || phi_scale < 0.01)) continue;  // the wide case sparingly
          SCOPED_TRACE(label(N, sc.tokens, sc.hidden, Mapping::name, cfgs[ci]) +
                       " phi_scale=" + mhc::detail::to_text(phi_scale));
          const mhc::shape s{sc.tokens, sc.hidden};
          const inputs<B, T> in(sc.tokens, N, sc.hidden, phi_scale, next_seed());
          pre_outputs<B, T> fused(sc.tokens, N, sc.hidden), unfused(sc.tokens, N, sc.hidden);
          run_fused<N, Mapping>(be, s, in, cfgs[ci], fused);
          run_unfused<N, Mapping>(be, s, in, cfgs[ci], unfused);
          expect_same(fused, unfused, "fused vs unfused");
        }
  });
}

TYPED_TEST(Fused, PreEqualsUnfusedChainManifold) {
  MHC_SKIP_WITHOUT_DEVICE();
  fused_equals_unfused<typename TypeParam::backend, typename TypeParam::storage, mhc::manifold>();
}

TYPED_TEST(Fused, PreEqualsUnfusedChainUnconstrained) {
  MHC_SKIP_WITHOUT_DEVICE();
  fused_equals_unfused<typename TypeParam::backend, typename TypeParam::storage, mhc::unconstrained>();
}

/// The layer is a thin shell over the ops: its pre output and saved coefficients are ops::pre's, and
/// forward(callable) is pre, the callable, post.
template <class B, class T, class Mapping>
void layer_equals_ops() {
  using F = mhc::compute_t<T>;
  const B be = mhc_test::make_backend<B>();
  const mhc::config cfg;
  for_streams<1, 2, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (int tokens : {1, 13})
      for (int C : {1, 37}) {
        SCOPED_TRACE(label(N, tokens, C, Mapping::name, cfg));
        const inputs<B, T> in(tokens, N, C, 0.05, next_seed());
        mhc::layer<B, N, T, Mapping> layer(be, C, cfg);
        layer.params().phi = in.phi.host();
        for (int g = 0; g < 3; ++g) layer.params().alpha[g] = in.alpha.host()[g];
        layer.params().bias = in.bias.host();
        auto ctx = layer.make_context(tokens);
        auto y = zeros<B, T>(std::size_t(tokens) * C);
        layer.pre(ctx, tokens, in.R.cview(), y.view());
        y.to_host();

        pre_outputs<B, T> want(tokens, N, C);
        run_fused<N, Mapping>(be, {tokens, C}, in, cfg, want);
        EXPECT_TRUE(bit_equal(y.host(), want.y.host())) << "layer input";
        auto host = [](mhc::view<const F> v) { return std::vector<F>(v.data(), v.data() + v.size()); };
        EXPECT_TRUE(bit_equal(host(ctx.pre()), want.pre.host())) << "pre";
        EXPECT_TRUE(bit_equal(host(ctx.post()), want.post.host())) << "post";
        EXPECT_TRUE(bit_equal(host(ctx.comb()), want.comb.host())) << "comb";

        // forward(callable) == pre, f, post, with f: y = 2 y_in - 1 elementwise.
        auto f = [](mhc::view<const T> a, mhc::view<T> b) {
          for (mhc::index_t i = 0; i < a.size(); ++i)
            b[i] = static_cast<T>(static_cast<F>(2 * static_cast<F>(a[i]) - 1));
        };
        auto yo = zeros<B, T>(std::size_t(tokens) * C);
        f(y.cview(), yo.view());
        yo.to_device();
        auto out1 = zeros<B, T>(in.R.size()), out2 = zeros<B, T>(in.R.size());
        layer.post(ctx, yo.cview(), in.R.cview(), out1.view());
        out1.to_host();
        auto ctx2 = layer.make_context(tokens);
        layer.forward(ctx2, tokens, in.R.cview(), f, out2.view());
        out2.to_host();
        EXPECT_TRUE(bit_equal(out1.host(), out2.host())) << "forward vs pre/f/post";
        // And the residual merge is ops::post with the saved coefficients.
        auto out3 = zeros<B, T>(in.R.size());
        mhc::ops::post<N, T>(be, {tokens, C}, want.post.cview(), want.comb.cview(), yo.cview(), in.R.cview(),
                             out3.view());
        out3.to_host();
        EXPECT_TRUE(bit_equal(out1.host(), out3.host())) << "layer post vs ops::post";
      }
  });
}

TYPED_TEST(Fused, LayerPreEqualsOpsPreManifold) {
  MHC_SKIP_UNLESS_HOST_MEMORY();
  MHC_SKIP_WITHOUT_DEVICE();
  layer_equals_ops<typename TypeParam::backend, typename TypeParam::storage, mhc::manifold>();
}

TYPED_TEST(Fused, LayerPreEqualsOpsPreUnconstrained) {
  MHC_SKIP_UNLESS_HOST_MEMORY();
  MHC_SKIP_WITHOUT_DEVICE();
  layer_equals_ops<typename TypeParam::backend, typename TypeParam::storage, mhc::unconstrained>();
}

// ------------------------------------------------------------------------------- decode seam

/// ops::post_pre (post of sublayer l and pre of sublayer l+1 in one call) writes exactly what
/// ops::post followed by ops::pre on its output writes, out of place and in place.
template <class B, class T, class Mapping>
void post_pre_equals_post_then_pre() {
  const B be = mhc_test::make_backend<B>();
  const mhc::config cfg;
  for_streams<1, 2, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (auto [tokens, C] : std::vector<std::pair<int, int>>{{1, 37}, {13, 64}, {3, 4096}}) {
      SCOPED_TRACE(label(N, tokens, C, Mapping::name, cfg));
      const mhc::shape s{tokens, C};
      const inputs<B, T> l0(tokens, N, C, 0.05, next_seed()), l1(tokens, N, C, 0.05, next_seed());
      pre_outputs<B, T> p0(tokens, N, C);
      run_fused<N, Mapping>(be, s, l0, cfg, p0);
      auto yo = make_buffer<B, T>(normal(std::size_t(tokens) * C, 1.0, next_seed()));
      // unfused: post, then pre of the next sublayer on its output
      auto Ro = zeros<B, T>(l0.R.size());
      mhc::ops::post<N, T>(be, s, p0.post.cview(), p0.comb.cview(), yo.cview(), l0.R.cview(), Ro.view());
      Ro.to_host();
      inputs<B, T> next = l1;
      next.R = Ro;
      pre_outputs<B, T> want(tokens, N, C);
      run_fused<N, Mapping>(be, s, next, cfg, want);
      // fused, out of place and in place
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(in_place ? "in place" : "out of place");
        auto R = l0.R;
        auto Rs = zeros<B, T>(l0.R.size());
        pre_outputs<B, T> got(tokens, N, C);
        mhc::ops::post_pre<N, Mapping, T>(be, s, p0.post.cview(), p0.comb.cview(), yo.cview(), R.cview(),
                                          in_place ? R.view() : Rs.view(), l1.phi.cview(), l1.alpha.cview(),
                                          l1.bias.cview(), cfg, got.y.view(), got.pre.view(), got.post.view(),
                                          got.comb.view(), got.proj.view(), got.rstd.view());
        got.to_host();
        auto& out = in_place ? R : Rs;
        out.to_host();
        EXPECT_TRUE(bit_equal(out.host(), Ro.host())) << "residual_out";
        expect_same(got, want, "post_pre vs post then pre");
      }
    }
  });
}

TYPED_TEST(Fused, PostPreEqualsPostThenPreManifold) {
  MHC_SKIP_WITHOUT_DEVICE();
  post_pre_equals_post_then_pre<typename TypeParam::backend, typename TypeParam::storage, mhc::manifold>();
}

TYPED_TEST(Fused, PostPreEqualsPostThenPreUnconstrained) {
  MHC_SKIP_WITHOUT_DEVICE();
  post_pre_equals_post_then_pre<typename TypeParam::backend, typename TypeParam::storage, mhc::unconstrained>();
}

// ------------------------------------------------------------------------- thread-count determinism

/// Results of one thread count: pre outputs, post output, and the layer backward's gradients.
template <class T>
struct run_result {
  using F = mhc::compute_t<T>;
  std::vector<T> y, post_out, grad_residual;
  std::vector<F> pre, post, comb, proj, rstd, grad_phi, grad_alpha, grad_bias;
};

template <int N, class T, class Mapping>
run_result<T> run_with_threads(int threads, int tokens, int C, const mhc::config& cfg, std::uint64_t seed,
                               mhc::cpu_isa isa = mhc::default_cpu_isa()) {
  using B = mhc::cpu;
  const B be(threads, isa);
  const inputs<B, T> in(tokens, N, C, 0.05, seed);
  run_result<T> r;

  pre_outputs<B, T> p(tokens, N, C);
  run_fused<N, Mapping>(be, {tokens, C}, in, cfg, p);
  r.y = p.y.host();
  r.pre = p.pre.host();
  r.post = p.post.host();
  r.comb = p.comb.host();
  r.proj = p.proj.host();
  r.rstd = p.rstd.host();

  auto yo = make_buffer<B, T>(normal(std::size_t(tokens) * C, 1.0, seed + 10));
  auto out = zeros<B, T>(in.R.size());
  mhc::ops::post<N, T>(be, {tokens, C}, p.post.cview(), p.comb.cview(), yo.cview(), in.R.cview(), out.view());
  out.to_host();
  r.post_out = out.host();

  // Layer forward and backward with an identity sublayer.
  mhc::layer<B, N, T, Mapping> layer(be, C, cfg);
  layer.params().phi = in.phi.host();
  for (int g = 0; g < 3; ++g) layer.params().alpha[g] = in.alpha.host()[g];
  layer.params().bias = in.bias.host();
  auto ctx = layer.make_context(tokens);
  auto identity = [](mhc::view<const T> a, mhc::view<T> b) {
    for (mhc::index_t i = 0; i < a.size(); ++i) b[i] = a[i];
  };
  auto Rout = zeros<B, T>(in.R.size());
  layer.forward(ctx, tokens, in.R.cview(), identity, Rout.view());
  auto gRout = make_buffer<B, T>(normal(in.R.size(), 1.0, seed + 11));
  auto gR = zeros<B, T>(in.R.size());
  auto grads = layer.make_gradients();
  layer.backward(ctx, in.R.cview(), gRout.cview(), identity, gR.view(), grads);
  gR.to_host();
  r.grad_residual = gR.host();
  r.grad_phi = grads.phi;
  r.grad_alpha.assign(grads.alpha.begin(), grads.alpha.end());
  r.grad_bias = grads.bias;
  return r;
}

template <class T>
void expect_same(const run_result<T>& a, const run_result<T>& b, const std::string& what) {
  const std::string w = what + ": ";
  EXPECT_TRUE(bit_equal(a.y, b.y)) << w << "layer input";
  EXPECT_TRUE(bit_equal(a.pre, b.pre)) << w << "pre";
  EXPECT_TRUE(bit_equal(a.post, b.post)) << w << "post";
  EXPECT_TRUE(bit_equal(a.comb, b.comb)) << w << "comb";
  EXPECT_TRUE(bit_equal(a.proj, b.proj)) << w << "proj";
  EXPECT_TRUE(bit_equal(a.rstd, b.rstd)) << w << "rstd";
  EXPECT_TRUE(bit_equal(a.post_out, b.post_out)) << w << "post residual";
  EXPECT_TRUE(bit_equal(a.grad_residual, b.grad_residual)) << w << "grad residual";
  EXPECT_TRUE(bit_equal(a.grad_phi, b.grad_phi)) << w << "grad phi";
  EXPECT_TRUE(bit_equal(a.grad_alpha, b.grad_alpha)) << w << "grad alpha";
  EXPECT_TRUE(bit_equal(a.grad_bias, b.grad_bias)) << w << "grad bias";
}

template <class T, class Mapping>
void thread_determinism() {
  struct shape_case {
    int tokens, hidden;
  };
  // Shapes that make the CPU backend split the work: many tokens, few tokens with a wide hidden
  // dimension, one token, and C = 1.
  const std::vector<shape_case> shapes = {{300, 37}, {9, 4096}, {1, 4096}, {13, 1}};
  const mhc::config cfg;
  for_streams<1, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (const auto& sc : shapes) {
      SCOPED_TRACE(label(N, sc.tokens, sc.hidden, Mapping::name, cfg));
      const std::uint64_t seed = next_seed();
      const auto one = run_with_threads<N, T, Mapping>(1, sc.tokens, sc.hidden, cfg, seed);
      for (int threads : {2, 3})
        expect_same(one, run_with_threads<N, T, Mapping>(threads, sc.tokens, sc.hidden, cfg, seed),
                    "1 vs " + std::to_string(threads) + " threads");
    }
  });
}

TYPED_TEST(Fused, ThreadCountDeterminismManifold) {
  MHC_SKIP_WITHOUT_DEVICE();
  if (!std::is_same_v<typename TypeParam::backend, mhc::cpu>) GTEST_SKIP() << "CPU thread counts only";
  thread_determinism<typename TypeParam::storage, mhc::manifold>();
}

TYPED_TEST(Fused, ThreadCountDeterminismUnconstrained) {
  MHC_SKIP_WITHOUT_DEVICE();
  if (!std::is_same_v<typename TypeParam::backend, mhc::cpu>) GTEST_SKIP() << "CPU thread counts only";
  thread_determinism<typename TypeParam::storage, mhc::unconstrained>();
}

// ------------------------------------------------------------------- instruction-set determinism

/// The baseline kernels on one thread and the AVX2 kernels on two give the same bits for every
/// output and gradient of the fused pre, post and the layer backward (the AVX2 kernels keep every
/// sum's order and contract nothing), with and without their AVX-512VL variants where the processor
/// has them. Shapes cover the projection's eight-token blocks and four-token groups with and without
/// a partial one, its 1024-element chunks with a tail, K not a multiple of 8, and C = 1.
template <class T, class Mapping>
void isa_determinism() {
  if (!mhc::cpu_isa_supported(mhc::cpu_isa::avx2)) GTEST_SKIP() << "this processor or build has no AVX2 kernels";
  struct shape_case {
    int tokens, hidden;
  };
  const std::vector<shape_case> shapes = {{300, 37}, {9, 4096}, {1, 4096}, {13, 1}, {7, 1100}, {6, 333}};
  const mhc::config cfg;
  for_streams<1, 3, 4, 8>([&](auto nc) {
    constexpr int N = decltype(nc)::value;
    for (const auto& sc : shapes) {
      SCOPED_TRACE(label(N, sc.tokens, sc.hidden, Mapping::name, cfg));
      const std::uint64_t seed = next_seed();
      const auto baseline = run_with_threads<N, T, Mapping>(1, sc.tokens, sc.hidden, cfg, seed, mhc::cpu_isa::baseline);
      expect_same(baseline, run_with_threads<N, T, Mapping>(2, sc.tokens, sc.hidden, cfg, seed, mhc::cpu_isa::avx2),
                  "baseline (1 thread) vs avx2 (2 threads)");
      if (mhc::detail::avx512vl_supported()) {  // the plain AVX2 variants as well as the AVX-512VL ones
        mhc::detail::avx512vl_allowed = false;
        expect_same(baseline, run_with_threads<N, T, Mapping>(2, sc.tokens, sc.hidden, cfg, seed, mhc::cpu_isa::avx2),
                    "baseline (1 thread) vs avx2 without AVX-512VL (2 threads)");
        mhc::detail::avx512vl_allowed = true;
      }
    }
  });
}

TYPED_TEST(Fused, InstructionSetDeterminismManifold) {
  MHC_SKIP_WITHOUT_DEVICE();
  if (!std::is_same_v<typename TypeParam::backend, mhc::cpu>) GTEST_SKIP() << "CPU instruction sets only";
  isa_determinism<typename TypeParam::storage, mhc::manifold>();
}

TYPED_TEST(Fused, InstructionSetDeterminismUnconstrained) {
  MHC_SKIP_WITHOUT_DEVICE();
  if (!std::is_same_v<typename TypeParam::backend, mhc::cpu>) GTEST_SKIP() << "CPU instruction sets only";
  isa_determinism<typename TypeParam::storage, mhc::unconstrained>();
}

}  // namespace
