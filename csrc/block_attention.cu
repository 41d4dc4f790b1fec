// Fused block attention for the TwoTower denoiser (CUDA, sm_80+).
//
// Reference twin: vllm_twotower/kernels/block_attention_ref.py::block_attention_reference.
// For request r, the 16 canvas queries (rows 16r..16r+15 of query [R*16, Hq, D]) attend,
// NON-causally and without rotary, over
//   [r's context K/V, read in place from the paged cache (token j at
//    cache[block_table[r, j / bs], j % bs, kv_head, :], j < context_lens[r]);
//    the canvas's own 16 K/V from key/value [R*16, Hkv, D]],
// with GQA (query head h reads kv head h / (Hq / Hkv)) and an fp32 softmax(scale * q.k).
//
// Design
// * One CTA per (context split, kv head x query-head chunk, request). Its query tile packs the
//   16 canvas queries of the 8 or 16 query heads sharing one kv head (HT heads x 16 rows, one
//   16-row WMMA block per head), so every K/V tile read from the cache serves all of them.
// * K/V stream through shared memory in 32-key tiles, double-buffered with cp.async (when the
//   source is 16-byte aligned with unit last stride; plain loads otherwise: the cache may be
//   any strided view, e.g. vLLM's head-major CPU layout permuted to [blocks, bs, Hkv, D]).
// * Q.K^T and P.V run on tensor cores (nvcuda::wmma, 16x16x16, fp32 accumulate). Each warp
//   owns whole query heads, so the online softmax (fp32 running max / sum, base-2) needs no
//   cross-warp traffic. The accumulator's element -> row map is opaque in the WMMA API, so it
//   is read once from a fragment loaded from a matrix whose entries are their row numbers.
// * Split 0 also processes the canvas's own 16 keys as one extra tile, so every query row sees
//   at least 16 keys: the final softmax sum is never 0, even for an empty context.
// * Flash-decoding: the host picks num_splits from shapes alone (no sync on context_lens);
//   each request's context is cut evenly into at most that many splits (split_tokens_for),
//   one CTA each, writing its unnormalised fp32 accumulator and (max, sum) to a workspace
//   that a merge kernel combines. A split past its request's context does nothing and the
//   merge never reads it. With num_splits == 1 the attention kernel writes `out` itself.
//
// This file needs only the CUDA toolkit: the torch glue (at::Tensor checks, workspace
// allocation, current stream) is in bindings.cpp, which calls the two host functions at the
// bottom. Invariants the kernel relies on and does not check (it cannot without a sync):
// block_table entries for j < context_lens[r] are valid block ids; context_lens is clamped to
// [0, max_blocks * block_size] so a bad length cannot read past the block table row.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <string>

namespace vllm_twotower {
namespace {

constexpr int kCanvas = 16;        // canvas queries per request == one WMMA row block
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 32;         // keys per streamed K/V tile
constexpr int kPad = 8;            // 16-byte row padding: WMMA ldm rule, fewer bank conflicts
constexpr int kLdS = kTileN + 4;   // fp32 score rows (also the 16x16 epilogue staging)
constexpr int kLdP = kTileN + 8;   // 16-bit probability rows
constexpr int kMinSplitTokens = 256;
constexpr int kMaxSplits = 128;
constexpr float kLog2e = 1.4426950408889634f;
// Per-warp scratch: scores [16][kLdS] f32, probabilities [16][kLdP] 16-bit, alpha[16], l[16].
constexpr int kWarpBytes = 16 * kLdS * 4 + 16 * kLdP * 2 + 2 * 16 * 4;
static_assert(kWarpBytes % 32 == 0, "WMMA pointers must stay 32-byte aligned");

struct Strided {  // a 16-bit tensor; strides in elements
  const uint16_t* ptr;
  int64_t s0, s1, s2, s3;
  bool vec;  // 16-byte cp.async is legal for every row (aligned base, strides % 8, s_last == 1)
};

struct Params {
  Strided q, k, v;     // [R*16, H, D]: s0 token, s1 head, s2 dim
  Strided kc, vc;      // [num_blocks, block_size, Hkv, D]
  const int32_t* block_table;
  int64_t bt_s0, bt_s1;
  const int32_t* context_lens;
  int64_t cl_s0;
  void* out;
  int64_t o_s0, o_s1, o_s2;
  float* ws_acc;       // [splits][R*16][Hq][D] unnormalised accumulators
  float* ws_m;         // [splits][R*16][Hq] running max (base 2, scaled)
  float* ws_l;         // [splits][R*16][Hq] running sum
  int num_requests, num_q_heads, group, head_chunks;
  int block_size, max_blocks, num_splits;
  float scale_log2;
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int clamped_context(const Params& p, int r) {
  const int64_t n = p.context_lens[r * p.cl_s0];
  const int64_t cap = static_cast<int64_t>(p.max_blocks) * p.block_size;
  return static_cast<int>(n < 0 ? 0 : (n > cap ? cap : n));
}

// A request's context is cut evenly into at most num_splits splits of >= kMinSplitTokens keys
// (rounded up to whole tiles); split s holds keys [s * st, min(ctx, (s + 1) * st)). Splits
// with s * st >= ctx hold nothing: the attention kernel skips them (except split 0, which has
// the canvas) and the merge does not read them. Both kernels use this one rule.
__device__ __forceinline__ int split_tokens_for(const Params& p, int ctx) {
  const int want = max(1, min((ctx + kMinSplitTokens - 1) / kMinSplitTokens, p.num_splits));
  const int st = ((ctx + want - 1) / want + kTileN - 1) / kTileN * kTileN;
  return max(st, kTileN);
}

// Fills `rows` rows of D 16-bit values at dst (row pitch ld): row i < valid from
// src + row_off(i) (+ d * stride_d), the rest with zeros, so that P = 0 never meets a NaN
// left in shared memory. Vector path: asynchronous; the caller commits and waits.
template <int D, typename RowOff>
__device__ __forceinline__ void load_rows(uint16_t* dst, int ld, int rows, int valid,
                                          const Strided& src, int64_t stride_d, RowOff row_off) {
  if (src.vec) {
    constexpr int kChunks = D / 8;
    for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      uint16_t* d = dst + row * ld + col;
      if (row < valid) {
        __pipeline_memcpy_async(d, src.ptr + row_off(row) + col, 16);
      } else {
        *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    for (int e = threadIdx.x; e < rows * D; e += kThreads) {
      const int row = e / D, col = e % D;
      dst[row * ld + col] = row < valid ? src.ptr[row_off(row) + col * stride_d] : uint16_t(0);
    }
  }
}

template <typename T, int D, int RB>
__global__ void __launch_bounds__(kThreads, 1) block_attention_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using AFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using KFrag = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using VFrag = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  constexpr int kAcc = AccFrag::num_elements;
  constexpr int HT = kWarps * RB;     // query heads per CTA; warp w owns heads w*RB .. w*RB+RB-1
  constexpr int LD = D + kPad;        // row pitch of the Q, K and V tiles
  constexpr int kTileElems = kTileN * LD;

  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);                 // [HT*16][LD], row = head*16 + query
  T* kv_s = q_s + HT * kCanvas * LD;                   // [2 stages][K, V][kTileN][LD]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* wbase = reinterpret_cast<unsigned char*>(kv_s + 4 * kTileElems);
  float* s_w = reinterpret_cast<float*>(wbase + warp * kWarpBytes);  // [16][kLdS]
  T* p_w = reinterpret_cast<T*>(s_w + 16 * kLdS);                  // [16][kLdP]
  float* alpha_w = reinterpret_cast<float*>(p_w + 16 * kLdP);       // [16]
  float* l_w = alpha_w + 16;                                        // [16]

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.head_chunks, chunk = blockIdx.y % p.head_chunks;
  const int r = blockIdx.z;
  const int ctx = clamped_context(p, r);
  const int st = split_tokens_for(p, ctx);
  const int begin = split * st;
  if (split > 0 && begin >= ctx) return;  // empty split: the merge does not read it
  const int n_ctx = max(0, min(ctx - begin, st));
  const int n_ctx_tiles = (n_ctx + kTileN - 1) / kTileN;
  const int n_tiles = n_ctx_tiles + (split == 0 ? 1 : 0);  // >= 1: split 0 has the canvas
  const int h0 = kvh * p.group + chunk * HT;                 // first query head of the CTA
  const int heads = min(HT, p.group - chunk * HT);           // valid heads in the tile
  const int tok0 = r * kCanvas;

  auto issue_tile = [&](int t, int stage) {
    uint16_t* ks = reinterpret_cast<uint16_t*>(kv_s + 2 * stage * kTileElems);
    uint16_t* vs = ks + kTileElems;
    if (t < n_ctx_tiles) {
      const int first = begin + t * kTileN;
      const int valid = min(kTileN, begin + n_ctx - first);
      const int bs = p.block_size;
      auto page = [&](int row, const Strided& c) -> int64_t {
        const int j = first + row;
        const int64_t blk = p.block_table[r * p.bt_s0 + (j / bs) * p.bt_s1];
        return blk * c.s0 + (j % bs) * c.s1 + kvh * c.s2;
      };
      load_rows<D>(ks, LD, kTileN, valid, p.kc, p.kc.s3, [&](int row) { return page(row, p.kc); });
      load_rows<D>(vs, LD, kTileN, valid, p.vc, p.vc.s3, [&](int row) { return page(row, p.vc); });
    } else {  // split 0's last tile: the canvas's own 16 keys (rows 16..31 zero, masked)
      auto canvas = [&](int row, const Strided& c) -> int64_t {
        return (tok0 + row) * c.s0 + kvh * c.s1;
      };
      load_rows<D>(ks, LD, kTileN, kCanvas, p.k, p.k.s2, [&](int row) { return canvas(row, p.k); });
      load_rows<D>(vs, LD, kTileN, kCanvas, p.v, p.v.s2, [&](int row) { return canvas(row, p.v); });
    }
  };

  load_rows<D>(reinterpret_cast<uint16_t*>(q_s), LD, HT * kCanvas, heads * kCanvas, p.q, p.q.s2,
               [&](int row) -> int64_t {
                 return (tok0 + row % kCanvas) * p.q.s0 + (h0 + row / kCanvas) * p.q.s1;
               });
  issue_tile(0, 0);
  __pipeline_commit();

  // Bits 4e..4e+3 of row_of: the row (0..15) of accumulator element e, the same for every
  // AccFrag (packed into one register: the D=128, 16-head variant is at 255 registers).
  static_assert(kAcc <= 8, "row_of packs 8 four-bit rows");
  for (int e = lane; e < 256; e += 32) s_w[(e / 16) * kLdS + e % 16] = static_cast<float>(e / 16);
  __syncwarp();
  uint32_t row_of = 0;
  {
    AccFrag rows;
    wmma::load_matrix_sync(rows, s_w, kLdS, wmma::mem_row_major);
#pragma unroll
    for (int e = 0; e < kAcc; ++e) row_of |= static_cast<uint32_t>(rows.x[e]) << (4 * e);
  }
  __syncwarp();

  AccFrag o[RB][D / 16];
  float m_run[RB], l_run[RB];
#pragma unroll
  for (int b = 0; b < RB; ++b) {
    m_run[b] = -INFINITY;
    l_run[b] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) wmma::fill_fragment(o[b][c], 0.f);
  }
  const int row = lane >> 1, half = lane & 1;  // softmax: a lane pair owns one score row

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_tiles) {
      issue_tile(t + 1, stage ^ 1);  // that stage was last read in tile t-1 (synced below)
      __pipeline_commit();
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    const int valid = t < n_ctx_tiles ? min(kTileN, n_ctx - t * kTileN) : kCanvas;
    const T* ks = kv_s + 2 * stage * kTileElems;
    const T* vs = ks + kTileElems;

#pragma unroll
    for (int b = 0; b < RB; ++b) {
      const int g = warp * RB + b;
      if (g >= heads) continue;  // warp-uniform
      // S = Q_g K^T for this tile -> s_w.
#pragma unroll
      for (int c = 0; c < kTileN / 16; ++c) {
        AccFrag s;
        wmma::fill_fragment(s, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          AFrag a;
          KFrag kf;
          wmma::load_matrix_sync(a, q_s + g * kCanvas * LD + kk * 16, LD);
          wmma::load_matrix_sync(kf, ks + c * 16 * LD + kk * 16, LD);
          wmma::mma_sync(s, a, kf, s);
        }
        wmma::store_matrix_sync(s_w + c * 16, s, kLdS, wmma::mem_row_major);
      }
      __syncwarp();
      // Online softmax in base 2. Masked keys are -inf; m_use keeps -inf - -inf out of exp2.
      float x[16];
      float mx = -INFINITY;
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int n = half * 16 + k;
        x[k] = n < valid ? s_w[row * kLdS + n] * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, x[k]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_new = fmaxf(m_run[b], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[b] - m_use);  // 0 while nothing was seen
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const float e = exp2f(x[k] - m_use);
        sum += e;
        p_w[row * kLdP + half * 16 + k] = from_float<T>(e);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      l_run[b] = l_run[b] * alpha + sum;
      m_run[b] = m_new;
      if (half == 0) alpha_w[row] = alpha;
      __syncwarp();
      // O_g = alpha * O_g + P V. (P fragments are re-read per column block: holding them
      // would push the 128-register accumulator of the 16-head, D=128 variant into spills.)
      float ae[kAcc];
#pragma unroll
      for (int e = 0; e < kAcc; ++e) ae[e] = alpha_w[(row_of >> (4 * e)) & 15u];
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
#pragma unroll
        for (int e = 0; e < kAcc; ++e) o[b][c].x[e] *= ae[e];
#pragma unroll
        for (int kk = 0; kk < kTileN / 16; ++kk) {
          AFrag pa;
          VFrag vf;
          wmma::load_matrix_sync(pa, p_w + kk * 16, kLdP);
          wmma::load_matrix_sync(vf, vs + kk * 16 * LD + c * 16, LD);
          wmma::mma_sync(o[b][c], pa, vf, o[b][c]);
        }
      }
      __syncwarp();  // s_w, p_w, alpha_w are rewritten for the next head
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Epilogue: one split -> out = O / l; several -> workspace (O, m, l) for the merge.
  const bool direct = p.num_splits == 1;
  const int64_t tokens = static_cast<int64_t>(p.num_requests) * kCanvas;
#pragma unroll
  for (int b = 0; b < RB; ++b) {
    const int g = warp * RB + b;
    if (g >= heads) continue;
    const int h = h0 + g;
    if (half == 0) l_w[row] = l_run[b];
    __syncwarp();
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      wmma::store_matrix_sync(s_w, o[b][c], kLdS, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int i = e / 16, d = c * 16 + e % 16;
        const float acc = s_w[i * kLdS + e % 16];
        const int64_t tok = tok0 + i;
        if (direct) {
          T* out = static_cast<T*>(p.out);
          out[tok * p.o_s0 + h * p.o_s1 + d * p.o_s2] = from_float<T>(acc / l_w[i]);
        } else {
          p.ws_acc[((split * tokens + tok) * p.num_q_heads + h) * D + d] = acc;
        }
      }
      __syncwarp();
    }
    if (!direct && half == 0) {
      const int64_t idx = (split * tokens + tok0 + row) * p.num_q_heads + h;
      p.ws_m[idx] = m_run[b];
      p.ws_l[idx] = l_run[b];
    }
    __syncwarp();  // l_w is rewritten for the next head
  }
#endif
}

// out[tok, h, :] = sum_s w_s acc_s / sum_s w_s l_s with w_s = 2^(m_s - max m) over the splits
// that hold keys of tok's request (split 0 always does: it has the canvas, so max m is finite).
template <typename T>
__global__ void merge_kernel(const Params p, int head_dim) {
  const int tok = blockIdx.x, h = blockIdx.y;
  const int ctx = clamped_context(p, tok / kCanvas);
  const int st = split_tokens_for(p, ctx);
  const int used = max(1, (ctx + st - 1) / st);  // <= num_splits
  const int64_t plane = static_cast<int64_t>(p.num_requests) * kCanvas * p.num_q_heads;
  const int64_t rowi = static_cast<int64_t>(tok) * p.num_q_heads + h;
  float mx = -INFINITY;
  for (int s = 0; s < used; ++s) mx = fmaxf(mx, p.ws_m[s * plane + rowi]);
  float denom = 0.f;
  for (int s = 0; s < used; ++s) {
    const float m = p.ws_m[s * plane + rowi];
    denom += (m == -INFINITY ? 0.f : exp2f(m - mx)) * p.ws_l[s * plane + rowi];
  }
  T* out = static_cast<T*>(p.out);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < used; ++s) {
      const float m = p.ws_m[s * plane + rowi];
      const float w = m == -INFINITY ? 0.f : exp2f(m - mx);
      acc += w * p.ws_acc[(s * plane + rowi) * head_dim + d];
    }
    out[tok * p.o_s0 + h * p.o_s1 + d * p.o_s2] = from_float<T>(acc / denom);
  }
}

// ------------------------------------------------------------------------------- host side

struct Plan {
  int rb, head_chunks, num_splits;
  size_t smem;
  int64_t workspace_floats;
};

Plan make_plan(int R, int Hq, int Hkv, int D, int block_size, int max_blocks, int sms) {
  Plan pl{};
  const int group = Hq / Hkv;
  pl.rb = group <= kWarps ? 1 : 2;
  const int ht = kWarps * pl.rb;
  pl.head_chunks = (group + ht - 1) / ht;
  pl.smem = static_cast<size_t>(ht * kCanvas + 4 * kTileN) * (D + kPad) * 2 +
            static_cast<size_t>(kWarps) * kWarpBytes;
  int64_t max_ctx = static_cast<int64_t>(max_blocks) * block_size;
  if (max_ctx > (int64_t{1} << 30)) max_ctx = int64_t{1} << 30;
  int64_t ctas = static_cast<int64_t>(R) * Hkv * pl.head_chunks;
  if (ctas < 1) ctas = 1;
  // Shapes only (never context_lens: no host sync, fixed under CUDA graphs): about two CTAs
  // per SM when every request is at the block table's full width.
  int64_t want = (2 * static_cast<int64_t>(sms) + ctas - 1) / ctas;
  const int64_t by_len = (max_ctx + kMinSplitTokens - 1) / kMinSplitTokens;
  want = want < by_len ? want : by_len;
  want = want < kMaxSplits ? want : kMaxSplits;
  pl.num_splits = static_cast<int>(want < 1 ? 1 : want);
  pl.workspace_floats =
      pl.num_splits > 1 ? static_cast<int64_t>(pl.num_splits) * R * kCanvas * Hq * (D + 2) : 0;
  return pl;
}

const char* fail(const std::string& msg) {
  thread_local std::string last;
  last = msg;
  return last.c_str();
}

const char* device_plan(int R, int Hq, int Hkv, int D, int block_size, int max_blocks,
                        Plan* pl) {
  if (D != 64 && D != 128)
    return fail("head_dim " + std::to_string(D) + " is not supported (64 or 128)");
  if (Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0)
    return fail("num_q_heads " + std::to_string(Hq) + " must be a positive multiple of " +
                "num_kv_heads " + std::to_string(Hkv));
  if (block_size <= 0) return fail("block_size must be positive");
  int dev = 0, major = 0, sms = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return fail(std::string("CUDA: ") + cudaGetErrorString(err));
  if (major < 8) return fail("needs compute capability 8.0+ (bf16/fp16 tensor cores)");
  *pl = make_plan(R, Hq, Hkv, D, block_size, max_blocks, sms);
  if (pl->smem > static_cast<size_t>(smem_optin))
    return fail("needs " + std::to_string(pl->smem) + " bytes of shared memory per block; " +
                "this device allows " + std::to_string(smem_optin));
  return nullptr;
}

Strided strided(const void* ptr, const int64_t* s, int ndim) {
  Strided t{static_cast<const uint16_t*>(ptr), s[0], s[1], s[2], ndim == 4 ? s[3] : 0, false};
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  bool ok = aligned && s[ndim - 1] == 1;
  for (int i = 0; i < ndim - 1; ++i) ok = ok && s[i] % 8 == 0;
  t.vec = ok;
  return t;
}

template <typename T, int D, int RB>
cudaError_t launch(const Params& p, const Plan& pl, int Hkv, cudaStream_t stream) {
  auto kernel = block_attention_kernel<T, D, RB>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(pl.smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(pl.num_splits, Hkv * pl.head_chunks, p.num_requests);
  kernel<<<grid, kThreads, pl.smem, stream>>>(p);
  if (pl.num_splits > 1) {
    merge_kernel<T><<<dim3(p.num_requests * kCanvas, p.num_q_heads), D, 0, stream>>>(p, D);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_dim(const Params& p, const Plan& pl, int D, int Hkv, cudaStream_t s) {
  if (D == 64) return pl.rb == 1 ? launch<T, 64, 1>(p, pl, Hkv, s) : launch<T, 64, 2>(p, pl, Hkv, s);
  return pl.rb == 1 ? launch<T, 128, 1>(p, pl, Hkv, s) : launch<T, 128, 2>(p, pl, Hkv, s);
}

}  // namespace

// Workspace (fp32 elements) that block_attention_launch needs for these sizes on the current
// device; 0 when one split suffices. Returns nullptr, or an error message.
const char* block_attention_workspace(int num_requests, int num_q_heads, int num_kv_heads,
                                      int head_dim, int block_size, int max_blocks,
                                      int64_t* workspace_floats) {
  Plan pl;
  *workspace_floats = 0;
  if (num_requests <= 0) return nullptr;
  if (const char* e = device_plan(num_requests, num_q_heads, num_kv_heads, head_dim, block_size,
                                  max_blocks, &pl))
    return e;
  *workspace_floats = pl.workspace_floats;
  return nullptr;
}

// Enqueues the attention (and merge) on `stream`. dtype: 0 = fp16, 1 = bf16. Strides are in
// elements: 3 for query/key/value/out ([tokens, heads, dim]), 4 for the caches ([block, slot,
// kv head, dim]), 2 for block_table. Returns nullptr, or an error message.
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
                                   int64_t workspace_floats, cudaStream_t stream) {
  if (dtype != 0 && dtype != 1) return fail("dtype must be fp16 or bf16");
  if (num_requests <= 0) return nullptr;
  if (num_requests > 65535 || static_cast<int64_t>(num_requests) * kCanvas > (1 << 30))
    return fail("too many requests in one call (at most 65535)");
  Plan pl;
  if (const char* e = device_plan(num_requests, num_q_heads, num_kv_heads, head_dim, block_size,
                                  max_blocks, &pl))
    return e;
  if (workspace_floats < pl.workspace_floats)
    return fail("workspace too small: " + std::to_string(workspace_floats) + " < " +
                std::to_string(pl.workspace_floats) + " floats");
  Params p{};
  p.q = strided(query, query_strides, 3);
  p.k = strided(key, key_strides, 3);
  p.v = strided(value, value_strides, 3);
  p.kc = strided(key_cache, key_cache_strides, 4);
  p.vc = strided(value_cache, value_cache_strides, 4);
  p.block_table = block_table;
  p.bt_s0 = block_table_strides[0];
  p.bt_s1 = block_table_strides[1];
  p.context_lens = context_lens;
  p.cl_s0 = context_lens_stride;
  p.out = out;
  p.o_s0 = out_strides[0];
  p.o_s1 = out_strides[1];
  p.o_s2 = out_strides[2];
  const int64_t acc_floats =
      static_cast<int64_t>(pl.num_splits) * num_requests * kCanvas * num_q_heads * head_dim;
  const int64_t row_floats = static_cast<int64_t>(pl.num_splits) * num_requests * kCanvas *
                             num_q_heads;
  p.ws_acc = pl.num_splits > 1 ? workspace : nullptr;
  p.ws_m = pl.num_splits > 1 ? workspace + acc_floats : nullptr;
  p.ws_l = pl.num_splits > 1 ? workspace + acc_floats + row_floats : nullptr;
  p.num_requests = num_requests;
  p.num_q_heads = num_q_heads;
  p.group = num_q_heads / num_kv_heads;
  p.head_chunks = pl.head_chunks;
  p.block_size = block_size;
  p.max_blocks = max_blocks;
  p.num_splits = pl.num_splits;
  p.scale_log2 = scale * kLog2e;
  const cudaError_t err =
      dtype == 0 ? launch_for_dim<__half>(p, pl, head_dim, num_kv_heads, stream)
                 : launch_for_dim<__nv_bfloat16>(p, pl, head_dim, num_kv_heads, stream);
  if (err != cudaSuccess) return fail(std::string("CUDA: ") + cudaGetErrorString(err));
  return nullptr;
}

}  // namespace vllm_twotower
