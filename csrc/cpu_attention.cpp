// CPU decode attention over a paged KV cache (see cpu_attention.h).
//
// Work items are (row, key range of at most kAttentionSplit keys), every kv head of the
// range in one item: a page stores each key's K (and V) row as KVH·D contiguous values,
// so an item streams whole rows, page after page, as the hardware prefetcher likes it.
// (Items per (row, kv head), the layout before, read a third of each row at a stride and
// ran at 6 GB/s from DRAM on the 2-core EPYC: 30 layers of a 3000-token context took
// 22 ms of a 58 ms SmolLM2 step.) For each group of 4 keys the item computes the scores
// of every query head, G queries x 4 keys per kv head (8 accumulators; each K vector
// loaded once for G queries), prefetching K rows kPrefetch keys ahead and the group's V
// rows into L2; a softmax over its H score rows; then P·V in tiles of 2 queries x 32
// columns (the item's V rows, 98 KB at KVH·D = 192 fp32, stay in L2 across queries).
// An item covering a whole row writes the output; the items of a longer row store
// (max, sum, unnormalized acc) and whichever finishes last merges them by log-sum-exp,
// so no second pass over the pool is needed.
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

// What an item computes for its H query heads over its nk keys (off[j]: element offset of
// key j's K and V rows, KVH·D values each; query head g reads kv head g / G at
// off[j] + (g / G)·D): m[g] = max score, l[g] = Σ exp(s - m), acc[g] = Σ exp(s - m) · v.
// s is scratch of H rows of kC floats.
struct Attend {
  const void* k;
  const void* v;
  const int64_t* off;
  int64_t nk;
  const float* q;  // [H, D], scale folded in
  int64_t H, G, KVH, D;
  float softcap;  // <= 0: none
  float* s;       // [H, kC]
  float* m;       // [H]
  float* l;       // [H]
  float* acc;     // [H, D]
};

// ---------------------------------------------------------------------------- portable

template <bool BF16>
void attend_scalar(const Attend& w) {
  for (int64_t g = 0; g < w.H; ++g) {
    const float* q = w.q + g * w.D;
    float* s = w.s + g * kC;
    const int64_t hd = (g / w.G) * w.D;
    float mx = -INFINITY;
    for (int64_t j = 0; j < w.nk; ++j) {
      float d = 0.f;
      for (int64_t i = 0; i < w.D; ++i) d += q[i] * load1<BF16>(w.k, w.off[j] + hd + i);
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
      for (int64_t i = 0; i < w.D; ++i) acc[i] += s[j] * load1<BF16>(w.v, w.off[j] + hd + i);
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

// Scores of NQ <= 3 queries (g ..) x 4 keys (o: their K rows' offsets, the queries' kv
// head included): 4·NQ accumulators, the NQ q vectors in registers, each K vector loaded
// once for the NQ queries (at NQ = 3: 12 accumulators, 3 q and one K vector, the 16 ymm
// registers; FMAs run back to back with no load of a q vector between them).
template <bool BF16, int NQ>
inline void scores_tile(const Attend& w, const int64_t* o, int64_t j, int64_t r, int64_t g) {
  const int64_t D8 = w.D & ~int64_t(7);
  const float* q = w.q + g * w.D;
  __m256 a[NQ][4];
  for (int n = 0; n < NQ; ++n)
    for (int i = 0; i < 4; ++i) a[n][i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D8; d += 8) {
    __m256 qv[NQ];
    for (int n = 0; n < NQ; ++n) qv[n] = _mm256_loadu_ps(q + n * w.D + d);
    for (int i = 0; i < 4; ++i) {
      const __m256 kv = load8<BF16>(w.k, o[i] + d);
      for (int n = 0; n < NQ; ++n) a[n][i] = _mm256_fmadd_ps(kv, qv[n], a[n][i]);
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
  const int64_t row_bytes = w.KVH * w.D * (BF16 ? 2 : 4);  // one key's K (or V) row, every kv head
  const char* kb = static_cast<const char*>(w.k);
  const char* vb = static_cast<const char*>(w.v);
  for (int64_t j = 0; j < w.nk; j += 4) {
    const int64_t r = std::min<int64_t>(4, w.nk - j);
    // Pages scatter the rows, so the hardware prefetcher loses the stream at every page
    // boundary: fetch K rows kPrefetch keys ahead, and this group's V rows for the P·V
    // pass (which reads them from L2 then).
    for (int64_t i = j + kPrefetch; i < std::min(j + kPrefetch + 4, w.nk); ++i)
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(kb + w.off[i] * (BF16 ? 2 : 4) + b, _MM_HINT_T0);
    for (int64_t i = j; i < j + r; ++i)
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(vb + w.off[i] * (BF16 ? 2 : 4) + b, _MM_HINT_T1);
    for (int64_t h = 0; h < w.KVH; ++h) {
      int64_t o[4];
      for (int i = 0; i < 4; ++i) o[i] = w.off[j + std::min<int64_t>(i, r - 1)] + h * w.D;  // pad with a live key
      const int64_t end = (h + 1) * w.G;
      int64_t g = h * w.G;
      for (; g + 3 <= end; g += 3) scores_tile<BF16, 3>(w, o, j, r, g);
      if (end - g == 2) scores_tile<BF16, 2>(w, o, j, r, g);
      if (end - g == 1) scores_tile<BF16, 1>(w, o, j, r, g);
    }
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

// acc[g.., d0:d0+8·NV] = Σ_j p[g.., j] · v_j[d0:d0+8·NV] for NQ queries of one kv head
// (d0 counts from the key's row start, that head's offset included): NQ·NV accumulators
// in registers, each V vector loaded once for the NQ queries.
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
  const int64_t c0 = d0 - (g / w.G) * w.D;  // the column within the head
  for (int n = 0; n < NQ; ++n)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(w.acc + (g + n) * w.D + c0 + 8 * i, a[n][i]);
}

// Columns [d, d + 8·NV) of kv head h's G queries.
template <bool BF16, int NV>
inline void pv_block_avx2(const Attend& w, int64_t h, int64_t d) {
  const int64_t d0 = h * w.D + d, end = (h + 1) * w.G;
  int64_t g = h * w.G;
  for (; g + 3 <= end; g += 3) pv_tile<BF16, 3, NV>(w, g, d0);
  if (end - g == 2) pv_tile<BF16, 2, NV>(w, g, d0);
  if (end - g == 1) pv_tile<BF16, 1, NV>(w, g, d0);
}

template <bool BF16>
void attend_avx2(const Attend& w) {
  scores_avx2<BF16>(w);
  for (int64_t g = 0; g < w.H; ++g) softmax_row_avx2(w.s + g * kC, w.nk, w.softcap, w.m + g, w.l + g);
  for (int64_t h = 0; h < w.KVH; ++h) {
    int64_t d = 0;
    for (; d + 32 <= w.D; d += 32) pv_block_avx2<BF16, 4>(w, h, d);
    for (; d + 8 <= w.D; d += 8) pv_block_avx2<BF16, 1>(w, h, d);
    for (; d < w.D; ++d)
      for (int64_t g = h * w.G; g < (h + 1) * w.G; ++g) {
        float t = 0.f;
        for (int64_t j = 0; j < w.nk; ++j) t += w.s[g * kC + j] * load1<BF16>(w.v, w.off[j] + h * w.D + d);
        w.acc[g * w.D + d] = t;
      }
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

// Keys [n0, n1) of row b, every head. part: its slot in the partials buffer, or -1 when
// the item covers the whole row (it then writes the output itself).
struct Item {
  int64_t b, n0, n1, part;
};

struct Group {              // the items of one row split into key ranges
  std::atomic<int> left{0};  // items not finished yet
  int64_t first_part = 0, parts = 0;
};

struct Job {
  const PagedAttentionArgs* a;
  const Item* items;
  int64_t n_items, per_chunk, G;
  Group* groups;    // per row
  float* partials;  // [parts, 2H + H·D]: m[H], l[H], acc[H, D]
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

// Writes row b's H output heads from n partial states (m, l, acc) at stride `stride`
// floats: out = Σ acc_i e^(m_i - M) / Σ l_i e^(m_i - M), M = max m_i, summed in part order
// (the merge does not depend on which thread runs it).
void finish(const PagedAttentionArgs& a, int64_t b, const float* st, int64_t n, int64_t stride) {
  const int64_t H = a.H, D = a.D;
  std::vector<float> w(n > 1 ? n : 0);
  for (int64_t g = 0; g < H; ++g) {
    if (n == 1) {
      const float inv = st[H + g] > 0.f ? 1.f / st[H + g] : 0.f;
      for (int64_t d = 0; d < D; ++d) store_out(a, b, g, d, st[2 * H + g * D + d] * inv);
      continue;
    }
    float M = -INFINITY;
    for (int64_t i = 0; i < n; ++i) M = std::max(M, st[i * stride + g]);
    float L = 0.f;
    for (int64_t i = 0; i < n; ++i) L += (w[i] = std::exp(st[i * stride + g] - M)) * st[i * stride + H + g];
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int64_t d = 0; d < D; ++d) {
      float t = 0.f;
      for (int64_t i = 0; i < n; ++i) t += w[i] * st[i * stride + 2 * H + g * D + d];
      store_out(a, b, g, d, t * inv);
    }
  }
}

void run_item(const Job& job, const Item& it, Scratch& w) {
  const PagedAttentionArgs& a = *job.a;
  const int64_t H = a.H, D = a.D, nk = it.n1 - it.n0, row = a.KVH * D;
  w.q.resize(H * D);
  w.s.resize(H * kC);
  w.state.resize(2 * H + H * D);  // m, l and acc side by side: the partial-state layout
  w.off.resize(kC);
  // Element offsets of the item's key rows, walked page by page (no division per key).
  for (int64_t n = it.n0, j = 0; n < it.n1;) {
    const int64_t pg = n / a.PS;
    const int64_t page = load_index(a.block_tables, a.tables_i64, it.b * a.sbt + pg);
    const int64_t end = std::min(it.n1, (pg + 1) * a.PS);
    for (int64_t o = (page * a.PS + (n - pg * a.PS)) * row; n < end; ++n, ++j, o += row) w.off[j] = o;
  }
  for (int64_t g = 0; g < H; ++g) {
    const int64_t q0 = it.b * a.sqb + g * a.sqh;
    for (int64_t d = 0; d < D; ++d)
      w.q[g * D + d] = a.scale * (a.io_bf16 ? load1<true>(a.q, q0 + d) : load1<false>(a.q, q0 + d));
  }
  float* st = w.state.data();
  const Attend at{a.k, a.v, w.off.data(), nk, w.q.data(), H, job.G, a.KVH, D, a.softcap,
                  w.s.data(), st, st + H, st + 2 * H};
  if (job.avx2)
    a.cache_bf16 ? attend_avx2<true>(at) : attend_avx2<false>(at);
  else
    a.cache_bf16 ? attend_scalar<true>(at) : attend_scalar<false>(at);
  const int64_t stride = 2 * H + H * D;
  if (it.part < 0) {
    finish(a, it.b, st, 1, stride);
    return;
  }
  std::memcpy(job.partials + it.part * stride, st, sizeof(float) * stride);
  Group& grp = job.groups[it.b];
  if (grp.left.fetch_sub(1, std::memory_order_acq_rel) == 1)  // the last one merges
    finish(a, it.b, job.partials + grp.first_part * stride, grp.parts, stride);
}

}  // namespace

void paged_decode_attention(const PagedAttentionArgs& a) {
  if (a.B <= 0 || a.H <= 0 || a.D <= 0 || a.KVH <= 0) return;
  const int64_t G = a.H / a.KVH, cap = a.NP * a.PS;
  // Rows, serially: clamp the length, check the pages the row needs, cut it into items.
  std::vector<Item> items;
  std::unique_ptr<Group[]> groups(new Group[a.B]);
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
    const int64_t n_split = (L - lo + kC - 1) / kC;
    if (n_split > 1) {
      groups[b].left.store(int(n_split), std::memory_order_relaxed);
      groups[b].first_part = parts;
      groups[b].parts = n_split;
    }
    for (int64_t i = 0; i < n_split; ++i)
      items.push_back({b, lo + i * kC, std::min(L, lo + (i + 1) * kC), n_split > 1 ? parts + i : -1});
    if (n_split > 1) parts += n_split;
  }
  if (items.empty()) return;
  std::vector<float> partials(parts * (2 * a.H + a.H * a.D));
  const int64_t n_items = int64_t(items.size());
  // Waking a pool worker costs a few microseconds (a futex call, the worker sleeping at
  // once: work_pool.cpp): each thread past the first must get ~10 us of work, 2^18 FMAs.
  int64_t fmas = 0;
  for (const Item& it : items) fmas += 2 * (it.n1 - it.n0) * a.H * a.D;
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
