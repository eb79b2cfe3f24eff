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
#include <atomic>
#include <string>

#include "mhc/core/error.hpp"

#if !defined(MHC_NO_AVX2_KERNELS) && !defined(__CUDACC__) && defined(__x86_64__) && \
    (defined(__GNUC__) || defined(__clang__))
/// Defined to 1 when this build carries the AVX2 kernels (x86-64, GCC or Clang, not nvcc).
#define MHC_HAVE_AVX2_KERNELS 1
/// Compiles one function for AVX2 (without FMA, so no contraction changes a result).
#define MHC_TARGET_AVX2 __attribute__((target("avx2")))
#include <immintrin.h>
/// Keeps a loaded vector in its register: a value used by several products would otherwise be
/// reloaded by each (GCC folds the load into every multiply), and the loads, not the arithmetic,
/// then bound the kernel.
#define MHC_KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
/// Compiles one function for AVX2 with the 32 vector registers of AVX-512VL, still on 256-bit
/// vectors (the same lanes as the AVX2 kernels). AVX-512 carries fused multiply-adds: such kernels
/// keep every product opaque (MHC_KEEP_IN_REGISTER) so no contraction can change a result.
#define MHC_TARGET_AVX512VL __attribute__((target("avx2,avx512f,avx512vl")))
/// Compiles one function for AVX-512 with its bf16 conversion (512-bit vectors). Such kernels work
/// element by element (so the vector width changes no result), keep every product opaque as above,
/// and send every value the conversion would round differently (NaN, subnormal) to the scalar code.
#define MHC_TARGET_AVX512BF16 __attribute__((target("avx2,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")))
#else
#define MHC_HAVE_AVX2_KERNELS 0
#endif

namespace mhc {

/// Vector instruction sets the CPU backend's kernels run with. Every choice computes the same bits.
enum class cpu_isa {
  baseline,  ///< the compiler's target for the including program (SSE2 on x86-64 by default)
  avx2,      ///< 256-bit AVX2 kernels (x86-64 with GCC or Clang, processor with AVX2); where the
             ///< processor also has AVX-512VL, some use its 32 registers (the same 256-bit lanes)
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

namespace detail {
/// Whether this build and processor can run the AVX-512VL variants of the AVX2 kernels.
inline bool avx512vl_supported() noexcept {
#if MHC_HAVE_AVX2_KERNELS
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  }();
  return yes;
#else
  return false;
#endif
}

/// Whether this build and processor can run the AVX-512 bf16 variants of the AVX2 kernels
/// (AVX-512F, VL, BW, DQ and BF16).
inline bool avx512bf16_supported() noexcept {
#if MHC_HAVE_AVX2_KERNELS
  static const bool yes = [] {
    __builtin_cpu_init();
    return avx512vl_supported() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
#else
  return false;
#endif
}

/// Whether the AVX2 kernels may use their AVX-512 variants (AVX-512VL's registers, AVX-512 bf16
/// conversion; same bits) where the processor has them. Tests clear it to run the plain AVX2 variants too.
inline std::atomic<bool> avx512vl_allowed{true};

/// Whether the AVX2 kernels use their AVX-512VL variants now.
inline bool avx512vl_kernels() noexcept {
  return avx512vl_supported() && avx512vl_allowed.load(std::memory_order_relaxed);
}

/// Whether the AVX2 kernels use their AVX-512 bf16 variants now.
inline bool avx512bf16_kernels() noexcept {
  return avx512bf16_supported() && avx512vl_allowed.load(std::memory_order_relaxed);
}
}  // namespace detail

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
