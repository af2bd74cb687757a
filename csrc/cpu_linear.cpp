// CPU decode linears (see cpu_linear.h). A decode step multiplies a handful of rows by
// every weight of the model once: it is bound by reading W, so the kernel streams each
// block of 4 weight rows from memory once and reuses it from L1 for every x row (4 rows of
// K=1536 fp32 are 24 KB). PyTorch's fp32 GEMV at M=1 ran on one core at 11-12 GB/s on the
// 2-core EPYC this was written on, where a 2-thread read streams 31-36 GB/s.
#include "cpu_linear.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "bf16.h"
#include "work_pool.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define COTRT_X86 1
#include <immintrin.h>
#endif

namespace cotrt {
namespace {

constexpr int64_t kNR = 4;  // weight rows per block (4 streams; 4 x 2 accumulators in AVX2)

inline float load_w(const void* p, WType t, int64_t i) {
  return t == WType::kF32 ? static_cast<const float*>(p)[i]
                          : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// The valve's per-row LoRA shrink t[m] = alpha[m] · x[m] A[a_m]ᵀ ([r] floats per row) and
// the row's offset into a B row (a_m · r), -1 for base-only rows (alpha 0, adapter < 0 or
// >= n_adapters), which then get no LoRA term at all. The shrink runs as the first chunks
// of the same pool job as W's rows (see Part), so it costs no serial time before the
// workers start; a chunk of W rows adds the expand, and checks once, before its first
// tile, that `left` has reached 0 (by then the shrink chunks, claimed first, are done).
struct Shrunk {
  const float* t = nullptr;  // [M, r]
  const int64_t* off = nullptr;  // [M]
  const std::atomic<int64_t>* left = nullptr;  // shrink chunks not finished yet
};

// Waits until every shrink chunk of the linear has finished (acquire: their t is visible).
// The chunks were claimed before any W chunk, so their owners are running them; a yield
// lets one that the OS descheduled run. The loop sits out of line (it is cold: the shrink is
// almost always done); the caller inlines one check.
__attribute__((noinline, cold)) void wait_shrunk_slow(const Shrunk& lo) {
  for (int spins = 0; lo.left->load(std::memory_order_acquire) > 0; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

inline void wait_shrunk(const Shrunk& lo) {
  if (lo.left && lo.left->load(std::memory_order_acquire) > 0) wait_shrunk_slow(lo);
}

// The LoRA expand of row m at output n: t[m] · B[n, a_m] (r terms), 0 for base-only rows.
inline float expand_scalar(const LinearArgs& a, const Shrunk& lo, int64_t m, int64_t n) {
  if (!lo.off || lo.off[m] < 0) return 0.f;
  const float* t = lo.t + m * a.r;
  const int64_t b0 = n * a.n_adapters * a.r + lo.off[m];
  float d = 0.f;
  for (int64_t j = 0; j < a.r; ++j) d += t[j] * load_w(a.lora_b, a.wtype, b0 + j);
  return d;
}

// bias, the LoRA term d, and the store: shared by both kernels.
inline void finish(const LinearArgs& a, int64_t m, int64_t n, float v, float d) {
  if (a.bias) v += load_w(a.bias, a.wtype, n);
  v += d;
  if (a.y_bf16)
    static_cast<uint16_t*>(a.y)[m * a.ldy + n] = f32_to_bf16(v);
  else
    static_cast<float*>(a.y)[m * a.ldy + n] = v;
}

// Portable kernel: 8 partial sums per dot product, summed in the order hsum() sums the
// AVX2 lanes (fp32 throughout; results differ from AVX2's only by FMA rounding).
void rows_scalar(const LinearArgs& a, const Shrunk& lo, int64_t n0, int64_t n1) {
  wait_shrunk(lo);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.ldx;
      float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= a.K; k += 8)
        for (int l = 0; l < 8; ++l) s[l] += x[k + l] * load_w(a.w, a.wtype, n * a.K + k + l);
      float v = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
      for (; k < a.K; ++k) v += x[k] * load_w(a.w, a.wtype, n * a.K + k);
      finish(a, m, n, v, expand_scalar(a, lo, m, n));
    }
  }
}

#ifdef COTRT_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

inline __m256 load8(const void* w, WType t, int64_t i) {
  if (t == WType::kF32) return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {  // ((0+4)+(2+6)) + ((1+5)+(3+7))
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The horizontal sums of 4 accumulators at once, each in hsum()'s order: lanes (a, b, c, d).
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
  const __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
  const __m128 d4 = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
  // [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d; then (x0+x2) + (x1+x3) for each.
  const __m128 ab = _mm_add_ps(_mm_unpacklo_ps(a4, b4), _mm_unpackhi_ps(a4, b4));
  const __m128 cd = _mm_add_ps(_mm_unpacklo_ps(c4, d4), _mm_unpackhi_ps(c4, d4));
  return _mm_add_ps(_mm_movelh_ps(ab, cd), _mm_movehl_ps(cd, ab));
}

inline __m128 load4(const void* w, WType t, int64_t i) {
  if (t == WType::kF32) return _mm_loadu_ps(static_cast<const float*>(w) + i);
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}

// NR weight rows (n..n+NR) times MR x rows (m..m+MR). A valve row's LoRA expand
// t[m] · B[n, a_m] is r more terms of the same dot product, [x, t] · [W[n], B[n, a_m]]: its
// first r & ~7 terms go into the row's accumulator before the one horizontal sum, the
// rest (r % 8) after it.
template <int NR, int MR>
inline void tile(const LinearArgs& a, const Shrunk& lo, int64_t n, int64_t m) {
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* x[MR];
  for (int j = 0; j < MR; ++j) x[j] = a.x + (m + j) * a.ldx;
  const int64_t K8 = a.K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MR];
    for (int j = 0; j < MR; ++j) xv[j] = _mm256_loadu_ps(x[j] + k);
    for (int i = 0; i < NR; ++i) {
      __m256 wv = load8(a.w, a.wtype, (n + i) * a.K + k);
      for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  const int64_t R8 = a.r & ~int64_t(7), ldb = a.n_adapters * a.r;
  if (lo.off) {
    // Every accumulator index is a constant once the loops unroll, so the accumulators
    // are not turned into a stack array. Rows on one adapter (the usual tile) share each B
    // load; a base-only row (offset < 0) takes no term.
    const float* t[MR];
    int64_t off[MR];
    bool same = true;
    for (int j = 0; j < MR; ++j) {
      off[j] = lo.off[m + j];
      t[j] = lo.t + (m + j) * a.r;
      same &= off[j] == off[0] && off[j] >= 0;
    }
    if (same) {
      for (int64_t q = 0; q < R8; q += 8) {
        __m256 tv[MR];
        for (int j = 0; j < MR; ++j) tv[j] = _mm256_loadu_ps(t[j] + q);
        for (int i = 0; i < NR; ++i) {
          const __m256 bv = load8(a.lora_b, a.wtype, (n + i) * ldb + off[0] + q);
          for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_fmadd_ps(bv, tv[j], acc[i][j]);
        }
      }
    } else {
      for (int64_t q = 0; q < R8; q += 8)
        for (int j = 0; j < MR; ++j) {
          if (off[j] < 0) continue;
          const __m256 tv = _mm256_loadu_ps(t[j] + q);
          for (int i = 0; i < NR; ++i)
            acc[i][j] = _mm256_fmadd_ps(load8(a.lora_b, a.wtype, (n + i) * ldb + off[j] + q), tv, acc[i][j]);
        }
    }
  }
  // The usual block (4 rows, no K % 8 or r % 8 tail, fp32 out): the 4 outputs of a row are
  // adjacent in y, so they are summed, biased and stored as one vector (an output at a time,
  // this epilogue took a fifth of a compute-bound call).
  if constexpr (NR == 4) {
    if (a.K == K8 && a.r == R8 && !a.y_bf16) {
      for (int j = 0; j < MR; ++j) {
        __m128 s = hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
        if (a.bias) s = _mm_add_ps(s, load4(a.bias, a.wtype, n));
        _mm_storeu_ps(static_cast<float*>(a.y) + (m + j) * a.ldy + n, s);
      }
      return;
    }
  }
  // Horizontal sums first, with constant indices (a loop over i and j with the K % 8 tail
  // inside was not unrolled, which kept every accumulator in memory), then the tails.
  float v[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) v[i][j] = hsum(acc[i][j]);
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) {
      for (int64_t k = K8; k < a.K; ++k) v[i][j] += x[j][k] * load_w(a.w, a.wtype, (n + i) * a.K + k);
      float d = 0.f;
      if (lo.off && lo.off[m + j] >= 0) {
        const float* t = lo.t + (m + j) * a.r;
        for (int64_t q = R8; q < a.r; ++q) d += t[q] * load_w(a.lora_b, a.wtype, (n + i) * ldb + lo.off[m + j] + q);
      }
      finish(a, m + j, n + i, v[i][j], d);
    }
}

template <int NR>
inline void block(const LinearArgs& a, const Shrunk& lo, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) tile<NR, 2>(a, lo, n, m);
  if (m < a.M) tile<NR, 1>(a, lo, n, m);
}

void rows_avx2(const LinearArgs& a, const Shrunk& lo, int64_t n0, int64_t n1) {
  wait_shrunk(lo);  // once a chunk, not once a tile
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) block<kNR>(a, lo, n);
  for (; n < n1; ++n) block<1>(a, lo, n);
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool cpu_has_avx2() {
  // COTRT_CPU_ISA=scalar forces the portable kernel (how the tests run it on AVX2 machines).
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(std::getenv("COTRT_CPU_ISA") && std::strcmp(std::getenv("COTRT_CPU_ISA"), "scalar") == 0);
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
void rows_avx2(const LinearArgs&, const Shrunk&, int64_t, int64_t) {}
#endif


}  // namespace

namespace {

// One linear of a pool job: its valve rows' shrink state and its chunks. Chunks are numbered
// across the job's linears: every shrink chunk first, then every block of W rows, so the
// pool (which hands chunks out in order) starts the shrinks first.
//
// The shrink runs through the W kernel itself, the adapter's r A rows as a small weight
// [r, K]: when every valve row uses one adapter (the usual case, a single row included),
// for all M rows at once in chunks of 8 A rows (x loaded once for 4 A rows and 2 x rows),
// the chunk that finishes last scaling each row by its alpha before it releases the
// expand; with several adapters, one chunk per valve row, which scales its own row.
struct Part {
  const LinearArgs* a = nullptr;
  float* t = nullptr;               // [M, r]
  int64_t* off = nullptr;           // [M]
  int64_t* valve_rows = nullptr;    // the rows with a LoRA term
  int64_t n_valve = 0;
  std::atomic<int64_t> left{0};     // shrink chunks not finished (+1 for the scaling)
  bool as_weight = false;           // one adapter: one shrink of all M rows
  LinearArgs shrink{};              // that shrink (as_weight)
  int64_t shrink_chunks = 0;
  Shrunk lo;
  int64_t rows = 0;                 // W rows per chunk
  int64_t shrink0 = 0, base0 = 0, base_chunks = 0;
};

// The valve state's storage, kept by each calling thread between calls (no allocation per
// call once it has grown; a call from another thread has its own). A part's arrays are
// used only while its call runs, and calls on one thread do not overlap.
struct Scratch {
  std::vector<float> t;
  std::vector<int64_t> idx;  // off [M], then valve_rows [M]
};

constexpr int64_t kShrinkRows = 8;  // A rows per chunk when the shrink runs as a weight

constexpr int kMaxParts = 4;

struct Job {
  Part* parts;
  int n;
  int64_t shrink_end;  // chunks [0, shrink_end) are shrinks
  bool avx2;
};

// The shrink of x rows [m0, m0 + M) as a linear: A rows of the adapter at offset `off`
// (a_m · r) times x, into y [M, r].
LinearArgs shrink_args(const LinearArgs& a, int64_t m0, int64_t M, int64_t off, float* y) {
  LinearArgs w{};
  const int64_t a0 = off * a.K;  // the adapter's first A element
  w.x = a.x + m0 * a.ldx;
  w.w = a.wtype == WType::kF32 ? static_cast<const void*>(static_cast<const float*>(a.lora_a) + a0)
                               : static_cast<const void*>(static_cast<const uint16_t*>(a.lora_a) + a0);
  w.y = y;
  w.M = M;
  w.N = a.r;
  w.K = a.K;
  w.ldx = a.ldx;
  w.ldy = a.r;
  w.wtype = a.wtype;
  return w;
}

void rows_of(const LinearArgs& a, const Shrunk& lo, int64_t n0, int64_t n1, bool avx2) {
  if (avx2)
    rows_avx2(a, lo, n0, n1);
  else
    rows_scalar(a, lo, n0, n1);
}

// Finds row m's adapter and alpha; valve rows get their offset and a shrink chunk.
void prepare(Part& p, const LinearArgs& a, int threads, Scratch& scratch) {
  p.a = &a;
  if (a.lora_a) {
    scratch.t.assign(a.M * a.r, 0.f);  // capacity kept: no allocation once grown
    scratch.idx.assign(2 * a.M, -1);
    p.t = scratch.t.data();
    p.off = scratch.idx.data();
    p.valve_rows = p.off + a.M;
    for (int64_t m = 0; m < a.M; ++m) {
      const float al = a.alpha[m * a.s_alpha];
      int64_t ad = 0;
      if (a.adapter)
        ad = a.adapter_i64 ? static_cast<const int64_t*>(a.adapter)[m * a.s_adapter]
                           : static_cast<const int32_t*>(a.adapter)[m * a.s_adapter];
      if (al == 0.f || ad < 0 || ad >= a.n_adapters) continue;
      p.off[m] = ad * a.r;
      p.valve_rows[p.n_valve++] = m;
    }
    if (p.n_valve > 0) {  // else every row is base-only: no LoRA term at all
      p.as_weight = true;
      for (int64_t i = 0; i < p.n_valve; ++i) p.as_weight &= p.off[p.valve_rows[i]] == p.off[p.valve_rows[0]];
      if (p.as_weight) {
        p.shrink = shrink_args(a, 0, a.M, p.off[p.valve_rows[0]], p.t);
        p.shrink_chunks = (a.r + kShrinkRows - 1) / kShrinkRows;
        p.left.store(p.shrink_chunks + 1, std::memory_order_relaxed);
      } else {
        p.shrink_chunks = p.n_valve;
        p.left.store(p.shrink_chunks, std::memory_order_relaxed);
      }
      p.lo = Shrunk{p.t, p.off, &p.left};
    }
  }
  // Chunks of whole 4-row blocks, about 8 per thread, claimed by whichever thread is free
  // (work_pool.h): a thread the OS deschedules delays only the chunk it holds.
  const int64_t blocks = (a.N + kNR - 1) / kNR;
  const int64_t per = std::max<int64_t>(4, (blocks + 8 * threads - 1) / (8 * threads));
  p.rows = per * kNR;
  p.base_chunks = (blocks + per - 1) / per;
}

void run_chunk(const void* ctx, int64_t c) {
  const Job& j = *static_cast<const Job*>(ctx);
  int i = 0;
  if (c < j.shrink_end) {
    while (c >= j.parts[i].shrink0 + j.parts[i].shrink_chunks) ++i;
    Part& p = j.parts[i];
    const LinearArgs& a = *p.a;
    if (p.as_weight) {
      const int64_t n0 = (c - p.shrink0) * kShrinkRows;
      rows_of(p.shrink, Shrunk{}, n0, std::min(n0 + kShrinkRows, a.r), j.avx2);
      if (p.left.fetch_sub(1, std::memory_order_acq_rel) != 2) return;
      for (int64_t i = 0; i < p.n_valve; ++i) {  // the last chunk: every row's alpha, then the release
        const int64_t m = p.valve_rows[i];
        for (int64_t q = 0; q < a.r; ++q) p.t[m * a.r + q] *= a.alpha[m * a.s_alpha];
      }
      p.left.fetch_sub(1, std::memory_order_release);
      return;
    }
    const int64_t m = p.valve_rows[c - p.shrink0];
    rows_of(shrink_args(a, m, 1, p.off[m], p.t + m * a.r), Shrunk{}, 0, a.r, j.avx2);
    for (int64_t q = 0; q < a.r; ++q) p.t[m * a.r + q] *= a.alpha[m * a.s_alpha];
    p.left.fetch_sub(1, std::memory_order_release);
    return;
  }
  while (c >= j.parts[i].base0 + j.parts[i].base_chunks) ++i;
  const Part& p = j.parts[i];
  const int64_t n0 = (c - p.base0) * p.rows;
  rows_of(*p.a, p.lo, n0, std::min(n0 + p.rows, p.a->N), j.avx2);
}

}  // namespace

void linears(const LinearArgs* const* as, int n) {
  if (n > kMaxParts) {
    for (int i = 0; i < n; ++i) linears(&as[i], 1);
    return;
  }
  int threads = 1;
  for (int i = 0; i < n; ++i) threads = std::max(threads, as[i]->threads);
  thread_local Scratch scratch[kMaxParts];
  Part parts[kMaxParts];
  int64_t shrinks = 0;
  for (int i = 0; i < n; ++i) {
    prepare(parts[i], *as[i], threads, scratch[i]);
    parts[i].shrink0 = shrinks;
    shrinks += parts[i].shrink_chunks;
  }
  int64_t chunks = shrinks;
  for (int i = 0; i < n; ++i) {
    parts[i].base0 = chunks;
    chunks += parts[i].base_chunks;
  }
  const Job job{parts, n, shrinks, cpu_has_avx2()};
  parallel_chunks(chunks, threads, run_chunk, &job);
}

void linear(const LinearArgs& a) {
  const LinearArgs* one = &a;
  linears(&one, 1);
}

const char* isa() { return cpu_has_avx2() ? "avx2" : "scalar"; }

int workers() { return pool_workers(); }

}  // namespace cotrt
