// AVX-512 kernels for the batched condensed linear (included by condensed_cpu.cpp, which defines
// SC_AVX512 / SC_BF16DP from the compiler's target macros; the avx512 and avx512bf16 builds of
// kernels/cpu.py turn them on).
//
// Feature-major, as the AVX2 kernel: x is transposed into column blocks xT [nblk, in, W]
// (zero-padded; fp32: per thread, one group of blocks at a time, see transpose_per_thread), and
// every fan-in entry (i, j) of neuron i adds vals[i, j] * xT[idx[i, j], 0:W] to register
// accumulators of W columns. Each entry reads one gathered row of W columns (4 bytes
// of x per multiply-add, no reuse in registers: neurons share few indices), so the load ports and
// the L2 -> L1 fill, not the FMA rate, bound the fp32 kernel (see fm_f32). Tried on a Zen 4 EPYC
// and measured slower, so not kept: L1-sized bands over the fan-in (8-16-column blocks with
// 256-768-feature bands, per-(neuron, band) segments of 26-77 entries, found per call from the
// sorted indices; also with the segments repacked band-major, padded to whole groups of 8 and
// sorted by length so the loop exits are predicted): the repacking (0.2-0.65 ms per call at
// ViT's shapes) and the per-segment exits cost more than the L2 reads they save; 8-column ymm
// blocks that fit L1 whole (front-end bound at 8 multiply-adds per entry); 512-bit vpermps
// broadcasts; 32-column blocks with the new loop.
//
// bf16 (SC_BF16DP): xT holds bf16, so a gathered row of 32 columns is one 64-byte load, and two
// fan-in entries are combined per VDPBF16PS (scbf16::Dot32, condensed_bf16dp.h, shared with the
// conv). Half the bytes per MAC of the fp32 kernel, and measured ~2x its rate.
//
// Output: out [B, n] (row-major, the layout F.linear returns). A neuron produces W columns of one
// output column; 16 neurons are collected in a tile and written as transposes, so each store is a
// whole 64-byte line (fp32) instead of single floats n apart. The bf16 kernel rounds its fp32
// sums to bf16 (round to nearest even) as it stores.
#pragma once

namespace sc512 {

constexpr int kTile = 16;  // neurons per output tile: one 64-byte line per output row

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
#if SC_BF16DP
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

// tile [nq][W] (neurons i..i+nq, block columns l0..l0+cols) -> out[(l0 + c) * n + i + q]. A full
// tile is written as 16 x 8 transposes, one 16-neuron store per output row: the output lines are
// written whole (measured: single-float stores n apart cost ~15% of the kernel at n = 3072).
template <int W, typename O>
inline void store_tile(const float (&tile)[kTile][W], int64_t nq, int64_t cols, O* out, int64_t n,
                       int64_t l0, int64_t i) {
  if (nq == kTile) {
    for (int c8 = 0; c8 < W && c8 < cols; c8 += 8) {
      __m256 v[8], lo[8], hi[8];
      for (int q = 0; q < 8; ++q) v[q] = _mm256_load_ps(&tile[q][c8]);
      transpose8(v, lo);
      for (int q = 0; q < 8; ++q) v[q] = _mm256_load_ps(&tile[8 + q][c8]);
      transpose8(v, hi);
      const int64_t rows = std::min<int64_t>(8, cols - c8);
      for (int64_t e = 0; e < rows; ++e)
        store16(out + (l0 + c8 + e) * n + i,
                _mm512_insertf32x8(_mm512_castps256_ps512(lo[e]), hi[e], 1));
    }
    return;
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t q = 0; q < nq; ++q) out[(l0 + c) * n + i + q] = static_cast<O>(tile[q][c]);
}

// L2 budgets of the 2-D tiling below (Zen 4 and recent Intel cores have 1-2 MB of L2).
constexpr int64_t kL2X = 384 << 10, kL2W = 256 << 10;

// Column blocks of block_bytes each that share the kL2X budget.
inline int64_t blocks_per_group(int64_t block_bytes) {
  return std::max<int64_t>(1, kL2X / std::max<int64_t>(1, block_bytes));
}

// Calls f(blk, i8, nq) for every column block in [blk0, blk1) and 16-neuron group of neurons
// [i0, i1), in 2-D tiles: a group of column blocks whose xT slices fit kL2X, times a chunk of
// neurons whose values + indices fit kL2W; group(g0, g1) first, once per group of blocks [g0, g1).
// Block-outer order alone re-streams all the weights from L3 once per column block (13 times at
// 197 rows, 16 columns); neuron-outer order re-reads all of xT.
template <typename F, typename Group>
void for_tiles(int64_t blk0, int64_t blk1, int64_t block_bytes, int64_t neuron_bytes, int64_t i0,
               int64_t i1, F&& f, Group&& group) {
  const int64_t G = blocks_per_group(block_bytes);
  const int64_t NC =
      std::max<int64_t>(kTile, kL2W / std::max<int64_t>(1, neuron_bytes) / kTile * kTile);
  for (int64_t g0 = blk0; g0 < blk1; g0 += G) {
    const int64_t g1 = std::min(blk1, g0 + G);
    group(g0, g1);
    for (int64_t c0 = i0; c0 < i1; c0 += NC) {
      const int64_t c1 = std::min(i1, c0 + NC);
      for (int64_t blk = g0; blk < g1; ++blk)
        for (int64_t i8 = c0; i8 < c1; i8 += kTile) f(blk, i8, std::min<int64_t>(kTile, c1 - i8));
    }
  }
}

// How the threads share a batched product: by neurons (every thread reads all of x and its share
// of the weights) or by column blocks (every thread reads, and transposes, only its blocks of x,
// and all the weights). The columns when x is the larger of the two, or when the neuron split
// would have every thread transpose all of x itself (fp32, transpose_per_thread); with at least
// two blocks per thread so the shares stay even. Measured at ViT-B/16's MLP shapes, 197 rows, 2
// threads, both splits interleaved in one process (a dense GEMM or a cache flush before each
// call, as in a model): fp32 from level to 10% faster than the neuron split (3072x768, 768x3072,
// 768x768); bf16 level at 3072x768 (x 0.3 MB < weights 0.9 MB), 0-27% faster at 768x3072.
inline bool split_columns(int64_t x_bytes, int64_t w_bytes, int64_t nblk, int64_t threads,
                          bool x_per_thread) {
  return threads > 1 && nblk >= 2 * threads && (x_per_thread || x_bytes > w_bytes);
}

// Column-split driver: thread t takes the t-th of equal shares of the (column block, 16-neuron
// group) pairs in block-major order, i.e. whole blocks plus at most a part of one block at each
// end, and calls f(blk0, blk1, i0, i1) for each piece (neurons [i0, i1) of blocks [blk0, blk1)).
// Every pair costs the same (a partial last block still runs whole 16-column vectors).
template <typename F>
void parallel_over_columns(int64_t nblk, int64_t n, F&& f) {
  const int64_t nt = (n + kTile - 1) / kTile, total = nblk * nt;
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t pos = total * t / T;
      const int64_t end = total * (t + 1) / T;
      while (pos < end) {
        const int64_t blk = pos / nt, tl = pos % nt;
        if (tl == 0 && end >= (blk + 1) * nt) {  // a run of whole blocks
          const int64_t blk1 = end / nt;
          f(blk, blk1, int64_t(0), n);
          pos = blk1 * nt;
        } else {
          const int64_t stop = std::min(end, (blk + 1) * nt);
          f(blk, blk + 1, tl * kTile, std::min(n, (stop - blk * nt) * kTile));
          pos = stop;
        }
      }
    }
  });
}

constexpr int kF32W = 16;  // fp32 column block: one 64-byte row of xT per fan-in entry

// Row numbers of 8 fan-in entries. int16: two 64-bit loads split in registers (one load per
// four entries instead of one per entry: the load ports, not the FMAs, bound this kernel).
// Indices are validated non-negative, so zero-extension is exact.
inline void rows8(const int16_t* p, uint64_t (&o)[8]) {
  uint64_t a, b;
  std::memcpy(&a, p, 8);
  std::memcpy(&b, p + 4, 8);
  for (int e = 0; e < 4; ++e) {
    o[e] = (a >> (16 * e)) & 0xFFFF;
    o[4 + e] = (b >> (16 * e)) & 0xFFFF;
  }
}
inline void rows8(const int32_t* p, uint64_t (&o)[8]) {
  for (int e = 0; e < 8; ++e) o[e] = static_cast<uint32_t>(p[e]);
}

// Whether fm_f32 should transpose x itself, per group of column blocks, into a buffer of each
// thread (x read once, its blocks written to L2 just before the kernel reads them) instead of one
// xT transposed by all threads beforehand (written out, then read back from L2 or L3). Measured
// at ViT-B/16's MLP shapes, 197 rows, 1 thread: fc1 5.4x -> 5.8x, fc2 3.6x -> 4.2x faster than
// dense. Each thread transposes all of x, so only while that is small next to its share of the
// product (at 2 threads both MLP layers qualify; at 16 neither does).
inline bool transpose_per_thread(int64_t in, int64_t n, int64_t k, int64_t threads) {
  return threads * threads * in * 4 <= n * k;
}

// One neuron's 16 columns of fp32 x: row[0:16] = bias + sum_j vr[j] * base[ir[j] * 16 + 0:16].
// Per fan-in entry: one 64-byte row of xT (two ymm loads, folded into two FMAs), 1/8 of a 32-byte
// load of values and 1/4 of a 64-bit load of indices; the value is broadcast in registers
// (vpermps) instead of by a load of its own. That is ~2.4 load-port slots (256-bit) per entry
// against ~3 for a broadcast load plus an index load per entry, measured 35-45 vs 26-30 GMAC/s
// with the rows in L1 on a Zen 4 core (2 such slots per cycle). The rows come from L2 (a block is
// in * 64 bytes): at in = 3072 the L2 -> L1 fill (~35 bytes/cycle measured) is the limit.
// 256-bit vectors: on Zen 4 a 512-bit FMA is two 256-bit halves, and a 512-bit vpermps costs more
// than the 256-bit one (measured); with AVX-512VL the 32 ymm registers hold the 8 accumulators
// and the 8 permute selectors. A function of its own (not inlined) so that gcc keeps the
// accumulators in registers: inlined into fm_f32's tiling it spilled them every step (measured).
template <typename V, typename I>
__attribute__((noinline)) void neuron_f32(const float* base, const V* vr, const I* ir, int64_t k,
                                          float bias, float* row) {
  constexpr int W = kF32W;
  __m256i sel[8];
  for (int e = 0; e < 8; ++e) sel[e] = _mm256_set1_epi32(e);
  // 4 accumulator pairs: 8 independent FMA chains cover the FMA latency at 2 per cycle.
  __m256 acc[4][2];
  for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
  auto entry = [&](int u, __m256 w, uint64_t r) {
    const float* p = base + r * W;
    acc[u][0] = _mm256_fmadd_ps(w, _mm256_load_ps(p), acc[u][0]);
    acc[u][1] = _mm256_fmadd_ps(w, _mm256_load_ps(p + 8), acc[u][1]);
  };
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = load8(vr + j);
    uint64_t rows[8];
    rows8(ir + j, rows);
#pragma GCC unroll 8
    for (int e = 0; e < 8; ++e) entry(e & 3, _mm256_permutevar8x32_ps(v, sel[e]), rows[e]);
  }
  // Tail of k % 8 entries, each into a fixed accumulator (an accumulator indexed at run time
  // would force all of them out of registers).
  auto tail = [&](int u, int64_t jj) {
    entry(u, _mm256_set1_ps(to_f(vr[jj])), static_cast<uint64_t>(ir[jj]));
  };
  switch (k - j) {
    case 7: tail(2, j + 6); [[fallthrough]];
    case 6: tail(1, j + 5); [[fallthrough]];
    case 5: tail(0, j + 4); [[fallthrough]];
    case 4: tail(3, j + 3); [[fallthrough]];
    case 3: tail(2, j + 2); [[fallthrough]];
    case 2: tail(1, j + 1); [[fallthrough]];
    case 1: tail(0, j); [[fallthrough]];
    default: break;
  }
  const __m256 bv = _mm256_set1_ps(bias);
  for (int h = 0; h < 2; ++h)
    _mm256_store_ps(row + 8 * h,
                    _mm256_add_ps(bv, _mm256_add_ps(_mm256_add_ps(acc[0][h], acc[1][h]),
                                                    _mm256_add_ps(acc[2][h], acc[3][h]))));
}

// fp32 x, values of any float type, column blocks [blk0, blk1), neurons [i0, i1). x is either
// xT [nblk, in, 16] (transposed beforehand; x_rows null) or, when x_rows is set, row-major x
// [B, in] with row stride ldx, which is transposed here one group of column blocks at a time (see
// transpose_per_thread).
template <typename V, typename I>
void fm_f32(const float* xT, const float* x_rows, int64_t ldx, int64_t in, int64_t B,
            const V* vals, const I* idx, int64_t k, int64_t blk0, int64_t blk1, int64_t i0,
            int64_t i1, const float* bias, float* out, int64_t n) {
  constexpr int W = kF32W;
  alignas(64) float tile[kTile][W];
  at::Tensor buf;  // this thread's transposed group of blocks (x_rows mode)
  float* xg = nullptr;
  int64_t g_first = 0;
  if (x_rows) {
    buf = at::empty({blocks_per_group(in * W * 4) * in * W}, at::kFloat);
    xg = buf.data_ptr<float>();
  }
  auto group = [&](int64_t g0, int64_t g1) {
    if (!x_rows) return;
    const int64_t r0 = g0 * W, rows = std::min(B, g1 * W) - r0;
    // Inside at::parallel_for this runs on the calling thread only.
    to_column_blocks(x_rows + r0 * ldx, ldx, rows, in, W, xg, tile8_f32);
    g_first = g0;
  };
  const int64_t entry_bytes = sizeof(V) + sizeof(I);
  for_tiles(blk0, blk1, in * W * 4, k * entry_bytes, i0, i1, [&](int64_t blk, int64_t i8, int64_t nq) {
    const float* base = x_rows ? xg + (blk - g_first) * in * W : xT + blk * in * W;
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t i = i8 + q;
      neuron_f32(base, vals + i * k, idx + i * k, k, bias ? bias[i] : 0.f, tile[q]);
    }
    store_tile<W>(tile, nq, std::min<int64_t>(W, B - blk * W), out, n, blk * W, i8);
  }, group);
}

#if SC_BF16DP
constexpr int kBfW = 32;  // bf16 column block: one 64-byte row per fan-in entry

// The 8 x 8 tile of to_column_blocks for bf16 (as raw 16-bit words): rows s + q * ld (q < nrows,
// zeros past them), features 0..7 -> d + e * W, in SSE registers.
inline void tile8_bf16(const uint16_t* s, int64_t ld, int64_t nrows, uint16_t* d, int64_t W) {
  __m128i v[8];
  for (int q = 0; q < 8; ++q)
    v[q] = q < nrows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + q * ld))
                     : _mm_setzero_si128();
  const __m128i a0 = _mm_unpacklo_epi16(v[0], v[1]), a1 = _mm_unpackhi_epi16(v[0], v[1]);
  const __m128i a2 = _mm_unpacklo_epi16(v[2], v[3]), a3 = _mm_unpackhi_epi16(v[2], v[3]);
  const __m128i a4 = _mm_unpacklo_epi16(v[4], v[5]), a5 = _mm_unpackhi_epi16(v[4], v[5]);
  const __m128i a6 = _mm_unpacklo_epi16(v[6], v[7]), a7 = _mm_unpackhi_epi16(v[6], v[7]);
  const __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
  const __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
  const __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
  const __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
  const __m128i c[8] = {_mm_unpacklo_epi64(b0, b4), _mm_unpackhi_epi64(b0, b4),
                        _mm_unpacklo_epi64(b1, b5), _mm_unpackhi_epi64(b1, b5),
                        _mm_unpacklo_epi64(b2, b6), _mm_unpackhi_epi64(b2, b6),
                        _mm_unpacklo_epi64(b3, b7), _mm_unpackhi_epi64(b3, b7)};
  for (int e = 0; e < 8; ++e) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + e * W), c[e]);
}

// bf16 x and values, fp32 accumulation, column blocks [blk0, blk1), neurons [i0, i1). x is
// either xT [nblk, in, 32] bf16 (x_rows null) or row-major bf16 x [B, in] (row stride ldx),
// transposed here one group of column blocks at a time (the column split: see split_columns).
template <typename I>
void fm_bf16(const uint16_t* xT, const uint16_t* x_rows, int64_t ldx, int64_t in, int64_t B,
             const c10::BFloat16* vals, const I* idx, int64_t k, int64_t blk0, int64_t blk1,
             int64_t i0, int64_t i1, const c10::BFloat16* bias, c10::BFloat16* out, int64_t n) {
  constexpr int W = kBfW;
  alignas(64) float tile[kTile][W];
  at::Tensor buf;
  uint16_t* xg = nullptr;
  int64_t g_first = 0;
  if (x_rows) {
    buf = at::empty({blocks_per_group(in * W * 2) * in * W}, at::kShort);
    xg = reinterpret_cast<uint16_t*>(buf.data_ptr<int16_t>());
  }
  auto group = [&](int64_t g0, int64_t g1) {
    if (!x_rows) return;
    const int64_t r0 = g0 * W, rows = std::min(B, g1 * W) - r0;
    to_column_blocks(x_rows + r0 * ldx, ldx, rows, in, W, xg, tile8_bf16);
    g_first = g0;
  };
  const scbf16::Dot32 dot;
  for_tiles(blk0, blk1, in * W * 2, k * int64_t(2 + sizeof(I)), i0, i1, [&](int64_t blk, int64_t i8, int64_t nq) {
    {
      const uint16_t* base = x_rows ? xg + (blk - g_first) * in * W : xT + blk * in * W;
      const int64_t cols = std::min<int64_t>(W, B - blk * W);
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t i = i8 + q;
        const c10::BFloat16* vr = vals + i * k;
        const I* ir = idx + i * k;
        __m512 y0, y1;
        dot.run<true>(vr, k, [&](int64_t j) { return base + static_cast<int64_t>(ir[j]) * W; },
                      bias ? static_cast<float>(bias[i]) : 0.f, y0, y1);
        _mm512_store_ps(&tile[q][0], y0);
        _mm512_store_ps(&tile[q][16], y1);
      }
      store_tile<W>(tile, nq, cols, out, n, blk * W, i8);
    }
  }, group);
}
#endif  // SC_BF16DP

}  // namespace sc512
