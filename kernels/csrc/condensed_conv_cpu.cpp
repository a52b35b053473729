// CPU kernel for the condensed (constant fan-in) conv2d: registers
// sparse_compile::_condensed_conv2d_cpu and _condensed_conv2d_relu_cpu (the same followed by ReLU,
// applied as the outputs are stored; schema and fake kernel in kernels/ops.py). It runs the
// feature-major product of condensed_kernels.h (shared with the linear op, condensed_cpu.cpp)
// on a stride-phase split of the padded image, without im2col; bf16 input on the avx512bf16 build
// runs the VDPBF16PS kernel of condensed_conv_bf16.h (fp32 accumulation, bf16 output).

#include "condensed_kernels.h"

#include <ATen/ops/relu.h>
#if SC_BF16DP
#include "condensed_bf16dp.h"
#include "condensed_conv_bf16.h"
#endif

namespace {

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

// The conv op, and with relu the fused "conv + ReLU" op (ReLU applied as the outputs are stored
// where the kernel allows, else to the output afterwards).
at::Tensor conv_impl(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                     const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     bool relu) {
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
#if SC_BF16DP
  if (x.scalar_type() == at::kBFloat16) {
    // bf16 image and values straight into VDPBF16PS (fp32 accumulation), bf16 output: no fp32
    // copies of the image or the output. Measured at ResNet-50's 3x3 convs, 90%: see
    // bench/kernel_cpu.py --conv.
    const at::Tensor bb = has_bias ? bias->contiguous() : at::Tensor();
    const c10::BFloat16* bp = has_bias ? bb.data_ptr<c10::BFloat16>() : nullptr;
    at::Tensor out = at::empty({N, n, Ho, Wo}, x.options());
    const int64_t ncols = Ho * Wq;
    at::Tensor buf = at::empty({img}, x.options());
    c10::BFloat16* bufp = buf.data_ptr<c10::BFloat16>();
    const c10::BFloat16* vp = vals.data_ptr<c10::BFloat16>();
    const int32_t* offp = off.data_ptr<int32_t>();
    for (int64_t g = 0; g < N; ++g) {
      const at::Tensor xg = x[g].contiguous();
      fill_phase_planes(xg.data_ptr<c10::BFloat16>(), C, H, W, ph, pw, sh, sw, Hq, Wq, bufp);
      std::fill(bufp + img - slack, bufp + img, c10::BFloat16(0.f));
      c10::BFloat16* dst = out[g].data_ptr<c10::BFloat16>();  // written in place, padded grid or not
      // Threads split the output channels: splitting the columns instead (each thread reading
      // its part of every plane) measured 0-12% slower at batch 1 on ResNet-50's 3x3 convs.
      at::parallel_for(0, n, grain_for(k * ncols), [&](int64_t i0, int64_t i1) {
        sc512conv::conv_bf16(reinterpret_cast<const uint16_t*>(bufp), ncols, Wq, Wo, Ho, vp, offp, k,
                             i0, i1, bp, dst, relu);
      });
    }
    return out;
  }
#endif
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
  bool relu_done = false;

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
          relu_done = fm_all(bufp, 1, ncols, /*padded=*/true, ncols, 0, vp, offp, n, k, bp,
                             dst.data_ptr<float>(), ncols, 1, relu);
        }
      });
    };
    if (dbl) run(buf.data_ptr<double>(), xg.data_ptr<double>());
    else run(buf.data_ptr<float>(), xg.data_ptr<float>());
    if (!direct) out[g].copy_(tmp.view({n, Ho, Wq}).narrow(2, 0, Wo));
  }
  if (relu && !relu_done) at::relu_(out);
  if (x.scalar_type() != acc_t) out = out.to(x.scalar_type());
  return out;
}

at::Tensor condensed_conv2d_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  return conv_impl(x, values, indices, bias, kernel_size, stride, padding, dilation, false);
}

at::Tensor condensed_conv2d_relu_cpu(const at::Tensor& x, const at::Tensor& values,
                                     const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  return conv_impl(x, values, indices, bias, kernel_size, stride, padding, dilation, true);
}
}  // namespace

TORCH_LIBRARY_IMPL(sparse_compile, CPU, m) {
  m.impl("_condensed_conv2d_cpu", &condensed_conv2d_cpu);
  m.impl("_condensed_conv2d_relu_cpu", &condensed_conv2d_relu_cpu);
}
