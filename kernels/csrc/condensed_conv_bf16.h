// bf16 condensed conv2d kernel for the avx512bf16 build (included by condensed_conv_cpu.cpp when
// SC_BF16DP is set).
#pragma once

namespace sc512conv {

constexpr int kBfW = 32;  // columns per step: one 64-byte run of bf16 per fan-in entry
// bf16 conv2d on VDPBF16PS (fp32 accumulation): the conv's stride-phase image `img` in bf16 (see
// condensed_conv_cpu.cpp), every fan-in entry (i, j) a contiguous run of it starting at element
// off[i, j]; out[i * ncols + l] = bias[i] + sum_j vals[i, j] * img[off[i, j] + l] for l < ncols,
// neurons [i0, i1), rounded to bf16 (after ReLU when relu is set). The product is the linear
// kernel's (scbf16::Dot32, two entries per instruction); the runs start anywhere, so the loads are
// unaligned, and the output is neuron-major, so each neuron's 32 columns are stored directly (no
// transposing tile). Reads up to 31 elements past a run's end (the caller's zero slack); those
// columns are not stored.
// Output: neuron i's plane at out + i * Ho * Wo; column l of the virtual grid is pixel
// (l / Wq, l % Wq), stored only where l % Wq < Wo (Wq == Wo: every column, as whole vectors).
inline void conv_bf16(const uint16_t* img, int64_t ncols, int64_t Wq, int64_t Wo, int64_t Ho,
                      const c10::BFloat16* vals, const int32_t* off, int64_t k, int64_t i0,
                      int64_t i1, const c10::BFloat16* bias, c10::BFloat16* out, bool relu) {
  constexpr int W = kBfW;
  const scbf16::Dot32 dot;
  for (int64_t l0 = 0; l0 < ncols; l0 += W) {
    const int64_t cols = std::min<int64_t>(W, ncols - l0);
    const uint16_t* base = img + l0;
    for (int64_t i = i0; i < i1; ++i) {
      const c10::BFloat16* vr = vals + i * k;
      const int32_t* orow = off + i * k;
      __m512 y0, y1;
      dot.run<false>(vr, k, [&](int64_t j) { return base + orow[j]; },
                     bias ? static_cast<float>(bias[i]) : 0.f, y0, y1);
      if (relu) {  // maxps returns its second operand when it is NaN: NaN stays NaN
        y0 = _mm512_max_ps(_mm512_setzero_ps(), y0);
        y1 = _mm512_max_ps(_mm512_setzero_ps(), y1);
      }
      const __m256i r0 = (__m256i)_mm512_cvtneps_pbh(y0);
      const __m256i r1 = (__m256i)_mm512_cvtneps_pbh(y1);
      if (Wq != Wo) {
        // Padded grid: each row piece of real pixels is one masked store of the 32 lanes, lanes
        // [c, c + len) to plane[oh * Wo + ow ...] (the store's base is offset back by c lanes;
        // masked-off lanes are never written). Measured: a memcpy per piece cost more than the
        // separate copy pass it replaced.
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
        uint16_t* plane = reinterpret_cast<uint16_t*>(out + i * Ho * Wo);
        int64_t oh = l0 / Wq, ow = l0 % Wq;
        for (int64_t c = 0; c < cols;) {
          const int64_t run = std::min(cols - c, Wq - ow);
          if (ow < Wo) {
            const int64_t len = std::min(run, Wo - ow);
            const __mmask32 m = static_cast<__mmask32>(((uint64_t{1} << len) - 1) << c);
            const uintptr_t at = reinterpret_cast<uintptr_t>(plane + oh * Wo + ow) -
                                 sizeof(uint16_t) * static_cast<uintptr_t>(c);
            _mm512_mask_storeu_epi16(reinterpret_cast<void*>(at), m, v);
          }
          c += run;
          ++oh;
          ow = 0;
        }
        continue;
      }
      c10::BFloat16* o = out + i * ncols + l0;
      if (cols == W) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), r0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), r1);
      } else {
        const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
        const __mmask16 m1 = cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
        _mm256_mask_storeu_epi16(o, m0, r0);
        _mm256_mask_storeu_epi16(o + 16, m1, r1);
      }
    }
  }
}

}  // namespace sc512conv
