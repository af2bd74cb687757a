// See cpu_layer.h.
#include "cpu_layer.h"

#include <cmath>
#include <vector>

#include "cpu_attention.h"
#include "cpu_linear.h"

namespace cotrt {
namespace {

// HF's RMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps)).
void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) s[l] += x[i + l] * x[i + l];
  float t = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
  for (; i < n; ++i) t += x[i] * x[i];
  const float r = 1.f / std::sqrt(t / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// Projection `i` of the layer (0..6: q, k, v, o, gate, up, down), with its valve if any.
LinearArgs proj(const DecodeLayerArgs& a, int i, const float* x, const float* w, const float* b, float* y,
                int64_t M, int64_t N, int64_t K) {
  LinearArgs l{};
  if (a.alpha && a.lora_a[i]) {
    l.lora_a = a.lora_a[i];
    l.lora_b = a.lora_b[i];
    l.n_adapters = a.n_adapters[i];
    l.r = a.r[i];
    l.alpha = a.alpha;
    l.s_alpha = a.s_alpha;
    l.adapter = a.adapter;
    l.s_adapter = a.s_adapter;
    l.adapter_i64 = a.adapter_i64;
  }
  l.x = x;
  l.w = w;
  l.bias = b;
  l.y = y;
  l.M = M;
  l.N = N;
  l.K = K;
  l.ldx = K;
  l.ldy = N;
  l.wtype = WType::kF32;
  l.threads = a.threads;
  return l;
}


// x * cos + rotate_half(x) * sin for one head, rotate_half(x) = [-x2, x1].
void rope(float* x, const float* c, const float* s, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    const float lo = a * c[i], hi = b * c[i + h];
    const float rl = -b * s[i], rh = a * s[i + h];
    x[i] = lo + rl;
    x[i + h] = hi + rh;
  }
}

}  // namespace

void decode_layer(const DecodeLayerArgs& a) {
  const int64_t B = a.B, H = a.H, D = a.D, QD = a.Hq * D, KD = a.Hk * D, I = a.I;
  std::vector<float> buf(B * (H + QD + 2 * KD + QD + 2 * I + H));
  float* h = buf.data();
  float* q = h + B * H;
  float* k = q + B * QD;
  float* v = k + B * KD;
  float* att = v + B * KD;
  float* g = att + B * QD;
  float* u = g + B * I;
  float* o = u + B * I;
  for (int64_t b = 0; b < B; ++b) rms_norm(a.x + b * H, a.norm1, a.eps1, H, h + b * H);
  {
    const LinearArgs lq = proj(a, 0, h, a.wq, a.bq, q, B, QD, H), lk = proj(a, 1, h, a.wk, a.bk, k, B, KD, H),
                     lv = proj(a, 2, h, a.wv, a.bv, v, B, KD, H);
    const LinearArgs* qkv[3] = {&lq, &lk, &lv};
    linears(qkv, 3);
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* c = a.cos + b * D;
    const float* s = a.sin + b * D;
    for (int64_t j = 0; j < a.Hq; ++j) {
      float* head = q + b * QD + j * D;
      if (a.q_norm) rms_norm(head, a.q_norm, a.qk_eps, D, head);
      rope(head, c, s, D);
    }
    const int64_t slot = (a.write_pages[b] * a.PS + a.write_offs[b]) * KD;
    for (int64_t j = 0; j < a.Hk; ++j) {
      float* head = k + b * KD + j * D;
      if (a.k_norm) rms_norm(head, a.k_norm, a.qk_eps, D, head);
      rope(head, c, s, D);
    }
    for (int64_t e = 0; e < KD; ++e) {
      a.k_cache[slot + e] = k[b * KD + e];
      a.v_cache[slot + e] = v[b * KD + e];
    }
  }
  PagedAttentionArgs p{};
  p.q = q;
  p.k = a.k_cache;
  p.v = a.v_cache;
  p.block_tables = a.tables;
  p.lengths = a.lengths;
  p.out = att;
  p.B = B;
  p.H = a.Hq;
  p.KVH = a.Hk;
  p.D = D;
  p.P = a.P;
  p.PS = a.PS;
  p.NP = a.NP;
  p.sqb = QD;
  p.sqh = D;
  p.sbt = a.NP;
  p.sl = 1;
  p.sob = QD;
  p.soh = D;
  p.scale = a.scale;
  p.softcap = 0.f;
  p.window = a.window;
  p.tables_i64 = true;
  p.lengths_i64 = true;
  p.threads = a.threads;
  paged_decode_attention(p);
  linear(proj(a, 3, att, a.wo, a.bo, o, B, H, QD));
  for (int64_t e = 0; e < B * H; ++e) a.x[e] += o[e];
  for (int64_t b = 0; b < B; ++b) rms_norm(a.x + b * H, a.norm2, a.eps2, H, h + b * H);
  {
    const LinearArgs lg = proj(a, 4, h, a.wg, a.bg, g, B, I, H), lu = proj(a, 5, h, a.wu, a.bu, u, B, I, H);
    const LinearArgs* gu[2] = {&lg, &lu};
    linears(gu, 2);
  }
  for (int64_t e = 0; e < B * I; ++e) g[e] = (g[e] / (1.f + std::exp(-g[e]))) * u[e];
  linear(proj(a, 6, g, a.wd, a.bd, o, B, H, I));
  for (int64_t e = 0; e < B * H; ++e) a.x[e] += o[e];
}

}  // namespace cotrt
