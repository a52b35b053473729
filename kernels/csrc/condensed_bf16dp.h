// The bf16 inner product both VDPBF16PS kernels share (the batched linear in condensed_avx512.h,
// the conv in condensed_conv_bf16.h): one neuron's 32 columns, two fan-in entries per instruction.
// Included only when SC_BF16DP is set.
#pragma once

namespace scbf16 {

// Rows a = row(j) and b = row(j + 1) (32 bf16 each, 64 bytes) are interleaved (vpunpck{l,h}wd,
// within 128-bit lanes) into (a_l, b_l) pairs and multiplied by the pair (v_j, v_j+1), which is
// exactly the 32 bits at vals + j; accumulation in fp32. The interleave permutes the columns
// within each lane: lane p of the unpacklo product holds column 8 * (p / 4) + p % 4, of the
// unpackhi product column 8 * (p / 4) + 4 + p % 4; the selectors put them back in order once per
// neuron (indices >= 16 pick from the unpackhi accumulator).
struct Dot32 {
  __m512i s0, s1;

  Dot32() {
    alignas(64) int32_t sel[2][16];
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 16; ++c) {
        const int col = 16 * h + c, L = col / 8, e = col % 8;
        sel[h][c] = e < 4 ? 4 * L + e : 16 + 4 * L + e - 4;
      }
    s0 = _mm512_load_si512(sel[0]);
    s1 = _mm512_load_si512(sel[1]);
  }

  // y0 / y1 = columns 0-15 / 16-31 of bias + sum_j vals[j] * row(j)[0:32]. ALIGNED: the rows
  // start on 64-byte boundaries (the linear kernel's xT), else anywhere (the conv's planes).
  template <bool ALIGNED, typename Row>
  inline void run(const c10::BFloat16* vals, int64_t k, Row&& row, float bias, __m512& y0,
                  __m512& y1) const {
    auto load = [](const uint16_t* p) {
      if constexpr (ALIGNED) return _mm512_load_si512(p);
      else return _mm512_loadu_si512(p);
    };
    __m512 lo[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 hi[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    auto pair = [&](int u, int64_t j) {
      uint32_t wp;
      std::memcpy(&wp, vals + j, 4);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wp));
      const __m512i a = load(row(j)), b = load(row(j + 1));
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
    if (j < k) {  // odd fan-in: the last entry pairs with zeros (not with a row times 0, which
                  // would turn an inf in x into NaN)
      const __m512i zero = _mm512_setzero_si512();
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(vals[j].x));
      const __m512i a = load(row(j));
      lo[1] = _mm512_dpbf16_ps(lo[1], (__m512bh)_mm512_unpacklo_epi16(a, zero), w);
      hi[1] = _mm512_dpbf16_ps(hi[1], (__m512bh)_mm512_unpackhi_epi16(a, zero), w);
    }
    const __m512 l = _mm512_add_ps(lo[0], lo[1]), h = _mm512_add_ps(hi[0], hi[1]);
    const __m512 bv = _mm512_set1_ps(bias);
    y0 = _mm512_add_ps(bv, _mm512_permutex2var_ps(l, s0, h));
    y1 = _mm512_add_ps(bv, _mm512_permutex2var_ps(l, s1, h));
  }
};

}  // namespace scbf16
