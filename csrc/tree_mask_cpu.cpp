// Native CPU ops for the metadata builder (torch library `tree_pruned`). Each has a numpy
// version in metadata/ that is both the fallback and the oracle the fuzz suite holds it to.
//
// build_tree_masks: FlashInfer's bit-packed custom mask and the cascade's [q, q] tree masks,
// straight from parent arrays in one pass. For request b with context c and q new tokens
// (kv_len = c + q), row i of its mask is c ones (the committed context) followed by the
// ancestor-or-self bits of token i over the q new tokens. Rows are concatenated row-major,
// little bit order, each request padded to a byte boundary: exactly
// np.packbits(dense_mask_b.ravel(), bitorder="little") per request, written byte by byte
// without ever materializing the dense [q, c + q] bool matrix. The second output is the last q
// columns of every dense mask, row-major, concatenated (the cascade's tree pass).
//
// tree_token_layout: depth, RoPE position (context + depth), cache slot (linear position
// context + i through the block table) and is-chain flag of every new token, plus FlashInfer's
// paged-KV layout (indptr / indices / last page length) of the whole KV and of the context.
//
// Both ops check every input before reading it (input_checks.h): qo_indptr starts at 0, never
// decreases and ends at the number of tokens, every request has >= 1 new token and a context in
// [0, 2^31), its parents form a tree in topological order, and the block-table entries a
// request uses exist and are in [0, 2^31).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "ancestors.h"
#include "input_checks.h"

namespace {

// Appends bits to a byte buffer in little bit order; every byte is written exactly once.
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}

  // Appends the low n (<= 32) bits of `bits`.
  void put(uint64_t bits, int n) {
    acc_ |= (bits & ((uint64_t(1) << n) - 1)) << pending_;
    pending_ += n;
    while (pending_ >= 8) {
      *out_++ = uint8_t(acc_);
      acc_ >>= 8;
      pending_ -= 8;
    }
  }

  void put_ones(int64_t count) {
    if (pending_ && count) {  // complete the current byte first
      const int k = static_cast<int>(std::min<int64_t>(count, 8 - pending_));
      put((uint64_t(1) << k) - 1, k);
      count -= k;
    }
    if (count >= 8) {  // now byte aligned
      std::memset(out_, 0xFF, static_cast<size_t>(count / 8));
      out_ += count / 8;
      count %= 8;
    }
    if (count) put((uint64_t(1) << count) - 1, static_cast<int>(count));
  }

  // Appends the first n bits of a bitset.
  void put_bitset(const uint64_t* words, int64_t n) {
    for (int64_t w = 0; n > 0; ++w, n -= 64) {
      const int64_t take = std::min<int64_t>(n, 64);
      put(words[w] & 0xFFFFFFFFu, static_cast<int>(std::min<int64_t>(take, 32)));
      if (take > 32) put(words[w] >> 32, static_cast<int>(take - 32));
    }
  }

  void finish() {
    if (pending_) *out_++ = uint8_t(acc_);
    acc_ = 0;
    pending_ = 0;
  }

 private:
  uint8_t* out_;
  uint64_t acc_ = 0;
  int pending_ = 0;
};

struct Batch {
  const int32_t* parents;
  const int64_t* qo;
  const int64_t* ctx;
  int64_t num_reqs;
};

// Checks the inputs both ops share: parents int32 [N], qo_indptr int64 [B + 1] over the N
// tokens with every request holding >= 1 of them, context_lens int64 [B] in [0, 2^31) (so
// q * (c + q) and the int32 page offsets cannot overflow), and each request's parents a tree
// in topological order.
Batch check_batch(const char* op, const at::Tensor& parents, const at::Tensor& qo_indptr,
                  const at::Tensor& context_lens) {
  tree_pruned::check_vector(op, "parents", parents, at::kInt);
  tree_pruned::check_vector(op, "qo_indptr", qo_indptr, at::kLong);
  tree_pruned::check_vector(op, "context_lens", context_lens, at::kLong);
  const int64_t num_reqs = context_lens.size(0);
  TORCH_CHECK(qo_indptr.size(0) == num_reqs + 1, op, ": qo_indptr has ", qo_indptr.size(0), " entries for ", num_reqs,
              " requests");
  Batch batch{parents.data_ptr<int32_t>(), qo_indptr.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), num_reqs};
  tree_pruned::check_indptr(op, "qo_indptr", batch.qo, num_reqs, parents.size(0), "parents");
  tree_pruned::check_range(op, "context_lens", batch.ctx, 0, num_reqs, tree_pruned::kInt32Limit, "the int32 limit");
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t q = batch.qo[b + 1] - batch.qo[b];
    TORCH_CHECK(q >= 1, op, ": request ", b, " has ", q, " new tokens (must be >= 1)");
    tree_pruned::check_parents(op, b, batch.parents + batch.qo[b], q);
  }
  return batch;
}

// Returns the first `size` elements of `buffer` when it is a large enough contiguous CPU
// tensor of `dtype`, else a new tensor. Reusing a caller-owned buffer across steps avoids
// fresh pages (and their page faults) for masks of several MB.
at::Tensor output_buffer(const std::optional<at::Tensor>& buffer, int64_t size, at::ScalarType dtype) {
  if (buffer.has_value() && buffer->device().is_cpu() && buffer->scalar_type() == dtype && buffer->dim() == 1 &&
      buffer->is_contiguous() && buffer->size(0) >= size) {
    return buffer->narrow(0, 0, size);
  }
  return at::empty({size}, dtype);
}

std::vector<at::Tensor> build_tree_masks(const at::Tensor& parents, const at::Tensor& qo_indptr,
                                         const at::Tensor& context_lens, const std::optional<at::Tensor>& packed_buffer,
                                         const std::optional<at::Tensor>& tree_buffer) {
  const Batch batch = check_batch("build_tree_masks", parents, qo_indptr, context_lens);
  const int64_t num_reqs = batch.num_reqs;
  at::Tensor mask_indptr = at::empty({num_reqs + 1}, at::kLong);
  int64_t* byte_ptr = mask_indptr.data_ptr<int64_t>();
  std::vector<int64_t> tree_ptr(num_reqs + 1, 0);
  byte_ptr[0] = 0;
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t q = batch.qo[b + 1] - batch.qo[b];
    byte_ptr[b + 1] = byte_ptr[b] + (q * (batch.ctx[b] + q) + 7) / 8;
    tree_ptr[b + 1] = tree_ptr[b] + q * q;
  }
  // Every byte of both outputs is written below, so no zero fill.
  at::Tensor packed = output_buffer(packed_buffer, byte_ptr[num_reqs], at::kByte);
  at::Tensor tree_mask = output_buffer(tree_buffer, tree_ptr[num_reqs], at::kBool);
  uint8_t* packed_out = packed.data_ptr<uint8_t>();
  bool* tree_out = tree_mask.data_ptr<bool>();

  at::parallel_for(0, num_reqs, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> rows;  // ancestor-or-self bitsets of one request, [q, words]
    for (int64_t b = begin; b < end; ++b) {
      const int64_t q = batch.qo[b + 1] - batch.qo[b];
      const int64_t c = batch.ctx[b];
      const int64_t words = (q + 63) / 64;
      const int32_t* par = batch.parents + batch.qo[b];
      rows.assign(static_cast<size_t>(q * words), 0);
      BitWriter writer(packed_out + byte_ptr[b]);
      bool* tree_seg = tree_out + tree_ptr[b];
      for (int64_t i = 0; i < q; ++i) {
        tree_pruned::fill_ancestor_row(rows.data(), words, par, i);
        const uint64_t* row = rows.data() + i * words;
        writer.put_ones(c);
        writer.put_bitset(row, q);
        bool* tree_row = tree_seg + i * q;
        std::memset(tree_row, 0, static_cast<size_t>(q));
        for (int64_t w = 0; w < words; ++w) {
          for (uint64_t word = row[w]; word; word &= word - 1) tree_row[w * 64 + __builtin_ctzll(word)] = true;
        }
      }
      writer.finish();
    }
  });
  return {packed, mask_indptr, tree_mask};
}

std::vector<at::Tensor> tree_token_layout(const at::Tensor& parents, const at::Tensor& qo_indptr,
                                          const at::Tensor& context_lens, const at::Tensor& block_table,
                                          int64_t block_size) {
  constexpr const char* op = "tree_token_layout";
  const Batch batch = check_batch(op, parents, qo_indptr, context_lens);
  TORCH_CHECK(block_table.device().is_cpu() && block_table.scalar_type() == at::kLong && block_table.dim() == 2 &&
                  block_table.size(0) == batch.num_reqs && block_table.is_contiguous(),
              op, ": block_table must be a contiguous int64 CPU tensor [num_reqs, max_blocks], got ",
              block_table.scalar_type(), " ", block_table.sizes(), " on ", block_table.device());
  // Slots are block id * block_size + offset in int64, with ids < 2^31 (checked below).
  TORCH_CHECK(block_size > 0 && block_size < tree_pruned::kInt32Limit, op, ": block_size = ", block_size,
              " (must be in [1, 2^31))");
  const int64_t n = parents.size(0);
  const int64_t max_blocks = block_table.size(1);
  const int64_t* table = block_table.data_ptr<int64_t>();
  int64_t total_pages = 0;  // of the whole KV; the context alone has no more
  for (int64_t b = 0; b < batch.num_reqs; ++b) {
    const int64_t q = batch.qo[b + 1] - batch.qo[b];
    const int64_t pages = (batch.ctx[b] + q + block_size - 1) / block_size;
    TORCH_CHECK(pages <= max_blocks, op, ": block_table is too short for request ", b, ": context ", batch.ctx[b],
                " + ", q, " new tokens need ", pages, " blocks of ", block_size, ", the table has ", max_blocks,
                " columns");
    // Only the blocks a request uses are read (vLLM pads the rest of the row); they become
    // int32 page indices.
    tree_pruned::check_range(op, "block_table", table + b * max_blocks, 0, pages, tree_pruned::kInt32Limit,
                             "the int32 limit", b);
    total_pages += pages;
  }
  TORCH_CHECK(total_pages < tree_pruned::kInt32Limit, op, ": ", total_pages, " pages overflow the int32 page indptr");
  at::Tensor depths = at::empty({n}, at::kInt);
  at::Tensor positions = at::empty({n}, at::kLong);
  at::Tensor slots = at::empty({n}, at::kLong);
  at::Tensor is_chain = at::empty({batch.num_reqs}, at::kBool);
  int32_t* depth = depths.data_ptr<int32_t>();
  int64_t* position = positions.data_ptr<int64_t>();
  int64_t* slot = slots.data_ptr<int64_t>();
  bool* chain = is_chain.data_ptr<bool>();
  for (int64_t b = 0; b < batch.num_reqs; ++b) {
    const int64_t start = batch.qo[b], q = batch.qo[b + 1] - start, c = batch.ctx[b];
    const int64_t* row = table + b * max_blocks;
    bool linear = true;
    for (int64_t i = 0; i < q; ++i) {
      const int32_t p = batch.parents[start + i];
      const int32_t d = p < 0 ? 0 : depth[start + p] + 1;  // parents come first
      depth[start + i] = d;
      position[start + i] = c + d;
      const int64_t pos = c + i;
      slot[start + i] = row[pos / block_size] * block_size + pos % block_size;
      linear = linear && p == i - 1;
    }
    chain[b] = linear;
  }
  // FlashInfer's paged layout of the whole KV (context + new tokens) and of the context alone.
  std::vector<at::Tensor> out{depths, positions, slots, is_chain};
  for (const bool whole : {true, false}) {
    at::Tensor indptr = at::empty({batch.num_reqs + 1}, at::kInt);
    at::Tensor last = at::empty({batch.num_reqs}, at::kInt);
    int32_t* ip = indptr.data_ptr<int32_t>();
    int32_t* lp = last.data_ptr<int32_t>();
    ip[0] = 0;
    for (int64_t b = 0; b < batch.num_reqs; ++b) {
      const int64_t len = batch.ctx[b] + (whole ? batch.qo[b + 1] - batch.qo[b] : 0);
      const int64_t pages = (len + block_size - 1) / block_size;
      ip[b + 1] = static_cast<int32_t>(ip[b] + pages);
      lp[b] = static_cast<int32_t>(pages ? len - (pages - 1) * block_size : 0);
    }
    at::Tensor indices = at::empty({ip[batch.num_reqs]}, at::kInt);
    int32_t* idx = indices.data_ptr<int32_t>();
    for (int64_t b = 0; b < batch.num_reqs; ++b) {
      for (int64_t k = 0; k < ip[b + 1] - ip[b]; ++k) idx[ip[b] + k] = static_cast<int32_t>(table[b * max_blocks + k]);
    }
    out.insert(out.end(), {indptr, indices, last});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tree_pruned, m) {
  // -> [packed uint8 [bytes], byte_indptr int64 [B+1], tree_mask bool [sum q^2]]
  // The optional buffers are written in place when large enough (see output_buffer).
  m.def(
      "build_tree_masks(Tensor parents, Tensor qo_indptr, Tensor context_lens, Tensor? packed_buffer=None, "
      "Tensor? tree_buffer=None) -> Tensor[]");
  // -> [depths int32 [N], positions int64 [N], slot_mapping int64 [N], is_chain bool [B],
  //     then (indptr int32 [B+1], indices int32 [pages], last_page_len int32 [B]) for the whole
  //     KV and again for the context alone]
  m.def(
      "tree_token_layout(Tensor parents, Tensor qo_indptr, Tensor context_lens, Tensor block_table, "
      "int block_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(tree_pruned, CPU, m) {
  m.impl("build_tree_masks", &build_tree_masks);
  m.impl("tree_token_layout", &tree_token_layout);
}
