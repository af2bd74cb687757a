// One decoder layer of a Llama-family model for a decode step on CPU, in one call:
//
//   h = rmsnorm(x) ; q, k, v = h Wq, h Wk, h Wv (+ biases) ; [per-head q/k norms] ; rope
//   write k, v into the paged cache ; a = paged attention ; x += a Wo
//   h = rmsnorm(x) ; x += (silu(h Wg) * (h Wu)) Wd
//
// fp32 only. A valve rides the projections: each may carry its LoRA bank, with one alpha
// and adapter per row for the whole layer (cpu_linear.h's LinearArgs). The linears and the attention
// are cpu_linear.h's and cpu_attention.h's kernels; everything else is a few loops over
// B rows, where the same step through PyTorch ops costs a few microseconds per op.
#pragma once

#include <cstdint>

namespace cotrt {

struct DecodeLayerArgs {
  float* x;  // [B, H] the residual stream, updated in place
  const float *norm1, *norm2;  // [H]
  float eps1, eps2;
  const float *wq, *wk, *wv, *wo, *wg, *wu, *wd;  // [Hq*D, H], [Hk*D, H] x2, [H, Hq*D], [I, H] x2, [H, I]
  const float *bq, *bk, *bv, *bo, *bg, *bu, *bd;  // biases or nullptr
  // Per projection (q, k, v, o, gate, up, down): its valve bank [n, r, K] / [N, n, r] or nullptr.
  const float* lora_a[7];
  const float* lora_b[7];
  int64_t n_adapters[7], r[7];
  const float* alpha;  // [B] (stride s_alpha) or nullptr: no valve in use
  const void* adapter;  // [B] int32 (int64: adapter_i64), stride s_adapter, or nullptr (adapter 0)
  int64_t s_alpha, s_adapter;
  bool adapter_i64;
  const float *q_norm, *k_norm;  // [D] per-head norms (Qwen3) or nullptr
  float qk_eps;
  const float *cos, *sin;  // [B, D]
  float *k_cache, *v_cache;  // [P, PS, Hk, D]
  const int64_t *write_pages, *write_offs;  // [B]
  const int64_t* tables;  // [B, NP]
  const int64_t* lengths;  // [B]
  int64_t B, H, Hq, Hk, D, I, P, PS, NP;
  float scale;
  int64_t window;  // <= 0: none
  int threads;
};

void decode_layer(const DecodeLayerArgs& a);

}  // namespace cotrt
