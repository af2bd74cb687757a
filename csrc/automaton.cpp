#include "automaton.h"

#include <stdexcept>

namespace cotrt {

ByteAutomaton build_byte_automaton(const std::vector<std::string>& patterns) {
  if (patterns.size() > static_cast<size_t>(kMaxPatterns)) {
    throw std::invalid_argument("patterns: at most " + std::to_string(kMaxPatterns) +
                                " patterns fit an int64 mask, got " +
                                std::to_string(patterns.size()));
  }
  ByteAutomaton a;
  // Trie: -1 marks a missing edge until the BFS below fills the goto function.
  a.go.assign(256, -1);
  a.out.push_back(0);
  a.depth.push_back(0);
  for (size_t i = 0; i < patterns.size(); ++i) {
    const std::string& p = patterns[i];
    if (p.empty()) {
      throw std::invalid_argument("patterns[" + std::to_string(i) +
                                  "] is empty: an empty pattern would match everywhere");
    }
    int32_t s = 0;
    for (unsigned char c : p) {
      int32_t& nxt = a.go[static_cast<size_t>(s) * 256 + c];
      if (nxt < 0) {
        nxt = static_cast<int32_t>(a.depth.size());
        a.go.insert(a.go.end(), 256, -1);  // may reallocate: `nxt` is not used after this
        a.out.push_back(0);
        a.depth.push_back(a.depth[s] + 1);
        s = static_cast<int32_t>(a.depth.size()) - 1;
      } else {
        s = nxt;
      }
    }
    a.out[s] |= int64_t{1} << i;
  }
  a.n_states = static_cast<int32_t>(a.depth.size());

  // BFS in depth order: a state's failure target is shallower, so its goto row and
  // output mask are final by the time the state is dequeued.
  std::vector<int32_t> fail(a.n_states, 0), queue;
  queue.reserve(a.n_states);
  for (int c = 0; c < 256; ++c) {
    int32_t& nxt = a.go[c];
    if (nxt < 0) {
      nxt = 0;
    } else {
      queue.push_back(nxt);  // depth-1 states fail to the root
    }
  }
  for (size_t head = 0; head < queue.size(); ++head) {
    const int32_t s = queue[head];
    a.out[s] |= a.out[fail[s]];
    int32_t* row = &a.go[static_cast<size_t>(s) * 256];
    const int32_t* fail_row = &a.go[static_cast<size_t>(fail[s]) * 256];
    for (int c = 0; c < 256; ++c) {
      if (row[c] < 0) {
        row[c] = fail_row[c];
      } else {
        fail[row[c]] = fail_row[c];
        queue.push_back(row[c]);
      }
    }
  }
  return a;
}

void compile_vocab(const ByteAutomaton& dfa, const std::string& token_data,
                   const std::vector<int64_t>& offsets, int32_t* next_state, int64_t* emit) {
  const int64_t vocab = static_cast<int64_t>(offsets.size()) - 1;
  const auto* bytes = reinterpret_cast<const unsigned char*>(token_data.data());
  const int32_t* go = dfa.go.data();
  const int64_t* out = dfa.out.data();
  // State-major so both outputs are written sequentially; the goto table
  // (n_states * 1 KiB) stays in cache.
  for (int32_t s0 = 0; s0 < dfa.n_states; ++s0) {
    int32_t* next_row = next_state + static_cast<int64_t>(s0) * vocab;
    int64_t* emit_row = emit + static_cast<int64_t>(s0) * vocab;
    for (int64_t t = 0; t < vocab; ++t) {
      int32_t s = s0;
      int64_t mask = 0;
      for (int64_t k = offsets[t]; k < offsets[t + 1]; ++k) {
        s = go[static_cast<size_t>(s) * 256 + bytes[k]];
        mask |= out[s];
      }
      next_row[t] = s;
      emit_row[t] = mask;
    }
  }
}

}  // namespace cotrt
