// Ancestor-or-self bitsets of a request's new tokens, shared by the CPU ops.
#pragma once

#include <cstdint>
#include <cstring>

namespace tree_pruned {

// Fills row i of a request's [q, words] bitsets (words = ceil(q / 64), bit j of row i: token j is
// i or an ancestor of i): its parent's row plus its own bit. Rows must start zeroed and be filled
// in token order; parents are topological (check_parents), so the parent's row is complete.
inline void fill_ancestor_row(uint64_t* rows, int64_t words, const int32_t* parents, int64_t i) {
  uint64_t* row = rows + i * words;
  if (parents[i] >= 0) std::memcpy(row, rows + parents[i] * words, static_cast<size_t>(words) * sizeof(uint64_t));
  row[i >> 6] |= uint64_t{1} << (i & 63);
}

}  // namespace tree_pruned
