#pragma once
/// \file
/// The CPU backend tag: carries the thread count used by every op it runs.

#include <algorithm>
#include <memory>
#include <thread>

#include "mhc/core/backend.hpp"
#include "mhc/core/config.hpp"
#include "mhc/core/error.hpp"
#include "mhc/cpu/isa.hpp"
#include "mhc/cpu/thread_pool.hpp"

namespace mhc {

/// CPU backend (Eigen types, portable C++17 loops, a persistent thread pool). Pass an instance to
/// every op or layer; copies share the same pool. Work is split over tokens (with few tokens, the
/// mixing ops also over the hidden dimension and the projection forward over the rows of phi) in
/// pieces that do not depend on the thread count, so every result is bit-identical for any number of
/// threads. The hot kernels run with the vector
/// instruction set isa() (see mhc/cpu/isa.hpp), which does not change any result either.
class cpu {
 public:
  /// A backend running on `threads` threads (0: std::thread::hardware_concurrency()) with the
  /// instruction set default_cpu_isa(). Throws mhc::error for a negative count (or a bad MHC_CPU_ISA).
  explicit cpu(int threads = 0) : isa_(default_cpu_isa()) { set_threads(threads); }

  /// A backend running on `threads` threads with the kernels of `isa`. Throws mhc::error for a
  /// negative count or an instruction set this build or processor cannot run.
  cpu(int threads, cpu_isa isa) : isa_(cpu_isa::baseline) {
    set_threads(threads);
    set_isa(isa);
  }

  /// Number of threads ops run on.
  int threads() const noexcept { return pool_->size(); }

  /// Instruction set of the kernels ops run with.
  cpu_isa isa() const noexcept { return isa_; }

  /// Changes the instruction set (same bits, different speed). Throws mhc::error, and changes nothing,
  /// when cpu_isa_supported(isa) is false. Not thread-safe with ops running on this object.
  void set_isa(cpu_isa isa) {
    if (!cpu_isa_supported(isa))
      detail::fail("cpu::set_isa", "isa", "is not supported by this build or processor", to_string(isa));
    isa_ = isa;
  }

  /// Changes the thread count (0: hardware concurrency). Not thread-safe with ops running on this object.
  void set_threads(int threads) {
    if (threads < 0) detail::fail("cpu::set_threads", "threads", "must be >= 0", threads);
    if (threads == 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    pool_ = std::make_shared<detail::thread_pool>(threads);
  }

  /// Splits [0, count) into contiguous pieces of at least `grain` items (at most one per thread) and
  /// calls f(begin, end, worker) for each; worker is in [0, threads()). f must not throw.
  template <class F>
  void parallel_for(index_t count, index_t grain, F&& f) const {
    if (count <= 0) return;
    const index_t g = grain < 1 ? 1 : grain;
    const index_t pieces = std::min<index_t>(threads(), (count + g - 1) / g);
    if (pieces <= 1) {
      f(index_t(0), count, 0);
      return;
    }
    struct job {
      F* f;
      index_t count, pieces;
    } j{&f, count, pieces};
    pool_->run(
        [](void* p, int w) {
          auto* jb = static_cast<job*>(p);
          if (w >= jb->pieces) return;
          const index_t b = jb->count * w / jb->pieces, e = jb->count * (w + 1) / jb->pieces;
          (*jb->f)(b, e, w);
        },
        &j);
  }

 private:
  std::shared_ptr<detail::thread_pool> pool_;
  cpu_isa isa_;
};

}  // namespace mhc
