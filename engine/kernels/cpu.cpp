// CPU kernels for the places where library calls leave most of the machine idle, all accumulating
// in float32. Built and loaded at run time by cpu.py; registered as torch.ops.kvserve.*.
//
// paged_decode: one new query token per sequence, read against that sequence's blocks of the KV
// pool in place (no gathered copy).
// skinny_linear: x [M, K] . W [N, K]^T for a handful of rows, a decode step of a small batch; the
// cost is streaming W from memory, which one pass at ~30 GB/s over 2 cores does (oneDNN's
// packed kernels reach ~20 GB/s at one row).
// gguf_linear: x [M, K] float32 times a weight kept in a GGUF file's 4- or 8-bit blocks, rebuilt
// in registers to the exact float32 weights: the float32 arithmetic at a fraction of the bytes
// (gguf_matmul.h).
// rms_norm, add_rms_norm, rope_qk, silu_mul: a layer's element-wise pieces, one pass each where
// eager PyTorch runs five to ten kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "gguf_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// prefetch (gguf_matmul.h): a sequence's KV blocks lie anywhere in the pool, so the hardware
// prefetcher, which follows sequential addresses, loses the stream at every block edge: fetching each
// block while the one before it is being worked on reads the pool ~1.4x faster.
using kvserve::prefetch;
using kvserve::gguf::block_bytes;
using kvserve::gguf::kQBlock;
using kvserve::gguf::kQGroup;

// e^x in a form the compiler vectorises (std::exp is a scalar call): x = n ln2 + r, |r| <= ln2 / 2,
// e^r by Cephes' expf polynomial (within ~1 ulp, as PyTorch's vectorised exp), 2^n put in the
// exponent bits. fma throughout: the build allows reassociation, which must not touch the range
// reduction. x is clamped to where 2^n stays a normal float (e^-87 ~ 1.6e-38, e^88 ~ 1.7e38).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::nearbyint(x * 1.44269504f);
  float r = std::fma(n, -0.693359375f, x);  // ln 2 in two parts, the first exact in few bits
  r = std::fma(n, 2.12194440e-4f, r);
  float p = std::fma(1.9875691500e-4f, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The lane sums of 16 vectors in one: a transposing tree of 15 adds and 30 shuffles, where 16
// separate horizontal sums cost ~4x as many. v[s]'s sum lands in lane 4 (s % 4) + s / 4.
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 b[8], c[4], d[2];  // b: 8 partial sums of each of 2 vectors; c: 4 of 4; d: 2 of 8
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
}

// out[t] = q . k_t for 16 keys `stride` elements apart: a token's dot product alone ends in a
// horizontal sum that costs more than its multiplications (head_dim 64: 4 FMAs).
template <typename T, int kHeadDim>
inline void dot16(const float* q, const T* k, int64_t stride, float* out) {
  __m512 qv[kHeadDim / 16], acc[16];
  for (int c = 0; c < kHeadDim / 16; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int s = 0; s < 16; ++s) {
    const T* key = k + (4 * (s % 4) + s / 4) * stride;  // the token sum16 puts in lane s
    acc[s] = _mm512_mul_ps(qv[0], load16(key));
    for (int c = 1; c < kHeadDim / 16; ++c) acc[s] = _mm512_fmadd_ps(qv[c], load16(key + 16 * c), acc[s]);
  }
  _mm512_storeu_ps(out, sum16(acc));
}
constexpr bool kDot16 = true;
#else
constexpr bool kDot16 = false;
template <typename T, int kHeadDim>
inline void dot16(const float*, const T*, int64_t, float*) {}
#endif

// Work items are (sequence, stretch of its blocks): whole sequences when there are at least as many
// as threads, else each sequence cut into stretches of at least kMinSplitBlocks blocks, so one long
// sequence is not left to one core. An item handles all heads together: a token's keys for every
// KV head lie side by side in the pool, so each is read once, in one contiguous run. It leaves an
// unnormalised partial per head (max score m, sum of e^(s - m), sum of e^(s - m) v), and the
// partials of a sequence are merged at the end, as flash-decoding does.
constexpr int64_t kMinSplitBlocks = 8;

// kHeadDim: head_dim as a compile-time constant for the common sizes (0: known at run time only).
template <typename T, int kHeadDim>
void decode(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
            const int64_t* context_lens, const int64_t* skips, T* out, int64_t batch, int64_t heads,
            int64_t kv_heads, int64_t head_dim_arg, int64_t block_size, int64_t width, float scale, float softcap) {
  const int64_t head_dim = kHeadDim ? kHeadDim : head_dim_arg;
  const int64_t group = heads / kv_heads, token_stride = kv_heads * head_dim, block_stride = block_size * token_stride;
  const int64_t row_bytes = token_stride * sizeof(T);
  const int64_t max_blocks = (*std::max_element(context_lens, context_lens + batch) + block_size - 1) / block_size;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = batch >= threads ? 1
                         : std::max<int64_t>(1, std::min((threads + batch - 1) / batch, max_blocks / kMinSplitBlocks));
  const int64_t per_split = (max_blocks + splits - 1) / splits;
  const int64_t part = heads * (head_dim + 2);  // one partial: acc [heads, D], then max [heads], sum [heads]
  std::vector<float> partials(batch * splits * part);

  auto stretch = [&](int64_t item) {  // -> its blocks [first, last) of its sequence
    const int64_t blocks = (context_lens[item / splits] + block_size - 1) / block_size;
    const int64_t first = item % splits * per_split;
    return std::make_pair(first, std::min(first + per_split, blocks));
  };
  auto first_key_block = [&](int64_t item) -> const T* {
    const auto [first, last] = stretch(item);
    return first < last ? k_cache + block_tables[item / splits * width + first] * block_stride : nullptr;
  };

  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(heads * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / splits, len = context_lens[b];
      const auto [first, last] = stretch(item);
      float* acc = partials.data() + item * part;
      float *max = acc + heads * head_dim, *sum = max + heads;
      std::fill(acc, acc + part, 0.f);
      if (first >= last) {  // a short sequence's empty stretch: weighs nothing in the merge
        std::fill(max, max + heads, -std::numeric_limits<float>::infinity());
        continue;
      }
      const int64_t* table = block_tables + b * width;
      const int64_t t0 = first * block_size, n = std::min(last * block_size, len) - t0;  // tokens t0 .. t0 + n
      scores.resize(heads * n);  // [heads, n]
      for (int64_t i = 0; i < heads * head_dim; ++i) qf[i] = static_cast<float>(q[b * heads * head_dim + i]) * scale;

      for (int64_t i = first; i < last; ++i) {
        const T* block = k_cache + table[i] * block_stride;
        const T* next = i + 1 < last ? k_cache + table[i + 1] * block_stride : v_cache + table[first] * block_stride;
        int64_t j = 0, t = i * block_size - t0;
        if constexpr (kDot16 && kHeadDim % 16 == 0 && kHeadDim > 0 && !std::is_same_v<T, double>) {
          for (; j + 16 <= block_size && t + 16 <= n; j += 16, t += 16) {
            // Fetch ahead, a slice beside each head's dots (issued all at once, most would be dropped):
            // the next key block into L1, the one after it and this block's values (read after the
            // softmax) into L2. Without the last two the pass waited on DRAM for most of its time.
            const int64_t rows = j * token_stride, chunk = 16 * row_bytes, slice = (chunk / heads + 63) / 64 * 64;
            const T* later = i + 2 < last ? k_cache + table[i + 2] * block_stride + rows : nullptr;
            const T* values = v_cache + table[i] * block_stride + rows;
            for (int64_t h = 0; h < heads; ++h) {
              const int64_t off = h * slice, len = std::min(slice, chunk - off);
              prefetch(reinterpret_cast<const char*>(next + rows) + off, len);
              if (later) prefetch<2>(reinterpret_cast<const char*>(later) + off, len);
              prefetch<2>(reinterpret_cast<const char*>(values) + off, len);
              dot16<T, kHeadDim>(qf.data() + h * head_dim, block + rows + (h / group) * head_dim,
                                 token_stride, scores.data() + h * n + t);
            }
          }
        }
        for (; j < block_size && t < n; ++j, ++t) {  // the rest one token at a time
          prefetch(next + j * token_stride, row_bytes);
          for (int64_t h = 0; h < heads; ++h) {
            const T* k = block + j * token_stride + (h / group) * head_dim;
            const float* qh = qf.data() + h * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * static_cast<float>(k[d]);
            scores[h * n + t] = dot;
          }
        }
      }

      // a sliding window's first keys to pass over (they lie in the sequence's first block, before the
      // window; the same block holds the window's first key, so a stretch is never all passed over)
      const int64_t skip = skips != nullptr && first == 0 ? skips[b] : 0;
      for (int64_t h = 0; h < heads; ++h) {  // softmax numerators in place
        float* s = scores.data() + h * n;
        if (softcap > 0.f)  // Gemma 2's soft cap on the scaled scores: cap * tanh(s / cap)
          for (int64_t t = skip; t < n; ++t) s[t] = softcap * std::tanh(s[t] / softcap);
        const float top = max[h] = *std::max_element(s + skip, s + n);
        float total = 0.f;  // a local, not sum[h]: the compiler cannot tell sum from s, and would not vectorise
        std::fill(s, s + skip, 0.f);
        for (int64_t t = skip; t < n; ++t) total += (s[t] = exp_approx(s[t] - top));
        sum[h] = total;
      }

      for (int64_t i = first; i < last; ++i) {
        const T* block = v_cache + table[i] * block_stride;
        const T* next = i + 1 < last ? v_cache + table[i + 1] * block_stride
                        : item + 1 < end ? first_key_block(item + 1)  // the next item's
                                         : nullptr;
        for (int64_t j = 0, t = i * block_size - t0; j < block_size && t < n; ++j, ++t) {
          if (next) prefetch(next + j * token_stride, row_bytes);
          for (int64_t h = 0; h < heads; ++h) {
            const T* v = block + j * token_stride + (h / group) * head_dim;
            const float p = scores[h * n + t];
            float* a = acc + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
          }
        }
      }
    }
  });

  // merge: weigh each partial by e^(its max - the overall max)
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(head_dim);
    for (int64_t b = begin; b < end; ++b) {
      const float* mine = partials.data() + b * splits * part;
      for (int64_t h = 0; h < heads; ++h) {
        float top = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, mine[sp * part + heads * head_dim + h]);
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float* acc = mine + sp * part;
          const float w = std::exp(acc[heads * head_dim + h] - top);  // exactly 1 for a lone partial
          total += w * acc[heads * head_dim + heads + h];
          for (int64_t d = 0; d < head_dim; ++d) o[d] += w * acc[h * head_dim + d];
        }
        for (int64_t d = 0; d < head_dim; ++d) out[(b * heads + h) * head_dim + d] = static_cast<T>(o[d] / total);
      }
    }
  });
}

// The checks of paged_decode's inputs; the kernel trusts them. Bad ids would read outside the pool:
// every block a sequence will touch is checked, before any work.
void check_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor* skip) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "paged_decode: bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_decode: inputs must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode: q and the cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode: block tables and context lengths must be int64");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t width = block_tables.dim() == 2 ? block_tables.size(1) : 0;
  TORCH_CHECK(k_cache.size(3) == head_dim && heads % kv_heads == 0, "paged_decode: head shapes disagree");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && context_lens.numel() == batch,
              "paged_decode: batch sizes disagree");
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* skips = nullptr;
  if (skip) {
    TORCH_CHECK(skip->scalar_type() == at::kLong && skip->is_contiguous() && skip->numel() == batch,
                "paged_decode: skip must be int64, one per sequence");
    skips = skip->data_ptr<int64_t>();
  }
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= width * block_size, "paged_decode: context length out of range");
    TORCH_CHECK(skips == nullptr || (skips[b] >= 0 && skips[b] < std::min(block_size, lens[b])),
                "paged_decode: skip must leave a key in the first block");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int64_t id = tables[b * width + i];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_decode: block id out of range");
    }
  }
}

// paged_decode on inputs check_paged has passed, into out (shaped as q)
void run_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor* skip,
               at::Tensor& out, double scale, double softcap) {
  const int64_t head_dim = q.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto* kernel = head_dim == 64    ? decode<scalar_t, 64>
                   : head_dim == 128 ? decode<scalar_t, 128>
                                     : decode<scalar_t, 0>;
    kernel(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
           block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
           skip ? skip->data_ptr<int64_t>() : nullptr, out.data_ptr<scalar_t>(), q.size(0), q.size(1),
           k_cache.size(2), head_dim, k_cache.size(1), block_tables.size(1), static_cast<float>(scale),
           static_cast<float>(softcap));
  });
}

// q [B, heads, D]; k_cache, v_cache [num_blocks, block_size, kv_heads, D]; block_tables [B, width]
// int64; context_lens [B] int64, each in 1..width * block_size; skip [B] int64 or none; softcap: 0
// or the cap of the scaled scores -> out [B, heads, D].
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                        const c10::optional<at::Tensor>& skip, double softcap) {
  const at::Tensor* skip_ptr = skip.has_value() ? &*skip : nullptr;
  check_paged(q, k_cache, v_cache, block_tables, context_lens, skip_ptr);
  at::Tensor out = at::empty_like(q);
  run_paged(q, k_cache, v_cache, block_tables, context_lens, skip_ptr, out, scale, softcap);
  return out;
}

// Threads split W's rows: each streams one contiguous stretch of it, and every row is used for
// all of x's rows while it is in cache.
template <typename T>
void skinny(const T* x, const T* w, const T* bias, T* y, int64_t rows, int64_t n_out, int64_t k_in) {
  const std::vector<float> xf(x, x + rows * k_in);  // converted once, not once per weight row
  at::parallel_for(0, n_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* wn = w + n * k_in;
      for (int64_t m = 0; m < rows; ++m) {
        const float* xm = xf.data() + m * k_in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < k_in; ++k) acc += xm[k] * static_cast<float>(wn[k]);
        y[m * n_out + n] = static_cast<T>(bias ? acc + static_cast<float>(bias[n]) : acc);
      }
    }
  });
}

// x [M, K]; weight [N, K]; bias [N] or None -> [M, N], all one dtype.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_linear: shapes disagree");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "skinny_linear: inputs must be contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "skinny_linear: x and weight must share a dtype");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->is_contiguous() && bias->numel() == weight.size(0) &&
                            bias->scalar_type() == x.scalar_type()), "skinny_linear: bad bias");
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "skinny_linear", [&] {
    skinny<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                     has_bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), x.size(0),
                     weight.size(0), weight.size(1));
  });
  return y;
}

// x [M, K] float32; q [groups, K / 32, 512 or 1024] uint8; scales [groups, K / 32, 2 or 1, 32] float16
// (2: 4-bit with minimums, 1: 8-bit); bias [N] or None -> [M, N]
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t n_out,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "gguf_linear: x must be a "
              "contiguous float32 matrix");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kByte && q.is_contiguous() && scales.dim() == 4 &&
              scales.scalar_type() == at::kHalf && scales.is_contiguous(), "gguf_linear: bad weight blocks");
  const int64_t k_in = x.size(1), groups = q.size(0);
  const bool four = scales.size(2) == 2;
  TORCH_CHECK(k_in % kQBlock == 0 && q.size(1) == k_in / kQBlock && q.size(2) == block_bytes(four) &&
              scales.size(0) == groups && scales.size(1) == q.size(1) && scales.size(3) == kQGroup &&
              (groups - 1) * kQGroup < n_out && n_out <= groups * kQGroup, "gguf_linear: shapes disagree");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->is_contiguous() && bias->numel() == n_out && bias->scalar_type() == at::kFloat),
              "gguf_linear: bad bias");
  at::Tensor y = at::empty({x.size(0), n_out}, x.options());
  const auto parallel_for = [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
    at::parallel_for(begin, end, grain, fn);
  };
  const auto* halves = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  (four ? kvserve::gguf::matmul<true, decltype(parallel_for)> : kvserve::gguf::matmul<false, decltype(parallel_for)>)(
      x.data_ptr<float>(), q.data_ptr<uint8_t>(), halves, has_bias ? bias->data_ptr<float>() : nullptr,
      y.data_ptr<float>(), x.size(0), n_out, k_in, parallel_for);
  return y;
}

// The element-wise pieces of a layer, each one pass instead of five to ten eager kernels. They
// round to T exactly where transformers' eager code does (each op's result is stored in the model
// dtype), so bfloat16 agrees with it as well as float32; the arithmetic in between is float32.
template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

// Rows of at least this many elements each are split between threads; below, one thread does all
// (a parallel region costs a few microseconds, more than a decode step's rows take).
constexpr int64_t kParallelElems = 1 << 15;

inline int64_t grain(int64_t row_elems) {
  return std::max<int64_t>(1, kParallelElems / std::max<int64_t>(row_elems, 1));
}

// x [T, H] (+ residual [T, H]) -> out = rms_norm(x + residual) * weight and, if wanted, sum = x + residual.
template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* weight, T* out, T* sum, int64_t rows, int64_t hidden,
                   float eps) {
  at::parallel_for(0, rows, grain(hidden), [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      float squares = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = residual ? static_cast<float>(round_to<T>(static_cast<float>(xr[i]) +
                                                                  static_cast<float>(residual[r * hidden + i])))
                                 : static_cast<float>(xr[i]);
        h[i] = v;
        squares += v * v;
      }
      const float inv_rms = 1.f / std::sqrt(squares / hidden + eps);
      for (int64_t i = 0; i < hidden; ++i) {
        if (sum) sum[r * hidden + i] = static_cast<T>(h[i]);
        const float normed = static_cast<float>(round_to<T>(h[i] * inv_rms));
        out[r * hidden + i] = round_to<T>(static_cast<float>(weight[i]) * normed);
      }
    }
  });
}

// x [T, H] and weight [H] contiguous, of one dtype; a residual shaped like x.
void check_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(), "rms_norm: x [T, H] and weight [H] of one dtype");
  TORCH_CHECK(!residual || (residual->sizes() == x.sizes() && residual->is_contiguous() &&
                            residual->scalar_type() == x.scalar_type()), "rms_norm: bad residual");
}

at::Tensor norm_into(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* residual, at::Tensor* sum,
                     double eps) {
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            sum ? sum->data_ptr<scalar_t>() : nullptr, x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight, nullptr);
  return norm_into(x, weight, nullptr, nullptr, eps);
}

// -> (x + residual, rms_norm(x + residual))
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm(x, weight, &residual);
  at::Tensor sum = at::empty_like(x);
  at::Tensor out = norm_into(x, weight, &residual, &sum, eps);
  return {sum, out};
}

// One head [D] rotated: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]).
template <typename T>
inline void rope_head(const T* x, const T* cos, const T* sin, T* out, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  auto term = [](float a, T b) { return static_cast<float>(round_to<T>(a * static_cast<float>(b))); };
  for (int64_t d = 0; d < half; ++d)  // two loops, not one with a branch: each vectorises
    out[d] = round_to<T>(term(static_cast<float>(x[d]), cos[d]) + term(-static_cast<float>(x[d + half]), sin[d]));
  for (int64_t d = half; d < head_dim; ++d)
    out[d] = round_to<T>(term(static_cast<float>(x[d]), cos[d]) + term(static_cast<float>(x[d - half]), sin[d]));
}

// qkv [T, (heads + 2 kv_heads) * D]; cos, sin [T, D] -> q [T, heads, D], k [T, kv_heads, D], rotated.
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                           int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == qkv.size(0),
              "rope_qk: qkv [T, (heads + 2 kv_heads) * D] and cos, sin [T, D]");
  const int64_t tokens = qkv.size(0), head_dim = cos.size(1), width = qkv.size(1);
  TORCH_CHECK(head_dim % 2 == 0 && width == (heads + 2 * kv_heads) * head_dim, "rope_qk: head shapes disagree");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "rope_qk: inputs must be contiguous and of one dtype");
  at::Tensor q = at::empty({tokens, heads, head_dim}, qkv.options());
  at::Tensor k = at::empty({tokens, kv_heads, head_dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_qk", [&] {
    const scalar_t *in = qkv.data_ptr<scalar_t>(), *c = cos.data_ptr<scalar_t>(), *s = sin.data_ptr<scalar_t>();
    scalar_t *q_out = q.data_ptr<scalar_t>(), *k_out = k.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads + kv_heads; ++h)  // q's heads, then k's
          rope_head(in + t * width + h * head_dim, c + t * head_dim, s + t * head_dim,
                    h < heads ? q_out + (t * heads + h) * head_dim : k_out + (t * kv_heads + h - heads) * head_dim,
                    head_dim);
    });
  });
  return {q, k};
}

// gate_up [T, 2 I] -> silu(gate) * up [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(),
              "silu_mul: gate_up [T, 2 I], contiguous");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({tokens, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain(2 * inter), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t *gate = in + t * 2 * inter, *up = gate + inter;
        for (int64_t i = 0; i < inter; ++i) {
          const float g = static_cast<float>(gate[i]);
          const float act = static_cast<float>(round_to<scalar_t>(g / (1.f + exp_approx(-g))));
          o[t * inter + i] = round_to<scalar_t>(act * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

// decode_layers: a whole decode step of a stack of Llama layers in one call, each piece the same
// kernel the per-op path calls (so the same arithmetic, bit for bit), without the Python and the
// dispatcher between them: at a row or two, ~12 ops x 30 layers of per-op overhead were a fifth of
// a step. The attention's inputs are checked once for all layers.
//
// A layer's weights in `weights`, kLayerWeights to a layer, in this order (an empty tensor: no bias).
enum LayerWeight {
  kInputNorm, kQkv, kQkvScales, kQkvBias, kO, kOScales, kOBias, kPostNorm,
  kGateUp, kGateUpScales, kGateUpBias, kDown, kDownScales, kDownBias, kLayerWeights
};

// x times the GGUF-block linear whose quants are w[quants] (scales and bias after them)
at::Tensor layer_linear(const at::Tensor& x, const at::Tensor* w, int quants, int64_t n_out) {
  const at::Tensor& bias = w[quants + 2];
  return gguf_linear(x, w[quants], w[quants + 1], n_out,
                     bias.numel() ? c10::optional<at::Tensor>(bias) : c10::optional<at::Tensor>());
}

// k and v of every new token into its slot of one layer's pool [2, num_blocks, block_size, kv_heads, D]
void write_kv(const at::Tensor& pool, const at::Tensor& k, const at::Tensor& qkv, int64_t v_offset,
              const int64_t* slots) {
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2), plane = pool.size(1) * pool.size(2) * row;
  float* keys = pool.data_ptr<float>();
  const float *k_rows = k.data_ptr<float>(), *qkv_rows = qkv.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(keys + slots[t] * row, k_rows + t * row, row * sizeof(float));
    std::memcpy(keys + plane + slots[t] * row, qkv_rows + t * qkv.size(1) + v_offset, row * sizeof(float));
  }
}

// hidden [T, H] float32, the embeddings of T decoding sequences' new tokens; cos, sin [T, D];
// slots [T] int64; block_tables [T, width], context_lens [T] int64 (as paged_decode); kv_caches:
// each layer's pool [2, num_blocks, block_size, kv_heads, D] float32 -> the hidden states after the
// last layer (before the final norm), the new keys and values written into the pools.
at::Tensor decode_layers(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens,
                         at::TensorList kv_caches, at::TensorList weights, int64_t heads, int64_t kv_heads,
                         double scale, double eps) {
  const int64_t layers = static_cast<int64_t>(kv_caches.size()), tokens = hidden.size(0);
  const int64_t hidden_size = hidden.size(1), head_dim = cos.size(1);
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == layers * kLayerWeights,
              "decode_layers: ", kLayerWeights, " weights a layer");
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "decode_layers: hidden must be a contiguous float32 [T, H]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens,
              "decode_layers: one int64 slot a token");
  const at::Tensor& first = kv_caches[0];
  TORCH_CHECK(first.dim() == 5 && first.size(0) == 2 && first.size(3) == kv_heads && first.size(4) == head_dim,
              "decode_layers: pools must be [2, num_blocks, block_size, kv_heads, head_dim]");
  for (const at::Tensor& pool : kv_caches)
    TORCH_CHECK(pool.sizes() == first.sizes() && pool.scalar_type() == at::kFloat && pool.is_contiguous(),
                "decode_layers: every layer's pool must be float32, contiguous, of one shape");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < first.size(1) * first.size(2), "decode_layers: slot out of range");
  check_paged(at::empty({tokens, heads, head_dim}, hidden.options()), first[0], first[1], block_tables,
              context_lens, nullptr);

  const int64_t q_width = heads * head_dim, v_offset = (heads + kv_heads) * head_dim;
  at::Tensor h = hidden;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kLayerWeights;
    const at::Tensor qkv = layer_linear(rms_norm(h, w[kInputNorm], eps), w, kQkv, v_offset + kv_heads * head_dim);
    const auto [q, k] = rope_qk(qkv, cos, sin, heads, kv_heads);
    write_kv(kv_caches[l], k, qkv, v_offset, slot);
    at::Tensor o = at::empty_like(q);
    run_paged(q, kv_caches[l][0], kv_caches[l][1], block_tables, context_lens, nullptr, o, scale, 0.0);
    const at::Tensor a = layer_linear(o.view({tokens, q_width}), w, kO, hidden_size);
    auto [sum, x] = add_rms_norm(h, a, w[kPostNorm], eps);
    const int64_t inter = w[kDown].size(1) * kQBlock;
    h = sum.add_(layer_linear(silu_mul(layer_linear(x, w, kGateUp, 2 * inter)), w, kDown, hidden_size));
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(kvserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, Tensor? skip, float softcap=0.0) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("gguf_linear(Tensor x, Tensor q, Tensor scales, int n_out, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_qk(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_layers(Tensor hidden, Tensor cos, Tensor sin, Tensor slots, Tensor block_tables, "
        "Tensor context_lens, Tensor[] kv_caches, Tensor[] weights, int heads, int kv_heads, float scale, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("skinny_linear", &skinny_linear);
  m.impl("gguf_linear", &gguf_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_qk", &rope_qk);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_layers", &decode_layers);
}
