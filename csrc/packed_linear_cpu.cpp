// Linear layers for the few rows of a decode or verify step (torch library `tree_pruned`).
//
// tree_pruned::pack_linear_weight(weight, bfloat16) -> packed
//   weight: float32 [N, K], CPU (nn.Linear's layout: out_features x in_features)
//   packed: the columns in pairs of blocks of kLanes, columns past N zero: float32
//           [ceil(N / (2 kLanes)), 2, K, kLanes] (pair, block, k, lane), or with `bfloat16`
//           bfloat16 [ceil(N / (2 kLanes)), K, kLanes, 2] (pair, k, lane, block: the two blocks
//           interleaved, see load_bfloat16_pair), which holds the same values in half the bytes;
//           then every weight must be a bfloat16 value (as a bfloat16 checkpoint's are, loaded
//           as float32), else the op fails naming the first one that is not
//
// tree_pruned::packed_linear(x, packed, bias, out_features) -> out
//   x:      float32 [M, K], CPU (rows strided apart are read in place, other layouts copied)
//   bias:   float32 [N] or None
//   out:    float32 [M, N], out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n])
//
// Why: a verify step at one request has 1 + (draft tokens) rows, and on a CPU each row's share
// of the weights' arithmetic is paid on top of streaming the weights from memory. Here every
// weight vector is loaded once per row tile and used by all the tile's rows, with the weights
// prefetched ahead so the arithmetic overlaps the stream. A step of a few rows is bound by the
// stream, so bfloat16 storage (half the bytes, widened to float32 in registers, exactly) makes
// it faster; with more rows the arithmetic binds, so tiles then cover more rows (fewer passes
// over each cached pair) and bfloat16 pairs are stored interleaved (one load and two bit
// operations widen two vectors). `tree-pruned bench linear`, SmolLM2-135M's 30 layers and LM
// head, 2 threads, AVX2 (ms for 1 / 5 / 9 / 17 rows): vLLM's oneDNN product 29 / 37 / 44 / 58,
// this op with bfloat16 weights 11 / 18 / 29 / 52 (one run). Past a few dozen rows oneDNN's blocking
// wins; the caller picks this op for small batches only.
//
// Each output is one float32 fused multiply-add chain over k = 0, 1, ..., K - 1 from zero, then
// + bias: the same operations whichever rows share the call, how they are tiled, which thread
// runs them and how the weights are stored. So a row's result does not depend on the batch it is
// in (tested exactly): a token's logits are the same verified in a tree of 17 or decoded alone.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "lanes.h"

namespace {

using tree_pruned::fma_lanes;
using tree_pruned::kLanes;
using tree_pruned::Lanes;
using tree_pruned::load_bfloat16_pair;
using tree_pruned::load_lanes;

// Weights are prefetched this many bytes ahead of each stream (one prefetch per 64-byte line):
// far enough to hide memory latency behind a tile's arithmetic.
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kCacheLine = 64;

// Prefetch a stream that advances `step_bytes` per k, once per line it enters.
template <int64_t step_bytes>
inline void prefetch_stream(const void* at_k, int64_t k) {
  if (step_bytes >= kCacheLine || (k * step_bytes) % kCacheLine == 0) {
    const char* ahead = static_cast<const char*>(at_k) + kPrefetchBytes;
    for (int64_t line = 0; line < std::max(step_bytes, kCacheLine); line += kCacheLine) {
      __builtin_prefetch(ahead + line);  // never faults, even past the end
    }
  }
}

// The weights at k of one pair of column blocks (`pair`: its K * 2 * kLanes stored weights),
// as two vectors of float32 lanes, prefetching ahead. float32: [2 blocks, K, kLanes], two
// streams; bfloat16: [K, kLanes, 2 blocks], one stream (see load_bfloat16_pair).
inline void load_weight_pair(const float* pair, int64_t K, int64_t k, Lanes& first, Lanes& second) {
  const float* first_at = pair + k * kLanes;
  const float* second_at = first_at + K * kLanes;
  prefetch_stream<kLanes * sizeof(float)>(first_at, k);
  prefetch_stream<kLanes * sizeof(float)>(second_at, k);
  first = load_lanes(first_at);
  second = load_lanes(second_at);
}
inline void load_weight_pair(const uint16_t* pair, int64_t, int64_t k, Lanes& first, Lanes& second) {
  const uint16_t* at = pair + k * 2 * kLanes;
  prefetch_stream<2 * kLanes * sizeof(uint16_t)>(at, k);
  load_bfloat16_pair(at, first, second);
}

// A register tile: ROWS rows x PAIRS pairs of column blocks, 2 * ROWS * PAIRS accumulators.
// With a few rows, two pairs per tile: more weight streams read at once (float32 pairs stored
// as one stream each were read about 30% slower at 1-3 rows, even two per tile; hence float32
// keeps two streams per pair). With more rows, one pair and twice the rows (fewer tiles re-read
// a pair).
#if defined(__AVX512F__)
constexpr int kTileVectors = 24;  // of the 32 registers
#else
constexpr int kTileVectors = 12;  // of the 16 registers
#endif
constexpr int kMaxTileRows = kTileVectors / 2;

// out[m, the PAIRS pairs' columns from column0] for the tile's ROWS rows: one fused multiply-add
// chain over k per output (fma_lanes), so every tile shape gives the same bits. `pairs` points
// at the first pair's weights; the next pair's start K * 2 * kLanes elements later.
// W: the packed weights' element, float or uint16_t (bfloat16 bits, interleaved).
template <int ROWS, int PAIRS, typename W>
void tile_product(const float* x, int64_t x_stride, const W* pairs, int64_t K, const float* bias, float* out,
                  int64_t out_stride, int64_t column0, int64_t N) {
  constexpr int VECTORS = 2 * PAIRS;
  Lanes acc[ROWS][VECTORS];
  for (int m = 0; m < ROWS; ++m) {
    for (int v = 0; v < VECTORS; ++v) acc[m][v] = Lanes{};
  }
  for (int64_t k = 0; k < K; ++k) {
    Lanes w[VECTORS];
    for (int p = 0; p < PAIRS; ++p) load_weight_pair(pairs + p * K * 2 * kLanes, K, k, w[2 * p], w[2 * p + 1]);
    for (int m = 0; m < ROWS; ++m) {
      const Lanes xk = Lanes{} + x[m * x_stride + k];
      for (int v = 0; v < VECTORS; ++v) acc[m][v] = fma_lanes(xk, w[v], acc[m][v]);
    }
  }
  for (int v = 0; v < VECTORS; ++v) {
    const int64_t column = column0 + v * kLanes;
    const int64_t width = std::max<int64_t>(0, std::min(kLanes, N - column));
    for (int m = 0; m < ROWS; ++m) {
      float* row = out + m * out_stride + column;
      if (bias != nullptr) {
        for (int64_t l = 0; l < width; ++l) row[l] = acc[m][v][l] + bias[column + l];
      } else {
        std::memcpy(row, &acc[m][v], width * sizeof(float));
      }
    }
  }
}

// Every row tile of x against PAIRS pairs of column blocks (they stay in cache across tiles).
template <int PAIRS, typename W>
void column_group(const float* x, int64_t x_stride, int64_t M, const W* pairs, int64_t K, const float* bias, float* out,
                  int64_t column0, int64_t N) {
  constexpr int tile_rows = kMaxTileRows / PAIRS;
  for (int64_t m = 0; m < M; m += tile_rows) {
    const float* xm = x + m * x_stride;
    float* om = out + m * N;
    switch (std::min<int64_t>(tile_rows, M - m)) {
#define TILE_CASE(R)                                                                                          \
  case R:                                                                                                     \
    if constexpr (R <= tile_rows) tile_product<R, PAIRS, W>(xm, x_stride, pairs, K, bias, om, N, column0, N); \
    break;
      TILE_CASE(1)
      TILE_CASE(2)
      TILE_CASE(3)
      TILE_CASE(4)
      TILE_CASE(5)
      TILE_CASE(6)
#if defined(__AVX512F__)
      TILE_CASE(7)
      TILE_CASE(8)
      TILE_CASE(9)
      TILE_CASE(10)
      TILE_CASE(11)
      TILE_CASE(12)
#endif
#undef TILE_CASE
    }
  }
}

at::Tensor pack_linear_weight(const at::Tensor& weight, bool bfloat16) {
  constexpr const char* op = "pack_linear_weight";
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2, op,
              ": weight must be a 2-D float32 CPU tensor, got ", weight.scalar_type(), " ", weight.sizes(), " on ",
              weight.device());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N > 0 && K > 0, op, ": weight must not be empty, got ", weight.sizes());
  at::Tensor stored = weight;
  if (bfloat16) {
    stored = weight.to(at::kBFloat16);
    const at::Tensor changed = stored.to(at::kFloat).ne(weight);  // NaN too: it is never equal
    if (changed.any().item<bool>()) {
      const at::Tensor first = changed.nonzero()[0];
      const int64_t n = first[0].item<int64_t>(), k = first[1].item<int64_t>();
      TORCH_CHECK(false, op, ": weight[", n, ", ", k, "] = ", weight[n][k].item<float>(),
                  " is not a bfloat16 value; pack it as float32");
    }
  }
  const int64_t num_pairs = (N + 2 * kLanes - 1) / (2 * kLanes);
  at::Tensor padded = at::zeros({num_pairs * 2 * kLanes, K}, stored.options());
  padded.narrow(0, 0, N).copy_(stored);
  const at::Tensor by_block = padded.view({num_pairs, 2, kLanes, K});
  if (bfloat16) {  // [pairs, block, lane, K] -> [pairs, K, lane, block]: the two blocks interleaved
    return by_block.permute({0, 3, 2, 1}).contiguous();
  }
  return by_block.permute({0, 1, 3, 2}).contiguous();  // -> [pairs, block, K, lane]
}

// Every column group of the packed weights (two pairs of blocks for at most half a tile's rows,
// else one) against all of x's rows.
template <typename W>
void all_column_groups(const float* x, int64_t x_stride, int64_t M, const W* weights, int64_t num_pairs, int64_t K,
                       const float* bias, float* out, int64_t N) {
  const int64_t group_pairs = M <= kMaxTileRows / 2 ? 2 : 1;
  const int64_t num_groups = (num_pairs + group_pairs - 1) / group_pairs;
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t pair = g * group_pairs;
      const W* group = weights + pair * K * 2 * kLanes;
      const int64_t column0 = pair * 2 * kLanes;
      if (std::min(group_pairs, num_pairs - pair) == 2) {
        column_group<2>(x, x_stride, M, group, K, bias, out, column0, N);
      } else {
        column_group<1>(x, x_stride, M, group, K, bias, out, column0, N);
      }
    }
  });
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  constexpr const char* op = "packed_linear";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": x must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const bool bfloat16 = packed.scalar_type() == at::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.device().is_cpu() && (packed.scalar_type() == at::kFloat || bfloat16) && packed.dim() == 4 &&
                  packed.is_contiguous() && packed.size(bfloat16 ? 3 : 1) == 2 &&
                  packed.size(bfloat16 ? 2 : 3) == kLanes,
              op, ": packed must be pack_linear_weight's contiguous float32 [pairs, 2, K, ", kLanes,
              "] or bfloat16 [pairs, K, ", kLanes, ", 2] CPU tensor, got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t num_pairs = packed.size(0), packed_k = packed.size(bfloat16 ? 1 : 2);
  TORCH_CHECK(packed_k == K, op, ": x has ", K, " features, the packed weight ", packed_k);
  TORCH_CHECK(out_features > (num_pairs - 1) * 2 * kLanes && out_features <= num_pairs * 2 * kLanes, op,
              ": out_features = ", out_features, " does not match the packed weight's ", num_pairs, " pairs of ",
              kLanes, "-column blocks");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->is_contiguous() && bias->size(0) == out_features,
                op, ": bias must be a contiguous float32 CPU tensor of ", out_features, " values, got ",
                bias->scalar_type(), " ", bias->sizes());
    bias_data = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  const float* x_data = rows.data_ptr<float>();
  const int64_t x_stride = rows.stride(0);
  float* out_data = out.data_ptr<float>();
  if (bfloat16) {
    const auto* weights = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
    all_column_groups(x_data, x_stride, M, weights, num_pairs, K, bias_data, out_data, out_features);
  } else {
    all_column_groups(x_data, x_stride, M, packed.data_ptr<float>(), num_pairs, K, bias_data, out_data, out_features);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_pruned, m) {
  m.def("pack_linear_weight(Tensor weight, bool bfloat16) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(tree_pruned, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
}
