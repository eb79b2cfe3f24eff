#pragma once
// Shared test harness: the typed-suite parameter (backend x storage type), backend-agnostic buffers,
// random data and comparison helpers. The CUDA backend adds a make_backend/buffer specialisation and
// an instantiation; no test body changes. A translation unit compiled by nvcc with MHC_TEST_CUDA
// defined (tests/cuda/*.cu, which include a shared test_*.cpp) instantiates the typed suites for
// mhc::cuda (fp32, bf16) instead of the CPU; without a device every test of it is skipped.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <utility>
#include <string>
#include <type_traits>
#include <vector>

#include <mhc/mhc.hpp>

namespace mhc_test {

/// A typed-suite parameter: backend B, storage type T.
template <class B, class T>
struct param {
  using backend = B;
  using storage = T;
  using compute = mhc::compute_t<T>;
};

/// The backend instance tests run on.
template <class B>
B make_backend();
template <>
inline mhc::cpu make_backend<mhc::cpu>() {
  return mhc::cpu(2);
}

/// Whether the backend can run here (CUDA: a device is present). Tests GTEST_SKIP() otherwise.
template <class B>
bool backend_available() {
  return true;
}

/// A buffer of n elements of T usable by backend B. host() is the host mirror: fill it, call
/// to_device() before the op, to_host() after it. For the CPU the view points at the host memory and
/// the transfers do nothing.
template <class B, class T>
class buffer {
 public:
  explicit buffer(std::size_t n = 0, T fill = T(0)) : host_(n, fill) {}
  std::vector<T>& host() { return host_; }
  const std::vector<T>& host() const { return host_; }
  std::size_t size() const { return host_.size(); }
  void to_device() {}
  void to_host() {}
  mhc::view<T> view() { return {host_.data(), static_cast<mhc::index_t>(host_.size())}; }
  mhc::view<const T> cview() const { return {host_.data(), static_cast<mhc::index_t>(host_.size())}; }

 private:
  std::vector<T> host_;
};

/// The CPU instantiations: float, double, bf16 storage.
using cpu_types = ::testing::Types<param<mhc::cpu, float>, param<mhc::cpu, double>, param<mhc::cpu, mhc::bf16>>;

/// Whether backend B's buffers are host memory (mhc::layer, which keeps its state in std::vector, runs
/// only on such a backend). Tests of the layer skip otherwise.
template <class B>
constexpr bool host_memory() {
  return mhc::backend_traits<B>::host_memory;
}

/// In a typed test of mhc::layer: skips it on a backend whose buffers are device memory.
#define MHC_SKIP_UNLESS_HOST_MEMORY()                             \
  if (!mhc_test::host_memory<typename TypeParam::backend>())     \
  GTEST_SKIP() << "mhc::layer keeps its state in host memory: CPU backend only"

#if defined(MHC_TEST_CUDA)
template <>
inline mhc::cuda make_backend<mhc::cuda>() {
  return mhc::cuda();
}
template <>
inline bool backend_available<mhc::cuda>() {
  static const bool available = mhc::cuda_device_count() > 0;
  return available;
}

/// Aborts the test on a CUDA error of the harness itself (allocation, copies).
inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("mhc_test: ") + what + ": " + cudaGetErrorString(e));
}

/// A device buffer with a host mirror. to_device()/to_host() copy synchronously (which also waits for
/// the kernels the ops enqueued on the default stream).
template <class T>
class buffer<mhc::cuda, T> {
 public:
  explicit buffer(std::size_t n = 0, T fill = T(0)) : host_(n, fill) { allocate(); }
  buffer(const buffer& o) : host_(o.host_) {
    allocate();
    if (dev_) cuda_check(cudaMemcpy(dev_, o.dev_, bytes(), cudaMemcpyDeviceToDevice), "cudaMemcpy D2D");
  }
  buffer(buffer&& o) noexcept : host_(std::move(o.host_)), dev_(o.dev_) { o.dev_ = nullptr; }
  buffer& operator=(buffer o) noexcept {
    std::swap(host_, o.host_);
    std::swap(dev_, o.dev_);
    return *this;
  }
  ~buffer() {
    if (dev_) (void)cudaFree(dev_);
  }
  std::vector<T>& host() { return host_; }
  const std::vector<T>& host() const { return host_; }
  std::size_t size() const { return host_.size(); }
  void to_device() {
    if (dev_) cuda_check(cudaMemcpy(dev_, host_.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  void to_host() {
    if (dev_) cuda_check(cudaMemcpy(host_.data(), dev_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  }
  mhc::view<T> view() { return {dev_, static_cast<mhc::index_t>(host_.size())}; }
  mhc::view<const T> cview() const { return {dev_, static_cast<mhc::index_t>(host_.size())}; }

 private:
  std::size_t bytes() const { return host_.size() * sizeof(T); }
  void allocate() {
    if (!host_.empty() && backend_available<mhc::cuda>()) {
      void* p = nullptr;
      cuda_check(cudaMalloc(&p, bytes()), "cudaMalloc");
      dev_ = static_cast<T*>(p);
      to_device();
    }
  }
  std::vector<T> host_;
  T* dev_ = nullptr;
};

/// The CUDA instantiations: float and bf16 storage.
using test_types = ::testing::Types<param<mhc::cuda, float>, param<mhc::cuda, mhc::bf16>>;

/// Skips every test of a CUDA test program, with a message, when no device is usable here.
class cuda_environment : public ::testing::Environment {
 public:
  void SetUp() override {
    if (!backend_available<mhc::cuda>())
      GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount failed or found none): CUDA tests skipped";
  }
};
inline ::testing::Environment* const cuda_environment_registered =
    ::testing::AddGlobalTestEnvironment(new cuda_environment);
#else
/// The instantiations of the typed suites in this translation unit.
using test_types = cpu_types;
#endif

/// gtest name generator: "cpu_fp32", "cpu_bf16", ...
struct param_names {
  template <class P>
  static std::string GetName(int) {
    std::string b = host_memory<typename P::backend>() ? "cpu" : "cuda";
    return b + "_" + mhc::storage_traits<typename P::storage>::name;
  }
};

/// n standard-normal doubles times scale, reproducible from seed.
inline std::vector<double> normal(std::size_t n, double scale, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> v(n);
  for (auto& x : v) x = scale * d(g);
  return v;
}

/// Converts doubles to storage type T (one rounding each).
template <class T>
std::vector<T> to(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<mhc::compute_t<T>>(v[i]));
  return out;
}

/// Converts any storage/compute values back to double.
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
  return out;
}

/// A buffer of backend B filled from doubles (rounded to T) and already on the device.
template <class B, class T>
buffer<B, T> make_buffer(const std::vector<double>& v) {
  buffer<B, T> b(v.size());
  b.host() = to<T>(v);
  b.to_device();
  return b;
}

/// Elementwise |a - b| <= atol + rtol |b|, reporting the first few failures with their index.
inline ::testing::AssertionResult all_close(const std::vector<double>& got, const std::vector<double>& want,
                                            double atol, double rtol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  int bad = 0;
  std::string msg;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    if (!(err <= atol + rtol * std::abs(want[i]))) {
      if (bad < 5)
        msg += "\n  [" + std::to_string(i) + "] got " + std::to_string(got[i]) + " want " + std::to_string(want[i]);
      ++bad;
    }
  }
  if (bad) return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ:" << msg;
  return ::testing::AssertionSuccess();
}

/// Bitwise equality of two buffers of the same type.
template <class T>
::testing::AssertionResult bit_equal(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size " << a.size() << " != " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0)
      return ::testing::AssertionFailure() << "first difference at " << i << ": " << double(a[i]) << " vs "
                                           << double(b[i]);
  return ::testing::AssertionSuccess();
}

/// bit_equal, except that a NaN equals any NaN: between instruction sets, which operand's NaN a
/// product of two NaNs returns (so the sign of the NaN) is the compiler's choice of operand order.
template <class T>
::testing::AssertionResult bit_equal_or_nan(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size " << a.size() << " != " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = double(a[i]), y = double(b[i]);
    if (std::isnan(x) && std::isnan(y)) continue;
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0)
      return ::testing::AssertionFailure() << "first difference at " << i << ": " << x << " vs " << y;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace mhc_test
