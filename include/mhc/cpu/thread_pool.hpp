#pragma once
/// \file
/// A small persistent thread pool with a static partition: the pieces of work are fixed by the caller,
/// never by timing, so every result is independent of scheduling.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mhc {
namespace detail {

/// How long an idle worker, or a caller waiting for the workers, polls before it sleeps on a
/// condition variable. Waking a sleeping thread took about 20 us each way on the 2-core virtual
/// machine the benchmarks ran on (a two-piece job with nothing to do: 40-48 us), longer than many
/// ops at small token counts; ops called one after another find the workers still polling.
inline constexpr std::chrono::microseconds pool_spin_time{200};

/// A pause for a polling loop: the processor's spin-wait hint where there is one.
inline void pool_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

/// Polls ready() for up to `time`; returns whether it became true.
template <class Ready>
bool pool_spin(std::chrono::microseconds time, Ready&& ready) {
  if (time.count() <= 0) return ready();
  const auto until = std::chrono::steady_clock::now() + time;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      pool_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return ready();
  }
}

/// Runs a job on `size()` workers (the calling thread is worker 0). One job at a time per pool;
/// concurrent callers are serialised.
class thread_pool {
 public:
  explicit thread_pool(int threads)
      : threads_(threads < 1 ? 1 : threads),
        // More threads than the processor runs at once: polling would only take their time from the
        // threads with work, so they sleep at once.
        spin_(unsigned(threads_) <= std::thread::hardware_concurrency() ? pool_spin_time
                                                                        : std::chrono::microseconds(0)) {
    workers_.reserve(static_cast<std::size_t>(threads_ - 1));
    for (int w = 1; w < threads_; ++w) workers_.emplace_back([this, w] { loop(w); });
  }

  ~thread_pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_.store(true, std::memory_order_release);
    }
    cv_start_.notify_all();
    for (auto& t : workers_) t.join();
  }

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const noexcept { return threads_; }

  /// Calls fn(ctx, w) once for every worker w in [0, size()) and returns when all have finished.
  /// fn must not throw. Idle workers poll for a new job for pool_spin_time before they sleep, and
  /// the caller polls for their completion as long before it sleeps (neither polls when the pool has
  /// more threads than the processor runs at once).
  void run(void (*fn)(void*, int), void* ctx) {
    std::lock_guard<std::mutex> job(job_m_);
    if (threads_ == 1) {
      fn(ctx, 0);
      return;
    }
    fn_ = fn;  // published to the workers by the release increment of generation_
    ctx_ = ctx;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    {
      // Under m_: a worker between its check of generation_ and its wait cannot miss the notify.
      std::lock_guard<std::mutex> lk(m_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_start_.notify_all();
    fn(ctx, 0);
    const auto done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    if (pool_spin(spin_, done)) return;
    std::unique_lock<std::mutex> lk(m_);
    cv_done_.wait(lk, done);
  }

 private:
  void loop(int w) {
    std::uint64_t seen = 0;
    const auto ready = [&] {
      return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen;
    };
    for (;;) {
      if (!pool_spin(spin_, ready)) {
        std::unique_lock<std::mutex> lk(m_);
        cv_start_.wait(lk, ready);
      }
      if (stop_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      fn_(ctx_, w);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // Under m_: the caller between its check of pending_ and its wait cannot miss the notify.
        std::lock_guard<std::mutex> lk(m_);
        cv_done_.notify_one();
      }
    }
  }

  int threads_;
  std::chrono::microseconds spin_;  // pool_spin_time, or 0 when oversubscribed
  std::vector<std::thread> workers_;
  std::mutex job_m_;
  std::mutex m_;
  std::condition_variable cv_start_, cv_done_;
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int> pending_{0};
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace detail
}  // namespace mhc
