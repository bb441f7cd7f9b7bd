// The k most likely next tokens and their probabilities (torch library `tree_pruned`): the
// recycle table's record step and the draft head's children.
//
// tree_pruned::top_k_probs(logits, k) -> [probs, ids]
//
//   logits: float32 [N, V], CPU, each row contiguous (rows may be strided: vocabulary padding
//           sliced off); 1 <= k <= min(V, 64)
//   probs:  float32 [N, k], softmax(logits[n])[ids[n, i]]: the probabilities of the k largest
//           logits of each row, largest first
//   ids:    int64 [N, k], their columns; among equal logits the lower column comes first, and a
//           tie at the k-th value keeps the lowest columns
//
// Every verify step records the target's next-token distribution at every sampled position, a
// stock decode step included, so this runs on every step. Two passes over a row, the first
// skipping 16 logits at a time that cannot enter the top k (one vectorised max), the second
// summing exp(logit - max) with the vectorisable exp of fast_math.h, cost about what torch's
// logsumexp alone does. torch.topk + logsumexp in tree_attn_backend/ops/top_k.py is the
// fallback, and the fuzz suite holds the op to torch.topk and a float64 softmax.
// Rows holding NaN are outside the contract: NaN never enters the top k and makes the row's
// probabilities NaN.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_math.h"

namespace {

constexpr int64_t kLanes = 16;  // logits per vectorised step
constexpr int64_t kMaxK = 64;

// The k <= n largest values of row[0..n) and their columns, largest first (ties: lower column
// first).
void top_k_row(const float* row, int64_t n, int64_t k, float* values, int64_t* columns) {
  int64_t found = 0;
  auto insert = [&](float x, int64_t column) {
    int64_t at = std::min(found, k - 1);    // full: the k-th is dropped
    while (at > 0 && values[at - 1] < x) {  // strictly smaller moves down: equal values keep their order
      values[at] = values[at - 1];
      columns[at] = columns[at - 1];
      --at;
    }
    values[at] = x;
    columns[at] = column;
    found = std::min(found + 1, k);
  };
  auto admits = [&](float x) { return found < k || x > values[k - 1]; };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    float block_max = row[j];
    for (int64_t l = 1; l < kLanes; ++l) block_max = std::max(block_max, row[j + l]);
    if (!admits(block_max)) continue;
    for (int64_t l = 0; l < kLanes; ++l) {
      if (admits(row[j + l])) insert(row[j + l], j + l);
    }
  }
  for (; j < n; ++j) {
    if (admits(row[j])) insert(row[j], j);
  }
}

// sum over row[0..n) of exp(row[j] - max_value), max_value >= every row[j].
float sum_exp_below(const float* row, int64_t n, float max_value) {
  float partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += tree_pruned::exp_nonpositive(row[j + l] - max_value);
  }
  float sum = 0.0f;
  for (; j < n; ++j) sum += tree_pruned::exp_nonpositive(row[j] - max_value);
  for (int64_t l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

std::vector<at::Tensor> top_k_probs(const at::Tensor& logits, int64_t k) {
  constexpr const char* op = "top_k_probs";
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2, op,
              ": logits must be a 2-D float32 CPU tensor, got ", logits.scalar_type(), " ", logits.sizes(), " on ",
              logits.device());
  const int64_t num_rows = logits.size(0), num_columns = logits.size(1);
  TORCH_CHECK(num_columns == 1 || logits.stride(1) == 1, op, ": logits rows must be contiguous, got strides ",
              logits.strides());
  TORCH_CHECK(k >= 1 && k <= std::min(num_columns, kMaxK), op, ": k = ", k, " (must be in [1, min(", num_columns,
              " columns, ", kMaxK, ")])");
  at::Tensor probs = at::empty({num_rows, k}, at::kFloat);
  at::Tensor ids = at::empty({num_rows, k}, at::kLong);
  const float* data = logits.data_ptr<float>();
  const int64_t row_stride = logits.stride(0);
  float* p = probs.data_ptr<float>();
  int64_t* c = ids.data_ptr<int64_t>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = data + r * row_stride;
      float* values = p + r * k;
      top_k_row(row, num_columns, k, values, c + r * k);
      const float max_value = values[0];
      const float log_sum = std::log(sum_exp_below(row, num_columns, max_value));
      for (int64_t i = 0; i < k; ++i) values[i] = std::exp(values[i] - max_value - log_sum);
    }
  });
  return {probs, ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_pruned, m) { m.def("top_k_probs(Tensor logits, int k) -> Tensor[]"); }

TORCH_LIBRARY_IMPL(tree_pruned, CPU, m) { m.impl("top_k_probs", &top_k_probs); }
