// CPU op: FlashInfer's bit-packed custom mask and the cascade's [q, q] tree masks, built
// straight from parent arrays in one pass.
//
// For request b with context c and q new tokens (kv_len = c + q), row i of its mask is
// c ones (the committed context) followed by the ancestor-or-self bits of token i over the
// q new tokens. Rows are concatenated row-major, bit (i * kv_len + k) of the request's
// segment, little bit order, each request padded to a byte boundary. This is exactly
// np.packbits(dense_mask_b.ravel(), bitorder="little") per request, without ever
// materializing the dense [q, c + q] bool matrix (c can be thousands of tokens).
// The second output is the last q columns of every dense mask, row-major, concatenated:
// the ancestor-or-self mask over the new tokens that the cascade's tree pass uses.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Sets bits [begin, end) of `out` (little bit order). Whole bytes are memset.
inline void set_bit_range(uint8_t* out, int64_t begin, int64_t end) {
  if (begin >= end) return;
  int64_t first_full = (begin + 7) / 8;
  int64_t last_full = end / 8;  // exclusive
  if (first_full > last_full) {  // begin and end inside one byte
    for (int64_t k = begin; k < end; ++k) out[k >> 3] |= uint8_t(1u << (k & 7));
    return;
  }
  for (int64_t k = begin; k < first_full * 8; ++k) out[k >> 3] |= uint8_t(1u << (k & 7));
  std::memset(out + first_full, 0xFF, static_cast<size_t>(last_full - first_full));
  for (int64_t k = last_full * 8; k < end; ++k) out[k >> 3] |= uint8_t(1u << (k & 7));
}

std::vector<at::Tensor> build_tree_masks(const at::Tensor& parents, const at::Tensor& qo_indptr,
                                               const at::Tensor& context_lens) {
  TORCH_CHECK(parents.device().is_cpu() && qo_indptr.device().is_cpu() && context_lens.device().is_cpu(),
              "build_tree_masks: all inputs must be CPU tensors");
  TORCH_CHECK(parents.scalar_type() == at::kInt, "parents must be int32, got ", parents.scalar_type());
  TORCH_CHECK(qo_indptr.scalar_type() == at::kLong, "qo_indptr must be int64, got ", qo_indptr.scalar_type());
  TORCH_CHECK(context_lens.scalar_type() == at::kLong, "context_lens must be int64, got ",
              context_lens.scalar_type());
  TORCH_CHECK(parents.dim() == 1 && qo_indptr.dim() == 1 && context_lens.dim() == 1, "inputs must be 1-D");
  const int64_t num_reqs = context_lens.size(0);
  TORCH_CHECK(qo_indptr.size(0) == num_reqs + 1, "qo_indptr has ", qo_indptr.size(0), " entries for ", num_reqs,
              " requests");
  auto parents_c = parents.contiguous();
  auto qo_c = qo_indptr.contiguous();
  auto ctx_c = context_lens.contiguous();
  const int32_t* par = parents_c.data_ptr<int32_t>();
  const int64_t* qo = qo_c.data_ptr<int64_t>();
  const int64_t* ctx = ctx_c.data_ptr<int64_t>();
  TORCH_CHECK(qo[0] == 0 && qo[num_reqs] == parents.size(0), "qo_indptr must start at 0 and end at ",
              parents.size(0));

  at::Tensor mask_indptr = at::empty({num_reqs + 1}, at::kLong);
  int64_t* byte_ptr = mask_indptr.data_ptr<int64_t>();
  byte_ptr[0] = 0;
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t q = qo[b + 1] - qo[b];
    TORCH_CHECK(q >= 1 && ctx[b] >= 0, "request ", b, ": bad lengths (query ", q, ", context ", ctx[b], ")");
    byte_ptr[b + 1] = byte_ptr[b] + (q * (ctx[b] + q) + 7) / 8;
  }
  std::vector<int64_t> tree_ptr(num_reqs + 1, 0);
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t q = qo[b + 1] - qo[b];
    tree_ptr[b + 1] = tree_ptr[b] + q * q;
  }
  at::Tensor packed = at::zeros({byte_ptr[num_reqs]}, at::kByte);
  at::Tensor tree_mask = at::zeros({tree_ptr[num_reqs]}, at::kBool);
  uint8_t* out = packed.data_ptr<uint8_t>();
  bool* tree_out = tree_mask.data_ptr<bool>();

  at::parallel_for(0, num_reqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> rows;  // ancestor-or-self bitsets of this request, [q, words]
    for (int64_t b = begin; b < end; ++b) {
      const int64_t q = qo[b + 1] - qo[b];
      const int64_t c = ctx[b];
      const int64_t kv = c + q;
      const int64_t words = (q + 63) / 64;
      rows.assign(static_cast<size_t>(q * words), 0);
      uint8_t* seg = out + byte_ptr[b];
      bool* tree_seg = tree_out + tree_ptr[b];
      for (int64_t i = 0; i < q; ++i) {
        uint64_t* row = rows.data() + i * words;
        const int32_t p = par[qo[b] + i];
        TORCH_CHECK((i == 0 && p == -1) || (i > 0 && p >= 0 && p < i), "request ", b, ": parents[", i, "] = ", p,
                    " is not a topologically ordered tree");
        if (p >= 0) std::memcpy(row, rows.data() + p * words, static_cast<size_t>(words) * sizeof(uint64_t));
        row[i >> 6] |= uint64_t(1) << (i & 63);
        const int64_t base = i * kv;
        set_bit_range(seg, base, base + c);
        for (int64_t w = 0; w < words; ++w) {
          uint64_t word = row[w];
          while (word) {
            const int64_t j = w * 64 + __builtin_ctzll(word);
            const int64_t bit = base + c + j;
            seg[bit >> 3] |= uint8_t(1u << (bit & 7));
            tree_seg[i * q + j] = true;
            word &= word - 1;
          }
        }
      }
    }
  });
  return {packed, mask_indptr, tree_mask};
}

}  // namespace

TORCH_LIBRARY(tree_pruned, m) {
  // -> [packed uint8 [bytes], byte_indptr int64 [B+1], tree_mask bool [sum q^2]]
  m.def("build_tree_masks(Tensor parents, Tensor qo_indptr, Tensor context_lens) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(tree_pruned, CPU, m) { m.impl("build_tree_masks", &build_tree_masks); }
