// cotrt._cpu: pybind11 bindings of the CPU decode linear (cpu_linear.h). Tensors arrive as
// data pointers (ints) from cotrt/ops/cpu_linear.py, which checks shapes, dtypes,
// contiguity and devices first: this layer trusts them, so it is private to that module.
#include <pybind11/pybind11.h>

#include "cpu_linear.h"

namespace py = pybind11;

namespace {

template <class T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

void linear(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t lora_a, uintptr_t lora_b,
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
  py::gil_scoped_release nogil;
  cotrt::linear(a);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "CPU decode linear kernels (private: use cotrt.ops.cpu_linear)";
  m.def("linear", &linear,
        "y = x Wᵀ (+ bias) (+ alpha-scaled LoRA); arguments: pointers (0 = absent), sizes, "
        "strides, flags, threads (the caller's included; <= 0: 1)");
  m.def("isa", &cotrt::isa, "the kernel linear() runs here: 'avx2' or 'scalar'");
  m.def("workers", &cotrt::workers, "worker threads the kernel's pool has started (the caller works too)");
}
