// gguf_matmul: x [M, K] float32 times a weight kept in its GGUF blocks (Q4_0, Q4_1, Q8_0: 32
// weights along K share a scale d, and for Q4_1 a minimum m; a weight is d * q + m). Each group of
// 32 output rows is dequantised in registers to exactly the float32 values transformers makes of
// the file (d * q is exact in float32, so the one rounding is that of + m, fused or not), then
// multiplied in float32. The model's arithmetic is unchanged; what changes is the 5-9 bits a weight
// costs to stream instead of 32 (engine/layers/gguf_linear.py repacks the blocks for this kernel).
//
// Free of torch so that it builds alone too: cpu.cpp wraps it as torch.ops.kvserve.gguf_linear;
// gguf_check.cpp builds it for an instruction set of one's choosing (the tests compare AVX2,
// AVX-512 and plain builds on one machine, whichever the machine itself has).
//
// Repacked layout, per group of 32 output rows and block of 32 inputs (k):
//   4-bit: 16 pairs of k x 32 rows, one byte each (low nibble k even, high k odd); scales [2][32]: d, m
//   8-bit: 32 k x 32 rows, int8; scales [1][32]: d
// with the scales as float16 bits, as the file holds them.
// so that one k's weights for 32 rows are contiguous, the layout a broadcast-x micro-kernel wants.
//
// Every output is summed in the same order, k ascending in one accumulator, whatever the number of
// rows and whichever path and instruction set: a row's result does not depend on its batch.
#pragma once
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Internal linkage (one translation unit includes this per library): a benchmark loads two builds of
// the kernels into one process, and each must call its own.
namespace {
namespace kvserve {

// Start loading `bytes` from p ahead of use (kLocality 3: into L1; 2: into L2).
template <int kLocality = 3>
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, 0, kLocality);
}

}  // namespace kvserve
}  // namespace

// Every sum here is kept in the order written: a row's output must not depend on the kernel's path
// (how many rows came with it), and the compiler, allowed to reassociate (cpu.py's flags, for
// the attention's reductions), would otherwise regroup the unrolled accumulations differently in each.
#if defined(__clang__)
#pragma clang fp reassociate(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("no-associative-math")
#endif

namespace {
namespace kvserve::gguf {

// Three paths by the number of rows: few (up to kFewRows: the group of 32 outputs is one tile, each
// weight dequantised in registers and used there), many (a block dequantised into L1 serves tiles of
// rows, their sums kept in memory between blocks) and, past kBlockRows, a prefill's (the group
// dequantised into a panel in L2, each tile's sums in registers all along K). A tile is kTileRows
// rows x 2 vectors of outputs: one register per accumulator, two for the weights, one for the
// broadcast x: AVX-512 12 x 2 x 16 of 32 registers, AVX2 6 x 2 x 8 of 16 (the shape of the classic
// 6 x 16 sgemm kernel).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kTileRows = 12, kFewRows = 8;
#elif defined(__AVX2__)
constexpr int kLanes = 8, kTileRows = 6, kFewRows = 3;  // few rows: 3 x 4 accumulators
#else
constexpr int kLanes = 4, kTileRows = 6, kFewRows = 1;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef float v16f __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t v16i __attribute__((vector_size(16 * sizeof(int32_t))));
constexpr int64_t kQBlock = 32, kQGroup = 32, kGroupVecs = kQGroup / kLanes, kTileVecs = 2;
constexpr int64_t kTileCols = kTileVecs * kLanes;
// Up to kBlockRows rows, a block dequantised into L1 serves every tile of rows in turn (many_rows);
// past it, a panel in L2 (panel_rows). Where each was faster on the bundled model's linears, one
// step's, AVX-512 and AVX2 builds on one machine (BENCHMARKS.md, issue 37): AVX2's tiles of 6 rows
// keep L1 longer.
#if defined(__AVX512F__)
constexpr int64_t kBlockRows = 96;
#else
constexpr int64_t kBlockRows = 256;
#endif

// 16 bytes widened to 16 int32 lanes (GCC's generic conversion of a byte vector goes through scalars)
template <bool kSigned>
inline v16i widen(const uint8_t* p) {
  v16i out;
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m512i w = kSigned ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  std::memcpy(&out, &w, sizeof out);
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), b8 = _mm_srli_si128(b, 8);
  const __m256i lo = kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  const __m256i hi = kSigned ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
  std::memcpy(&out, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof lo, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; ++i) out[i] = kSigned ? static_cast<int8_t>(p[i]) : p[i];
#endif
  return out;
}

template <typename V>
inline V load_vec(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store_vec(float* p, V v) { std::memcpy(p, &v, sizeof v); }

// IEEE half-precision bits -> float32 (exact: every half is a float32)
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 scales, stored as halves (the GGUF file's own: a third of a 4-bit weight's bytes as float32)
inline v16f load_halves(const uint16_t* p) {
  v16f out;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&out, &v, sizeof out);
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&out, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof lo, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; ++i) out[i] = half_to_float(p[i]);
#endif
  return out;
}

constexpr int64_t block_bytes(bool four) { return kQBlock * kQGroup / (four ? 2 : 1); }
constexpr int64_t block_scales(bool four) { return (four ? 2 : 1) * kQGroup; }

// Block b of the next group (its quants and scales lie right after this group's) requested into L2
// while block b of this one is worked on: the weights of a step stream from DRAM once, and the
// hardware prefetcher, which follows demand loads, stops running ahead while a block is multiplied.
template <bool kFour>
inline void fetch_next_group(const uint8_t* q, const uint16_t* scales, int64_t b, int64_t blocks) {
  prefetch<2>(q + (blocks + b) * block_bytes(kFour), block_bytes(kFour));
  prefetch<2>(scales + (blocks + b) * block_scales(kFour), block_scales(kFour) * sizeof(uint16_t));
}

// The weights a byte row of a block holds, k after k (4-bit: row j holds k = 2j and 2j + 1, 8-bit: k =
// j), each k's 32 outputs as two halves of 16. Every path takes its float32 weights from here, so all
// round d * q + m alike.
constexpr int kPerRow(bool four) { return four ? 2 : 1; }  // k values a byte row holds

template <bool kFour>
struct BlockRows {
  const uint8_t* q;  // the block's quants
  v16f d0, d1, m0, m1;  // its scales (and minimums) for outputs 0-15 and 16-31

  BlockRows(const uint8_t* group_q, const uint16_t* group_scales, int64_t b)
      : q(group_q + b * block_bytes(kFour)) {
    const uint16_t* s = group_scales + b * block_scales(kFour);
    d0 = load_halves(s), d1 = load_halves(s + 16);
    if constexpr (kFour) m0 = load_halves(s + 32), m1 = load_halves(s + 48);
  }

  // row j -> w[2 i + h]: the weights of k = kPerRow * j + i for outputs 16 h .. 16 h + 15
  void weights(int j, v16f (&w)[2 * kPerRow(kFour)]) const {
    if constexpr (kFour) {
      const v16i a = widen<false>(q + j * kQGroup), c = widen<false>(q + j * kQGroup + 16);
      w[0] = d0 * __builtin_convertvector(a & 15, v16f) + m0;
      w[1] = d1 * __builtin_convertvector(c & 15, v16f) + m1;
      w[2] = d0 * __builtin_convertvector(a >> 4, v16f) + m0;
      w[3] = d1 * __builtin_convertvector(c >> 4, v16f) + m1;
    } else {
      w[0] = d0 * __builtin_convertvector(widen<true>(q + j * kQGroup), v16f);
      w[1] = d1 * __builtin_convertvector(widen<true>(q + j * kQGroup + 16), v16f);
    }
  }
};

// Block b of a group -> out [32 k][32 rows] float32 (with `ahead`, the next group's block b fetched)
template <bool kFour>
inline void dequant_block(const uint8_t* q, const uint16_t* scales, float* out, int64_t b, int64_t blocks, bool ahead) {
  if (ahead) fetch_next_group<kFour>(q, scales, b, blocks);
  const BlockRows<kFour> block(q, scales, b);
  for (int j = 0; j < kQBlock / kPerRow(kFour); ++j) {
    v16f w[2 * kPerRow(kFour)];
    block.weights(j, w);
    for (int i = 0; i < 2 * kPerRow(kFour); ++i)
      store_vec(out + (kPerRow(kFour) * j + i / 2) * kQGroup + i % 2 * 16, w[i]);
  }
}

// acc [R][V] += x rows [R] (row stride k_in, from column k0) times w [n k, stride 32][V vectors]
template <int R, int V>
inline void multiply(vf (&acc)[R][V], const float* x, int64_t k_in, int64_t k0, const float* w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    vf wk[V];
    for (int v = 0; v < V; ++v) wk[v] = load_vec<vf>(w + k * kQGroup + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const vf xr = vf{} + x[r * k_in + k0 + k];  // a broadcast
      for (int v = 0; v < V; ++v) acc[r][v] += xr * wk[v];
    }
  }
}

// y [R rows, stride ldy][cols <= V vectors] = acc (+ bias [V vectors])
template <int R, int V>
inline void store_rows(const vf (&acc)[R][V], const float* bias, float* y, int64_t ldy, int64_t cols) {
  for (int r = 0; r < R; ++r) {
    alignas(64) float row[V * kLanes];
    for (int v = 0; v < V; ++v)
      store_vec(row + v * kLanes, acc[r][v] + (bias ? load_vec<vf>(bias + v * kLanes) : vf{}));
    std::memcpy(y + r * ldy, row, std::max<int64_t>(cols, 0) * sizeof(float));
  }
}

// acc [R][32 outputs] += x rows [R] (from column k0) times w, 16 outputs for one k (lo: the first 16)
template <int R>
inline void multiply16(vf (&acc)[R][kGroupVecs], const float* x, int64_t k_in, int64_t k, v16f w, bool lo) {
  constexpr int kHalf = 16 / kLanes;  // vectors in 16 floats
  vf part[kHalf];
  std::memcpy(part, &w, sizeof w);
  for (int r = 0; r < R; ++r) {
    const vf xr = vf{} + x[r * k_in + k];
    for (int v = 0; v < kHalf; ++v) acc[r][v + (lo ? 0 : kHalf)] += xr * part[v];
  }
}

// Up to kFewRows rows x the whole group, R a compile-time constant picked at run time. Each weight is
// dequantised into registers and used there, the only pass over it (`ahead` fetches the next
// group's blocks meanwhile): with few rows, a store to L1 and a load back per weight would be a good
// part of the work.
// noinline: inlined into one another, the variants came out with 3 and 4 rows slower than 5 (all of
// SmolLM2's linears at 4 rows ~21 ms against ~14 ms at 5); apart, time grows with R.
template <bool kFour, int R>
__attribute__((noinline)) void few_rows(const float* x, int64_t rows, int64_t k_in, const uint8_t* q,
                                        const uint16_t* scales, const float* bias, float* y, int64_t ldy, int64_t cols,
                                        bool ahead) {
  if constexpr (R > 1) {
    if (rows < R) return few_rows<kFour, R - 1>(x, rows, k_in, q, scales, bias, y, ldy, cols, ahead);
  }
  vf acc[R][kGroupVecs] = {};
  const int64_t blocks = k_in / kQBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    if (ahead) fetch_next_group<kFour>(q, scales, b, blocks);
    const BlockRows<kFour> block(q, scales, b);
    for (int j = 0; j < kQBlock / kPerRow(kFour); ++j) {
      v16f w[2 * kPerRow(kFour)];
      block.weights(j, w);
      for (int i = 0; i < 2 * kPerRow(kFour); ++i)
        multiply16<R>(acc, x, k_in, b * kQBlock + kPerRow(kFour) * j + i / 2, w[i], i % 2 == 0);
    }
  }
  store_rows<R, kGroupVecs>(acc, bias, y, ldy, cols);
}

// acc_mem [R rows, stride 32][kTileVecs vectors] += x rows [R] (from column k0) times w [32 k, stride
// 32][kTileVecs vectors]: the accumulators go through memory once per block of 32 k (exactly: a
// float32 store and load round nothing), so a block dequantised once serves every tile of rows.
template <int R>
__attribute__((noinline)) void block_tile(float* acc_mem, const float* x, int64_t rows, int64_t k_in, int64_t k0,
                                          const float* w) {
  if constexpr (R > 1) {
    if (rows < R) return block_tile<R - 1>(acc_mem, x, rows, k_in, k0, w);
  }
  vf acc[R][kTileVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kTileVecs; ++v) acc[r][v] = load_vec<vf>(acc_mem + r * kQGroup + v * kLanes);
  multiply<R, kTileVecs>(acc, x, k_in, k0, w, kQBlock);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kTileVecs; ++v) store_vec(acc_mem + r * kQGroup + v * kLanes, acc[r][v]);
}

// fn(first row, rows, first column) for each tile of the rows x 32 outputs: tiles of equal height
// (16 rows as 8 + 8, not 12 + 4), kTileCols outputs wide
template <typename Fn>
inline void for_each_tile(int64_t rows, const Fn& fn) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t h = (rows - r) / (tiles - t);
    for (int64_t c = 0; c < kQGroup; c += kTileCols) fn(r, h, c);
    r += h;
  }
}

// More rows than kFewRows, up to kBlockRows: each block of the group is dequantised into L1 once and
// multiplied by every tile of rows in turn, the tiles' sums kept in acc [rows][32] between blocks.
template <bool kFour>
void many_rows(const float* x, int64_t rows, int64_t k_in, const uint8_t* q, const uint16_t* scales,
               const float* bias, float* y, int64_t ldy, int64_t cols, bool ahead, std::vector<float>& acc) {
  const int64_t blocks = k_in / kQBlock;
  acc.assign(rows * kQGroup, 0.f);
  alignas(64) float block[kQBlock * kQGroup];
  for (int64_t b = 0; b < blocks; ++b) {
    dequant_block<kFour>(q, scales, block, b, blocks, ahead);
    for_each_tile(rows, [&](int64_t r, int64_t h, int64_t c) {
      block_tile<kTileRows>(acc.data() + r * kQGroup + c, x + r * k_in, h, k_in, b * kQBlock, block + c);
    });
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = acc[r * kQGroup + c] + (bias ? bias[c] : 0.f);
}

// Up to kTileRows rows x kTileVecs vectors of outputs over a panel: the group dequantised whole
// ([K][32] from column c0), the accumulators in registers all along K.
template <int R>
__attribute__((noinline)) void panel_tile(const float* x, int64_t rows, int64_t k_in, const float* panel,
                                          const float* bias, float* y, int64_t ldy, int64_t cols) {
  if constexpr (R > 1) {
    if (rows < R) return panel_tile<R - 1>(x, rows, k_in, panel, bias, y, ldy, cols);
  }
  vf acc[R][kTileVecs] = {};
  multiply<R, kTileVecs>(acc, x, k_in, 0, panel, k_in);
  store_rows<R, kTileVecs>(acc, bias, y, ldy, cols);
}

// More than kBlockRows rows (a prefill): the group is dequantised whole into a panel (in L2), and
// each tile of rows runs down all of K with its sums in registers. With this many rows, sums kept
// in memory between blocks (many_rows) and the rows' slices of x outgrow L1.
template <bool kFour>
void panel_rows(const float* x, int64_t rows, int64_t k_in, const uint8_t* q, const uint16_t* scales,
                const float* bias, float* y, int64_t ldy, int64_t cols, bool ahead, std::vector<float>& panel) {
  const int64_t blocks = k_in / kQBlock;
  panel.resize(k_in * kQGroup);
  for (int64_t b = 0; b < blocks; ++b)
    dequant_block<kFour>(q, scales, panel.data() + b * kQBlock * kQGroup, b, blocks, ahead);
  for_each_tile(rows, [&](int64_t r, int64_t h, int64_t c) {
    panel_tile<kTileRows>(x + r * k_in, h, k_in, panel.data() + c, bias ? bias + c : nullptr, y + r * ldy + c, ldy,
                          std::min(kTileCols, cols - c));
  });
}

// ParallelFor(begin, end, grain, fn(begin, end)): at::parallel_for, or OpenMP's in a build without torch.
template <bool kFour, typename ParallelFor>
void matmul(const float* x, const uint8_t* q, const uint16_t* scales, const float* bias, float* y, int64_t rows,
            int64_t n_out, int64_t k_in, const ParallelFor& parallel_for) {
  const int64_t groups = (n_out + kQGroup - 1) / kQGroup, blocks = k_in / kQBlock;
  const int64_t group_bytes = blocks * block_bytes(kFour), group_scales = blocks * block_scales(kFour);
  parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;  // many_rows' sums or panel_rows' panel
    alignas(64) float group_bias[kQGroup] = {};
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kQGroup, cols = std::min(kQGroup, n_out - n0);
      if (bias) std::memcpy(group_bias, bias + n0, cols * sizeof(float));
      const uint8_t* qg = q + g * group_bytes;
      const uint16_t* sg = scales + g * group_scales;
      const bool ahead = g + 1 < end;
      const float* b = bias ? group_bias : nullptr;
      if (rows <= kFewRows)
        few_rows<kFour, kFewRows>(x, rows, k_in, qg, sg, b, y + n0, n_out, cols, ahead);
      else if (rows <= kBlockRows)
        many_rows<kFour>(x, rows, k_in, qg, sg, b, y + n0, n_out, cols, ahead, scratch);
      else
        panel_rows<kFour>(x, rows, k_in, qg, sg, b, y + n0, n_out, cols, ahead, scratch);
    }
  });
}

}  // namespace kvserve::gguf
}  // namespace

#if !defined(__clang__) && defined(__GNUC__)
#pragma GCC pop_options
#endif
