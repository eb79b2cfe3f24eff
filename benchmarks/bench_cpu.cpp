// CPU benchmarks of every mhc op, forward and backward, at production shapes, each reported against
// rooflines measured in the same process:
//   copy_GBps    a memory copy on the backend's threads (bytes read + written per second; glibc's memcpy
//                uses non-temporal stores at this size, so no write-allocate traffic is counted), timed
//                right after each benchmark (its counter) and once at the start (the run's context)
//   gemm_GFLOPs  fp32 GEMM throughput of Eigen, every thread running its own 512^3 product at once: the
//                faster of Eigen compiled for the baseline (SSE2) and for AVX2 + FMA where the processor
//                has them (gemm_avx2_fma.cpp), because the library's own kernels pick AVX2 at run time
// Counters of every benchmark:
//   bytes_per_second   bytes the traffic model below says the op must move, over the measured time
//   roofline_fraction  roofline time / measured time, roofline time = max(bytes / copy bandwidth,
//                      flops / GEMM throughput); 1.0 means at the roofline
//
// Traffic model (SPEC.md section 8, per token unless marked "once"; s = bytes of the storage type, f = 4
// bytes of an fp32 coefficient, M = n(n+2), K = nC). Activations dominate at large T; phi ("once") is
// read once per call and dominates at T = 1. Each op counts what it must read and write, not what the
// implementation happens to re-read (pre_backward, for example, reads R a second time for grad_phi).
//   residual_add        x + F(x): read 2C, write C                                       3C s
//   expand              read h (C), write R (nC)                                         (n+1)C s
//   expand_backward     read gR (nC), write gh (C)                                       (n+1)C s
//   projection          read R; write proj, rstd; phi once                               nC s + (M+1) f; MK f once
//   projection_backward read R, proj, rstd, grad_z; gR += (read + write); phi and
//                       grad_phi once                                                    3nC s + (2M+1) f; 2MK f once
//   gates               read proj, rstd; write pre, post, comb                           (2M+1) f
//   gates_backward      read proj, rstd, gpre, gpost, gcomb; write grad_z                (3M+1) f
//   sinkhorn            read logits, write comb                                          2n^2 f
//   sinkhorn_backward   read logits, grad_comb; write grad_logits                        3n^2 f
//   coefficients        the unfused chain projection -> gates -> sinkhorn: their sum
//   pre_apply           read R, pre; write y_in                                          (n+1)C s + n f
//   pre_apply_backward  read R, gy_in, pre; gR += ; write gpre                           (3n+1)C s + 2n f
//   pre_fused           read R once; write y_in, pre, post, comb, proj, rstd; phi once   (n+1)C s + (2M+1) f; MK f once
//   pre_unfused         coefficients + pre_apply (reads R twice)
//   post                read y, R, post, comb; write R'                                  (2n+1)C s + n(n+1) f
//   post_backward       read y, R, gR', post, comb; write gy, gpost, gcomb (grad_residual
//                       left to pre_backward, as the layer does)                         (2n+2)C s + 2n(n+1) f
//   pre_backward        read R, gR', gy_in; write gR; small coefficient reads; phi and
//                       grad_phi once                                                    (3n+1)C s + (3M+1) f; 2MK f once
//   head                read R, write out; phi_head once                                 (n+1)C s + (2n+1) f; nK f once
//   head_backward       read R, gout; gR += ; phi_head and grad_phi_head once            (3n+1)C s + (3n+1) f; 2nK f once
//   glue                one sublayer's forward glue: pre_fused + post
//   glue_unfused        the same with the unfused chain: coefficients + pre_apply + post
//   backward            one sublayer's backward glue: post_backward + pre_backward
// FLOPs: projection 2MK per token, its backward 4MK (input gradient and grad_phi); head 2nK and 4nK.
//
// Names: <op>/<storage>/T:<tokens>/C:<hidden>/n:4[/<mapping>] with mapping mhc or hc where the op has one
// (ops on fp32 coefficients only, such as sinkhorn and gates, are listed under fp32).
// The kernels run with the instruction set mhc::default_cpu_isa() picks; MHC_CPU_ISA=baseline forces
// the baseline ones (the same bits, for a comparison).
// Usage: bench_cpu [--threads=K] [--tokens=1,16,...] [--hidden=1280,...] [--storage=fp32,bf16]
//                  [--mapping=mhc,hc] [google benchmark flags, e.g. --benchmark_filter=<regex>]
// The default is the full grid (T in {1,16,512,4096}, C in {1280,4096,7168}, fp32 and bf16, mHC and HC),
// which takes a while; for the headline shape:
//   bench_cpu --tokens=4096 --hidden=4096

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <mhc/mhc.hpp>

#if MHC_BENCH_GEMM_AVX2_FMA
void mhc_bench_gemm_avx2_fma(const float* A, const float* B, float* C, int n);  // gemm_avx2_fma.cpp
#endif

namespace {

constexpr int N = 4;
constexpr int M = mhc::coeff_count<N>;
using mhc::index_t;

int g_threads = 0;
std::vector<long> g_tokens = {1, 16, 512, 4096};
std::vector<long> g_hidden = {1280, 4096, 7168};
std::vector<std::string> g_storage = {"fp32", "bf16"};
std::vector<std::string> g_mapping = {"mhc", "hc"};

mhc::cpu& backend() {
  static mhc::cpu be(g_threads);
  return be;
}

double seconds_of(const std::function<void()>& f, int reps) {
  f();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

/// Allocates on 64-byte boundaries, as tensor libraries do (PyTorch's CPU allocator, for one): a
/// row of R then starts a cache line, and no 512-bit load of it straddles two. (std::vector's
/// default, 16 bytes for these sizes, made grad_phi 10-20% slower.)
template <class T>
struct aligned64 {
  using value_type = T;
  aligned64() = default;
  template <class U>
  aligned64(const aligned64<U>&) noexcept {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    if (void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes)) return static_cast<T*>(p);
    throw std::bad_alloc();
  }
  void deallocate(T* p, std::size_t) noexcept { std::free(p); }
  template <class U>
  bool operator==(const aligned64<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const aligned64<U>&) const noexcept { return false; }
};

/// The benchmark's buffers: 64-byte aligned.
template <class T>
using buffer = std::vector<T, aligned64<T>>;

/// Timed trials of each roofline measurement, the fastest kept: on a shared host one slow stretch of
/// a few milliseconds (5 trials of a 512^3 GEMM last about 10 ms) once halved the GEMM roofline and
/// doubled every projection step's fraction; 25 trials (about 0.6 s for the copy) make that unlikely.
constexpr int roofline_trials = 25;

/// Copy bandwidth of a memcpy of a to b with the backend's threads, counting bytes read plus bytes
/// written: the fastest of `trials` timed copies.
double copy_bandwidth_of(const buffer<char>& a, buffer<char>& b, int trials) {
  const std::size_t bytes = a.size();
  auto f = [&] {
    backend().parallel_for(index_t(bytes >> 16), 1, [&](index_t b0, index_t b1, int) {
      std::memcpy(b.data() + (b0 << 16), a.data() + (b0 << 16), std::size_t(b1 - b0) << 16);
    });
  };
  double best = 1e30;
  for (int i = 0; i < trials; ++i) best = std::min(best, seconds_of(f, 1));
  return 2.0 * double(bytes) / best;
}

/// Copy bandwidth at the start of the run (512 MiB, roofline_trials copies): the run's context.
double copy_bandwidth() {
  static const double bw = [] {
    buffer<char> a(std::size_t(512) << 20, 1), b(std::size_t(512) << 20, 0);
    return copy_bandwidth_of(a, b, roofline_trials);
  }();
  return bw;
}

/// Copy bandwidth right now (256 MiB, the fastest of 5 copies, about 0.1 s), measured after each
/// benchmark for its roofline: this host's memory bandwidth moves between about 45 and 80 GB/s from
/// one minute to the next, so a copy timed once at the start did not hold for a whole run.
double copy_bandwidth_now() {
  static buffer<char> a(std::size_t(256) << 20, 1), b(std::size_t(256) << 20, 0);
  return copy_bandwidth_of(a, b, 5);
}

/// Whether the GEMM roofline can also run Eigen's AVX2 + FMA kernels on this processor.
bool gemm_avx2_fma_available() {
#if MHC_BENCH_GEMM_AVX2_FMA
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

/// fp32 GEMM throughput (FLOP/s) of Eigen on every thread at once (each thread its own 512^3 product),
/// with the instructions bench_cpu is compiled for (avx2_fma = false) or with AVX2 + FMA.
double gemm_throughput_of(bool avx2_fma) {
  const int n = 512, threads = backend().threads();
  std::vector<Eigen::MatrixXf> A(threads, Eigen::MatrixXf::Random(n, n)), B(threads, Eigen::MatrixXf::Random(n, n)),
      Cm(threads, Eigen::MatrixXf::Zero(n, n));
  auto f = [&] {
    backend().parallel_for(threads, 1, [&](index_t b0, index_t b1, int) {
      for (auto i = b0; i < b1; ++i) {
#if MHC_BENCH_GEMM_AVX2_FMA
        if (avx2_fma) {
          mhc_bench_gemm_avx2_fma(A[i].data(), B[i].data(), Cm[i].data(), n);
          continue;
        }
#endif
        Cm[i].noalias() = A[i] * B[i];
      }
    });
  };
  double best = 1e30;
  for (int i = 0; i < roofline_trials; ++i) best = std::min(best, seconds_of(f, 2));
  return 2.0 * double(n) * n * n * threads / best;
}

/// GEMM throughput with the instructions bench_cpu is compiled for (SSE2 by default on x86-64).
double gemm_throughput_baseline() {
  static const double fl = gemm_throughput_of(false);
  return fl;
}

/// The GEMM roofline: the best of Eigen's baseline and AVX2 + FMA kernels this processor runs.
double gemm_throughput() {
  static const double fl = std::max(gemm_throughput_baseline(), gemm_avx2_fma_available() ? gemm_throughput_of(true) : 0.0);
  return fl;
}

void report(benchmark::State& st, double bytes, double flops) {
  const double copy = copy_bandwidth_now();
  const double roof = std::max(bytes / copy, flops / gemm_throughput());
  st.SetBytesProcessed(int64_t(bytes) * int64_t(st.iterations()));
  st.counters["roofline_fraction"] = benchmark::Counter(roof * double(st.iterations()), benchmark::Counter::kIsRate);
  st.counters["copy_GBps"] = copy / 1e9;
  st.counters["gemm_GFLOPs"] = gemm_throughput() / 1e9;
  st.counters["threads"] = backend().threads();
}

/// Fills v with values spread like N(0, scale^2) in mean and variance (uniform; fast for GB buffers).
template <class T>
void fill(buffer<T>& v, double scale, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& e : v) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    const double u = double(x >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
    e = mhc::storage_traits<T>::store(static_cast<mhc::compute_t<T>>(scale * 3.4641016 * (u - 0.5)));
  }
}

/// Coefficients saved by one mapping's forward, and the gradients its backward reads and writes.
template <class F>
struct saved {
  buffer<F> pre, post, comb, logits, proj, rstd, gpre, gpost, gcomb, gz;
};

/// Every buffer the ops of one (storage, T, C) touch, with SPEC.md section 7 data.
template <class T>
struct problem {
  using F = mhc::compute_t<T>;
  mhc::shape s;
  mhc::config cfg;
  buffer<T> R, Rout, y, yin, gRout, gR, gy, gyin;
  buffer<F> phi, alpha, bias, phi_head, bias_head, gphi, galpha, gbias, hw, hproj, hrstd, ws;
  saved<F> sv[2];  // [0] mhc, [1] hc
  bool prepared[2] = {false, false};

  problem(long T_, long C) : s{T_, C} {
    const std::size_t K = std::size_t(N) * C, TK = std::size_t(T_) * K, TC = std::size_t(T_) * C;
    for (auto* v : {&R, &Rout, &gRout, &gR}) v->resize(TK);
    for (auto* v : {&y, &yin, &gy, &gyin}) v->resize(TC);
    fill(R, 1.0, 1), fill(y, 1.0, 2), fill(gRout, 1.0, 3), fill(gyin, 1.0, 4);
    phi.resize(M * K), fill(phi, 1e-4, 5);
    alpha.resize(3), fill(alpha, 0.1, 6);
    bias.resize(M), fill(bias, 0.1, 7);
    phi_head.resize(N * K), fill(phi_head, 1e-4, 8);
    bias_head.resize(N), fill(bias_head, 0.1, 9);
    gphi.resize(M * K), galpha.resize(3), gbias.resize(M);
    hw.resize(T_ * N), hproj.resize(T_ * N), hrstd.resize(T_);
    auto& be = backend();
    ws.resize(std::max({mhc::ops::pre_backward_workspace_size<N, F>(be, T_, cfg.sinkhorn_iters),
                        mhc::ops::gates_backward_workspace_size<N, F>(be, T_, cfg.sinkhorn_iters),
                        mhc::ops::sinkhorn_backward_workspace_size<N, F>(be, T_, cfg.sinkhorn_iters),
                        mhc::ops::head_backward_workspace_size<N, F>(be, T_)}));
  }

  /// The saved coefficients of Mapping, computed once by the unfused chain.
  template <class Mapping>
  saved<F>& coef() {
    constexpr int m = std::is_same_v<Mapping, mhc::manifold> ? 0 : 1;
    saved<F>& c = sv[m];
    if (!prepared[m]) {
      const index_t T_ = s.tokens;
      for (auto* v : {&c.pre, &c.post, &c.gpre, &c.gpost}) v->resize(T_ * N);
      for (auto* v : {&c.comb, &c.logits, &c.gcomb}) v->resize(T_ * N * N);
      for (auto* v : {&c.proj, &c.gz}) v->resize(T_ * M);
      c.rstd.resize(T_);
      fill(c.gpre, 1.0, 10), fill(c.gpost, 1.0, 11), fill(c.gcomb, 1.0, 12), fill(c.gz, 1.0, 13);
      auto& be = backend();
      mhc::ops::projection<N, T>(be, s, view(R), view(phi), cfg.eps_rms, mut(c.proj), mut(c.rstd));
      mhc::ops::gates<N, Mapping, F>(be, T_, view(c.proj), view(c.rstd), view(alpha), view(bias), cfg, mut(c.pre),
                                     mut(c.post), mut(c.logits));
      c.comb = c.logits;
      if (std::is_same_v<Mapping, mhc::manifold>)
        mhc::ops::sinkhorn<N, F>(be, T_, view(c.logits), mut(c.comb), cfg.sinkhorn_iters, cfg.eps_sinkhorn);
      mhc::ops::head<N, T>(be, s, view(R), view(phi_head), 0.1, view(bias_head), cfg.eps_rms, cfg.eps_pre, mut(yin),
                           mut(hw), mut(hproj), mut(hrstd));
      prepared[m] = true;
    }
    return c;
  }

  template <class V>
  static mhc::view<const V> view(const buffer<V>& v) {
    return {v.data(), index_t(v.size())};
  }
  template <class V>
  static mhc::view<V> mut(buffer<V>& v) {
    return {v.data(), index_t(v.size())};
  }
};

/// The one problem alive at a time (benchmarks run in registration order, grouped by shape), built on
/// first use so that filtered-out shapes allocate nothing.
template <class T>
problem<T>& get_problem(long T_, long C) {
  static std::unique_ptr<problem<T>> p;
  if (!p || p->s.tokens != T_ || p->s.hidden != C) {
    p.reset();
    p = std::make_unique<problem<T>>(T_, C);
  }
  return *p;
}

void register_one(const std::string& name, double bytes, double flops, std::function<void()> fn) {
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
    fn();  // warm-up: builds the problem, faults the pages in
    for (auto _ : st) fn();
    report(st, bytes, flops);
  })->UseRealTime()->Unit(benchmark::kMicrosecond);
}

/// Bytes and FLOPs of the ops at one shape (the traffic model at the top of this file).
struct model {
  double T, C, K, s;
  static constexpr double f = 4, n = N, m = M;
  double residual_add() const { return T * 3 * C * s; }
  double expand() const { return T * (n + 1) * C * s; }
  double projection() const { return T * (n * C * s + (m + 1) * f) + m * K * f; }
  double projection_backward() const { return T * (3 * n * C * s + (2 * m + 1) * f) + 2 * m * K * f; }
  double gates() const { return T * (2 * m + 1) * f; }
  double gates_backward() const { return T * (3 * m + 1) * f; }
  double sinkhorn() const { return T * 2 * n * n * f; }
  double sinkhorn_backward() const { return T * 3 * n * n * f; }
  double coefficients() const { return projection() + gates() + sinkhorn(); }
  double pre_apply() const { return T * ((n + 1) * C * s + n * f); }
  double pre_apply_backward() const { return T * ((3 * n + 1) * C * s + 2 * n * f); }
  double pre_fused() const { return T * ((n + 1) * C * s + (2 * m + 1) * f) + m * K * f; }
  double post() const { return T * ((2 * n + 1) * C * s + n * (n + 1) * f); }
  double post_backward() const { return T * ((2 * n + 2) * C * s + 2 * n * (n + 1) * f); }
  double pre_backward() const { return T * ((3 * n + 1) * C * s + (3 * m + 1) * f) + 2 * m * K * f; }
  double head() const { return T * ((n + 1) * C * s + (2 * n + 1) * f) + n * K * f; }
  double head_backward() const { return T * ((3 * n + 1) * C * s + (3 * n + 1) * f) + 2 * n * K * f; }
  double proj_flops() const { return T * 2 * m * K; }
  double head_flops() const { return T * 2 * n * K; }
};

template <class T>
void register_storage_ops(long T_, long C, const std::string& sz) {
  using F = mhc::compute_t<T>;
  using P = problem<T>;
  const std::string dt = mhc::storage_traits<T>::name;
  const model md{double(T_), double(C), double(N) * double(C), double(sizeof(T))};
  auto& be = backend();
  auto pb = [T_, C]() -> P& { return get_problem<T>(T_, C); };
  const std::string tail = "/" + dt + sz;

  register_one("residual_add" + tail, md.residual_add(), 0, [pb, &be] {
    P& p = pb();
    const T* a = p.y.data();
    const T* b = p.gyin.data();
    T* out = p.gy.data();
    // A vectorised add, as a plain residual would be. fp32: one loop (the compiler vectorises it). bf16:
    // the sum of a block in floats, then the library's SSE2 row writer (the rounding in vector
    // registers; a scalar loop rounding bf16 ran at 0.4 of the copy).
    be.parallel_for(p.s.tokens * p.s.hidden, 16384, [&](index_t i0, index_t i1, int) {
      using st = mhc::storage_traits<T>;
      if constexpr (std::is_same_v<T, F>) {
        for (index_t i = i0; i < i1; ++i) out[i] = a[i] + b[i];
        return;
      }
      constexpr index_t B = 1024;
      alignas(64) F sum[B];
      for (index_t k = i0; k < i1; k += B) {
        const index_t w = std::min(B, i1 - k);
        for (index_t l = 0; l < w; ++l) sum[l] = st::load(a[k + l]) + st::load(b[k + l]);
        mhc::detail::simd_store<false>::row(out + k, sum, w);
      }
    });
  });
  register_one("expand" + tail, md.expand(), 0, [pb, &be] {
    P& p = pb();
    mhc::ops::expand<N, T>(be, p.s, P::view(p.y), P::mut(p.Rout));
  });
  register_one("expand_backward" + tail, md.expand(), 0, [pb, &be] {
    P& p = pb();
    mhc::ops::expand_backward<N, T>(be, p.s, P::view(p.gRout), P::mut(p.gy));
  });
  register_one("projection" + tail, md.projection(), md.proj_flops(), [pb, &be] {
    P& p = pb();
    auto& c = p.template coef<mhc::manifold>();
    mhc::ops::projection<N, T>(be, p.s, P::view(p.R), P::view(p.phi), p.cfg.eps_rms, P::mut(c.proj), P::mut(c.rstd));
  });
  register_one("projection_backward" + tail, md.projection_backward(), 2 * md.proj_flops(), [pb, &be] {
    P& p = pb();
    auto& c = p.template coef<mhc::manifold>();
    mhc::ops::projection_backward<N, T>(be, p.s, P::view(p.R), P::view(p.phi), P::view(c.proj), P::view(c.rstd),
                                        P::view(c.gz), P::mut(p.gR), P::mut(p.gphi));
  });
  register_one("pre_apply" + tail, md.pre_apply(), 0, [pb, &be] {
    P& p = pb();
    auto& c = p.template coef<mhc::manifold>();
    mhc::ops::pre_apply<N, T>(be, p.s, P::view(c.pre), P::view(p.R), P::mut(p.yin));
  });
  register_one("pre_apply_backward" + tail, md.pre_apply_backward(), 0, [pb, &be] {
    P& p = pb();
    auto& c = p.template coef<mhc::manifold>();
    mhc::ops::pre_apply_backward<N, T>(be, p.s, P::view(c.pre), P::view(p.R), P::view(p.gyin), P::mut(p.gR),
                                       P::mut(c.gpre));
  });
  register_one("post" + tail, md.post(), 0, [pb, &be] {
    P& p = pb();
    auto& c = p.template coef<mhc::manifold>();
    mhc::ops::post<N, T>(be, p.s, P::view(c.post), P::view(c.comb), P::view(p.y), P::view(p.R), P::mut(p.Rout));
  });
  register_one("post_backward" + tail, md.post_backward(), 0, [pb, &be] {
    P& p = pb();
    auto& c = p.template coef<mhc::manifold>();
    mhc::ops::post_backward<N, T>(be, p.s, P::view(c.post), P::view(c.comb), P::view(p.y), P::view(p.R),
                                  P::view(p.gRout), mhc::view<T>{}, P::mut(p.gy), P::mut(c.gpost), P::mut(c.gcomb));
  });
  register_one("head" + tail, md.head(), md.head_flops(), [pb, &be] {
    P& p = pb();
    p.template coef<mhc::manifold>();
    mhc::ops::head<N, T>(be, p.s, P::view(p.R), P::view(p.phi_head), 0.1, P::view(p.bias_head), p.cfg.eps_rms,
                         p.cfg.eps_pre, P::mut(p.yin), P::mut(p.hw), P::mut(p.hproj), P::mut(p.hrstd));
  });
  register_one("head_backward" + tail, md.head_backward(), 2 * md.head_flops(), [pb, &be] {
    P& p = pb();
    p.template coef<mhc::manifold>();
    mhc::ops::head_backward<N, T>(be, p.s, P::view(p.R), P::view(p.phi_head), 0.1, P::view(p.bias_head),
                                  P::view(p.hw), P::view(p.hproj), P::view(p.hrstd), P::view(p.gyin), P::mut(p.gR),
                                  mhc::view<F>(p.gphi.data(), index_t(N) * N * p.s.hidden),
                                  mhc::view<F>(p.galpha.data(), 1), mhc::view<F>(p.gbias.data(), N), P::mut(p.ws));
  });
  if constexpr (std::is_same_v<T, float>) {  // ops on fp32 coefficients only
    register_one("sinkhorn" + tail, md.sinkhorn(), 0, [pb, &be] {
      P& p = pb();
      auto& c = p.template coef<mhc::manifold>();
      mhc::ops::sinkhorn<N, F>(be, p.s.tokens, P::view(c.logits), P::mut(c.comb), p.cfg.sinkhorn_iters,
                               p.cfg.eps_sinkhorn);
    });
    register_one("sinkhorn_backward" + tail, md.sinkhorn_backward(), 0, [pb, &be] {
      P& p = pb();
      auto& c = p.template coef<mhc::manifold>();
      mhc::ops::sinkhorn_backward<N, F>(be, p.s.tokens, P::view(c.logits), P::view(c.gcomb), p.cfg.sinkhorn_iters,
                                        p.cfg.eps_sinkhorn, mhc::view<F>(c.gz.data(), p.s.tokens * N * N),
                                        P::mut(p.ws));
    });
  }
}

template <class T, class Mapping>
void register_mapping_ops(long T_, long C, const std::string& sz) {
  using F = mhc::compute_t<T>;
  using P = problem<T>;
  const std::string dt = mhc::storage_traits<T>::name;
  const model md{double(T_), double(C), double(N) * double(C), double(sizeof(T))};
  constexpr bool manifold = std::is_same_v<Mapping, mhc::manifold>;
  auto& be = backend();
  auto pb = [T_, C]() -> P& { return get_problem<T>(T_, C); };
  const std::string tail = "/" + dt + sz + "/" + Mapping::name;

  // The steps of the unfused chain and of the fused paths, as functions of the problem.
  auto coefficients = [&be](P& p) {
    auto& c = p.template coef<Mapping>();
    mhc::ops::coefficients<N, Mapping, T>(be, p.s, P::view(p.R), P::view(p.phi), P::view(p.alpha), P::view(p.bias),
                                          p.cfg, P::mut(c.pre), P::mut(c.post), P::mut(c.comb), P::mut(c.proj),
                                          P::mut(c.rstd));
  };
  auto pre_fused = [&be](P& p) {
    auto& c = p.template coef<Mapping>();
    mhc::ops::pre<N, Mapping, T>(be, p.s, P::view(p.R), P::view(p.phi), P::view(p.alpha), P::view(p.bias), p.cfg,
                                 P::mut(p.yin), P::mut(c.pre), P::mut(c.post), P::mut(c.comb), P::mut(c.proj),
                                 P::mut(c.rstd));
  };
  auto pre_apply = [&be](P& p) {
    auto& c = p.template coef<Mapping>();
    mhc::ops::pre_apply<N, T>(be, p.s, P::view(c.pre), P::view(p.R), P::mut(p.yin));
  };
  auto post = [&be](P& p) {
    auto& c = p.template coef<Mapping>();
    mhc::ops::post<N, T>(be, p.s, P::view(c.post), P::view(c.comb), P::view(p.y), P::view(p.R), P::mut(p.Rout));
  };
  auto post_backward = [&be](P& p) {
    auto& c = p.template coef<Mapping>();
    mhc::ops::post_backward<N, T>(be, p.s, P::view(c.post), P::view(c.comb), P::view(p.y), P::view(p.R),
                                  P::view(p.gRout), mhc::view<T>{}, P::mut(p.gy), P::mut(c.gpost), P::mut(c.gcomb));
  };
  auto pre_backward = [&be](P& p) {
    auto& c = p.template coef<Mapping>();
    mhc::ops::pre_backward<N, Mapping, T>(be, p.s, P::view(p.R), P::view(p.phi), P::view(p.alpha), P::view(p.bias),
                                          p.cfg, P::view(c.pre), P::view(c.comb), P::view(c.proj), P::view(c.rstd),
                                          P::view(c.gpost), P::view(c.gcomb), P::view(p.gRout), P::view(p.gyin),
                                          P::mut(p.gR), P::mut(p.gphi), P::mut(p.galpha), P::mut(p.gbias),
                                          P::mut(p.ws));
  };

  if constexpr (std::is_same_v<T, float>) {  // ops on fp32 coefficients only
    register_one("gates" + tail, md.gates(), 0, [pb, &be] {
      P& p = pb();
      auto& c = p.template coef<Mapping>();
      mhc::ops::gates<N, Mapping, F>(be, p.s.tokens, P::view(c.proj), P::view(c.rstd), P::view(p.alpha),
                                     P::view(p.bias), p.cfg, P::mut(c.pre), P::mut(c.post), P::mut(c.logits));
    });
    register_one("gates_backward" + tail, md.gates_backward(), 0, [pb, &be] {
      P& p = pb();
      auto& c = p.template coef<Mapping>();
      mhc::ops::gates_backward<N, Mapping, F>(be, p.s.tokens, P::view(c.proj), P::view(c.rstd), P::view(p.alpha),
                                              P::view(p.bias), p.cfg, P::view(c.gpre), P::view(c.gpost),
                                              P::view(c.gcomb), P::mut(c.gz), P::mut(p.galpha), P::mut(p.gbias),
                                              P::mut(p.ws));
    });
  }
  const double sk = manifold ? md.sinkhorn() : 0;
  const double coef_bytes = md.projection() + md.gates() + sk;
  register_one("coefficients" + tail, coef_bytes, md.proj_flops(), [pb, coefficients] { coefficients(pb()); });
  register_one("pre_fused" + tail, md.pre_fused(), md.proj_flops(), [pb, pre_fused] { pre_fused(pb()); });
  register_one("pre_unfused" + tail, coef_bytes + md.pre_apply(), md.proj_flops(), [pb, coefficients, pre_apply] {
    P& p = pb();
    coefficients(p);
    pre_apply(p);
  });
  register_one("pre_backward" + tail, md.pre_backward(), 2 * md.proj_flops(),
               [pb, pre_backward] { pre_backward(pb()); });
  register_one("glue" + tail, md.pre_fused() + md.post(), md.proj_flops(), [pb, pre_fused, post] {
    P& p = pb();
    pre_fused(p);
    post(p);
  });
  register_one("glue_unfused" + tail, coef_bytes + md.pre_apply() + md.post(), md.proj_flops(),
               [pb, coefficients, pre_apply, post] {
                 P& p = pb();
                 coefficients(p);
                 pre_apply(p);
                 post(p);
               });
  register_one("backward" + tail, md.post_backward() + md.pre_backward(), 2 * md.proj_flops(),
               [pb, post_backward, pre_backward] {
                 P& p = pb();
                 post_backward(p);
                 pre_backward(p);
               });
}

template <class T>
void register_shape(long T_, long C) {
  const std::string sz = "/T:" + std::to_string(T_) + "/C:" + std::to_string(C) + "/n:" + std::to_string(N);
  register_storage_ops<T>(T_, C, sz);
  for (const auto& m : g_mapping) {
    if (m == "mhc") register_mapping_ops<T, mhc::manifold>(T_, C, sz);
    if (m == "hc") register_mapping_ops<T, mhc::unconstrained>(T_, C, sz);
  }
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::size_t p = 0;
  while (p <= s.size()) {
    std::size_t q = s.find(',', p);
    if (q == std::string::npos) q = s.size();
    if (q > p) v.push_back(s.substr(p, q - p));
    p = q + 1;
  }
  return v;
}

std::vector<long> parse_list(const std::string& s) {
  std::vector<long> v;
  for (const auto& e : split(s)) v.push_back(std::stol(e));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--threads=", 0) == 0)
      g_threads = std::stoi(a.substr(10));
    else if (a.rfind("--tokens=", 0) == 0)
      g_tokens = parse_list(a.substr(9));
    else if (a.rfind("--hidden=", 0) == 0)
      g_hidden = parse_list(a.substr(9));
    else if (a.rfind("--storage=", 0) == 0)
      g_storage = split(a.substr(10));
    else if (a.rfind("--mapping=", 0) == 0)
      g_mapping = split(a.substr(10));
    else
      rest.push_back(argv[i]);
  }
  int rc = int(rest.size());
  benchmark::Initialize(&rc, rest.data());
  for (long C : g_hidden)
    for (long T_ : g_tokens)
      for (const auto& st : g_storage) {
        if (st == "fp32") register_shape<float>(T_, C);
        if (st == "bf16") register_shape<mhc::bf16>(T_, C);
      }
  benchmark::AddCustomContext("copy_GBps", std::to_string(copy_bandwidth() / 1e9));
  benchmark::AddCustomContext("gemm_GFLOPs", std::to_string(gemm_throughput() / 1e9));
  benchmark::AddCustomContext("gemm_baseline_GFLOPs", std::to_string(gemm_throughput_baseline() / 1e9));
  benchmark::AddCustomContext("mhc_cpu_isa", mhc::to_string(backend().isa()));
  benchmark::AddCustomContext("threads", std::to_string(backend().threads()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
