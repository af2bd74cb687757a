// CPU decode attention over a paged KV cache: one query token per row,
//
//   out[b, h] = softmax(cap(scale · q[b, h] · Kᵀ)) · V   over keys [max(0, L - window), L),
//
// L = lengths[b] clamped to [0, NP·PS], row b's key n read in place at
// k_cache[block_tables[b, n / PS], n % PS, h / G] (G = H / KVH query heads per kv head).
//
// Plain C++17, no torch headers: the caller passes raw pointers and sizes (see
// cotrt/ops/cpu_attention.py, which validates every argument first). Table and length
// *values* are checked here: a row whose needed pages are not all in [0, P) gets zeros.
#pragma once

#include <cstdint>

namespace cotrt {

struct PagedAttentionArgs {
  // pointers
  const void* q;             // [B, H, D] fp32 or bf16 (io_bf16), strides (sqb, sqh, 1)
  const void* k;             // [P, PS, KVH, D] fp32 or bf16 (cache_bf16), contiguous
  const void* v;             // same shape and dtype as k
  const void* block_tables;  // [B, NP] int32 or int64 (tables_i64), strides (sbt, 1)
  const void* lengths;       // [B] int32 or int64 (lengths_i64), stride sl
  void* out;                 // [B, H, D] of q's dtype, strides (sob, soh, 1)
  // sizes
  int64_t B, H, KVH, D, P, PS, NP;
  // strides (elements)
  int64_t sqb, sqh, sbt, sl, sob, soh;
  // meta
  float scale;
  float softcap;   // <= 0: none
  int64_t window;  // <= 0: none
  bool io_bf16, cache_bf16, tables_i64, lengths_i64;
  int threads;  // threads to use, the caller's included (<= 0: 1)
};

// Keys per work item: a row longer than this is split into key ranges whose partial
// softmax states are merged by log-sum-exp. Fixed (not derived from `threads`), so the
// result does not depend on the thread count.
constexpr int64_t kAttentionSplit = 128;

void paged_decode_attention(const PagedAttentionArgs& a);

}  // namespace cotrt
