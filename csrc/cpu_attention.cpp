// CPU decode attention over a paged KV cache (see cpu_attention.h).
//
// Work items are (row, kv head, key range of at most kAttentionSplit keys). An item loads
// its kv head's G queries once (fp32, pre-scaled) and reads each of its K and V rows once
// from memory for all G of them: scores in tiles of 2 queries x 4 keys (8 accumulators;
// the K rows come from L1 for the other queries), prefetching K rows ahead and the same
// keys' V rows into L2 (pages scatter the rows, which defeats the hardware prefetcher at
// every page boundary); a softmax over the item's score rows; then P·V in tiles of
// 2 queries x 32 columns (the item's V rows, 32 KB at D=64 fp32, stay in L1/L2 across
// the G queries). An item covering a whole row writes the output; the items of a longer
// row store (max, sum, unnormalized acc) and whichever finishes last merges them by
// log-sum-exp, so no second pass over the pool is needed.
//
// SmolLM2's shape (H 9, KVH 3, D 64, fp32) at 1 thread on the loaded 2-core EPYC
// (bench/bench_cpu_attention.py --threads 1): B=1, L=1024 in 148 us against 288 us for
// SDPA over the slot views; B=8, L=1024 (12.6 MB of K/V) 3.2 ms against 4.0 ms, both
// bound by memory.
#include "cpu_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_linear.h"  // isa(): the AVX2/FMA check shared with the linear kernel
#include "bf16.h"
#include "work_pool.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define COTRT_X86 1
#include <immintrin.h>
#endif

namespace cotrt {
namespace {

constexpr int64_t kC = kAttentionSplit;
constexpr int64_t kPrefetch = 8;  // keys ahead the scores loop prefetches K rows
static_assert(kC % 8 == 0, "score rows are processed in whole 8-float vectors");

template <bool BF16>
inline float load1(const void* p, int64_t i) {
  if (BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

inline int64_t load_index(const void* p, bool i64, int64_t i) {
  return i64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// What an item computes for its G queries over its nk keys (off[j]: element offset of key
// j's K and V row): m[g] = max score, l[g] = Σ exp(s - m), acc[g] = Σ exp(s - m) · v.
// s is scratch of G rows of kC floats.
struct Attend {
  const void* k;
  const void* v;
  const int64_t* off;
  int64_t nk;
  const float* q;  // [G, D], scale folded in
  int64_t G, D;
  float softcap;  // <= 0: none
  float* s;       // [G, kC]
  float* m;       // [G]
  float* l;       // [G]
  float* acc;     // [G, D]
};

// ---------------------------------------------------------------------------- portable

template <bool BF16>
void attend_scalar(const Attend& w) {
  for (int64_t g = 0; g < w.G; ++g) {
    const float* q = w.q + g * w.D;
    float* s = w.s + g * kC;
    float mx = -INFINITY;
    for (int64_t j = 0; j < w.nk; ++j) {
      float d = 0.f;
      for (int64_t i = 0; i < w.D; ++i) d += q[i] * load1<BF16>(w.k, w.off[j] + i);
      if (w.softcap > 0.f) d = w.softcap * std::tanh(d / w.softcap);
      s[j] = d;
      mx = std::max(mx, d);
    }
    if (!(mx > -INFINITY)) mx = 0.f;  // every score -inf: p = 0, not NaN
    float sum = 0.f;
    for (int64_t j = 0; j < w.nk; ++j) sum += (s[j] = std::exp(s[j] - mx));
    w.m[g] = mx;
    w.l[g] = sum;
    float* acc = w.acc + g * w.D;
    std::fill(acc, acc + w.D, 0.f);
    for (int64_t j = 0; j < w.nk; ++j)
      for (int64_t i = 0; i < w.D; ++i) acc[i] += s[j] * load1<BF16>(w.v, w.off[j] + i);
  }
}

// ---------------------------------------------------------------------------- AVX2 + FMA

#ifdef COTRT_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

template <bool BF16>
inline __m256 load8(const void* p, int64_t i) {
  if (!BF16) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// [Σa, Σb, Σc, Σd] of four 8-lane vectors.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// e^x, Cephes' expf polynomial (max rel. error ~2 ulp); x <= -88.38 (and NaN) gives 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n·ln2, ln2 in two parts
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));  // n = -127 (x clamped low): e = 0
}

// tanh x, Cephes' tanhf: an odd polynomial below |x| = 0.625 (where 1 - 2/(e^2x + 1)
// would cancel), 1 - 2/(e^2|x| + 1) with x's sign above.
inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 ax = _mm256_andnot_ps(sign, x);
  __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.f),
                             _mm256_div_ps(_mm256_set1_ps(2.f),
                                           _mm256_add_ps(exp8(_mm256_add_ps(ax, ax)), _mm256_set1_ps(1.f))));
  big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
  __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  return _mm256_blendv_ps(small, big, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_GE_OQ));
}

// Scores of NQ queries (g, g+1) x 4 keys (o): 4·NQ accumulators, each K vector loaded
// once for the NQ queries and each q vector once for the 4 keys.
template <bool BF16, int NQ>
inline void scores_tile(const Attend& w, const int64_t* o, int64_t j, int64_t r, int64_t g) {
  const int64_t D8 = w.D & ~int64_t(7);
  const float* q = w.q + g * w.D;
  __m256 a[NQ][4];
  for (int n = 0; n < NQ; ++n)
    for (int i = 0; i < 4; ++i) a[n][i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D8; d += 8) {
    __m256 kv[4];
    for (int i = 0; i < 4; ++i) kv[i] = load8<BF16>(w.k, o[i] + d);
    for (int n = 0; n < NQ; ++n) {
      const __m256 qv = _mm256_loadu_ps(q + n * w.D + d);
      for (int i = 0; i < 4; ++i) a[n][i] = _mm256_fmadd_ps(kv[i], qv, a[n][i]);
    }
  }
  for (int n = 0; n < NQ; ++n) {
    float res[4];
    _mm_storeu_ps(res, hsum4(a[n][0], a[n][1], a[n][2], a[n][3]));
    for (int64_t d = D8; d < w.D; ++d)
      for (int i = 0; i < 4; ++i) res[i] += q[n * w.D + d] * load1<BF16>(w.k, o[i] + d);
    for (int64_t i = 0; i < r; ++i) w.s[(g + n) * kC + j + i] = res[i];
  }
}

template <bool BF16>
void scores_avx2(const Attend& w) {
  const int64_t row_bytes = w.D * (BF16 ? 2 : 4);
  const char* kb = static_cast<const char*>(w.k);
  const char* vb = static_cast<const char*>(w.v);
  for (int64_t j = 0; j < w.nk; j += 4) {
    const int64_t r = std::min<int64_t>(4, w.nk - j);
    int64_t o[4];
    for (int i = 0; i < 4; ++i) o[i] = w.off[j + std::min<int64_t>(i, r - 1)];  // pad with a live key
    // Pages scatter the rows, so the hardware prefetcher loses the stream at every page
    // boundary: fetch K rows kPrefetch keys ahead, and this group's V rows for the P·V
    // pass (which reads them from L2 then).
    for (int64_t i = j + kPrefetch; i < std::min(j + kPrefetch + 4, w.nk); ++i)
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(kb + w.off[i] * (BF16 ? 2 : 4) + b, _MM_HINT_T0);
    for (int64_t i = j; i < j + r; ++i)
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(vb + w.off[i] * (BF16 ? 2 : 4) + b, _MM_HINT_T1);
    int64_t g = 0;
    for (; g + 2 <= w.G; g += 2) scores_tile<BF16, 2>(w, o, j, r, g);
    if (g < w.G) scores_tile<BF16, 1>(w, o, j, r, g);
  }
}

// Softcap, max, exp and sum of one score row, over whole vectors: the row is padded to a
// multiple of 8 with -inf (exp gives 0 there), so no scalar tail.
inline void softmax_row_avx2(float* s, int64_t nk, float softcap, float* m, float* l) {
  const int64_t n8 = (nk + 7) & ~int64_t(7);
  if (softcap > 0.f) {
    const __m256 c = _mm256_set1_ps(softcap), inv = _mm256_set1_ps(1.f / softcap);
    for (int64_t j = 0; j < n8; j += 8)
      _mm256_storeu_ps(s + j, _mm256_mul_ps(c, tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + j), inv))));
  }
  for (int64_t j = nk; j < n8; ++j) s[j] = -INFINITY;
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n8; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
  float mx = hmax(mv);
  if (!(mx > -INFINITY)) mx = 0.f;
  const __m256 mb = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mb));
    _mm256_storeu_ps(s + j, p);
    sum = _mm256_add_ps(sum, p);
  }
  *m = mx;
  *l = hsum(sum);
}

// acc[g.., d0:d0+8·NV] = Σ_j p[g.., j] · v_j[d0:d0+8·NV] for NQ queries: NQ·NV
// accumulators in registers, each V vector loaded once for the NQ queries.
template <bool BF16, int NQ, int NV>
inline void pv_tile(const Attend& w, int64_t g, int64_t d0) {
  const float* p = w.s + g * kC;
  __m256 a[NQ][NV];
  for (int n = 0; n < NQ; ++n)
    for (int i = 0; i < NV; ++i) a[n][i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < w.nk; ++j) {
    __m256 pj[NQ];
    for (int n = 0; n < NQ; ++n) pj[n] = _mm256_broadcast_ss(p + n * kC + j);
    const int64_t o = w.off[j] + d0;
    for (int i = 0; i < NV; ++i) {
      const __m256 vv = load8<BF16>(w.v, o + 8 * i);
      for (int n = 0; n < NQ; ++n) a[n][i] = _mm256_fmadd_ps(pj[n], vv, a[n][i]);
    }
  }
  for (int n = 0; n < NQ; ++n)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(w.acc + (g + n) * w.D + d0 + 8 * i, a[n][i]);
}

template <bool BF16, int NV>
inline void pv_block_avx2(const Attend& w, int64_t d0) {
  int64_t g = 0;
  for (; g + 2 <= w.G; g += 2) pv_tile<BF16, 2, NV>(w, g, d0);
  if (g < w.G) pv_tile<BF16, 1, NV>(w, g, d0);
}

template <bool BF16>
void attend_avx2(const Attend& w) {
  scores_avx2<BF16>(w);
  for (int64_t g = 0; g < w.G; ++g) softmax_row_avx2(w.s + g * kC, w.nk, w.softcap, w.m + g, w.l + g);
  int64_t d = 0;
  for (; d + 32 <= w.D; d += 32) pv_block_avx2<BF16, 4>(w, d);
  for (; d + 8 <= w.D; d += 8) pv_block_avx2<BF16, 1>(w, d);
  for (; d < w.D; ++d)
    for (int64_t g = 0; g < w.G; ++g) {
      float t = 0.f;
      for (int64_t j = 0; j < w.nk; ++j) t += w.s[g * kC + j] * load1<BF16>(w.v, w.off[j] + d);
      w.acc[g * w.D + d] = t;
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
template <bool BF16>
void attend_avx2(const Attend&) {}
#endif

// ---------------------------------------------------------------------------- driver

// Keys [n0, n1) of row b for kv head h. part: its slot in the partials buffer, or -1 when
// the item covers the whole row (it then writes the output itself).
struct Item {
  int64_t b, h, n0, n1, group, part;
};

struct Group {              // the items of one (row, kv head) split into key ranges
  std::atomic<int> left{0};  // items not finished yet
  int64_t first_part = 0, parts = 0;
};

struct Job {
  const PagedAttentionArgs* a;
  const Item* items;
  int64_t n_items, per_chunk, G;
  Group* groups;
  float* partials;  // [parts, 2G + G·D]: m[G], l[G], acc[G, D]
  bool avx2;
};

struct Scratch {  // per thread, reused across calls
  std::vector<float> q, s, state;
  std::vector<int64_t> off;
};

void store_out(const PagedAttentionArgs& a, int64_t b, int64_t head, int64_t d, float v) {
  const int64_t i = b * a.sob + head * a.soh + d;
  if (a.io_bf16)
    static_cast<uint16_t*>(a.out)[i] = f32_to_bf16(v);
  else
    static_cast<float*>(a.out)[i] = v;
}

// Writes the G output heads of kv head h from n partial states (m, l, acc) at stride
// `stride` floats: out = Σ acc_i e^(m_i - M) / Σ l_i e^(m_i - M), M = max m_i, summed in
// part order (the merge does not depend on which thread runs it).
void finish(const PagedAttentionArgs& a, int64_t G, int64_t b, int64_t h, const float* st, int64_t n,
            int64_t stride) {
  const int64_t D = a.D;
  std::vector<float> w(n > 1 ? n : 0);
  for (int64_t g = 0; g < G; ++g) {
    if (n == 1) {
      const float inv = st[G + g] > 0.f ? 1.f / st[G + g] : 0.f;
      for (int64_t d = 0; d < D; ++d) store_out(a, b, h * G + g, d, st[2 * G + g * D + d] * inv);
      continue;
    }
    float M = -INFINITY;
    for (int64_t i = 0; i < n; ++i) M = std::max(M, st[i * stride + g]);
    float L = 0.f;
    for (int64_t i = 0; i < n; ++i) L += (w[i] = std::exp(st[i * stride + g] - M)) * st[i * stride + G + g];
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int64_t d = 0; d < D; ++d) {
      float t = 0.f;
      for (int64_t i = 0; i < n; ++i) t += w[i] * st[i * stride + 2 * G + g * D + d];
      store_out(a, b, h * G + g, d, t * inv);
    }
  }
}

void run_item(const Job& job, const Item& it, Scratch& w) {
  const PagedAttentionArgs& a = *job.a;
  const int64_t G = job.G, D = a.D, nk = it.n1 - it.n0, row = a.KVH * D;
  w.q.resize(G * D);
  w.s.resize(G * kC);
  w.state.resize(2 * G + G * D);  // m, l and acc side by side: the partial-state layout
  w.off.resize(kC);
  // Element offsets of the item's keys, walked page by page (no division per key).
  for (int64_t n = it.n0, j = 0; n < it.n1;) {
    const int64_t pg = n / a.PS;
    const int64_t page = load_index(a.block_tables, a.tables_i64, it.b * a.sbt + pg);
    const int64_t end = std::min(it.n1, (pg + 1) * a.PS);
    for (int64_t o = ((page * a.PS + (n - pg * a.PS)) * a.KVH + it.h) * D; n < end; ++n, ++j, o += row)
      w.off[j] = o;
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t q0 = it.b * a.sqb + (it.h * G + g) * a.sqh;
    for (int64_t d = 0; d < D; ++d)
      w.q[g * D + d] = a.scale * (a.io_bf16 ? load1<true>(a.q, q0 + d) : load1<false>(a.q, q0 + d));
  }
  float* st = w.state.data();
  const Attend at{a.k, a.v, w.off.data(), nk, w.q.data(), G, D, a.softcap, w.s.data(), st, st + G, st + 2 * G};
  if (job.avx2)
    a.cache_bf16 ? attend_avx2<true>(at) : attend_avx2<false>(at);
  else
    a.cache_bf16 ? attend_scalar<true>(at) : attend_scalar<false>(at);
  const int64_t stride = 2 * G + G * D;
  if (it.part < 0) {
    finish(a, G, it.b, it.h, st, 1, stride);
    return;
  }
  std::memcpy(job.partials + it.part * stride, st, sizeof(float) * stride);
  Group& grp = job.groups[it.group];
  if (grp.left.fetch_sub(1, std::memory_order_acq_rel) == 1)  // the last one merges
    finish(a, G, it.b, it.h, job.partials + grp.first_part * stride, grp.parts, stride);
}

}  // namespace

void paged_decode_attention(const PagedAttentionArgs& a) {
  if (a.B <= 0 || a.H <= 0 || a.D <= 0 || a.KVH <= 0) return;
  const int64_t G = a.H / a.KVH, cap = a.NP * a.PS;
  // Rows, serially: clamp the length, check the pages the row needs, cut it into items.
  std::vector<Item> items;
  std::vector<int64_t> group_parts;  // per group: its item count when split, 0 otherwise
  int64_t parts = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t L = std::clamp<int64_t>(load_index(a.lengths, a.lengths_i64, b * a.sl), 0, cap);
    const int64_t lo = a.window > 0 ? std::max<int64_t>(0, L - a.window) : 0;
    bool ok = L > lo;
    for (int64_t pg = ok ? lo / a.PS : 0; ok && pg < (L + a.PS - 1) / a.PS; ++pg) {
      const int64_t page = load_index(a.block_tables, a.tables_i64, b * a.sbt + pg);
      ok = page >= 0 && page < a.P;
    }
    if (!ok) {  // no key, or a page id out of range: zeros
      for (int64_t h = 0; h < a.H; ++h)
        for (int64_t d = 0; d < a.D; ++d) store_out(a, b, h, d, 0.f);
      continue;
    }
    // Key range by key range, the kv heads of a range next to each other: a page holds
    // [PS, KVH, D], so consecutive items (one thread's, or both threads' at once) read one
    // contiguous stretch of it rather than strided rows of pages far apart. (On the loaded
    // 2-core EPYC the two orders timed alike, within noise: B=8, L=1024, 1.6-3.4 ms.)
    const int64_t n_split = (L - lo + kC - 1) / kC, group0 = int64_t(group_parts.size());
    for (int64_t h = 0; h < a.KVH; ++h) group_parts.push_back(n_split > 1 ? n_split : 0);
    for (int64_t i = 0; i < n_split; ++i)
      for (int64_t h = 0; h < a.KVH; ++h)
        items.push_back({b, h, lo + i * kC, std::min(L, lo + (i + 1) * kC), group0 + h,
                         n_split > 1 ? parts + h * n_split + i : -1});
    if (n_split > 1) parts += a.KVH * n_split;
  }
  if (items.empty()) return;
  std::unique_ptr<Group[]> groups(new Group[group_parts.size()]);
  for (int64_t g = 0, first = 0; g < int64_t(group_parts.size()); ++g) {
    groups[g].left.store(int(group_parts[g]), std::memory_order_relaxed);
    groups[g].first_part = first;
    groups[g].parts = group_parts[g];
    first += group_parts[g];
  }
  std::vector<float> partials(parts * (2 * G + G * a.D));
  const int64_t n_items = int64_t(items.size());
  // Waking a pool worker costs a few microseconds (a futex call, the worker sleeping at
  // once: work_pool.cpp): each thread past the first must get ~10 us of work, 2^18 FMAs.
  int64_t fmas = 0;
  for (const Item& it : items) fmas += 2 * (it.n1 - it.n0) * G * a.D;
  const int threads = int(std::clamp<int64_t>(fmas >> 18, 1, a.threads > 0 ? a.threads : 1));
  const int64_t per = (n_items + 4095) / 4096;  // the pool takes up to 2^20 chunks; 4096 is plenty
  const Job job{&a, items.data(), n_items, per, G, groups.get(), partials.data(),
                std::strcmp(isa(), "avx2") == 0};
  parallel_chunks((n_items + per - 1) / per, threads, [](const void* ctx, int64_t c) {
    const Job& j = *static_cast<const Job*>(ctx);
    thread_local Scratch w;
    for (int64_t i = c * j.per_chunk; i < std::min(j.n_items, (c + 1) * j.per_chunk); ++i) run_item(j, j.items[i], w);
  }, &job);
}

}  // namespace cotrt
