#pragma once
/// \file
/// Run-time choice of the vector instruction set of the CPU backend's hot kernels.
///
/// The library is compiled for the compiler's baseline target (SSE2 on x86-64; no `-march=native`),
/// and on x86-64 with GCC or Clang it also carries AVX2 versions of its hot kernels, compiled with
/// `__attribute__((target("avx2")))` and chosen at run time where the processor has AVX2. The AVX2
/// kernels keep every sum in the same order (the projection's eight lanes are one 256-bit register)
/// and never contract `a * b + c` into a fused multiply-add ("fma" is not in their target), so every
/// instruction set gives the same bits. Define `MHC_NO_AVX2_KERNELS` before including mhc to leave
/// the AVX2 kernels out.

#include <cstdlib>
#include <cstring>
#include <string>

#include "mhc/core/error.hpp"

#if !defined(MHC_NO_AVX2_KERNELS) && !defined(__CUDACC__) && defined(__x86_64__) && \
    (defined(__GNUC__) || defined(__clang__))
/// Defined to 1 when this build carries the AVX2 kernels (x86-64, GCC or Clang, not nvcc).
#define MHC_HAVE_AVX2_KERNELS 1
/// Compiles one function for AVX2 (without FMA, so no contraction changes a result).
#define MHC_TARGET_AVX2 __attribute__((target("avx2")))
#include <immintrin.h>
#else
#define MHC_HAVE_AVX2_KERNELS 0
#endif

namespace mhc {

/// Vector instruction sets the CPU backend's kernels run with. Every choice computes the same bits.
enum class cpu_isa {
  baseline,  ///< the compiler's target for the including program (SSE2 on x86-64 by default)
  avx2,      ///< 256-bit AVX2 kernels (x86-64 with GCC or Clang, processor with AVX2)
};

/// Name of an instruction set as MHC_CPU_ISA spells it: "baseline" or "avx2".
inline const char* to_string(cpu_isa isa) noexcept { return isa == cpu_isa::avx2 ? "avx2" : "baseline"; }

/// Whether this build and this processor can run the kernels of `isa`.
inline bool cpu_isa_supported(cpu_isa isa) noexcept {
  if (isa == cpu_isa::baseline) return true;
#if MHC_HAVE_AVX2_KERNELS
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return avx2;
#else
  return false;
#endif
}

/// The instruction set a new mhc::cpu backend uses: the environment variable MHC_CPU_ISA when it is
/// set ("baseline" or "avx2"), otherwise the widest one cpu_isa_supported() accepts. Throws mhc::error
/// when MHC_CPU_ISA names something else or an instruction set this build or processor cannot run.
inline cpu_isa default_cpu_isa() {
  const char* env = std::getenv("MHC_CPU_ISA");
  if (env == nullptr || *env == '\0') return cpu_isa_supported(cpu_isa::avx2) ? cpu_isa::avx2 : cpu_isa::baseline;
  cpu_isa isa = cpu_isa::baseline;
  if (std::strcmp(env, "baseline") == 0)
    isa = cpu_isa::baseline;
  else if (std::strcmp(env, "avx2") == 0)
    isa = cpu_isa::avx2;
  else
    detail::fail("default_cpu_isa", "MHC_CPU_ISA", "must be \"baseline\" or \"avx2\"", std::string(env));
  if (!cpu_isa_supported(isa))
    detail::fail("default_cpu_isa", "MHC_CPU_ISA", "names an instruction set this build or processor cannot run",
                 std::string(env));
  return isa;
}

namespace detail {

#if MHC_HAVE_AVX2_KERNELS
/// Runs fn() compiled for AVX2: fn must be an always-inline lambda (MHC_ALWAYS_INLINE_LAMBDA), so its
/// body, and the always-inline helpers it calls, are compiled here with 256-bit vectors.
template <class Fn>
MHC_TARGET_AVX2 __attribute__((noinline)) void run_avx2(Fn& fn) {
  fn();
}
#endif

/// Runs fn() with the kernels of `isa`: the body of the always-inline lambda fn is compiled once for
/// the baseline and once for AVX2 (where this build carries AVX2 kernels), and `isa` picks one.
template <class Fn>
inline void with_isa(cpu_isa isa, Fn&& fn) {
#if MHC_HAVE_AVX2_KERNELS
  if (isa == cpu_isa::avx2) return run_avx2(fn);
#endif
  (void)isa;
  fn();
}

}  // namespace detail
}  // namespace mhc
