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
// tree ancestors and itself. Online softmax in float32 over the request's cache blocks, each
// block's scores and probabilities x V computed as register-tiled products for all query tokens
// of the request and all query heads sharing a KV head at once (so each K/V block is read once
// per (request, KV head)); in the blocks holding the new tokens, a token sees only its ancestors'
// columns (ancestor bitsets). When there are fewer (request, KV head) pairs than threads can share
// evenly (one request at a time, say), each pair's blocks are split into chunks whose partial
// softmax states are merged afterwards, so all threads work. The torch path in
// tree_attn_backend/attention/cpu_attention.py is the fallback and the fuzzed oracle.
//
// Every index the op follows is checked first (input_checks.h): both indptrs start at 0, never
// decrease and end at their arrays' lengths, context_lens >= 0, each request's pages cover its
// context + new tokens, every page id is in [0, num_blocks), and each request's parents form a
// tree in topological order (so a token's ancestor set is built from its parent's, complete by then).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "ancestors.h"
#include "fast_math.h"
#include "input_checks.h"
#include "lanes.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using tree_pruned::kLanes;
using tree_pruned::Lanes;
using tree_pruned::load_lanes;
using tree_pruned::store_lanes;

// Register tiles of the two block products: eight accumulators, kTileRows / kVectors rows x
// kVectors vectors of columns, so a tile stays in registers through its inner loop; columns left
// over after the two-vector tiles take one-vector tiles, then a scalar loop. Rows are padded to
// kTileRows.
constexpr int64_t kTileRows = 8;
// Cache columns per softmax fold at least (several blocks when blocks are smaller), so the fold's
// per-row work is spread over enough columns.
constexpr int64_t kSpanColumns = 128;

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

// Tiles of C[r, j] (+)= sum_k A[r, k] B[k, j], kVectors * kLanes columns each, from column j0
// while a tile starts before `cols` and fits in `room`; returns the first column not done.
template <int64_t kVectors>
int64_t product_tiles(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                      int64_t depth, int64_t cols, int64_t room, bool accumulate, int64_t j0) {
  constexpr int64_t kRows = kTileRows / kVectors, kWidth = kVectors * kLanes;
  for (; j0 < cols && j0 + kWidth <= room; j0 += kWidth) {
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      Lanes tile[kRows][kVectors] = {};
      if (accumulate)
        for (int64_t i = 0; i < kRows; ++i)
          for (int64_t v = 0; v < kVectors; ++v) tile[i][v] = load_lanes(c + (r0 + i) * ldc + j0 + v * kLanes);
      for (int64_t k = 0; k < depth; ++k) {
        Lanes row_k[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) row_k[v] = load_lanes(b + k * ldb + j0 + v * kLanes);
#pragma GCC unroll 8
        for (int64_t i = 0; i < kRows; ++i) {
          const float x = a[(r0 + i) * lda + k];
          for (int64_t v = 0; v < kVectors; ++v) tile[i][v] += x * row_k[v];
        }
      }
      for (int64_t i = 0; i < kRows; ++i)
        for (int64_t v = 0; v < kVectors; ++v) store_lanes(c + (r0 + i) * ldc + j0 + v * kLanes, tile[i][v]);
    }
  }
  return j0;
}

// C[r, j] (+)= sum_k A[r, k] B[k, j] (added to C when `accumulate`) for r < rows (a multiple of
// kTileRows), j < cols, k < depth; A [rows, lda], B [depth, ldb] and C [rows, ldc] row-major.
// Tiles may run past cols up to `room` columns, which B must hold and C may take (their values
// there are never read), so a partly filled cache block needs no scalar tail.
void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                  int64_t depth, int64_t cols, int64_t room, bool accumulate) {
  int64_t j0 = product_tiles<2>(a, lda, b, ldb, c, ldc, rows, depth, cols, room, accumulate, 0);
  j0 = product_tiles<1>(a, lda, b, ldb, c, ldc, rows, depth, cols, room, accumulate, j0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = j0; j < cols; ++j) {
      float x = accumulate ? c[r * ldc + j] : 0.0f;
      for (int64_t k = 0; k < depth; ++k) x += a[r * lda + k] * b[k * ldb + j];
      c[r * ldc + j] = x;
    }
}

// Online softmax, one row: folds the row's scores s[0..n) (-inf where the row may not look)
// into its running maximum and sum, rescales its accumulator and leaves the probabilities
// (relative to the new maximum; 0 where masked) in s; the caller adds probabilities x V.
inline void softmax_fold(float* s, int64_t n, float* acc_row, int64_t head_dim, float& max_score, float& sum) {
  // Per-lane maxima and sums (kLanes independent chains), so both loops vectorise.
  float lane_max[kLanes], lane_sum[kLanes] = {};
  std::fill(lane_max, lane_max + kLanes, max_score);
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = std::max(lane_max[l], s[t + l]);
  float block_max = *std::max_element(lane_max, lane_max + kLanes);
  for (; t < n; ++t) block_max = std::max(block_max, s[t]);
  if (block_max == kNegInf) {  // nothing visible to this row yet
    std::fill(s, s + n, 0.0f);
    return;
  }
  const float rescale = std::exp(max_score - block_max);  // 0 on the row's first visible fold
  auto prob = [block_max](float score) {
    const float e = tree_pruned::exp_nonpositive(score - block_max);
    return score == kNegInf ? 0.0f : e;
  };
  for (t = 0; t + kLanes <= n; t += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      s[t + l] = prob(s[t + l]);
      lane_sum[l] += s[t + l];
    }
  float total = sum * rescale;
  for (; t < n; ++t) {
    s[t] = prob(s[t]);
    total += s[t];
  }
  for (int64_t l = 0; l < kLanes; ++l) total += lane_sum[l];
  for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale;
  sum = total;
  max_score = block_max;
}

// One work item: request r, one KV head, cache blocks [first_block, end_block) of the request.
struct WorkItem {
  int64_t request;
  int64_t kv_head;
  int64_t first_block;
  int64_t end_block;
  int64_t state_offset;  // its SoftmaxState in the buffer of split pairs' states; -1: none (a pair of one item)
};

inline int64_t padded_rows(int64_t rows) { return (rows + kTileRows - 1) / kTileRows * kTileRows; }

// A work item's partial softmax state over rows_p rows, in one float buffer of floats(rows_p, D):
// accumulators [rows_p, D], then running maxima [rows_p], then running sums [rows_p].
struct SoftmaxState {
  float* acc;
  float* max_score;
  float* sum;
  SoftmaxState(float* base, int64_t rows_p, int64_t head_dim)
      : acc(base), max_score(base + rows_p * head_dim), sum(base + rows_p * (head_dim + 1)) {}
  static int64_t floats(int64_t rows_p, int64_t head_dim) { return rows_p * (head_dim + 2); }
};

// The partial softmax state of one item: rows = its request's query tokens x the query heads of
// its KV head, row (i, g) = query token i, head kv_head * group + g; rows_p of them, padded.
// ancestors: the request's [num_queries, words] bitsets (bit j of token i: j is i or an ancestor).
template <typename scalar_t>
void attend_blocks(const scalar_t* q, const scalar_t* cache, int64_t num_queries, int64_t group, int64_t num_heads,
                   int64_t head_dim, int64_t block_size, int64_t block_stride, const int32_t* pages,
                   int64_t context_len, const uint64_t* ancestors, int64_t words, int64_t first_block,
                   int64_t end_block, float scale, SoftmaxState state, std::vector<float>& work) {
  const int64_t rows = num_queries * group;
  const int64_t rows_p = padded_rows(rows);
  const int64_t block_floats = 2 * head_dim * block_size;
  const int64_t kv_len = context_len + num_queries;
  float *acc = state.acc, *max_score = state.max_score, *sum = state.sum;
  // Blocks are taken kSpanColumns columns at a time: one softmax fold per row per span.
  const int64_t span_blocks = std::max<int64_t>(1, kSpanColumns / block_size), ld_s = span_blocks * block_size;
  work.resize(rows_p * (head_dim + ld_s) + (std::is_same_v<scalar_t, float> ? 0 : span_blocks * block_floats));
  float* qs = work.data();                  // [rows_p, D] scaled queries, zero padding rows
  float* scores = qs + rows_p * head_dim;   // [rows_p, ld_s]
  float* scratch = scores + rows_p * ld_s;  // the span's blocks as float32 (non-float32 caches)
  std::vector<const float*> span(span_blocks);
  for (int64_t i = 0; i < num_queries; ++i)
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < head_dim; ++d)
        qs[(i * group + g) * head_dim + d] = static_cast<float>(q[(i * num_heads + g) * head_dim + d]) * scale;
  std::fill(qs + rows * head_dim, qs + rows_p * head_dim, 0.0f);
  std::fill(acc, acc + rows_p * head_dim, 0.0f);
  std::fill(max_score, max_score + rows_p, kNegInf);
  std::fill(sum, sum + rows_p, 0.0f);

  for (int64_t b0 = first_block; b0 < end_block; b0 += span_blocks) {
    const int64_t count = std::min(span_blocks, end_block - b0);
    const int64_t start = b0 * block_size;
    const int64_t n = std::min(count * block_size, kv_len - start);  // the span's columns in use
    auto columns_of = [&](int64_t i) { return std::min(block_size, n - i * block_size); };
    for (int64_t i = 0; i < count; ++i) {
      span[i] = block_as_float(cache + static_cast<int64_t>(pages[b0 + i]) * block_stride, block_floats,
                               scratch + i * block_floats);
      // scores [rows_p, columns] = Q [rows_p, D] x K^T [D, columns] (K is stored transposed)
      tile_product(qs, head_dim, span[i], block_size, scores + i * block_size, ld_s, rows_p, head_dim, columns_of(i),
                   block_size, false);
    }
    // Columns at or past the context are new tokens: each row sees only its token's ancestors.
    const int64_t first_new = std::max<int64_t>(0, context_len - start);
    for (int64_t row = 0; row < rows; ++row) {
      float* s = scores + row * ld_s;
      const uint64_t* bits = ancestors + (row / group) * words;
      for (int64_t t = first_new; t < n; ++t) {
        const int64_t node = start + t - context_len;
        if (!((bits[node >> 6] >> (node & 63)) & 1)) s[t] = kNegInf;
      }
      softmax_fold(s, n, acc + row * head_dim, head_dim, max_score[row], sum[row]);
    }
    for (int64_t i = 0; i < count; ++i)  // acc [rows_p, D] += P [rows_p, columns] x V [columns, D]
      tile_product(scores + i * block_size, ld_s, span[i] + head_dim * block_size, head_dim, acc, head_dim, rows_p,
                   columns_of(i), head_dim, head_dim, true);
  }
}

// Blocks per work item: whole (request, KV head) pairs when there are enough pairs to share
// evenly among the threads; else chunks sized for about four items per thread.
int64_t blocks_per_item(int64_t pairs, int64_t pair_blocks) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (pairs >= 4 * threads) return std::numeric_limits<int64_t>::max();
  return std::max<int64_t>(1, (pair_blocks + 4 * threads - 1) / (4 * threads));
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

  // Ancestor bitsets per request (parents are topological, so a parent's set is complete first).
  std::vector<int64_t> words(num_reqs), ancestor_offset(num_reqs + 1, 0);
  for (int64_t r = 0; r < num_reqs; ++r) {
    words[r] = (qo[r + 1] - qo[r] + 63) / 64;
    ancestor_offset[r + 1] = ancestor_offset[r] + (qo[r + 1] - qo[r]) * words[r];
  }
  std::vector<uint64_t> ancestors(ancestor_offset[num_reqs], 0);
  for (int64_t r = 0; r < num_reqs; ++r)
    for (int64_t i = 0; i < qo[r + 1] - qo[r]; ++i)
      tree_pruned::fill_ancestor_row(ancestors.data() + ancestor_offset[r], words[r], par + qo[r], i);

  // Work items, in (request, KV head, block) order. The items of a pair split into several keep
  // their partial softmax states for the merge below; a pair of one item writes its rows directly.
  auto blocks_of = [&](int64_t r) { return (ctx[r] + qo[r + 1] - qo[r] + block_size - 1) / block_size; };
  int64_t pair_blocks = 0;
  for (int64_t r = 0; r < num_reqs; ++r) pair_blocks += blocks_of(r) * num_kv_heads;
  const int64_t chunk = blocks_per_item(num_reqs * num_kv_heads, pair_blocks);
  std::vector<WorkItem> items;
  std::vector<int64_t> pair_items(num_reqs * num_kv_heads + 1, 0);  // items of pair p: pair_items[p]..[p+1]
  int64_t state_floats = 0;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t nb = blocks_of(r),
                  state_size = SoftmaxState::floats(padded_rows((qo[r + 1] - qo[r]) * group), head_dim);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const size_t first = items.size();
      for (int64_t b = 0;; b += chunk) {  // at least one item, also for a request without blocks
        const bool last = nb - b <= chunk;
        items.push_back({r, h, b, last ? nb : b + chunk, -1});
        if (last) break;
      }
      if (items.size() - first > 1)
        for (size_t k = first; k < items.size(); ++k, state_floats += state_size) items[k].state_offset = state_floats;
      pair_items[r * num_kv_heads + h + 1] = static_cast<int64_t>(items.size());
    }
  }
  std::vector<float> states(state_floats);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "tree_paged_attention", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Output row of (request r, KV head, row (i, g)): token qo[r] + i, head kv_head * group + g.
    auto out_row = [&](int64_t r, int64_t kv_head, int64_t row) {
      return o + ((qo[r] + row / group) * num_heads + kv_head * group + row % group) * head_dim;
    };
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work, whole;
      for (int64_t k = begin; k < end; ++k) {
        const WorkItem& item = items[k];
        const int64_t r = item.request, rows = (qo[r + 1] - qo[r]) * group, rows_p = padded_rows(rows);
        if (item.state_offset < 0) whole.resize(SoftmaxState::floats(rows_p, head_dim));
        const SoftmaxState state(item.state_offset < 0 ? whole.data() : states.data() + item.state_offset, rows_p,
                                 head_dim);
        attend_blocks<scalar_t>(q + (qo[r] * num_heads + item.kv_head * group) * head_dim,
                                cache + item.kv_head * block_size * 2 * head_dim, qo[r + 1] - qo[r], group, num_heads,
                                head_dim, block_size, block_stride, pages + pip[r], ctx[r],
                                ancestors.data() + ancestor_offset[r], words[r], item.first_block, item.end_block,
                                static_cast<float>(scale), state, work);
        if (item.state_offset >= 0) continue;
        for (int64_t row = 0; row < rows; ++row) {
          scalar_t* dst = out_row(r, item.kv_head, row);
          for (int64_t d = 0; d < head_dim; ++d)
            dst[d] = static_cast<scalar_t>(state.acc[row * head_dim + d] / state.sum[row]);
        }
      }
    });
    // Merge a split pair's items c (maximum m_c, sum l_c, accumulator acc_c per row):
    // out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M), M = max_c m_c (finite: every row
    // sees at least its own token).
    at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> merged(head_dim);
      for (int64_t pair = begin; pair < end; ++pair) {
        if (pair_items[pair + 1] - pair_items[pair] == 1) continue;  // written above
        const int64_t r = pair / num_kv_heads, kv_head = pair % num_kv_heads;
        const int64_t rows = (qo[r + 1] - qo[r]) * group, rows_p = padded_rows(rows);
        for (int64_t row = 0; row < rows; ++row) {
          float top = kNegInf;
          for (int64_t k = pair_items[pair]; k < pair_items[pair + 1]; ++k)
            top = std::max(top, SoftmaxState(states.data() + items[k].state_offset, rows_p, head_dim).max_score[row]);
          float total = 0.0f;
          std::fill(merged.begin(), merged.end(), 0.0f);
          for (int64_t k = pair_items[pair]; k < pair_items[pair + 1]; ++k) {
            const SoftmaxState state(states.data() + items[k].state_offset, rows_p, head_dim);
            const float weight = std::exp(state.max_score[row] - top);  // 0 for an item it saw nothing of
            total += state.sum[row] * weight;
            for (int64_t d = 0; d < head_dim; ++d) merged[d] += state.acc[row * head_dim + d] * weight;
          }
          scalar_t* dst = out_row(r, kv_head, row);
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(merged[d] / total);
        }
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
