// The GEMM roofline of bench_cpu with AVX2 and FMA, for processors that have them: the library's
// kernels choose AVX2 at run time (mhc/cpu/isa.hpp), so the GEMM they are compared with must use the
// widest instructions too, not only the baseline the rest of bench_cpu is compiled for. This file
// alone is compiled with -mavx2 -mfma (benchmarks/CMakeLists.txt) and is called only after a run-time
// check. Eigen is renamed here so that its AVX2 template instantiations get their own symbols and can
// never be merged by the linker with the baseline ones in bench_cpu.cpp.
#define Eigen mhc_bench_eigen_avx2_fma
#include <Eigen/Core>

/// C = A B for n x n column-major fp32 matrices, with Eigen's AVX2 + FMA kernels.
void mhc_bench_gemm_avx2_fma(const float* A, const float* B, float* C, int n) {
  using Matrix = mhc_bench_eigen_avx2_fma::Matrix<float, mhc_bench_eigen_avx2_fma::Dynamic, mhc_bench_eigen_avx2_fma::Dynamic>;
  const mhc_bench_eigen_avx2_fma::Map<const Matrix> a(A, n, n), b(B, n, n);
  mhc_bench_eigen_avx2_fma::Map<Matrix> c(C, n, n);
  c.noalias() = a * b;
}
