// Torch glue for csrc/block_attention.cu: the op schema, argument checks, the workspace and
// the current CUDA stream. The .cu file needs only the CUDA toolkit (so it compiles on a
// machine whose torch is a CPU build); it exposes the two host functions declared below.
//
// Python reaches the op only through vllm_twotower/kernels/compiled.py, which builds this
// library and registers the fake (meta) implementation.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>

namespace vllm_twotower {

// Defined in block_attention.cu; each returns nullptr on success, else an error message.
// (C++ name mangling turns a signature mismatch into a load-time undefined symbol.)
const char* block_attention_workspace(int num_requests, int num_q_heads, int num_kv_heads,
                                      int head_dim, int block_size, int max_blocks,
                                      int64_t* workspace_floats);
const char* block_attention_launch(int dtype, int head_dim, int num_requests, int num_q_heads,
                                   int num_kv_heads, int block_size, int max_blocks, float scale,
                                   const void* query, const int64_t* query_strides,
                                   const void* key, const int64_t* key_strides,
                                   const void* value, const int64_t* value_strides,
                                   const void* key_cache, const int64_t* key_cache_strides,
                                   const void* value_cache, const int64_t* value_cache_strides,
                                   const int32_t* block_table, const int64_t* block_table_strides,
                                   const int32_t* context_lens, int64_t context_lens_stride,
                                   void* out, const int64_t* out_strides, float* workspace,
                                   int64_t workspace_floats, cudaStream_t stream);

namespace {

constexpr int64_t kCanvas = 16;

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK(t.is_cuda(), "block_attention: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == query.device(), "block_attention: ", name, " is on ", t.device(),
              " but query is on ", query.device());
}

void block_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& block_table, const at::Tensor& context_lens, double scale,
                     at::Tensor& out) {
  check_cuda(query, "query", query);
  check_cuda(key, "key", query);
  check_cuda(value, "value", query);
  check_cuda(key_cache, "key_cache", query);
  check_cuda(value_cache, "value_cache", query);
  check_cuda(block_table, "block_table", query);
  check_cuda(context_lens, "context_lens", query);
  check_cuda(out, "out", query);

  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "block_attention: query must be float16 or bfloat16, got ", dtype);
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&key, &value, &key_cache, &value_cache, &out}) {
    TORCH_CHECK(t->scalar_type() == dtype, "block_attention: key, value, key_cache, ",
                "value_cache and out must have query's dtype ", dtype, ", got ",
                t->scalar_type());
  }
  TORCH_CHECK(block_table.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_attention: block_table and context_lens must be int32, got ",
              block_table.scalar_type(), " and ", context_lens.scalar_type());

  TORCH_CHECK(query.dim() == 3, "block_attention: query must be [R*16, Hq, D], got ",
              query.sizes());
  const int64_t tokens = query.size(0), hq = query.size(1), d = query.size(2);
  TORCH_CHECK(tokens % kCanvas == 0, "block_attention: query has ", tokens,
              " rows, not a multiple of the 16-token canvas");
  const int64_t requests = tokens / kCanvas;
  TORCH_CHECK(key.dim() == 3 && key.size(0) == tokens && key.size(2) == d,
              "block_attention: key must be [", tokens, ", Hkv, ", d, "], got ", key.sizes());
  const int64_t hkv = key.size(1);
  TORCH_CHECK(value.sizes() == key.sizes(), "block_attention: value must match key's shape ",
              key.sizes(), ", got ", value.sizes());
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "block_attention: query heads (", hq,
              ") must be a multiple of kv heads (", hkv, ")");
  TORCH_CHECK(d == 64 || d == 128, "block_attention: head dim ", d,
              " is not supported by the CUDA kernel (64 or 128)");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(2) == hkv && key_cache.size(3) == d,
              "block_attention: key_cache must be a [num_blocks, block_size, ", hkv, ", ", d,
              "] view, got ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(),
              "block_attention: value_cache must match key_cache's shape ", key_cache.sizes(),
              ", got ", value_cache.sizes());
  // vLLM sizes both for max_num_seqs: rows past the R requests are never read.
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= requests,
              "block_attention: block_table must be [>= ", requests, ", max_blocks], got ",
              block_table.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) >= requests,
              "block_attention: context_lens must be [>= ", requests, "], got ",
              context_lens.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "block_attention: out must have query's shape ",
              query.sizes(), ", got ", out.sizes());
  if (requests == 0) return;

  const c10::cuda::CUDAGuard guard(query.device());
  const int block_size = static_cast<int>(key_cache.size(1));
  const int max_blocks = static_cast<int>(block_table.size(1));
  int64_t ws_floats = 0;
  const char* err = block_attention_workspace(static_cast<int>(requests), static_cast<int>(hq),
                                              static_cast<int>(hkv), static_cast<int>(d),
                                              block_size, max_blocks, &ws_floats);
  TORCH_CHECK(err == nullptr, "block_attention: ", err ? err : "");
  at::Tensor workspace;
  if (ws_floats > 0) workspace = at::empty({ws_floats}, query.options().dtype(at::kFloat));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device()).stream();
  err = block_attention_launch(
      dtype == at::kHalf ? 0 : 1, static_cast<int>(d), static_cast<int>(requests),
      static_cast<int>(hq), static_cast<int>(hkv), block_size, max_blocks,
      static_cast<float>(scale), query.data_ptr(), query.strides().data(), key.data_ptr(),
      key.strides().data(), value.data_ptr(), value.strides().data(), key_cache.data_ptr(),
      key_cache.strides().data(), value_cache.data_ptr(), value_cache.strides().data(),
      block_table.data_ptr<int32_t>(), block_table.strides().data(),
      context_lens.data_ptr<int32_t>(), context_lens.stride(0), out.data_ptr(),
      out.strides().data(), ws_floats > 0 ? workspace.data_ptr<float>() : nullptr, ws_floats,
      stream);
  TORCH_CHECK(err == nullptr, "block_attention: ", err ? err : "");
}

}  // namespace
}  // namespace vllm_twotower

// The schema is defined once, here; further ops would join with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(vllm_twotower, m) {
  m.def(
      "block_attention(Tensor query, Tensor key, Tensor value, Tensor key_cache, "
      "Tensor value_cache, Tensor block_table, Tensor context_lens, float scale, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_twotower, CUDA, m) {
  m.impl("block_attention", &vllm_twotower::block_attention);
}
