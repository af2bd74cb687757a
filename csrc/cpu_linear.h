// CPU decode linears: y[M, N] = x[M, K] W[N, K]ᵀ (+ bias) (+ alpha-scaled LoRA expand)
// for the few rows of a decode step, streaming W once at the memory-bandwidth limit.
//
// Plain C++17, no torch headers: the caller passes raw pointers and sizes (see
// cotrt/ops/cpu_linear.py, which validates every argument first).
#pragma once

#include <cstdint>

namespace cotrt {

enum class WType : int { kF32 = 0, kBF16 = 1 };

struct LinearArgs {
  // pointers
  const float* x;         // [M, K] fp32, row stride ldx (elements), unit column stride
  const void* w;          // [N, K] in wtype, contiguous
  const void* bias;       // [N] in wtype, or nullptr
  const void* lora_a;     // [n_adapters, r, K] in wtype, contiguous, or nullptr (no valve)
  const void* lora_b;     // [N, n_adapters, r] in wtype, contiguous (N-major bank)
  const float* alpha;     // [M] fp32, stride s_alpha (0: one value for all rows)
  const void* adapter;    // [M] int32 or int64 (adapter_i64), stride s_adapter, or nullptr
  void* y;                // [M, N] fp32 or bf16 (y_bf16), row stride ldy
  // sizes
  int64_t M, N, K, n_adapters, r;
  // strides (elements)
  int64_t ldx, ldy, s_alpha, s_adapter;
  // meta
  WType wtype;
  bool adapter_i64, y_bf16;
  int threads;  // threads to use, the caller's included (<= 0: 1)
};

// Runs the AVX2+FMA kernel when the CPU has it, the portable one otherwise.
void linear(const LinearArgs& a);

// Several linears (valves included), as one job for the thread pool: one wake-up of the
// workers instead of one each (a decode layer's q/k/v and gate/up). At most 4 share a job.
void linears(const LinearArgs* const* as, int n);

// Which kernel linear() runs on this CPU: "avx2" or "scalar"; and the pool's worker threads
// started so far.
const char* isa();
int workers();

}  // namespace cotrt
