// cotrt._C: pybind11 wrapper of the token automaton compiler (automaton.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "automaton.h"

namespace py = pybind11;

namespace {

// Returns (next_state int32 [n_states, vocab], emit int64 [n_states, vocab],
// depth int32 [n_states]).
py::tuple compile_automaton(const std::vector<std::string>& patterns, const py::list& vocab) {
  // Flatten the vocabulary into one buffer while holding the GIL (one memcpy per token).
  std::string data;
  std::vector<int64_t> offsets;
  offsets.reserve(vocab.size() + 1);
  offsets.push_back(0);
  for (size_t t = 0; t < vocab.size(); ++t) {
    py::handle item = vocab[t];
    char* buf = nullptr;
    Py_ssize_t len = 0;
    if (!PyBytes_Check(item.ptr()) || PyBytes_AsStringAndSize(item.ptr(), &buf, &len) != 0) {
      PyErr_Clear();
      throw py::type_error("vocab[" + std::to_string(t) + "] must be bytes, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    }
    data.append(buf, static_cast<size_t>(len));
    offsets.push_back(static_cast<int64_t>(data.size()));
  }

  cotrt::ByteAutomaton dfa = cotrt::build_byte_automaton(patterns);
  const py::ssize_t n = dfa.n_states, v = static_cast<py::ssize_t>(vocab.size());
  py::array_t<int32_t> next_state({n, v});
  py::array_t<int64_t> emit({n, v});
  py::array_t<int32_t> depth(n);
  std::copy(dfa.depth.begin(), dfa.depth.end(), depth.mutable_data());
  int32_t* next_ptr = next_state.mutable_data();
  int64_t* emit_ptr = emit.mutable_data();
  {
    py::gil_scoped_release release;
    cotrt::compile_vocab(dfa, data, offsets, next_ptr, emit_ptr);
  }
  return py::make_tuple(next_state, emit, depth);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cotrt native code: the token automaton compiler";
  m.attr("MAX_PATTERNS") = cotrt::kMaxPatterns;
  m.def("compile_automaton", &compile_automaton, py::arg("patterns"), py::arg("vocab"),
        R"doc(Compile byte patterns against a vocabulary (Aho-Corasick over bytes).

patterns: list[bytes], 1..63 non-empty patterns; bit i of a mask is patterns[i].
vocab: list[bytes], the bytes of token ids 0..V-1.
Returns (next_state int32 [S, V], emit int64 [S, V], depth int32 [S]); state 0 is the start.
Raises ValueError on an empty pattern or more than 63 patterns.)doc");
}
