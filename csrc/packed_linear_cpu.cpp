// Linear layers for the few rows of a decode or verify step (torch library `tree_pruned`).
//
// tree_pruned::pack_linear_weight(weight, bfloat16) -> packed
//   weight: float32 [N, K], CPU (nn.Linear's layout: out_features x in_features)
//   packed: [ceil(N / kLanes), K, kLanes]: block b holds columns b * kLanes ... of the output,
//           for every k the kLanes weights side by side; columns past N are zero. float32, or
//           with `bfloat16` bfloat16, which holds the same values in half the bytes; then every
//           weight must be a bfloat16 value (as a bfloat16 checkpoint's are, loaded as float32),
//           else the op fails naming the first one that is not
//
// tree_pruned::packed_linear(x, packed, bias, out_features) -> out
//   x:      float32 [M, K], CPU (rows strided apart are read in place, other layouts copied)
//   bias:   float32 [N] or None
//   out:    float32 [M, N], out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n])
//
// Why: a verify step at one request has 1 + (draft tokens) rows, and on a CPU each row's share
// of the weights' arithmetic is paid on top of streaming the weights from memory: vLLM's
// oneDNN products take 19.3 ms for 1 row of SmolLM2-135M's 30 layers and LM head (float32), 24.3
// for 5, 27.0 for 9. Here every weight vector is loaded once per row tile and used by all the
// tile's rows, with the weights prefetched ahead so the arithmetic overlaps the stream: 16.0 ms
// for 1 row, 18.0 for 5, 20.3 for 9 (`tree-pruned bench linear`). Past a few dozen rows oneDNN's
// blocking wins; the caller picks this op for small batches only. A step of a few rows is bound
// by streaming the weights, so bfloat16 storage (widened to float32 in registers, exactly) makes
// it faster again at the same arithmetic.
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
using tree_pruned::load_bfloat16_lanes;
using tree_pruned::load_lanes;

inline Lanes load_weight_lanes(const float* p) { return load_lanes(p); }
inline Lanes load_weight_lanes(const uint16_t* p) { return load_bfloat16_lanes(p); }

#if defined(__AVX512F__)
constexpr int kTileRows = 8;  // 8 rows x 3 vectors = 24 of the 32 registers accumulate
#else
constexpr int kTileRows = 4;  // 4 rows x 3 vectors = 12 of the 16 registers accumulate
#endif
constexpr int kTileBlocks = 3;  // column blocks per tile: kTileBlocks * kLanes output columns
// float32 weights are prefetched this many k steps ahead (2 KiB per block stream with 16 lanes):
// far enough to hide memory latency behind a tile's arithmetic, measured best among 8 to 128;
// bfloat16 weights as many bytes ahead.
constexpr int64_t kPrefetchSteps = 32;

// out[m, columns of `blocks` blocks from column0] for the tile's ROWS rows: one fused
// multiply-add chain over k per output (fma_lanes), so every tile shape gives the same bits.
// W: the packed weights' element, float or uint16_t (bfloat16 bits).
template <int ROWS, int BLOCKS, typename W>
void tile_product(const float* x, int64_t x_stride, const W* weight_blocks, int64_t K, const float* bias, float* out,
                  int64_t out_stride, int64_t column0, int64_t N) {
  constexpr int64_t prefetch_steps = kPrefetchSteps * static_cast<int64_t>(sizeof(float) / sizeof(W));
  Lanes acc[ROWS][BLOCKS];
  for (int m = 0; m < ROWS; ++m) {
    for (int b = 0; b < BLOCKS; ++b) acc[m][b] = Lanes{};
  }
  for (int64_t k = 0; k < K; ++k) {
    Lanes w[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b) {
      const W* block = weight_blocks + b * K * kLanes;
      __builtin_prefetch(block + (k + prefetch_steps) * kLanes);  // never faults, even past the end
      w[b] = load_weight_lanes(block + k * kLanes);
    }
    for (int m = 0; m < ROWS; ++m) {
      const Lanes xk = Lanes{} + x[m * x_stride + k];
      for (int b = 0; b < BLOCKS; ++b) acc[m][b] = fma_lanes(xk, w[b], acc[m][b]);
    }
  }
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t column = column0 + b * kLanes;
    const int64_t width = std::min(kLanes, N - column);
    for (int m = 0; m < ROWS; ++m) {
      float* row = out + m * out_stride + column;
      if (bias != nullptr) {
        for (int64_t l = 0; l < width; ++l) row[l] = acc[m][b][l] + bias[column + l];
      } else {
        std::memcpy(row, &acc[m][b], width * sizeof(float));
      }
    }
  }
}

// Every row tile of x against BLOCKS column blocks (the blocks stay in cache across tiles).
template <int BLOCKS, typename W>
void column_group(const float* x, int64_t x_stride, int64_t M, const W* weight_blocks, int64_t K, const float* bias,
                  float* out, int64_t column0, int64_t N) {
  for (int64_t m = 0; m < M; m += kTileRows) {
    const float* xm = x + m * x_stride;
    float* om = out + m * N;
    switch (std::min<int64_t>(kTileRows, M - m)) {
#define TILE_CASE(R)                                                                     \
  case R:                                                                                \
    tile_product<R, BLOCKS, W>(xm, x_stride, weight_blocks, K, bias, om, N, column0, N); \
    break;
      TILE_CASE(1)
      TILE_CASE(2)
      TILE_CASE(3)
      TILE_CASE(4)
#if defined(__AVX512F__)
      TILE_CASE(5)
      TILE_CASE(6)
      TILE_CASE(7)
      TILE_CASE(8)
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
  const int64_t num_blocks = (N + kLanes - 1) / kLanes;
  at::Tensor padded = at::zeros({num_blocks * kLanes, K}, stored.options());
  padded.narrow(0, 0, N).copy_(stored);
  // [blocks, lanes, K] -> [blocks, K, lanes]
  return padded.view({num_blocks, kLanes, K}).transpose(1, 2).contiguous();
}

// Every column group (kTileBlocks blocks) of the packed weights against all of x's rows.
template <typename W>
void all_column_groups(const float* x, int64_t x_stride, int64_t M, const W* weights, int64_t num_blocks, int64_t K,
                       const float* bias, float* out, int64_t N) {
  const int64_t num_groups = (num_blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t block = g * kTileBlocks;
      const W* group = weights + block * K * kLanes;
      const int64_t column0 = block * kLanes;
      switch (std::min<int64_t>(kTileBlocks, num_blocks - block)) {
        case 1:
          column_group<1>(x, x_stride, M, group, K, bias, out, column0, N);
          break;
        case 2:
          column_group<2>(x, x_stride, M, group, K, bias, out, column0, N);
          break;
        default:
          column_group<3>(x, x_stride, M, group, K, bias, out, column0, N);
          break;
      }
    }
  });
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  constexpr const char* op = "packed_linear";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": x must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(packed.device().is_cpu() &&
                  (packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kBFloat16) && packed.dim() == 3 &&
                  packed.is_contiguous() && packed.size(2) == kLanes,
              op, ": packed must be pack_linear_weight's contiguous float32 or bfloat16 [blocks, K, ", kLanes,
              "] CPU tensor, got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t M = x.size(0), K = x.size(1), num_blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, op, ": x has ", K, " features, the packed weight ", packed.size(1));
  TORCH_CHECK(out_features > (num_blocks - 1) * kLanes && out_features <= num_blocks * kLanes, op,
              ": out_features = ", out_features, " does not match the packed weight's ", num_blocks, " blocks of ",
              kLanes, " columns");
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
  if (packed.scalar_type() == at::kBFloat16) {
    const auto* weights = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
    all_column_groups(x_data, x_stride, M, weights, num_blocks, K, bias_data, out_data, out_features);
  } else {
    all_column_groups(x_data, x_stride, M, packed.data_ptr<float>(), num_blocks, K, bias_data, out_data, out_features);
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
