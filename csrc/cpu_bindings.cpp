// cotrt._cpu: pybind11 bindings of the CPU decode kernels (cpu_linear.h, cpu_attention.h).
// Tensors arrive as data pointers (ints) from cotrt/ops/cpu_linear.py and
// cotrt/ops/cpu_attention.py, which check shapes, dtypes, contiguity and devices first:
// this layer trusts them, so it is private to those modules.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_attention.h"
#include "cpu_layer.h"
#include "cpu_linear.h"

namespace py = pybind11;

namespace {

template <class T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

cotrt::LinearArgs linear_args(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t lora_a, uintptr_t lora_b,
                              uintptr_t alpha, uintptr_t adapter, uintptr_t y, int64_t M, int64_t N, int64_t K,
                              int64_t n_adapters, int64_t r, int64_t ldx, int64_t ldy, int64_t s_alpha,
                              int64_t s_adapter, bool w_bf16, bool adapter_i64, bool y_bf16, int threads) {
  cotrt::LinearArgs a{};
  a.x = ptr<float>(x);
  a.w = ptr<void>(w);
  a.bias = ptr<void>(bias);
  a.lora_a = ptr<void>(lora_a);
  a.lora_b = ptr<void>(lora_b);
  a.alpha = ptr<float>(alpha);
  a.adapter = ptr<void>(adapter);
  a.y = reinterpret_cast<void*>(y);
  a.M = M;
  a.N = N;
  a.K = K;
  a.n_adapters = n_adapters;
  a.r = r;
  a.ldx = ldx;
  a.ldy = ldy;
  a.s_alpha = s_alpha;
  a.s_adapter = s_adapter;
  a.wtype = w_bf16 ? cotrt::WType::kBF16 : cotrt::WType::kF32;
  a.adapter_i64 = adapter_i64;
  a.y_bf16 = y_bf16;
  a.threads = threads;
  return a;
}

void linear_repeat(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t lora_a, uintptr_t lora_b,
                   uintptr_t alpha, uintptr_t adapter, uintptr_t y, int64_t M, int64_t N, int64_t K,
                   int64_t n_adapters, int64_t r, int64_t ldx, int64_t ldy, int64_t s_alpha,
                   int64_t s_adapter, bool w_bf16, bool adapter_i64, bool y_bf16, int threads,
                   int64_t repeats) {
  const cotrt::LinearArgs a = linear_args(x, w, bias, lora_a, lora_b, alpha, adapter, y, M, N, K, n_adapters, r,
                                          ldx, ldy, s_alpha, s_adapter, w_bf16, adapter_i64, y_bf16, threads);
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < repeats; ++i) cotrt::linear(a);
}

void linear(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t lora_a, uintptr_t lora_b,
            uintptr_t alpha, uintptr_t adapter, uintptr_t y, int64_t M, int64_t N, int64_t K,
            int64_t n_adapters, int64_t r, int64_t ldx, int64_t ldy, int64_t s_alpha,
            int64_t s_adapter, bool w_bf16, bool adapter_i64, bool y_bf16, int threads) {
  linear_repeat(x, w, bias, lora_a, lora_b, alpha, adapter, y, M, N, K, n_adapters, r, ldx, ldy, s_alpha,
                s_adapter, w_bf16, adapter_i64, y_bf16, threads, 1);
}

// One linear() argument tuple (as cotrt.ops.cpu_linear._kernel_args makes it) as LinearArgs.
cotrt::LinearArgs tuple_args(const py::tuple& t, const char* fn) {
  if (t.size() != 21) throw std::invalid_argument(std::string(fn) + ": each call is linear()'s 21 arguments");
  return linear_args(t[0].cast<uintptr_t>(), t[1].cast<uintptr_t>(), t[2].cast<uintptr_t>(), t[3].cast<uintptr_t>(),
                     t[4].cast<uintptr_t>(), t[5].cast<uintptr_t>(), t[6].cast<uintptr_t>(), t[7].cast<uintptr_t>(),
                     t[8].cast<int64_t>(), t[9].cast<int64_t>(), t[10].cast<int64_t>(), t[11].cast<int64_t>(),
                     t[12].cast<int64_t>(), t[13].cast<int64_t>(), t[14].cast<int64_t>(), t[15].cast<int64_t>(),
                     t[16].cast<int64_t>(), t[17].cast<bool>(), t[18].cast<bool>(), t[19].cast<bool>(),
                     t[20].cast<int>());
}

// A pool job's linears (1 to 4 argument tuples) as LinearArgs, in `as`.
void job_args(const std::vector<py::tuple>& calls, std::vector<cotrt::LinearArgs>& as, const char* fn) {
  if (calls.empty() || calls.size() > 4) throw std::invalid_argument(std::string(fn) + ": 1 to 4 calls a job");
  for (const py::tuple& t : calls) as.push_back(tuple_args(t, fn));
}

// Several linears as one pool job (cotrt::linears, as the decoder layer runs q/k/v and
// gate/up), each given as linear()'s argument tuple; repeated back to back.
void linears_repeat(const std::vector<py::tuple>& calls, int64_t repeats) {
  std::vector<cotrt::LinearArgs> as;
  job_args(calls, as, "linears_repeat");
  std::vector<const cotrt::LinearArgs*> ps;
  for (const auto& a : as) ps.push_back(&a);
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < repeats; ++i) cotrt::linears(ps.data(), int(ps.size()));
}

// Jobs (each 1 to 4 linears, as linears_repeat's calls) run one after another, the whole
// sequence `repeats` times; returns each job's seconds, summed over the repeats. A sequence
// as long as a decode step's (every layer's weights once) finds each job's weights evicted
// since its last run, as a decode step does; linears_repeat's back-to-back calls find them
// in cache.
std::vector<double> linears_sequence(const std::vector<std::vector<py::tuple>>& jobs, int64_t repeats) {
  if (jobs.empty()) throw std::invalid_argument("linears_sequence: no jobs");
  std::vector<std::vector<cotrt::LinearArgs>> as(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) job_args(jobs[j], as[j], "linears_sequence");
  std::vector<std::vector<const cotrt::LinearArgs*>> ps(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j)
    for (const auto& a : as[j]) ps[j].push_back(&a);
  std::vector<double> seconds(jobs.size(), 0.0);
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < repeats; ++i)
    for (size_t j = 0; j < jobs.size(); ++j) {
      const auto t0 = std::chrono::steady_clock::now();
      cotrt::linears(ps[j].data(), int(ps[j].size()));
      seconds[j] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  return seconds;
}

void paged_decode_attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t block_tables,
                            uintptr_t lengths, uintptr_t out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                            int64_t P, int64_t PS, int64_t NP, int64_t sqb, int64_t sqh, int64_t sbt,
                            int64_t sl, int64_t sob, int64_t soh, float scale, float softcap, int64_t window,
                            bool io_bf16, bool cache_bf16, bool tables_i64, bool lengths_i64, int threads) {
  cotrt::PagedAttentionArgs a{};
  a.q = ptr<void>(q);
  a.k = ptr<void>(k);
  a.v = ptr<void>(v);
  a.block_tables = ptr<void>(block_tables);
  a.lengths = ptr<void>(lengths);
  a.out = reinterpret_cast<void*>(out);
  a.B = B;
  a.H = H;
  a.KVH = KVH;
  a.D = D;
  a.P = P;
  a.PS = PS;
  a.NP = NP;
  a.sqb = sqb;
  a.sqh = sqh;
  a.sbt = sbt;
  a.sl = sl;
  a.sob = sob;
  a.soh = soh;
  a.scale = scale;
  a.softcap = softcap;
  a.window = window;
  a.io_bf16 = io_bf16;
  a.cache_bf16 = cache_bf16;
  a.tables_i64 = tables_i64;
  a.lengths_i64 = lengths_i64;
  a.threads = threads;
  py::gil_scoped_release nogil;
  cotrt::paged_decode_attention(a);
}

// Pointers: x, norm1, norm2, wq, wk, wv, wo, wg, wu, wd, bq, bk, bv, bo, bg, bu, bd, q_norm,
// k_norm, cos, sin, k_cache, v_cache, write_pages, write_offs, tables, lengths (0 = absent).
// valve: 7 lora_a, 7 lora_b pointers (0: none), then alpha, adapter (0: none); banks: 7
// n_adapters then 7 r.
void decode_layer(std::vector<uintptr_t> p, std::vector<uintptr_t> valve, std::vector<int64_t> banks,
                  int64_t s_alpha, int64_t s_adapter, bool adapter_i64, int64_t B, int64_t H, int64_t Hq,
                  int64_t Hk, int64_t D, int64_t I, int64_t P, int64_t PS, int64_t NP, float eps1, float eps2,
                  float qk_eps, float scale, int64_t window, int threads) {
  if (p.size() != 27) throw std::invalid_argument("decode_layer: 27 pointers expected");
  if (valve.size() != 16 || banks.size() != 14) throw std::invalid_argument("decode_layer: 16 valve pointers and 14 sizes expected");
  cotrt::DecodeLayerArgs a{};
  for (int i = 0; i < 7; ++i) {
    a.lora_a[i] = ptr<float>(valve[i]);
    a.lora_b[i] = ptr<float>(valve[7 + i]);
    a.n_adapters[i] = banks[i];
    a.r[i] = banks[7 + i];
  }
  a.alpha = ptr<float>(valve[14]);
  a.adapter = ptr<void>(valve[15]);
  a.s_alpha = s_alpha;
  a.s_adapter = s_adapter;
  a.adapter_i64 = adapter_i64;
  a.x = reinterpret_cast<float*>(p[0]);
  a.norm1 = ptr<float>(p[1]);
  a.norm2 = ptr<float>(p[2]);
  a.wq = ptr<float>(p[3]);
  a.wk = ptr<float>(p[4]);
  a.wv = ptr<float>(p[5]);
  a.wo = ptr<float>(p[6]);
  a.wg = ptr<float>(p[7]);
  a.wu = ptr<float>(p[8]);
  a.wd = ptr<float>(p[9]);
  a.bq = ptr<float>(p[10]);
  a.bk = ptr<float>(p[11]);
  a.bv = ptr<float>(p[12]);
  a.bo = ptr<float>(p[13]);
  a.bg = ptr<float>(p[14]);
  a.bu = ptr<float>(p[15]);
  a.bd = ptr<float>(p[16]);
  a.q_norm = ptr<float>(p[17]);
  a.k_norm = ptr<float>(p[18]);
  a.cos = ptr<float>(p[19]);
  a.sin = ptr<float>(p[20]);
  a.k_cache = reinterpret_cast<float*>(p[21]);
  a.v_cache = reinterpret_cast<float*>(p[22]);
  a.write_pages = ptr<int64_t>(p[23]);
  a.write_offs = ptr<int64_t>(p[24]);
  a.tables = ptr<int64_t>(p[25]);
  a.lengths = ptr<int64_t>(p[26]);
  a.B = B;
  a.H = H;
  a.Hq = Hq;
  a.Hk = Hk;
  a.D = D;
  a.I = I;
  a.P = P;
  a.PS = PS;
  a.NP = NP;
  a.eps1 = eps1;
  a.eps2 = eps2;
  a.qk_eps = qk_eps;
  a.scale = scale;
  a.window = window;
  a.threads = threads;
  py::gil_scoped_release nogil;
  cotrt::decode_layer(a);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "CPU decode kernels (private: use cotrt.ops.cpu_linear, cotrt.ops.cpu_attention)";
  m.def("linear", &linear,
        "y = x Wᵀ (+ bias) (+ alpha-scaled LoRA); arguments: pointers (0 = absent), sizes, "
        "strides, flags, threads (the caller's included; <= 0: 1)");
  m.def("linear_repeat", &linear_repeat,
        "linear()'s arguments, then repeats: the same call that many times back to back, with "
        "no Python in between (how bench/bench_cpu_linear.py times the kernel as the native "
        "decoder layer calls it)");
  m.def("linears_repeat", &linears_repeat,
        "calls (a list of 1 to 4 linear() argument tuples), repeats: those linears as one pool "
        "job (as the decoder layer runs q/k/v and gate/up), that many times back to back");
  m.def("linears_sequence", &linears_sequence,
        "jobs (a list of linears_repeat call lists), repeats: the jobs one after another, the "
        "sequence that many times; returns each job's seconds summed over the repeats (a "
        "decode step's order: each job's weights evicted since its last run)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per row over a paged KV cache; arguments: pointers, sizes, strides, "
        "scale, softcap (<= 0: none), window (<= 0: none), flags, threads");
  m.def("decode_layer", &decode_layer,
        "one fp32 Llama-family decoder layer for a decode step (cpu_layer.h); arguments: 27 "
        "pointers, 16 valve pointers, 14 bank sizes, alpha/adapter strides, sizes, eps values, scale, "
        "window (<= 0: none), threads");
  m.attr("ATTENTION_SPLIT") = cotrt::kAttentionSplit;
  m.def("isa", &cotrt::isa, "the kernel linear() runs here: 'avx2' or 'scalar'");
  m.def("workers", &cotrt::workers, "worker threads the kernel's pool has started (the caller works too)");
}
