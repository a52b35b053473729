// CPU kernels for the condensed (constant fan-in) matmul and conv2d.
//
// Registers the CPU implementations of sparse_compile::_condensed_linear_cpu and
// sparse_compile::_condensed_conv2d_cpu (schemas and fake kernels are defined in kernels/ops.py).
//
//   y[b, i] = sum_j values[i, j] * x[b, indices[i, j]] + bias[i]
//
// Two strategies, both accumulating in fp32 (fp64 inputs get a plain double loop):
//  * small batch (GEMV, B <= kGemvMaxRows): row-major x; per neuron, x is gathered 8 indices at a
//    time (scalar loads merged into a vector, see gather4) into 2 independent accumulators, 16
//    entries per step; a row's last partial chunk is read in full and masked.
//  * larger batch: x transposed once (8 x 8 register tiles) to feature-major column blocks
//    xT [in, W] (zero-padded to whole vectors); then every (i, j) is
//    acc[0:W] += v * xT[idx, 0:W]: contiguous vector loads instead of gathers. 8/16/32 columns
//    are the register block; the block loop is outside the neuron loop so the xT slice stays
//    cached while the weights stream.
// Conv2d runs the feature-major kernel on a stride-phase split of the padded image (no im2col),
// see condensed_conv2d_cpu.
// Threads: at::parallel_for over neurons (torch's intra-op pool, so torch.set_num_threads holds).
// Indices are trusted (validated by sparse_compile.formats when the condensed form is built).

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// The AVX2 kernels use GCC/Clang inline asm with BMI1/2 instructions (every AVX2 CPU has them).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && defined(__BMI__) && \
    defined(__BMI2__) && defined(__GNUC__)
#include <immintrin.h>
#define SC_AVX2 1
#else
#define SC_AVX2 0
#endif
// The avx512 build adds 512-bit batched kernels (condensed_avx512.h); avx512bf16 adds the bf16
// kernel on VDPBF16PS.
#if SC_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define SC_AVX512 1
#else
#define SC_AVX512 0
#endif
#if SC_AVX512 && defined(__AVX512BF16__)
#define SC_BF16DP 1
#else
#define SC_BF16DP 0
#endif

namespace {

constexpr int64_t kGemvMaxRows = 2;  // measured: feature-major wins from 3 rows on
constexpr int64_t kWideBlock = 32;   // feature-major x up to this many columns stays one matrix
constexpr int64_t kBlock = 16;       // column block width beyond that
// The avx512 kernels' blocks are 16-32 columns wide: below this many rows the AVX2 kernel's
// 8-column granularity wastes less (measured, 90% at 768 x 3072: AVX2 ahead at 3 and 8 rows,
// even at 16, AVX-512 ahead from 24).
constexpr int64_t kAvx512MinRows = 17;

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
inline double to_f(double v) { return v; }

int64_t grain_for(int64_t work_per_neuron) {
  // Enough neurons per task that a thread has >= ~32k multiply-adds: smaller tasks lose more to
  // the fork/join than they gain.
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_neuron));
}

#if SC_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- gathers without the gather instruction -------------------------------------------------
// vgatherdps is microcoded and slow on AMD Zen (~12 cycles per 8 floats measured here). Scalar
// loads folded into vinsertps, with the four 16-bit indices of one 64-bit load peeled off by
// movzx/bextr/shrx, cost ~4 macro-ops per float and measured 2x faster. Inline asm because
// compilers do not fold the loads into vinsertps. Indices are non-negative, so zero-extension is
// exact. No "memory" clobber: the asm only reads x, which nothing writes while a kernel runs.
inline __m128 gather4(const float* x, const int16_t* q) {
  uint64_t p;
  std::memcpy(&p, q, 8);
  __m128 r;
  uint64_t t0, t1, t2, t3;
  asm("movzwl %w[p], %k[t0]\n\t"
      "vmovss (%[x],%[t0],4), %[r]\n\t"
      "bextr %[c1], %[p], %[t1]\n\t"
      "vinsertps $0x10, (%[x],%[t1],4), %[r], %[r]\n\t"
      "bextr %[c2], %[p], %[t2]\n\t"
      "vinsertps $0x20, (%[x],%[t2],4), %[r], %[r]\n\t"
      "shrx %[c3], %[p], %[t3]\n\t"
      "vinsertps $0x30, (%[x],%[t3],4), %[r], %[r]"
      : [r] "=&x"(r), [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3)
      : [x] "r"(x), [p] "r"(p), [c1] "r"(uint64_t{0x1010}), [c2] "r"(uint64_t{0x1020}),
        [c3] "r"(uint64_t{48}));
  return r;
}
inline __m128 gather4(const float* x, const int32_t* q) {
  uint64_t p0, p1;
  std::memcpy(&p0, q, 8);
  std::memcpy(&p1, q + 2, 8);
  __m128 r;
  uint64_t t0, t1, t2, t3;
  asm("movl %k[p0], %k[t0]\n\t"
      "vmovss (%[x],%[t0],4), %[r]\n\t"
      "shrx %[c], %[p0], %[t1]\n\t"
      "vinsertps $0x10, (%[x],%[t1],4), %[r], %[r]\n\t"
      "movl %k[p1], %k[t2]\n\t"
      "vinsertps $0x20, (%[x],%[t2],4), %[r], %[r]\n\t"
      "shrx %[c], %[p1], %[t3]\n\t"
      "vinsertps $0x30, (%[x],%[t3],4), %[r], %[r]"
      : [r] "=&x"(r), [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3)
      : [x] "r"(x), [p0] "r"(p0), [p1] "r"(p1), [c] "r"(uint64_t{32}));
  return r;
}
template <typename I>
inline __m256 gather8(const float* x, const I* q) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(gather4(x, q)), gather4(x, q + 4), 1);
}

// ---- GEMV: NB row-major rows of x, neurons [i0, i1) ------------------------------------------
// nk = n * k, the length of the values/indices arrays: a row's last partial chunk of 8 is read
// in full (running into the next row) and masked, unless that would run past the arrays' end.
template <int NB, typename V, typename I>
void gemv_range(const float* x, int64_t ldx, const V* vals, const I* idx, int64_t k, int64_t nk,
                int64_t i0, int64_t i1, const float* bias, float* out, int64_t ldo) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = i0; i < i1; ++i) {
    const V* vr = vals + i * k;
    const I* ir = idx + i * k;
    __m256 acc[NB][2];
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    float tail[NB] = {};
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      const __m256 v0 = load8(vr + j), v1 = load8(vr + j + 8);
      for (int b = 0; b < NB; ++b) {
        acc[b][0] = _mm256_fmadd_ps(gather8(x + b * ldx, ir + j), v0, acc[b][0]);
        acc[b][1] = _mm256_fmadd_ps(gather8(x + b * ldx, ir + j + 8), v1, acc[b][1]);
      }
    }
    for (; j < k; j += 8) {
      if (i * k + j + 8 > nk) {  // the arrays end inside this chunk: finish the row with scalars
        for (int b = 0; b < NB; ++b)
          for (int64_t jj = j; jj < k; ++jj) tail[b] += to_f(vr[jj]) * x[b * ldx + ir[jj]];
        break;
      }
      // Lanes past the row hold the next row's (valid) indices; zero both factors so that even a
      // non-finite x there cannot leak in.
      const __m256 m = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(k - j, 8))), lane));
      const __m256 vv = _mm256_and_ps(load8(vr + j), m);
      for (int b = 0; b < NB; ++b)
        acc[b][0] = _mm256_fmadd_ps(_mm256_and_ps(gather8(x + b * ldx, ir + j), m), vv, acc[b][0]);
    }
    const float bi = bias ? bias[i] : 0.f;
    for (int b = 0; b < NB; ++b)
      out[b * ldo + i] = hsum(_mm256_add_ps(acc[b][0], acc[b][1])) + tail[b] + bi;
  }
}

// ---- feature-major -----------------------------------------------------------------------------
// Output columns [l0, l0 + valid) for neurons [i0, i1), NV vectors of 8 columns; `base` points at
// column l0 of row 0 of xT (row stride ld): out[i, l] = bias[i] + sum_j vals[i, j] * xT[idx[i, j], l].
// MASKED: the rows end before l0 + 8 * NV, so loads are masked; otherwise (zero-padded xT) they
// read full vectors and only the stores stop at `valid`.
// (Splitting the input features into L1-sized bands was tried: at 8 columns x 3072 features it
// cut the cost per (i, j) from L2 but lost more to the extra loop exits; measured slower.)
template <int NV, bool MASKED, typename V, typename I>
void fm_block(const float* base, int64_t ld, int64_t l0, int64_t valid, const V* vals, const I* idx,
              int64_t k, int64_t i0, int64_t i1, const float* bias, float* out, int64_t os_n,
              int64_t os_l) {
  constexpr int U = NV >= 4 ? 1 : 4 / NV;  // independent accumulator sets to hide FMA latency
  __m256i mask[NV];
  for (int v = 0; v < NV; ++v) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    mask[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - 8 * v)), lane);
  }
  auto row_load = [&](const float* row, int v) {
    if constexpr (MASKED) return _mm256_maskload_ps(row + 8 * v, mask[v]);
    else return _mm256_loadu_ps(row + 8 * v);
  };
  for (int64_t i = i0; i < i1; ++i) {
    const V* vr = vals + i * k;
    const I* ir = idx + i * k;
    __m256 acc[U][NV];
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NV; ++v) acc[u][v] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + U <= k; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m256 w = _mm256_set1_ps(to_f(vr[j + u]));
        const float* row = base + static_cast<int64_t>(ir[j + u]) * ld;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[u][v] = _mm256_fmadd_ps(w, row_load(row, v), acc[u][v]);
      }
    }
    for (; j < k; ++j) {
      const __m256 w = _mm256_set1_ps(to_f(vr[j]));
      const float* row = base + static_cast<int64_t>(ir[j]) * ld;
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_fmadd_ps(w, row_load(row, v), acc[0][v]);
    }
    const __m256 bv = _mm256_set1_ps(bias ? bias[i] : 0.f);
    for (int v = 0; v < NV; ++v) {
      const int64_t nvalid = std::min<int64_t>(8, valid - 8 * v);
      if (nvalid <= 0) break;
      __m256 s = bv;
      for (int u = 0; u < U; ++u) s = _mm256_add_ps(s, acc[u][v]);
      float* o = out + i * os_n + (l0 + 8 * v) * os_l;
      if (os_l == 1 && nvalid == 8) {
        _mm256_storeu_ps(o, s);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, s);
        for (int64_t q = 0; q < nvalid; ++q) o[q * os_l] = tmp[q];
      }
    }
  }
}
#endif  // SC_AVX2

#if SC_AVX512
#include "condensed_avx512.h"
#endif

// ---- portable fallback (fp64, or a CPU without AVX2) -------------------------------------------
template <typename A, typename V, typename I>
void scalar_fm_range(const A* xT, int64_t ld, int64_t ncols, const V* vals, const I* idx, int64_t k,
                     int64_t i0, int64_t i1, const A* bias, A* out, int64_t os_n, int64_t os_l) {
  std::vector<A> acc(ncols);
  for (int64_t i = i0; i < i1; ++i) {
    std::fill(acc.begin(), acc.end(), bias ? bias[i] : A(0));
    for (int64_t j = 0; j < k; ++j) {
      const A w = static_cast<A>(to_f(vals[i * k + j]));
      const A* row = xT + static_cast<int64_t>(idx[i * k + j]) * ld;
      for (int64_t c = 0; c < ncols; ++c) acc[c] += w * row[c];
    }
    for (int64_t c = 0; c < ncols; ++c) out[i * os_n + c * os_l] = acc[c];
  }
}


// ---- drivers -------------------------------------------------------------------------------------
// Feature-major product over all neurons: out[i * os_n + l * os_l] for columns l < ncols of xT.
// Column l of row r lives at xT + (l / col_block) * block_stride + r * ld + l % col_block, so xT is
// either one [rows, ld] matrix (col_block >= ncols) or column blocks [rows, col_block] stacked
// block_stride apart (col_block a multiple of 8).
// padded: xT's rows are zero-padded to a multiple of 8 columns, so no load needs a mask.
template <typename V, typename I>
void fm_all(const float* xT, int64_t ld, int64_t ncols, bool padded, int64_t col_block,
            int64_t block_stride, const V* vals, const I* idx, int64_t n, int64_t k,
            const float* bias, float* out, int64_t os_n, int64_t os_l) {
  at::parallel_for(0, n, grain_for(k * ncols), [&](int64_t i0, int64_t i1) {
#if SC_AVX2
    for (int64_t l0 = 0; l0 < ncols;) {
      const int64_t r = std::min(ncols - l0, col_block - l0 % col_block);
      // Widest register block that the (padded) row still fills; unpadded rows take the widest
      // block that covers them and mask the rest.
      const int64_t room = padded ? (r + 7) / 8 * 8 : 0;
      const int nv = padded ? (room >= 32 ? 4 : room >= 16 ? 2 : 1) : (r > 16 ? 4 : r > 8 ? 2 : 1);
      const int64_t valid = std::min<int64_t>(r, 8 * nv);
      const bool masked = !padded && valid < 8 * nv;
      const float* base = xT + (l0 / col_block) * block_stride + l0 % col_block;
#define SC_FM(NV, M) fm_block<NV, M>(base, ld, l0, valid, vals, idx, k, i0, i1, bias, out, os_n, os_l)
      if (nv == 4) masked ? SC_FM(4, true) : SC_FM(4, false);
      else if (nv == 2) masked ? SC_FM(2, true) : SC_FM(2, false);
      else masked ? SC_FM(1, true) : SC_FM(1, false);
#undef SC_FM
      l0 += 8 * nv;
    }
#else
    (void)padded;
    for (int64_t l0 = 0; l0 < ncols; l0 += col_block)
      scalar_fm_range<float>(xT + (l0 / col_block) * block_stride, ld, std::min(col_block, ncols - l0),
                             vals, idx, k, i0, i1, bias, out + l0 * os_l, os_n, os_l);
#endif
  });
}

// xT[b, r, c] = x[b * W + c, r] (0 for rows >= B): x [B, in] (row stride ldx) to feature-major
// column blocks [ceil(B / W), in, W], W a multiple of 8. 8 x 8 tiles transposed in registers:
// torch's strided copy does the same at a few GB/s, which at 99% sparsity cost more than the
// product itself.
void to_column_blocks(const float* x, int64_t ldx, int64_t B, int64_t in, int64_t W, float* xT) {
  const int64_t nblk = (B + W - 1) / W, in8 = in / 8 * 8;
  at::parallel_for(0, nblk * (W / 8), std::max<int64_t>(1, 4096 / std::max<int64_t>(1, in)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / (W / 8), c0 = t % (W / 8) * 8, row0 = blk * W + c0;
      const int64_t nrows = std::clamp<int64_t>(B - row0, 0, 8);
      float* dst = xT + blk * in * W + c0;
      int64_t r = 0;
#if SC_AVX2
      for (; r < in8; r += 8) {
        __m256 v[8];
        for (int q = 0; q < 8; ++q)
          v[q] = q < nrows ? _mm256_loadu_ps(x + (row0 + q) * ldx + r) : _mm256_setzero_ps();
        // 8 x 8 transpose: v[q][e] -> out row r + e, column q.
        const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
        const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
        const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
        const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
        const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
        const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
        const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
        const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
        float* o = dst + r * W;
        _mm256_storeu_ps(o + 0 * W, _mm256_permute2f128_ps(b0, b4, 0x20));
        _mm256_storeu_ps(o + 1 * W, _mm256_permute2f128_ps(b1, b5, 0x20));
        _mm256_storeu_ps(o + 2 * W, _mm256_permute2f128_ps(b2, b6, 0x20));
        _mm256_storeu_ps(o + 3 * W, _mm256_permute2f128_ps(b3, b7, 0x20));
        _mm256_storeu_ps(o + 4 * W, _mm256_permute2f128_ps(b0, b4, 0x31));
        _mm256_storeu_ps(o + 5 * W, _mm256_permute2f128_ps(b1, b5, 0x31));
        _mm256_storeu_ps(o + 6 * W, _mm256_permute2f128_ps(b2, b6, 0x31));
        _mm256_storeu_ps(o + 7 * W, _mm256_permute2f128_ps(b3, b7, 0x31));
      }
#else
      (void)in8;
#endif
      for (; r < in; ++r)
        for (int64_t q = 0; q < 8; ++q) dst[r * W + q] = q < nrows ? x[(row0 + q) * ldx + r] : 0.f;
    }
  });
}

// x2: float [B, in] with unit column stride; out: float [B, n] contiguous.
template <typename V, typename I>
void linear_f32(const at::Tensor& x2, const V* vals, const I* idx, int64_t n, int64_t k,
                const float* bias, float* out) {
  const int64_t B = x2.size(0);
#if SC_AVX2
  if (B <= kGemvMaxRows) {
    const float* xp = x2.data_ptr<float>();
    const int64_t ldx = x2.stride(0);
    at::parallel_for(0, n, grain_for(k * B), [&](int64_t i0, int64_t i1) {
      static_assert(kGemvMaxRows == 2, "instantiate gemv_range for each row count");
      if (B == 1) gemv_range<1>(xp, ldx, vals, idx, k, n * k, i0, i1, bias, out, n);
      else gemv_range<2>(xp, ldx, vals, idx, k, n * k, i0, i1, bias, out, n);
    });
    return;
  }
#endif
  const int64_t in = x2.size(1);
#if SC_AVX512
  if (B >= kAvx512MinRows) {
    // 16 columns per block (one 64-byte row per fan-in entry); measured at 197 rows, 90%: ahead
    // of the former 32-column blocks at in = 768 too (their rows come from L2 at twice the size).
    constexpr int64_t W = sc512::kF32W;
    const int64_t nblk = (B + W - 1) / W;
    at::Tensor xT = at::empty({nblk, in, W}, x2.options());
    to_column_blocks(x2.data_ptr<float>(), x2.stride(0), B, in, W, xT.data_ptr<float>());
    const float* xp = xT.data_ptr<float>();
    at::parallel_for(0, n, grain_for(k * B), [&](int64_t i0, int64_t i1) {
      sc512::fm_f32(xp, in, B, vals, idx, k, i0, i1, bias, out, n);
    });
    return;
  }
#endif
  // Feature-major x: each gathered row is a contiguous batch slice, zero-padded to whole vectors.
  // Up to kWideBlock columns: one [in, Bp] matrix. Beyond: [Bp / kBlock, in, kBlock] column blocks,
  // so the slice a block pass reads is contiguous and stays in L2 (measured, 3072 x 256:
  // 1.6x faster than one [in, 256] matrix).
  const bool blocked = SC_AVX2 && B > kWideBlock;
  const int64_t W = blocked ? kBlock : (B + 7) / 8 * 8;
  const int64_t nblk = (B + W - 1) / W;
  at::Tensor xT = at::empty({nblk, in, W}, x2.options());
  to_column_blocks(x2.data_ptr<float>(), x2.stride(0), B, in, W, xT.data_ptr<float>());
  fm_all(xT.data_ptr<float>(), W, B, /*padded=*/true, W, in * W, vals, idx, n, k, bias, out,
         /*os_n=*/1, /*os_l=*/n);
}

template <typename F>
void dispatch_v(const at::Tensor& values, F&& f) {
  switch (values.scalar_type()) {
    case at::kFloat: f(values.data_ptr<float>()); break;
    case at::kHalf: f(values.data_ptr<c10::Half>()); break;
    case at::kBFloat16: f(values.data_ptr<c10::BFloat16>()); break;
    case at::kDouble: f(values.data_ptr<double>()); break;
    default: TORCH_CHECK(false, "condensed op: unsupported values dtype ", values.scalar_type());
  }
}

template <typename F>
void dispatch_vi(const at::Tensor& values, const at::Tensor& indices, F&& f) {
  dispatch_v(values, [&](auto* vp) {
    if (indices.scalar_type() == at::kShort) f(vp, indices.data_ptr<int16_t>());
    else f(vp, indices.data_ptr<int32_t>());
  });
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& values,
                  const at::Tensor& indices, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [n, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), op, ": indices shape ", indices.sizes(),
              " must equal values shape ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kShort || indices.scalar_type() == at::kInt, op,
              ": indices must be int16 or int32, got ", indices.scalar_type());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": x dtype ", dt, " not supported");
  TORCH_CHECK(values.scalar_type() == dt, op, ": values dtype ", values.scalar_type(),
              " must match x dtype ", dt);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0), op, ": bias shape ",
                bias->sizes(), " must be [", values.size(0), "]");
    TORCH_CHECK(bias->scalar_type() == dt, op, ": bias dtype must match x dtype");
  }
}

at::Tensor condensed_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& indices, const c10::optional<at::Tensor>& bias) {
  check_common("condensed_linear", x, values, indices, bias);
  TORCH_CHECK(x.dim() >= 1, "condensed_linear: x must have at least one dimension");
  const int64_t in = x.size(-1), n = values.size(0), k = values.size(1);
  TORCH_CHECK(k <= in, "condensed_linear: k = ", k, " exceeds x's fan-in ", in);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n;
  int64_t B = 1;
  for (size_t d = 0; d + 1 < out_sizes.size(); ++d) B *= out_sizes[d];
  if (B == 0 || n == 0) return at::empty(out_sizes, x.options());
  const at::Tensor vals = values.contiguous(), idx = indices.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();

  if (x.scalar_type() == at::kDouble) {
    const at::Tensor xT = x.reshape({B, in}).t().contiguous();
    at::Tensor out = at::empty({B, n}, x.options());
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    const double* bp = has_bias ? b.data_ptr<double>() : nullptr;
    dispatch_vi(vals, idx, [&](auto* vp, auto* ip) {
      if constexpr (std::is_same_v<std::remove_pointer_t<decltype(vp)>, double>) {
        at::parallel_for(0, n, grain_for(k * B), [&](int64_t i0, int64_t i1) {
          scalar_fm_range<double>(xT.data_ptr<double>(), B, B, vp, ip, k, i0, i1, bp,
                                  out.data_ptr<double>(), 1, n);
        });
      }
    });
    return out.view(out_sizes);
  }

#if SC_BF16DP
  if (x.scalar_type() == at::kBFloat16 && B >= kAvx512MinRows) {
    // bf16 x and values straight into VDPBF16PS (fp32 accumulation), no fp32 copy of x.
    at::Tensor xb = x.reshape({B, in});
    if (xb.stride(1) != 1) xb = xb.contiguous();
    const at::Tensor b32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bp = has_bias ? b32.data_ptr<float>() : nullptr;
    const int64_t nblk = (B + sc512::kBfW - 1) / sc512::kBfW;
    at::Tensor xT = at::empty({nblk, in, sc512::kBfW}, xb.options());
    sc512::to_column_blocks_bf16(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()),
                                 xb.stride(0), B, in,
                                 reinterpret_cast<uint16_t*>(xT.data_ptr<at::BFloat16>()));
    at::Tensor out = at::empty({B, n}, x.options());
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xT.data_ptr<at::BFloat16>());
    const c10::BFloat16* vp = vals.data_ptr<c10::BFloat16>();
    c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
    at::parallel_for(0, n, grain_for(k * B), [&](int64_t i0, int64_t i1) {
      if (idx.scalar_type() == at::kShort)
        sc512::fm_bf16(xp, in, B, vp, idx.data_ptr<int16_t>(), k, i0, i1, bp, op, n);
      else
        sc512::fm_bf16(xp, in, B, vp, idx.data_ptr<int32_t>(), k, i0, i1, bp, op, n);
    });
    return out.view(out_sizes);
  }
#endif
  at::Tensor x2 = x.reshape({B, in});
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor b32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = has_bias ? b32.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({B, n}, x.options().dtype(at::kFloat));
  dispatch_vi(vals, idx, [&](auto* vp, auto* ip) {
    if constexpr (!std::is_same_v<std::remove_pointer_t<decltype(vp)>, double>) {
      linear_f32(x2, vp, ip, n, k, bp, out.data_ptr<float>());
    }
  });
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  return out.view(out_sizes);
}

// Conv2d as the feature-major product without im2col ("implicit gather"). The zero-padded image
// is split into stride phases, plane (pr, pc) holding xpad[c, h*sh + pr, w*sw + pc] as
// [C, Hq, Wq]. Tap (c, r, s) of output pixel (oh, ow) then reads plane (r*dh % sh, s*dw % sw),
// channel c, at (oh + r*dh / sh, ow + s*dw / sw): a fixed offset per fan-in entry plus
// oh * Wq + ow. Over the virtual output grid m = oh * Wq + ow (ow < Wq, the columns ow >= Wo
// computed and dropped) every fan-in entry is a contiguous run of the buffer: the linear kernel
// with offsets[i, j] in place of indices[i, j] * ld. Costs one pass over the input instead of
// im2col's kh*kw-fold copy; the planes are written straight from x, padding included.

// Stride-phase planes of the zero-padded image, written in one pass (no padded copy first):
// buf[((pr * sw + pc) * C + c) * Hq * Wq + hq * Wq + wq] = xpad[c, hq * sh + pr, wq * sw + pc],
// 0 outside the image. x is [C, H, W] contiguous.
template <typename T>
void fill_phase_planes(const T* x, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw,
                       int64_t sh, int64_t sw, int64_t Hq, int64_t Wq, T* buf) {
  const int64_t plane = Hq * Wq;
  at::parallel_for(0, sh * sw * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, plane)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pr = t / (sw * C), pc = t / C % sw, c = t % C;
      T* dst = buf + t * plane;
      const T* src = x + c * H * W;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        T* row = dst + hq * Wq;
        const int64_t h = hq * sh + pr - ph;
        if (h < 0 || h >= H) {
          std::fill(row, row + Wq, T(0));
          continue;
        }
        const T* srow = src + h * W;
        if (sw == 1) {  // pc == 0: left padding, the row, right padding
          const int64_t lead = std::min(pw, Wq), body = std::max<int64_t>(0, std::min(W, Wq - lead));
          std::fill(row, row + lead, T(0));
          std::memcpy(row + lead, srow, body * sizeof(T));
          std::fill(row + lead + body, row + Wq, T(0));
        } else {
          for (int64_t wq = 0; wq < Wq; ++wq) {
            const int64_t w = wq * sw + pc - pw;
            row[wq] = (w >= 0 && w < W) ? srow[w] : T(0);
          }
        }
      }
    }
  });
}

at::Tensor condensed_conv2d_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_common("condensed_conv2d", x, values, indices, bias);
  TORCH_CHECK(x.dim() == 4, "condensed_conv2d: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "condensed_conv2d: kernel_size, stride, padding, dilation must be pairs");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0,
              "condensed_conv2d: need kernel_size, stride, dilation >= 1 and padding >= 0");
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t Ho = (Hp - dh * (kh - 1) - 1) / sh + 1, Wo = (Wp - dw * (kw - 1) - 1) / sw + 1;
  const int64_t n = values.size(0), k = values.size(1), fan_in = C * kh * kw;
  TORCH_CHECK(Hp - dh * (kh - 1) - 1 >= 0 && Wp - dw * (kw - 1) - 1 >= 0,
              "condensed_conv2d: input too small for the kernel");
  TORCH_CHECK(k <= fan_in, "condensed_conv2d: k = ", k, " exceeds the fan-in ", fan_in);
  if (N == 0 || n == 0) return at::empty({N, n, Ho, Wo}, x.options());

  const int64_t Hq = (Hp + sh - 1) / sh, Wq = (Wp + sw - 1) / sw, plane = Hq * Wq;
  const int64_t slack = Wq + 64;                 // over-reads past the last plane stay in bounds
  const int64_t img = sh * sw * C * plane + slack;
  TORCH_CHECK(img < (int64_t{1} << 31), "condensed_conv2d: image too large for 32-bit offsets");

  // offsets[i, j]: a table over the fan-in (C*kh*kw entries, so no per-entry division), gathered
  // by the indices (validated < fan_in when the condensed form was built).
  std::vector<int32_t> tab(fan_in);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < kh; ++r)
      for (int64_t sx = 0; sx < kw; ++sx) {
        const int64_t a = r * dh, b = sx * dw;
        tab[(c * kh + r) * kw + sx] = static_cast<int32_t>(((a % sh) * sw + b % sw) * C * plane +
                                                           c * plane + (a / sh) * Wq + b / sw);
      }
  at::Tensor off = at::empty({n, k}, indices.options().dtype(at::kInt));
  {
    int32_t* op = off.data_ptr<int32_t>();
    const at::Tensor idx = indices.contiguous();
    if (idx.scalar_type() == at::kShort) {
      const int16_t* ip = idx.data_ptr<int16_t>();
      for (int64_t e = 0; e < n * k; ++e) op[e] = tab[static_cast<uint16_t>(ip[e])];
    } else {
      const int32_t* ip = idx.data_ptr<int32_t>();
      for (int64_t e = 0; e < n * k; ++e) op[e] = tab[ip[e]];
    }
  }
  const at::Tensor vals = values.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool dbl = x.scalar_type() == at::kDouble;
  const auto acc_t = dbl ? at::kDouble : at::kFloat;
  const at::Tensor ba = has_bias ? bias->to(acc_t).contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, n, Ho, Wo}, x.options().dtype(acc_t));
  // The kernel runs over the virtual grid m = oh * Wq + ow: long column blocks, at the price of
  // computing the columns ow >= Wo and copying the rest out. (Blocks of one output row each,
  // stored straight into `out`, were tried: at 56x56 they split each row into 32 + 16 + 8
  // columns, and the extra passes over the fan-in cost what the copy saved.)
  const bool direct = Wq == Wo;
  const int64_t ncols = Ho * Wq;
  at::Tensor tmp = direct ? at::Tensor() : at::empty({n, ncols}, out.options());
  at::Tensor buf = at::empty({img}, out.options());

  for (int64_t g = 0; g < N; ++g) {
    const at::Tensor xg = x[g].to(acc_t).contiguous();  // [C, H, W]; a no-op for fp32 NCHW input
    at::Tensor dst = direct ? out[g].view({n, ncols}) : tmp;
    auto run = [&](auto* bufp, const auto* xp) {
      using T = std::remove_pointer_t<decltype(bufp)>;
      fill_phase_planes(xp, C, H, W, ph, pw, sh, sw, Hq, Wq, bufp);
      std::fill(bufp + img - slack, bufp + img, T(0));
      dispatch_v(vals, [&](auto* vp) {
        using V = std::remove_pointer_t<decltype(vp)>;
        const int32_t* offp = off.data_ptr<int32_t>();
        if constexpr (std::is_same_v<V, double> && std::is_same_v<T, double>) {
          const double* bp = has_bias ? ba.data_ptr<double>() : nullptr;
          at::parallel_for(0, n, grain_for(k * ncols), [&](int64_t i0, int64_t i1) {
            scalar_fm_range<double>(bufp, 1, ncols, vp, offp, k, i0, i1, bp, dst.data_ptr<double>(),
                                    ncols, 1);
          });
        } else if constexpr (!std::is_same_v<V, double> && std::is_same_v<T, float>) {
          const float* bp = has_bias ? ba.data_ptr<float>() : nullptr;
          fm_all(bufp, 1, ncols, /*padded=*/true, ncols, 0, vp, offp, n, k, bp,
                 dst.data_ptr<float>(), ncols, 1);
        }
      });
    };
    if (dbl) run(buf.data_ptr<double>(), xg.data_ptr<double>());
    else run(buf.data_ptr<float>(), xg.data_ptr<float>());
    if (!direct) out[g].copy_(tmp.view({n, Ho, Wq}).narrow(2, 0, Wo));
  }
  if (x.scalar_type() != acc_t) out = out.to(x.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_compile, CPU, m) {
  m.impl("_condensed_linear_cpu", &condensed_linear_cpu);
  m.impl("_condensed_conv2d_cpu", &condensed_conv2d_cpu);
}
