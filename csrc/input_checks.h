// Input checks shared by the CPU ops (torch library `tree_pruned`).
//
// The ops are callable by anyone through torch.ops.tree_pruned.*, and they index memory with
// the values of their integer inputs (parents, indptrs, page ids), so every such value is
// checked before any memory is touched. Each check is one pass over its array (O(N) with a
// tiny constant, negligible next to the op) and fails with TORCH_CHECK (RuntimeError in
// Python) naming the op, the array, the bad index and its value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace tree_pruned {

// Bound for lengths and ids that the ops store in (or offset as) int32: 2^31.
constexpr int64_t kInt32Limit = int64_t(std::numeric_limits<int32_t>::max()) + 1;

// `t` is a contiguous 1-D CPU tensor of `dtype`, so its data can be read as a plain array.
inline void check_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D ", dtype, " CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

// indptr [num_segments + 1] splits an array of `length` entries (`of`, for the message):
// indptr[0] == 0, non-decreasing, indptr[num_segments] == length. Segment s is then
// indptr[s]..indptr[s + 1] and lies inside the array.
template <typename T>
void check_indptr(const char* op, const char* name, const T* indptr, int64_t num_segments, int64_t length,
                  const char* of) {
  TORCH_CHECK(indptr[0] == 0, op, ": ", name, "[0] = ", indptr[0], " (must be 0)");
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(indptr[s + 1] >= indptr[s], op, ": ", name, "[", s + 1, "] = ", indptr[s + 1], " < ", name, "[", s,
                "] = ", indptr[s], " (must be non-decreasing)");
  }
  TORCH_CHECK(static_cast<int64_t>(indptr[num_segments]) == length, op, ": ", name, "[", num_segments,
              "] = ", indptr[num_segments], " (must be ", length, ", the length of ", of, ")");
}

// Request `request`'s q request-local parents form a tree in topological order:
// parents[0] == -1 and parents[i] in [0, i) after it. Then every ancestor walk from node i
// visits strictly decreasing indices: it ends within i steps and stays inside the request.
inline void check_parents(const char* op, int64_t request, const int32_t* parents, int64_t q) {
  if (q > 0) {
    TORCH_CHECK(parents[0] == -1, op, ": request ", request, ": parents[0] = ", parents[0],
                " (must be -1 at the root)");
  }
  for (int64_t i = 1; i < q; ++i) {
    TORCH_CHECK(parents[i] >= 0 && parents[i] < i, op, ": request ", request, ": parents[", i, "] = ", parents[i],
                " (must be in [0, ", i, "))");
  }
}

// values[begin..end) lie in [0, limit); `limit_name` says what the limit is ("num_blocks").
// `row` >= 0 names a row of a 2-D array: "name[row, i]" instead of "name[i]".
template <typename T>
void check_range(const char* op, const char* name, const T* values, int64_t begin, int64_t end, int64_t limit,
                 const char* limit_name, int64_t row = -1) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t v = values[i];
    if (v >= 0 && v < limit) continue;
    TORCH_CHECK(false, op, ": ", name, "[", row >= 0 ? c10::str(row, ", ") : "", i, "] = ", v,
                v < 0 ? " < 0" : c10::str(" >= ", limit_name, " ", limit));
  }
}

}  // namespace tree_pruned
