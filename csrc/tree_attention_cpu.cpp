// Tree attention over vLLM's CPU paged KV cache ("vec" layout).
//
// tree_pruned::tree_paged_attention(query, kv_cache, qo_indptr, context_lens, parents,
//                                   page_indptr, page_indices, scale, out)
//
//   query, out:    [N, Hq, D], float32 / bfloat16 / float16, contiguous (same dtype as the cache)
//   kv_cache:      [num_blocks, Hkv, block_size, 2 * D]; per (block, kv head) K is stored
//                  transposed [D, block_size], then V [block_size, D]
//   qo_indptr:     int32 [R + 1], request r's query tokens are qo_indptr[r]..qo_indptr[r+1]
//   context_lens:  int32 [R], committed tokens before the step
//   parents:       int32 [N], request-local parent of every query token (-1 at a root); a
//                  request's token i has its K/V at linear position context_lens[r] + i
//   page_indptr:   int32 [R + 1], page_indices: int32 [pages], the request's cache blocks in order
//
// Query token i of request r attends to r's context (positions < context_lens[r]) and to its
// tree ancestors and itself. Online softmax in float32; all query tokens of a request and all
// query heads sharing a KV head are processed together, so each K/V block is read once per
// (request, KV head), and the context's scores and probabilities x V are BLAS GEMMs. The torch
// path in tree_attn_backend/attention/cpu_attention.py is the fallback and the fuzzed oracle.
//
// Every index the op follows is checked first (input_checks.h): both indptrs start at 0, never
// decrease and end at their arrays' lengths, context_lens >= 0, each request's pages cover its
// context + new tokens, every page id is in [0, num_blocks), and each request's parents form a
// tree in topological order (so the ancestor walk below ends and stays inside the request).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_math.h"
#include "input_checks.h"

namespace {

// The cache block of one KV head as float32: K transposed [D, block_size], then V [block_size, D].
// A float32 cache is read in place; other dtypes are converted into `scratch` first.
template <typename scalar_t>
const float* block_as_float(const scalar_t* block, int64_t count, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return block;
  } else {
    for (int64_t i = 0; i < count; ++i) scratch[i] = static_cast<float>(block[i]);
    return scratch;
  }
}

// Online softmax, one row: folds the row's scores s[0..n) into its running maximum and sum,
// rescales its accumulator and leaves the probabilities (relative to the new maximum) in s;
// the caller adds probabilities x V to the accumulator.
inline void softmax_fold(float* s, int64_t n, float* acc_row, int64_t head_dim, float& max_score, float& sum) {
  float block_max = max_score;
  for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, s[t]);
  const float rescale = std::exp(max_score - block_max);  // 0 on the first fold
  float total = sum * rescale;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = tree_pruned::exp_nonpositive(s[t] - block_max);
    total += s[t];
  }
  for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale;
  sum = total;
  max_score = block_max;
}

// One request, one KV head: rows = its query tokens x the query heads of that KV head, so each
// K/V block is read once for all of them. Per context block, scores = Q [rows, D] x K^T [D, n]
// (K is stored transposed) and acc += P [rows, n] x V [n, D] are two row-major GEMMs
// (ATen's brgemm: oneDNN's small-matrix kernels).
template <typename scalar_t>
void attend_request(const scalar_t* q, const scalar_t* cache, scalar_t* out, int64_t num_queries, int64_t group,
                    int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t block_stride, const int32_t* pages,
                    int64_t context_len, const int32_t* parents, float scale, std::vector<float>& work) {
  const int64_t rows = num_queries * group;
  const int64_t block_floats = 2 * head_dim * block_size;
  work.resize(rows * (2 * head_dim + 2 + block_size) + block_floats + num_queries);
  float* qs = work.data();            // [rows, D] scaled queries
  float* acc = qs + rows * head_dim;  // [rows, D]
  float* max_score = acc + rows * head_dim;
  float* sum = max_score + rows;
  float* scores = sum + rows;                        // [rows, block_size]
  float* block = scores + rows * block_size;         // one converted cache block (non-float32 caches)
  float* path_scores = block + block_floats;         // [num_queries] one row's scores over a token's path
  std::vector<int64_t> path_positions(num_queries);  // the path's linear cache positions
  // Row (i, g) is query token i, head kv_head * group + g: q[(i * num_heads + g) * D].
  for (int64_t i = 0; i < num_queries; ++i)
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < head_dim; ++d)
        qs[(i * group + g) * head_dim + d] = static_cast<float>(q[(i * num_heads + g) * head_dim + d]) * scale;
  std::fill(acc, acc + rows * head_dim, 0.0f);
  std::fill(max_score, max_score + rows, -std::numeric_limits<float>::infinity());
  std::fill(sum, sum + rows, 0.0f);

  const int64_t num_context_blocks = (context_len + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_context_blocks; ++b) {
    const float* k_t = block_as_float(cache + static_cast<int64_t>(pages[b]) * block_stride, block_floats, block);
    const float* v = k_t + head_dim * block_size;
    const int64_t n = std::min(block_size, context_len - b * block_size);
    at::native::cpublas::brgemm(rows, n, head_dim, head_dim, block_size, block_size, false, qs, k_t, scores);
    for (int64_t row = 0; row < rows; ++row)
      softmax_fold(scores + row * block_size, n, acc + row * head_dim, head_dim, max_score[row], sum[row]);
    at::native::cpublas::brgemm(rows, head_dim, n, block_size, head_dim, head_dim, true, scores, v, acc);
  }
  // The tree part: each token's ancestors and itself (at most num_queries of them), read in place.
  for (int64_t i = 0; i < num_queries; ++i) {
    int64_t depth = 0;
    for (int64_t node = i; node >= 0; node = parents[node]) path_positions[depth++] = context_len + node;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t row = i * group + g;
      const float* qr = qs + row * head_dim;
      for (int64_t j = 0; j < depth; ++j) {
        const int64_t pos = path_positions[j];
        const scalar_t* k_t = cache + static_cast<int64_t>(pages[pos / block_size]) * block_stride + pos % block_size;
        float s = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) s += qr[d] * static_cast<float>(k_t[d * block_size]);
        path_scores[j] = s;
      }
      float* a = acc + row * head_dim;
      softmax_fold(path_scores, depth, a, head_dim, max_score[row], sum[row]);
      for (int64_t j = 0; j < depth; ++j) {
        const int64_t pos = path_positions[j];
        const scalar_t* v = cache + static_cast<int64_t>(pages[pos / block_size]) * block_stride +
                            head_dim * block_size + (pos % block_size) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) a[d] += path_scores[j] * static_cast<float>(v[d]);
      }
    }
  }
  for (int64_t i = 0; i < num_queries; ++i)
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < head_dim; ++d)
        out[(i * num_heads + g) * head_dim + d] =
            static_cast<scalar_t>(acc[(i * group + g) * head_dim + d] / sum[i * group + g]);
}

void tree_paged_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& qo_indptr,
                          const at::Tensor& context_lens, const at::Tensor& parents, const at::Tensor& page_indptr,
                          const at::Tensor& page_indices, double scale, const at::Tensor& out) {
  constexpr const char* op = "tree_paged_attention";
  TORCH_CHECK(query.device().is_cpu() && kv_cache.device().is_cpu() && out.device().is_cpu(), op,
              ": query, kv_cache and out must be CPU tensors");
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(), op, ": query must be a contiguous [N, Hq, D] tensor, got ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.is_contiguous() && out.scalar_type() == query.scalar_type(), op,
              ": out must be contiguous and match query ", query.sizes(), ", got ", out.sizes());
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && kv_cache.scalar_type() == query.scalar_type(), op,
              ": kv_cache must be a contiguous [blocks, Hkv, block_size, 2*D] tensor of the query's dtype, got ",
              kv_cache.sizes(), " ", kv_cache.scalar_type());
  const int64_t num_tokens = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_blocks = kv_cache.size(0), num_kv_heads = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == 2 * head_dim, op, ": kv_cache last dim ", kv_cache.size(3), " != 2 * head_dim ",
              2 * head_dim);
  // Both are divisors below.
  TORCH_CHECK(num_kv_heads > 0 && block_size > 0, op, ": kv_cache has ", num_kv_heads, " KV heads and block size ",
              block_size, " (both must be positive)");
  TORCH_CHECK(num_heads % num_kv_heads == 0, op, ": ", num_heads, " query heads are not a multiple of ", num_kv_heads,
              " KV heads");
  tree_pruned::check_vector(op, "qo_indptr", qo_indptr, at::kInt);
  tree_pruned::check_vector(op, "context_lens", context_lens, at::kInt);
  tree_pruned::check_vector(op, "parents", parents, at::kInt);
  tree_pruned::check_vector(op, "page_indptr", page_indptr, at::kInt);
  tree_pruned::check_vector(op, "page_indices", page_indices, at::kInt);
  const int64_t num_reqs = context_lens.size(0);
  TORCH_CHECK(qo_indptr.size(0) == num_reqs + 1 && page_indptr.size(0) == num_reqs + 1, op, ": qo_indptr has ",
              qo_indptr.size(0), " and page_indptr ", page_indptr.size(0), " entries for ", num_reqs,
              " requests (must be num_reqs + 1)");
  TORCH_CHECK(parents.size(0) == num_tokens, op, ": parents has ", parents.size(0), " entries for ", num_tokens,
              " tokens");
  const int32_t* qo = qo_indptr.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int32_t* par = parents.data_ptr<int32_t>();
  const int32_t* pip = page_indptr.data_ptr<int32_t>();
  const int32_t* pages = page_indices.data_ptr<int32_t>();
  tree_pruned::check_indptr(op, "qo_indptr", qo, num_reqs, num_tokens, "query");
  tree_pruned::check_indptr(op, "page_indptr", pip, num_reqs, page_indices.size(0), "page_indices");
  tree_pruned::check_range(op, "context_lens", ctx, 0, num_reqs, tree_pruned::kInt32Limit, "the int32 limit");
  tree_pruned::check_range(op, "page_indices", pages, 0, page_indices.size(0), num_blocks, "num_blocks");
  for (int64_t r = 0; r < num_reqs; ++r) {
    // Token i of the request reads position ctx + i through the request's own pages only.
    const int64_t kv_len = static_cast<int64_t>(ctx[r]) + qo[r + 1] - qo[r];
    TORCH_CHECK(static_cast<int64_t>(pip[r + 1] - pip[r]) * block_size >= kv_len, op, ": request ", r, " has ",
                pip[r + 1] - pip[r], " pages of ", block_size, " for ", kv_len, " tokens");
    tree_pruned::check_parents(op, r, par + qo[r], qo[r + 1] - qo[r]);
  }
  const int64_t group = num_heads / num_kv_heads;
  const int64_t block_stride = num_kv_heads * block_size * 2 * head_dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "tree_paged_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / num_kv_heads, kv_head = item % num_kv_heads;
        const int64_t head_offset = (qo[r] * num_heads + kv_head * group) * head_dim;
        attend_request<scalar_t>(q + head_offset, cache + kv_head * block_size * 2 * head_dim, o + head_offset,
                                 qo[r + 1] - qo[r], group, num_heads, head_dim, block_size, block_stride,
                                 pages + pip[r], ctx[r], par + qo[r], static_cast<float>(scale), work);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_pruned, m) {
  m.def(
      "tree_paged_attention(Tensor query, Tensor kv_cache, Tensor qo_indptr, Tensor context_lens, Tensor parents, "
      "Tensor page_indptr, Tensor page_indices, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tree_pruned, CPU, m) { m.impl("tree_paged_attention", &tree_paged_attention); }
