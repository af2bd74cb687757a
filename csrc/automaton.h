// Aho-Corasick over bytes, compiled against a tokenizer vocabulary.
//
// Plain C++17, no torch or Python headers: bindings.cpp wraps it for cotrt._C.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cotrt {

// Bit i of a mask is patterns[i]; int64 masks keep bit 63 (the sign bit) unused.
constexpr int kMaxPatterns = 63;

// The byte-level DFA: the trie with failure links folded into a full goto function.
struct ByteAutomaton {
  int32_t n_states = 0;
  std::vector<int32_t> go;   // [n_states * 256]: next state on each byte value
  std::vector<int64_t> out;  // [n_states]: patterns ending here or on the suffix chain
  std::vector<int32_t> depth;  // [n_states]: length of the pattern prefix the state spells
};

// Builds the DFA; throws std::invalid_argument on an empty pattern or more than
// kMaxPatterns patterns (pybind11 turns that into ValueError).
ByteAutomaton build_byte_automaton(const std::vector<std::string>& patterns);

// Runs every token from every state. `token_data` holds the tokens' bytes back to back,
// token t being token_data[offsets[t], offsets[t + 1]); offsets has vocab + 1 entries.
// Writes next_state[s * vocab + t] (the state after the token's bytes) and
// emit[s * vocab + t] (OR of the output masks of every state entered on the way).
// Work: n_states * total vocabulary bytes DFA steps; touches no Python state.
void compile_vocab(const ByteAutomaton& dfa, const std::string& token_data,
                   const std::vector<int64_t>& offsets, int32_t* next_state, int64_t* emit);

}  // namespace cotrt
