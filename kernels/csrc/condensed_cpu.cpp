// CPU kernels for the condensed (constant fan-in) linear layer.
//
// Registers the CPU implementation of sparse_compile::_condensed_linear_cpu (schema and fake
// kernel in kernels/ops.py; the conv2d op is in condensed_conv_cpu.cpp, the kernels both share
// in condensed_kernels.h):
//
//   y[b, i] = sum_j values[i, j] * x[b, indices[i, j]] + bias[i]
//
// Strategies, all accumulating in fp32 (fp64 inputs get a plain double loop):
//  * small batch (GEMV, B <= kGemvMaxRows): row-major x; per neuron, x is gathered 8 indices at a
//    time (scalar loads merged into a vector, see gather4) into 2 independent accumulators, 16
//    entries per step; a row's last partial chunk is read in full and masked.
//  * larger batch: x transposed once (8 x 8 register tiles) to feature-major column blocks
//    xT [in, W] (zero-padded to whole vectors); then every (i, j) is
//    acc[0:W] += v * xT[idx, 0:W]: contiguous vector loads instead of gathers (fm_all). The block
//    loop is outside the neuron loop so the xT slice stays cached while the weights stream.
//  * from kAvx512MinRows rows on an AVX-512 build: the 16-column kernel of condensed_avx512.h
//    (and bf16 on VDPBF16PS where the CPU has AVX512_BF16).
// Threads: at::parallel_for (torch's intra-op pool, so torch.set_num_threads holds) over neurons,
// or, in the avx512 kernels, over column blocks (see sc512::split_columns).
// Indices are trusted (validated by sparse_compile.formats when the condensed form is built).

#include "condensed_kernels.h"

namespace {

constexpr int64_t kGemvMaxRows = 2;  // measured: feature-major wins from 3 rows on
constexpr int64_t kWideBlock = 32;   // feature-major x up to this many columns stays one matrix
constexpr int64_t kBlock = 16;       // column block width beyond that
// The avx512 kernels' blocks are 16 (fp32) or 32 (bf16) columns wide: below this many rows the
// AVX2 kernel's 8-column granularity wastes less (measured, 90% at 768 x 3072, with 16-32-column
// fp32 blocks: AVX2 ahead at 3 and 8 rows, even at 16, AVX-512 ahead from 24).
constexpr int64_t kAvx512MinRows = 17;

#if SC_AVX2
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
#endif  // SC_AVX2

// xT[b, r, c] = x[b * W + c, r] (0 for rows >= B): x [B, in] (row stride ldx) to feature-major
// column blocks [ceil(B / W), in, W], W a multiple of 8. tile8(s, ldx, nrows, d, W) transposes 8
// rows (nrows of them real, zeros for the rest) x 8 features in registers; the features past the
// last whole 8 are copied one by one. torch's strided copy does the same at a few GB/s, which at
// 99% sparsity cost more than the product itself.
template <typename T, typename Tile8>
void to_column_blocks(const T* x, int64_t ldx, int64_t B, int64_t in, int64_t W, T* xT,
                      Tile8&& tile8) {
  const int64_t nblk = (B + W - 1) / W, in8 = in / 8 * 8;
  at::parallel_for(0, nblk * (W / 8), std::max<int64_t>(1, 4096 / std::max<int64_t>(1, in)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / (W / 8), c0 = t % (W / 8) * 8, row0 = blk * W + c0;
      const int64_t nrows = std::clamp<int64_t>(B - row0, 0, 8);
      const T* src = nrows > 0 ? x + row0 * ldx : x;
      T* dst = xT + blk * in * W + c0;
      int64_t r = 0;
      for (; r < in8; r += 8) tile8(src + r, ldx, nrows, dst + r * W, W);
      for (; r < in; ++r)
        for (int64_t q = 0; q < 8; ++q) dst[r * W + q] = q < nrows ? src[q * ldx + r] : T(0);
    }
  });
}

// The fp32 tile of to_column_blocks.
inline void tile8_f32(const float* s, int64_t ld, int64_t nrows, float* d, int64_t W) {
#if SC_AVX2
  __m256 v[8], c[8];
  for (int q = 0; q < 8; ++q) v[q] = q < nrows ? _mm256_loadu_ps(s + q * ld) : _mm256_setzero_ps();
  transpose8(v, c);
  for (int e = 0; e < 8; ++e) _mm256_storeu_ps(d + e * W, c[e]);
#else
  for (int e = 0; e < 8; ++e)
    for (int q = 0; q < 8; ++q) d[e * W + q] = q < nrows ? s[q * ld + e] : 0.f;
#endif
}

#if SC_BF16DP
#include "condensed_bf16dp.h"
#endif
#if SC_AVX512
#include "condensed_avx512.h"
#endif

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
    const float* xr = x2.data_ptr<float>();
    const int64_t ldx = x2.stride(0), nblk = (B + W - 1) / W, threads = at::get_num_threads();
    const bool per_thread = sc512::transpose_per_thread(in, n, k, threads);
    if (sc512::split_columns(B * in * 4, n * k * int64_t(sizeof(V) + sizeof(I)), nblk, threads,
                             per_thread)) {
      sc512::parallel_over_columns(nblk, n, [&](int64_t b0, int64_t b1, int64_t i0, int64_t i1) {
        sc512::fm_f32(nullptr, xr, ldx, in, B, vals, idx, k, b0, b1, i0, i1, bias, out, n);
      });
      return;
    }
    at::Tensor xT;
    if (!per_thread) {
      xT = at::empty({nblk, in, W}, x2.options());
      to_column_blocks(xr, ldx, B, in, W, xT.data_ptr<float>(), tile8_f32);
    }
    const float* xp = xT.defined() ? xT.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, grain_for(k * B), [&](int64_t i0, int64_t i1) {
      sc512::fm_f32(xp, xp ? nullptr : xr, ldx, in, B, vals, idx, k, 0, nblk, i0, i1, bias, out, n);
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
  to_column_blocks(x2.data_ptr<float>(), x2.stride(0), B, in, W, xT.data_ptr<float>(), tile8_f32);
  fm_all(xT.data_ptr<float>(), W, B, /*padded=*/true, W, in * W, vals, idx, n, k, bias, out,
         /*os_n=*/1, /*os_l=*/n);
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
    // The bias stays bf16 (read per neuron): converting it per call cost ~30 us (measured).
    const at::Tensor bb = has_bias ? bias->contiguous() : at::Tensor();
    const c10::BFloat16* bp = has_bias ? bb.data_ptr<c10::BFloat16>() : nullptr;
    const int64_t nblk = (B + sc512::kBfW - 1) / sc512::kBfW, ldx = xb.stride(0);
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    at::Tensor out = at::empty({B, n}, x.options());
    const c10::BFloat16* vp = vals.data_ptr<c10::BFloat16>();
    c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
    auto run = [&](const uint16_t* xT, const uint16_t* rows, int64_t b0, int64_t b1, int64_t i0,
                   int64_t i1) {
      if (idx.scalar_type() == at::kShort)
        sc512::fm_bf16(xT, rows, ldx, in, B, vp, idx.data_ptr<int16_t>(), k, b0, b1, i0, i1, bp, op, n);
      else
        sc512::fm_bf16(xT, rows, ldx, in, B, vp, idx.data_ptr<int32_t>(), k, b0, b1, i0, i1, bp, op, n);
    };
    if (sc512::split_columns(B * in * 2, n * k * int64_t(2 + idx.element_size()), nblk,
                             at::get_num_threads(), /*x_per_thread=*/false)) {
      sc512::parallel_over_columns(nblk, n, [&](int64_t b0, int64_t b1, int64_t i0, int64_t i1) {
        run(nullptr, xs, b0, b1, i0, i1);
      });
      return out.view(out_sizes);
    }
    at::Tensor xT = at::empty({nblk, in, sc512::kBfW}, xb.options());
    to_column_blocks(xs, ldx, B, in, sc512::kBfW,
                     reinterpret_cast<uint16_t*>(xT.data_ptr<at::BFloat16>()), sc512::tile8_bf16);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xT.data_ptr<at::BFloat16>());
    at::parallel_for(0, n, grain_for(k * B), [&](int64_t i0, int64_t i1) {
      run(xp, nullptr, 0, nblk, i0, i1);
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
}  // namespace

TORCH_LIBRARY_IMPL(sparse_compile, CPU, m) {
  m.impl("_condensed_linear_cpu", &condensed_linear_cpu);
}
