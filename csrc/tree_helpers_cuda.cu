// CUDA versions of the builder's mask ops and of KV compaction, for the GPU verify path.
//
// Plain C ABI (raw device pointers, a stream, an error code back) rather than torch ops, so the
// library does not depend on torch's C++ ABI: built once with nvcc for sm_90a, it loads next to
// whatever torch the GPU machine has. tree_attn_backend/gpu/cuda_ops.py loads it with ctypes and
// checks every argument on the host before a launch (parents, indptrs, slots: the kernels index
// memory with them and trust them); the oracles are metadata/ (masks) and gpu/paged_cache.py
// (compaction).
//
// Masks. Request b has q_b new tokens in node order with request-local parents
// (parents[i] < i, -1 at the root) after c_b committed tokens. Token i sees token j of its own
// tree iff j is i or an ancestor of i. Because parents precede children, the walk from i
// upwards visits strictly decreasing indices, so "is j an ancestor-or-self of i" is decided by
// walking until the index drops to j or below: O(depth) per element, no shared state, every
// output element written exactly once by one thread.
//  - tree mask: bool [sum q_b^2], request b's [q_b, q_b] matrix row-major (cascade tree pass);
//  - custom mask: bool [sum q_b * (c_b + q_b)], row i = c_b ones then the tree row
//    (FlashInfer's unpacked custom_mask);
//  - packed custom mask: the custom mask bit-packed little-endian per request, each request
//    padded to a whole byte (FlashInfer's packed layout with byte offsets).
//
// Compaction. Moves cache rows (one token's K or V across all KV heads, contiguous) from slot
// src[m] to slot dst[m] in every layer. A destination can be the source of another move (the
// accepted path [0, 2, 3] moves 2->1 and 3->2), so all sources are gathered into scratch
// before any destination is written: two launches, each fully parallel.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;

// The host checks parents (tree_attn_backend/gpu/cuda_ops.py); should a corrupt array get
// past it anyway, a parent that does not precede its child ends the walk, so it still takes at
// most i - j steps and reads only parents[j + 1..i].
__device__ __forceinline__ bool sees(const int32_t* parents, int32_t i, int32_t j) {
  int32_t node = i;
  while (node > j) {
    const int32_t parent = parents[node];
    if (parent >= node) return false;
    node = parent;
  }
  return node == j;
}

// Index b with indptr[b] <= x < indptr[b + 1] (indptr non-decreasing, x < indptr[n]).
template <typename T>
__device__ __forceinline__ int32_t find_segment(const T* indptr, int32_t n, int64_t x) {
  int32_t lo = 0, hi = n;  // invariant: indptr[lo] <= x < indptr[hi]
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(indptr[mid]) <= x)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

__device__ __forceinline__ bool custom_mask_bit(const int32_t* parents, const int32_t* qo_indptr,
                                                const int32_t* context_lens, int32_t b, int64_t within) {
  const int32_t q = qo_indptr[b + 1] - qo_indptr[b];
  const int64_t kv = static_cast<int64_t>(context_lens[b]) + q;
  const int64_t row = within / kv;
  const int64_t col = within - row * kv - context_lens[b];
  return col < 0 || sees(parents + qo_indptr[b], static_cast<int32_t>(row), static_cast<int32_t>(col));
}

__global__ void tree_mask_kernel(const int32_t* parents, const int32_t* qo_indptr, const int64_t* mask_indptr,
                                 int32_t num_reqs, int64_t total, bool* out) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int32_t b = find_segment(mask_indptr, num_reqs, e);
    const int32_t q = qo_indptr[b + 1] - qo_indptr[b];
    const int64_t within = e - mask_indptr[b];
    out[e] = sees(parents + qo_indptr[b], static_cast<int32_t>(within / q), static_cast<int32_t>(within % q));
  }
}

__global__ void custom_mask_kernel(const int32_t* parents, const int32_t* qo_indptr, const int32_t* context_lens,
                                   const int64_t* mask_indptr, int32_t num_reqs, int64_t total, bool* out) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int32_t b = find_segment(mask_indptr, num_reqs, e);
    out[e] = custom_mask_bit(parents, qo_indptr, context_lens, b, e - mask_indptr[b]);
  }
}

__global__ void packed_custom_mask_kernel(const int32_t* parents, const int32_t* qo_indptr, const int32_t* context_lens,
                                          const int64_t* bit_indptr, const int64_t* byte_indptr, int32_t num_reqs,
                                          int64_t total_bytes, uint8_t* out) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total_bytes;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int32_t b = find_segment(byte_indptr, num_reqs, k);
    const int64_t first_bit = (k - byte_indptr[b]) * 8;
    const int64_t bits = bit_indptr[b + 1] - bit_indptr[b];
    uint8_t byte = 0;
    for (int bit = 0; bit < 8 && first_bit + bit < bits; ++bit) {
      byte |= uint8_t(custom_mask_bit(parents, qo_indptr, context_lens, b, first_bit + bit)) << bit;
    }
    out[k] = byte;  // padding bits past the request's last row stay 0
  }
}

struct CacheLayout {
  int64_t block_stride;  // bytes between cache blocks
  int64_t kv_stride;     // bytes from a block's K rows to its V rows
  int64_t token_stride;  // bytes between consecutive tokens of a block
  int64_t row_bytes;     // bytes of one token's K (or V) across heads, contiguous
  int64_t block_size;
};

__device__ __forceinline__ int64_t row_offset(const CacheLayout& layout, int64_t slot, int kv) {
  return (slot / layout.block_size) * layout.block_stride + kv * layout.kv_stride +
         (slot % layout.block_size) * layout.token_stride;
}

// One thread block per (layer, move, K or V) row; Word is uint4 when every row is 16-byte aligned.
template <typename Word, bool kGather>
__global__ void move_rows_kernel(const int64_t* layer_ptrs, const int64_t* slots, int64_t num_moves, CacheLayout layout,
                                 uint8_t* scratch) {
  const int64_t row = blockIdx.x;  // ((layer * num_moves) + move) * 2 + kv
  const int kv = static_cast<int>(row % 2);
  const int64_t move = (row / 2) % num_moves;
  const int64_t layer = row / 2 / num_moves;
  uint8_t* cache_row = reinterpret_cast<uint8_t*>(layer_ptrs[layer]) + row_offset(layout, slots[move], kv);
  uint8_t* scratch_row = scratch + row * layout.row_bytes;
  const Word* from = reinterpret_cast<const Word*>(kGather ? cache_row : scratch_row);
  Word* to = reinterpret_cast<Word*>(kGather ? scratch_row : cache_row);
  for (int64_t w = threadIdx.x; w < layout.row_bytes / int64_t(sizeof(Word)); w += blockDim.x) to[w] = from[w];
}

int64_t grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535;  // grid-stride loops cover the rest
}

template <typename Word>
cudaError_t move_rows(const int64_t* layer_ptrs, int64_t num_layers, const int64_t* src, const int64_t* dst,
                      int64_t num_moves, const CacheLayout& layout, uint8_t* scratch, cudaStream_t stream) {
  const int64_t rows = num_layers * num_moves * 2;
  move_rows_kernel<Word, true><<<rows, kThreads, 0, stream>>>(layer_ptrs, src, num_moves, layout, scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  move_rows_kernel<Word, false><<<rows, kThreads, 0, stream>>>(layer_ptrs, dst, num_moves, layout, scratch);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

// Every entry point returns a cudaError_t (0 = success); launches are asynchronous on `stream`,
// a stream of CUDA device `device` (this library has its own, static, runtime, whose current
// device is not torch's: it is set on every call).

const char* tree_pruned_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int tree_pruned_tree_mask(const int32_t* parents, const int32_t* qo_indptr, const int64_t* mask_indptr,
                          int32_t num_reqs, int64_t total, bool* out, int32_t device, cudaStream_t stream) {
  if (const cudaError_t err = cudaSetDevice(device); err != cudaSuccess) return err;
  if (total == 0) return cudaSuccess;
  tree_mask_kernel<<<grid_for(total), kThreads, 0, stream>>>(parents, qo_indptr, mask_indptr, num_reqs, total, out);
  return cudaGetLastError();
}

int tree_pruned_custom_mask(const int32_t* parents, const int32_t* qo_indptr, const int32_t* context_lens,
                            const int64_t* mask_indptr, int32_t num_reqs, int64_t total, bool* out, int32_t device,
                            cudaStream_t stream) {
  if (const cudaError_t err = cudaSetDevice(device); err != cudaSuccess) return err;
  if (total == 0) return cudaSuccess;
  custom_mask_kernel<<<grid_for(total), kThreads, 0, stream>>>(parents, qo_indptr, context_lens, mask_indptr, num_reqs,
                                                               total, out);
  return cudaGetLastError();
}

int tree_pruned_packed_custom_mask(const int32_t* parents, const int32_t* qo_indptr, const int32_t* context_lens,
                                   const int64_t* bit_indptr, const int64_t* byte_indptr, int32_t num_reqs,
                                   int64_t total_bytes, uint8_t* out, int32_t device, cudaStream_t stream) {
  if (const cudaError_t err = cudaSetDevice(device); err != cudaSuccess) return err;
  if (total_bytes == 0) return cudaSuccess;
  packed_custom_mask_kernel<<<grid_for(total_bytes), kThreads, 0, stream>>>(
      parents, qo_indptr, context_lens, bit_indptr, byte_indptr, num_reqs, total_bytes, out);
  return cudaGetLastError();
}

// layer_ptrs: device int64 [num_layers] base addresses; src/dst: device int64 [num_moves] slots;
// scratch: device bytes >= num_layers * num_moves * 2 * row_bytes; bases_aligned: every layer's
// base address is a multiple of 16 (the caller knows; the addresses live on the device).
int tree_pruned_compact_kv(const int64_t* layer_ptrs, int64_t num_layers, const int64_t* src, const int64_t* dst,
                           int64_t num_moves, int64_t block_stride, int64_t kv_stride, int64_t token_stride,
                           int64_t row_bytes, int64_t block_size, int32_t bases_aligned, uint8_t* scratch,
                           int32_t device, cudaStream_t stream) {
  if (const cudaError_t err = cudaSetDevice(device); err != cudaSuccess) return err;
  if (num_moves == 0 || num_layers == 0) return cudaSuccess;
  const CacheLayout layout{block_stride, kv_stride, token_stride, row_bytes, block_size};
  const bool aligned =
      bases_aligned && row_bytes % 16 == 0 && block_stride % 16 == 0 && kv_stride % 16 == 0 && token_stride % 16 == 0;
  return aligned ? move_rows<uint4>(layer_ptrs, num_layers, src, dst, num_moves, layout, scratch, stream)
                 : move_rows<uint8_t>(layer_ptrs, num_layers, src, dst, num_moves, layout, scratch, stream);
}

}  // extern "C"
