// The work-claiming pool (see work_pool.h).
//
// One job at a time. Its claim state is one 64-bit word, so a participant decides from a
// single snapshot whether there is work and which chunk is its own:
//   bits 40..63  generation (which job)      bits 20..39  chunks in the job
//   bits  0..19  next chunk to hand out
// A claim is a compare-and-swap of that word: it fails if the job changed in between, so
// a late worker can never claim a chunk of a job whose parameters are being rewritten.
// The job's function and context are written before the word is published and read only
// after a successful claim; the caller rewrites them only once every chunk is done.
#include "work_pool.h"

#include <pthread.h>

#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define COTRT_PAUSE() _mm_pause()
#else
#define COTRT_PAUSE() std::this_thread::yield()
#endif

namespace cotrt {
namespace {

constexpr int kGenShift = 40, kCountShift = 20;
constexpr uint64_t kField = (uint64_t(1) << 20) - 1;
constexpr int64_t kMaxChunks = int64_t(kField);
constexpr int kMaxWorkers = 63;
constexpr long kDefaultSpinUs = 0;
// How long an idle worker polls for the next job before it sleeps (COTRT_CPU_SPIN_US
// overrides; default 0: sleep at once). Measured on the 2-core EPYC (bench/RESULTS.md): a
// worker that polls takes a core from the main thread's own work between two linears (a
// decode step's Python, norms, attention), and batch-1 decode was slowest with the longest
// poll (100 us: 1.01x HF, 1 ms: 0.72x; 0: 1.10-1.31x); waking costs a futex call instead.
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t = [] {
    const char* e = std::getenv("COTRT_CPU_SPIN_US");
    long v = e ? std::strtol(e, nullptr, 10) : kDefaultSpinUs;
    return std::chrono::microseconds(v < 0 ? 0 : v);
  }();
  return t;
}

inline uint64_t gen_of(uint64_t s) { return s >> kGenShift; }
inline int64_t count_of(uint64_t s) { return int64_t((s >> kCountShift) & kField); }
inline int64_t next_of(uint64_t s) { return int64_t(s & kField); }

class Pool {
 public:
  // Runs chunks of the published job until none are left; returns how many it ran.
  int64_t drain(uint64_t gen) {
    int64_t ran = 0;
    uint64_t s = state_.load(std::memory_order_acquire);
    while (gen_of(s) == gen && next_of(s) < count_of(s)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        fn_(ctx_, next_of(s));
        done_.fetch_add(1, std::memory_order_release);
        ++ran;
        s = state_.load(std::memory_order_acquire);
      }
    }
    return ran;
  }

  bool run(int64_t chunks, int threads, void (*fn)(const void*, int64_t), const void* ctx) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;  // another caller's job is running: do it alone
    start_workers(threads - 1);
    fn_ = fn;
    ctx_ = ctx;
    wanted_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (gen_of(state_.load(std::memory_order_relaxed)) + 1) & ((uint64_t(1) << 24) - 1);
    state_.store((gen << kGenShift) | (uint64_t(chunks) << kCountShift), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      wake_.notify_all();
    }
    drain(gen);
    // Only chunks already claimed remain; their owners are running them.
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096)
        COTRT_PAUSE();
      else
        std::this_thread::yield();  // the owner was descheduled: let it run
    }
    return true;
  }

  int workers() {
    std::lock_guard<std::mutex> lk(start_mutex_);
    return int(threads_.size());
  }

 private:
  void start_workers(int n) {
    if (n > kMaxWorkers) n = kMaxWorkers;
    std::lock_guard<std::mutex> lk(start_mutex_);
    while (int(threads_.size()) < n) {
      const int index = int(threads_.size());
      threads_.emplace_back([this, index] { loop(index); });
      threads_.back().detach();  // the pool lives as long as the process
    }
  }

  void loop(int index) {
    uint64_t seen = gen_of(state_.load(std::memory_order_acquire));
    for (;;) {
      uint64_t gen = wait_for_job(seen);
      seen = gen;
      if (index < wanted_.load(std::memory_order_relaxed)) drain(gen);
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + spin_time();
    for (int i = 0;; ++i) {
      uint64_t g = gen_of(state_.load(std::memory_order_acquire));
      if (g != seen) return g;
      COTRT_PAUSE();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lk(sleep_mutex_);
    sleeping_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t g;
    wake_.wait(lk, [&] { return (g = gen_of(state_.load(std::memory_order_seq_cst))) != seen; });
    sleeping_.fetch_sub(1, std::memory_order_relaxed);
    return g;
  }

  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> wanted_{0};
  std::atomic<int> sleeping_{0};
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  std::mutex run_mutex_, start_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
};

std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork;

Pool& pool() {
  std::call_once(g_atfork, [] {
    // A forked child has none of the parent's threads and may have copied a locked mutex:
    // it starts a pool of its own (the parent's is leaked, never touched again).
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh))
      p = fresh;
    else
      delete fresh;  // another thread made it first (it started no threads yet)
  }
  return *p;
}

}  // namespace

void parallel_chunks(int64_t chunks, int threads, void (*fn)(const void*, int64_t), const void* ctx) {
  if (threads <= 0) threads = int(std::thread::hardware_concurrency());
  if (threads > chunks) threads = int(chunks);
  if (threads > 1 && chunks <= kMaxChunks && pool().run(chunks, threads, fn, ctx)) return;
  for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
}

int pool_workers() {
  Pool* p = g_pool.load();
  return p ? p->workers() : 0;
}

}  // namespace cotrt
