// Trilinear resampling and windowed box sums on the CPU, exposed to XLA as FFI custom calls
// (vmjax/kernels.py). XLA:CPU runs these as scalar gathers, scatter-adds and reduce_window
// loops; here they are plain OpenMP loops over contiguous memory. float32, channels-last,
// row-major, the same math as the XLA reference in vmjax/transforms.py and vmjax/losses.py.
//
//   VmjaxTrilinear(image (B, Di, Hi, Wi, C), coords (B, D, H, W, 3)) -> out (B, D, H, W, C)
//     out[x] = sum over the 8 corners of floor(coords[x]) of weight * image[corner];
//     attr mode: 0 = "constant" (corners outside the image count 0), 1 = "nearest" (corner
//     indices clamped to the image).
//   VmjaxTrilinearGradCoords(image, coords, g (B, D, H, W, C)) -> d_coords (B, D, H, W, 3)
//   VmjaxTrilinearGradImage(image, coords, g) -> d_image (B, Di, Hi, Wi, C)  (the scatter-add;
//     each thread accumulates into its own buffer, summed in a fixed order: deterministic for a
//     given thread count)
//   VmjaxBoxSum(x (B, D, H, W, C)) -> y: the sum over a window^3 cube around each voxel, zero
//     padded (attr window, odd). Separable: a pass along D, then H and W per (b, d) slab.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Axis {
  int64_t i0, i1;  // the two corner indices (clamped into the image)
  float w0, w1;    // their weights (0 for an invalid corner in constant mode)
  float d0, d1;    // d(weight)/d(coordinate) (0 likewise)
};

inline Axis MakeAxis(float p, int64_t n, bool nearest) {
  // Far outside, every corner is invalid (constant) or clamped to one edge voxel (nearest)
  // either way; bounding p keeps the integer conversion defined (NaN included).
  if (!(p >= -2.0f)) p = -2.0f;
  if (p > static_cast<float>(n + 1)) p = static_cast<float>(n + 1);
  const float lower = std::floor(p);
  const float frac = p - lower;
  const int64_t l = static_cast<int64_t>(lower);
  Axis a;
  a.w0 = 1.0f - frac;
  a.w1 = frac;
  a.d0 = -1.0f;
  a.d1 = 1.0f;
  if (!nearest) {
    if (l < 0 || l >= n) a.w0 = a.d0 = 0.0f;
    if (l + 1 < 0 || l + 1 >= n) a.w1 = a.d1 = 0.0f;
  }
  a.i0 = std::min(std::max<int64_t>(l, 0), n - 1);
  a.i1 = std::min(std::max<int64_t>(l + 1, 0), n - 1);
  return a;
}

struct Shapes {
  int64_t b, di, hi, wi, c, out;  // out: voxels per batch item of the coords' grid
};

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& image, const ffi::Buffer<ffi::F32>& coords,
                       Shapes* s) {
  auto id = image.dimensions(), cd = coords.dimensions();
  if (id.size() != 5 || cd.size() != 5 || cd[4] != 3 || cd[0] != id[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax trilinear: image (B, D, H, W, C) and coords (B, D, H, W, 3)");
  *s = {id[0], id[1], id[2], id[3], id[4], cd[1] * cd[2] * cd[3]};
  return ffi::Error::Success();
}

struct Axes {
  Axis a0, a1, a2;
};

inline Axes MakeAxes(const Shapes& s, const float* p, bool nearest) {
  return {MakeAxis(p[0], s.di, nearest), MakeAxis(p[1], s.hi, nearest),
          MakeAxis(p[2], s.wi, nearest)};
}

// Calls f(b, x, axes) for every output voxel x of batch item b, in parallel.
template <typename F>
inline void ForEachSample(const Shapes& s, const float* coords, bool nearest, F&& f) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.b; ++b)
    for (int64_t x = 0; x < s.out; ++x) f(b, x, MakeAxes(s, coords + (b * s.out + x) * 3, nearest));
}

// Calls f(offset, w0, w1, w2, d0, d1, d2) for the 8 corners of one sample: the corner's offset
// into its batch item's image, its per-axis weights (their product is the corner's weight) and
// the per-axis weight derivatives.
template <typename F>
inline void ForEachCorner(const Shapes& s, const Axes& a, F&& f) {
  for (int c0 = 0; c0 < 2; ++c0) {
    const int64_t i0 = c0 ? a.a0.i1 : a.a0.i0;
    const float w0 = c0 ? a.a0.w1 : a.a0.w0, d0 = c0 ? a.a0.d1 : a.a0.d0;
    for (int c1 = 0; c1 < 2; ++c1) {
      const int64_t i1 = c1 ? a.a1.i1 : a.a1.i0;
      const float w1 = c1 ? a.a1.w1 : a.a1.w0, d1 = c1 ? a.a1.d1 : a.a1.d0;
      for (int c2 = 0; c2 < 2; ++c2) {
        const int64_t i2 = c2 ? a.a2.i1 : a.a2.i0;
        const float w2 = c2 ? a.a2.w1 : a.a2.w0, d2 = c2 ? a.a2.d1 : a.a2.d0;
        f(((i0 * s.hi + i1) * s.wi + i2) * s.c, w0, w1, w2, d0, d1, d2);
      }
    }
  }
}

// C > 0: the channel count known at compile time (1: images, 3: fields); 0: any.
template <int C>
void TrilinearLoop(const Shapes& s0, const float* img, const float* coords, float* o,
                   bool nearest) {
  Shapes s = s0;
  if (C > 0) s.c = C;
  const int64_t per_item = s.di * s.hi * s.wi * s.c;
  ForEachSample(s, coords, nearest, [&](int64_t b, int64_t x, const Axes& axes) {
    const float* base = img + b * per_item;
    float* ov = o + (b * s.out + x) * s.c;
    float acc[C > 0 ? C : 1] = {};
    if (C == 0)
      for (int64_t k = 0; k < s.c; ++k) ov[k] = 0.0f;
    ForEachCorner(s, axes, [&](int64_t offset, float w0, float w1, float w2, float, float,
                               float) {
      const float w = w0 * w1 * w2;
      const float* v = base + offset;
      if (C > 0) {
        for (int k = 0; k < C; ++k) acc[k] += w * v[k];
      } else {
        for (int64_t k = 0; k < s.c; ++k) ov[k] += w * v[k];
      }
    });
    if (C > 0)
      for (int k = 0; k < C; ++k) ov[k] = acc[k];
  });
}

ffi::Error Trilinear(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> coords,
                     ffi::ResultBuffer<ffi::F32> out, int64_t mode) {
  Shapes s;
  if (auto e = CheckShapes(image, coords, &s); e.failure()) return e;
  if (s.c == 1) {
    TrilinearLoop<1>(s, image.typed_data(), coords.typed_data(), out->typed_data(), mode == 1);
  } else if (s.c == 3) {
    TrilinearLoop<3>(s, image.typed_data(), coords.typed_data(), out->typed_data(), mode == 1);
  } else {
    TrilinearLoop<0>(s, image.typed_data(), coords.typed_data(), out->typed_data(), mode == 1);
  }
  return ffi::Error::Success();
}

ffi::Error TrilinearGradCoords(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> coords,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> d_coords,
                               int64_t mode) {
  Shapes s;
  if (auto e = CheckShapes(image, coords, &s); e.failure()) return e;
  const float* img = image.typed_data();
  const float* gp = g.typed_data();
  float* dc = d_coords->typed_data();
  const int64_t per_item = s.di * s.hi * s.wi * s.c;
  ForEachSample(s, coords.typed_data(), mode == 1, [&](int64_t b, int64_t x, const Axes& axes) {
    const float* base = img + b * per_item;
    const float* gv = gp + (b * s.out + x) * s.c;
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f;
    ForEachCorner(s, axes, [&](int64_t offset, float w0, float w1, float w2, float d0, float d1,
                               float d2) {
      const float* v = base + offset;
      float gdotv = 0.0f;
      for (int64_t k = 0; k < s.c; ++k) gdotv += gv[k] * v[k];
      t0 += gdotv * d0 * w1 * w2;
      t1 += gdotv * w0 * d1 * w2;
      t2 += gdotv * w0 * w1 * d2;
    });
    float* out = dc + (b * s.out + x) * 3;
    out[0] = t0;
    out[1] = t1;
    out[2] = t2;
  });
  return ffi::Error::Success();
}

ffi::Error TrilinearGradImage(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> coords,
                              ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> d_image,
                              int64_t mode) {
  Shapes s;
  if (auto e = CheckShapes(image, coords, &s); e.failure()) return e;
  const float* cp = coords.typed_data();
  const float* gp = g.typed_data();
  float* di = d_image->typed_data();
  const int64_t per_item = s.di * s.hi * s.wi * s.c;
  const int64_t total = s.b * per_item;
  const bool nearest = mode == 1;
  const int threads = std::max(1, omp_get_max_threads());
  // Thread 0 accumulates into the output, the others into their own buffers; then summed.
  std::vector<std::vector<float>> partial(threads - 1);
  std::fill(di, di + total, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    float* acc = di;
    if (t > 0) {
      partial[t - 1].assign(total, 0.0f);
      acc = partial[t - 1].data();
    }
    const int64_t n = s.b * s.out;
    const int64_t chunk = (n + threads - 1) / threads;
    const int64_t begin = std::min(n, t * chunk), end = std::min(n, begin + chunk);
    for (int64_t bx = begin; bx < end; ++bx) {
      const int64_t b = bx / s.out;
      const float* gv = gp + bx * s.c;
      float* base = acc + b * per_item;
      ForEachCorner(s, MakeAxes(s, cp + bx * 3, nearest),
                    [&](int64_t offset, float w0, float w1, float w2, float, float, float) {
        const float w = w0 * w1 * w2;
        if (w == 0.0f) return;
        float* v = base + offset;
        for (int64_t k = 0; k < s.c; ++k) v[k] += w * gv[k];
      });
    }
#pragma omp barrier
    // Sum the other threads' buffers into the output, split over the image.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < total; ++i) {
      float sum = di[i];
      for (int u = 0; u < threads - 1; ++u) sum += partial[u][i];
      di[i] = sum;
    }
  }
  return ffi::Error::Success();
}

// out_row[i] = sum over k in [-half, half] of rows[(j + k) * stride + i], rows j + k inside
// [0, n), for i in [0, len).
inline void WindowSum(const float* rows, float* out_row, int64_t j, int64_t n, int64_t stride,
                      int64_t len, int64_t half) {
  std::fill(out_row, out_row + len, 0.0f);
  for (int64_t k = std::max<int64_t>(-half, -j); k <= std::min<int64_t>(half, n - 1 - j); ++k) {
    const float* __restrict__ in = rows + (j + k) * stride;
    float* __restrict__ o = out_row;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) o[i] += in[i];
  }
}

ffi::Error BoxSum(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t window) {
  auto d = x.dimensions();
  if (d.size() != 5 || window < 1 || window % 2 == 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax box sum: x (B, D, H, W, C) and an odd window");
  const int64_t nb = d[0], nd = d[1], nh = d[2], nw = d[3], nc = d[4];
  const int64_t half = window / 2, row = nw * nc, plane = nh * row;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  // Along D: each output plane is the sum of up to `window` input planes.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < nd; ++j)
      WindowSum(xp + b * nd * plane, yp + (b * nd + j) * plane, j, nd, plane, plane, half);
  // Along H, then W, one (b, d) slab at a time through a per-thread buffer, back into y.
#pragma omp parallel
  {
    std::vector<float> buf(plane);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < nd; ++j) {
        float* slab = yp + (b * nd + j) * plane;
        for (int64_t h = 0; h < nh; ++h) WindowSum(slab, buf.data() + h * row, h, nh, row, row, half);
        for (int64_t h = 0; h < nh; ++h) {
          const float* in = buf.data() + h * row;
          float* out = slab + h * row;
          std::fill(out, out + row, 0.0f);
          for (int64_t k = -half; k <= half; ++k) {
            // out[w, c] += in[w + k, c] for w + k inside [0, nw)
            const int64_t lo = std::max<int64_t>(0, -k) * nc;
            const int64_t hi = std::min<int64_t>(nw, nw - k) * nc;
            const float* __restrict__ src = in + k * nc;
            float* __restrict__ dst = out;
#pragma omp simd
            for (int64_t i = lo; i < hi; ++i) dst[i] += src[i];
          }
        }
      }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxTrilinear, Trilinear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode"));

// The two gradients take (image, coords, g) and return one buffer.
#define VMJAX_TRILINEAR_GRAD_HANDLER(SYMBOL, FUNCTION)                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SYMBOL, FUNCTION,                        \
                                ffi::Ffi::Bind()                         \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Ret<ffi::Buffer<ffi::F32>>()        \
                                    .Attr<int64_t>("mode"));

VMJAX_TRILINEAR_GRAD_HANDLER(VmjaxTrilinearGradCoords, TrilinearGradCoords)
VMJAX_TRILINEAR_GRAD_HANDLER(VmjaxTrilinearGradImage, TrilinearGradImage)

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxBoxSum, BoxSum,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
