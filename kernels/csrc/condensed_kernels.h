// Kernels shared by the CPU condensed linear (condensed_cpu.cpp) and conv2d
// (condensed_conv_cpu.cpp): the ISA switches, value loads, the feature-major product (AVX2 and
// portable), and the argument checks and dtype dispatch both ops use.
//
// Feature-major product: x (or the conv's stride-phase image) laid out so that the columns one
// fan-in entry multiplies are contiguous, xT [in, W]; then every entry (i, j) is
// acc[0:W] += values[i, j] * xT[indices[i, j], 0:W]: vector loads instead of gathers. 8/16/32
// columns are the register block (fm_block); fm_all walks the column blocks and splits the
// neurons over threads.
#pragma once

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
// 8 x 8 float transpose in registers: r[e] = column e of v (element e of every v[q]).
inline void transpose8(const __m256 (&v)[8], __m256 (&r)[8]) {
  const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
  const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
  const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
  const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
  r[0] = _mm256_permute2f128_ps(b0, b4, 0x20);
  r[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
  r[2] = _mm256_permute2f128_ps(b2, b6, 0x20);
  r[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
  r[4] = _mm256_permute2f128_ps(b0, b4, 0x31);
  r[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
  r[6] = _mm256_permute2f128_ps(b2, b6, 0x31);
  r[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
}

// ---- feature-major -----------------------------------------------------------------------------
// Output columns [l0, l0 + valid) for neurons [i0, i1), NV vectors of 8 columns; `base` points at
// column l0 of row 0 of xT (row stride ld): out[i, l] = bias[i] + sum_j vals[i, j] * xT[idx[i, j], l].
// MASKED: the rows end before l0 + 8 * NV, so loads are masked; otherwise (zero-padded xT) they
// read full vectors and only the stores stop at `valid`.
// (Splitting the input features into L1-sized bands was tried: at 8 columns x 3072 features it
// cut the cost per (i, j) from L2 but lost more to the extra loop exits; measured slower.)
// relu: store max(0, y) (NaN stays NaN, as torch.relu).
template <int NV, bool MASKED, typename V, typename I>
void fm_block(const float* base, int64_t ld, int64_t l0, int64_t valid, const V* vals, const I* idx,
              int64_t k, int64_t i0, int64_t i1, const float* bias, float* out, int64_t os_n,
              int64_t os_l, bool relu) {
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
      if (relu) s = _mm256_max_ps(_mm256_setzero_ps(), s);  // maxps returns s when s is NaN
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
// relu: apply ReLU as the outputs are stored (AVX2 builds; returns whether it did).
template <typename V, typename I>
bool fm_all(const float* xT, int64_t ld, int64_t ncols, bool padded, int64_t col_block,
            int64_t block_stride, const V* vals, const I* idx, int64_t n, int64_t k,
            const float* bias, float* out, int64_t os_n, int64_t os_l, bool relu = false) {
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
#define SC_FM(NV, M) \
  fm_block<NV, M>(base, ld, l0, valid, vals, idx, k, i0, i1, bias, out, os_n, os_l, relu)
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
  return SC_AVX2 && relu;
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
}  // namespace
