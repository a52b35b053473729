// bf16 condensed conv2d kernel for the avx512bf16 build (included by condensed_conv_cpu.cpp when
// SC_BF16DP is set).
#pragma once

namespace sc512conv {

constexpr int kBfW = 32;  // columns per step: one 64-byte run of bf16 per fan-in entry
// bf16 conv2d on VDPBF16PS (fp32 accumulation): the conv's stride-phase image `img` in bf16 (see
// condensed_conv_cpu.cpp), every fan-in entry (i, j) a contiguous run of it starting at element
// off[i, j]; out[i * ncols + l] = bias[i] + sum_j vals[i, j] * img[off[i, j] + l] for l < ncols,
// neurons [i0, i1), rounded to bf16 (after ReLU when relu is set). As fm_bf16, two entries per instruction (their runs
// interleaved in registers); the runs start anywhere, so the loads are unaligned, and the output
// is neuron-major, so each neuron's 32 columns are stored directly (no transposing tile). Reads
// up to 31 elements past a run's end (the caller's zero slack); those columns are not stored.
inline void conv_bf16(const uint16_t* img, int64_t ncols, const c10::BFloat16* vals,
                      const int32_t* off, int64_t k, int64_t i0, int64_t i1,
                      const c10::BFloat16* bias, c10::BFloat16* out, bool relu) {
  constexpr int W = kBfW;
  alignas(64) int32_t sel[2][16];  // as in fm_bf16
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < 16; ++c) {
      const int col = 16 * h + c, L = col / 8, e = col % 8;
      sel[h][c] = e < 4 ? 4 * L + e : 16 + 4 * L + e - 4;
    }
  const __m512i s0 = _mm512_load_si512(sel[0]), s1 = _mm512_load_si512(sel[1]);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t l0 = 0; l0 < ncols; l0 += W) {
    const int64_t cols = std::min<int64_t>(W, ncols - l0);
    const uint16_t* base = img + l0;
    for (int64_t i = i0; i < i1; ++i) {
      const c10::BFloat16* vr = vals + i * k;
      const int32_t* orow = off + i * k;
      __m512 lo[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      __m512 hi[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      auto pair = [&](int u, int64_t j) {
        uint32_t wp;
        std::memcpy(&wp, vr + j, 4);
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wp));
        const __m512i a = _mm512_loadu_si512(base + orow[j]);
        const __m512i b = _mm512_loadu_si512(base + orow[j + 1]);
        lo[u] = _mm512_dpbf16_ps(lo[u], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
        hi[u] = _mm512_dpbf16_ps(hi[u], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
      };
      int64_t j = 0;
      for (; j + 4 <= k; j += 4) {
        pair(0, j);
        pair(1, j + 2);
      }
      if (j + 2 <= k) {
        pair(0, j);
        j += 2;
      }
      if (j < k) {  // odd fan-in: the last entry pairs with zeros (an inf in x must not meet 0)
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(vr[j].x));
        const __m512i a = _mm512_loadu_si512(base + orow[j]);
        lo[1] = _mm512_dpbf16_ps(lo[1], (__m512bh)_mm512_unpacklo_epi16(a, zero), w);
        hi[1] = _mm512_dpbf16_ps(hi[1], (__m512bh)_mm512_unpackhi_epi16(a, zero), w);
      }
      const __m512 l = _mm512_add_ps(lo[0], lo[1]), h = _mm512_add_ps(hi[0], hi[1]);
      const __m512 bv = _mm512_set1_ps(bias ? static_cast<float>(bias[i]) : 0.f);
      __m512 y0 = _mm512_add_ps(bv, _mm512_permutex2var_ps(l, s0, h));
      __m512 y1 = _mm512_add_ps(bv, _mm512_permutex2var_ps(l, s1, h));
      if (relu) {  // maxps returns its second operand when it is NaN: NaN stays NaN
        y0 = _mm512_max_ps(_mm512_setzero_ps(), y0);
        y1 = _mm512_max_ps(_mm512_setzero_ps(), y1);
      }
      const __m256i r0 = (__m256i)_mm512_cvtneps_pbh(y0);
      const __m256i r1 = (__m256i)_mm512_cvtneps_pbh(y1);
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
