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
//     given thread count; ScatterInParallel)
//   VmjaxBoxSum(x (B, D, H, W, C)) -> y: the sum over a window^3 cube around each voxel, zero
//     padded (attr window, odd). Separable: a pass along D, then H and W per (b, d) slab.
//   VmjaxUpsample2(x (B, D, H, W, C)) -> y (B, 2D, 2H, 2W, C): linear resampling to twice the
//     size, jax.image.resize(method="linear")'s values (half-pixel centres: output 2i samples
//     i - 1/4, output 2i + 1 samples i + 1/4; the edge voxels extended).
//   VmjaxUpsample2T(g (B, 2D, 2H, 2W, C)) -> x (B, D, H, W, C): its transpose (the gradient).
//   VmjaxComposeSelf(u (B, D, H, W, 3)) -> u(x) + u(x + u(x)): one squaring of scaling and
//     squaring (trilinear, indices clamped to the field), without the coordinates in memory.
//   VmjaxComposeSelfGrad(u, g) -> d_u: its gradient, the coordinate and the scattered image
//     parts in one pass (ScatterInParallel).
//   VmjaxSum(x (any shape)) -> the sum of its elements (f64 accumulation, per-thread partial
//     sums added in a fixed order). XLA:CPU fuses an elementwise map into the reduction that
//     consumes it and then runs ~20-50x slower than the map and the sum apart (NCC's mean).

#include <algorithm>
#include <array>
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

// This thread's contiguous share [begin, end) of [0, n) when `threads` threads split it.
inline void ThreadRange(int64_t n, int t, int threads, int64_t* begin, int64_t* end) {
  const int64_t chunk = (n + threads - 1) / threads;
  *begin = std::min(n, t * chunk);
  *end = std::min(n, *begin + chunk);
}

// A scatter-add in parallel: calls f(acc, i) for i in [0, n), each thread over its own
// contiguous range with `acc` its own zeroed buffer of `total` floats (thread 0's is `out`),
// then sums the buffers into `out` in a fixed order (deterministic for a given thread count).
template <typename F>
void ScatterInParallel(float* out, int64_t total, int64_t n, F&& f) {
  const int threads = std::max(1, omp_get_max_threads());
  std::vector<std::vector<float>> partial(threads - 1);
  std::fill(out, out + total, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    float* acc = out;
    if (t > 0) {
      partial[t - 1].assign(total, 0.0f);
      acc = partial[t - 1].data();
    }
    int64_t begin, end;
    ThreadRange(n, t, threads, &begin, &end);
    for (int64_t i = begin; i < end; ++i) f(acc, i);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < total; ++i) {
      float sum = out[i];
      for (int u = 0; u < threads - 1; ++u) sum += partial[u][i];
      out[i] = sum;
    }
  }
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
  const bool nearest = mode == 1;
  ScatterInParallel(di, s.b * per_item, s.b * s.out, [&](float* acc, int64_t bx) {
    const float* gv = gp + bx * s.c;
    float* base = acc + (bx / s.out) * per_item;
    ForEachCorner(s, MakeAxes(s, cp + bx * 3, nearest),
                  [&](int64_t offset, float w0, float w1, float w2, float, float, float) {
      const float w = w0 * w1 * w2;
      if (w == 0.0f) return;
      float* v = base + offset;
      for (int64_t k = 0; k < s.c; ++k) v[k] += w * gv[k];
    });
  });
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

// One row of the x2 linear upsampling along an axis: from the input rows a (index i) and its
// neighbours prev (i - 1) and next (i + 1), clamped at the edges, the output rows even (2i) and
// odd (2i + 1), `len` floats each.
inline void UpRow(const float* __restrict__ a, const float* __restrict__ prev,
                  const float* __restrict__ next, float* __restrict__ even,
                  float* __restrict__ odd, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    even[k] = 0.75f * a[k] + 0.25f * prev[k];
    odd[k] = 0.75f * a[k] + 0.25f * next[k];
  }
}

// Its transpose: input row i received output rows g0 (2i - 1), g1 (2i), g2 (2i + 1), g3 (2i + 2)
// with weights 1/4, 3/4, 3/4, 1/4 (clamped at the edges).
inline void UpRowT(const float* __restrict__ g0, const float* __restrict__ g1,
                   const float* __restrict__ g2, const float* __restrict__ g3,
                   float* __restrict__ x, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) x[k] = 0.75f * (g1[k] + g2[k]) + 0.25f * (g0[k] + g3[k]);
}

// UpRow over a whole axis: rows of `stride` floats, in (outer, n, .) -> out (outer, 2n, .), the
// `len` floats at `offset` of each row.
inline void UpRows(const float* in, float* out, int64_t o, int64_t n, int64_t stride,
                   int64_t offset, int64_t len) {
  const float* rows = in + o * n * stride + offset;
  float* outs = out + o * 2 * n * stride + offset;
  for (int64_t i = 0; i < n; ++i)
    UpRow(rows + i * stride, rows + std::max<int64_t>(i - 1, 0) * stride,
          rows + std::min<int64_t>(i + 1, n - 1) * stride, outs + 2 * i * stride,
          outs + (2 * i + 1) * stride, len);
}

// UpRowT over a whole axis: g (outer, 2n, .) -> out (outer, n, .), rows as in UpRows.
inline void UpRowsT(const float* g, float* out, int64_t o, int64_t n, int64_t stride,
                    int64_t offset, int64_t len) {
  const float* rows = g + o * 2 * n * stride + offset;
  float* outs = out + o * n * stride + offset;
  for (int64_t i = 0; i < n; ++i)
    UpRowT(rows + std::max<int64_t>(2 * i - 1, 0) * stride, rows + 2 * i * stride,
           rows + (2 * i + 1) * stride, rows + std::min<int64_t>(2 * i + 2, 2 * n - 1) * stride,
           outs + i * stride, len);
}

// x (B, D, H, W, C) -> y (B, 2D, 2H, 2W, C): each (b, d) plane upsampled along W then H into
// `planes` (B, D, 2H, 2W, C), then along D into y, in blocks of kBlock floats of a plane (so
// that both threads share the D pass).
constexpr int64_t kBlock = 4096;

void Upsample2Loop(const float* x, float* y, int64_t nb, int64_t nd, int64_t nh, int64_t nw,
                   int64_t nc) {
  const int64_t small = nh * nw * nc, big = 4 * small;  // one plane before / after H and W
  std::vector<float> planes(nb * nd * big);
#pragma omp parallel
  {
    std::vector<float> buf(nh * 2 * nw * nc);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t d = 0; d < nd; ++d) {
        const float* in = x + (b * nd + d) * small;
        for (int64_t h = 0; h < nh; ++h) UpRows(in, buf.data(), h, nw, nc, 0, nc);
        UpRows(buf.data(), planes.data() + (b * nd + d) * big, 0, nh, 2 * nw * nc, 0,
               2 * nw * nc);
      }
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < big; c += kBlock)
        UpRows(planes.data(), y, b, nd, big, c, std::min(kBlock, big - c));
  }
}

// The transpose of Upsample2Loop, y (B, 2D, 2H, 2W, C) -> x (B, D, H, W, C): along D into
// `planes`, then along H and W per plane.
void Upsample2TLoop(const float* y, float* x, int64_t nb, int64_t nd, int64_t nh, int64_t nw,
                    int64_t nc) {
  const int64_t small = nh * nw * nc, big = 4 * small;
  std::vector<float> planes(nb * nd * big);
#pragma omp parallel
  {
    std::vector<float> buf(nh * 2 * nw * nc);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < big; c += kBlock)
        UpRowsT(y, planes.data(), b, nd, big, c, std::min(kBlock, big - c));
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t d = 0; d < nd; ++d) {
        UpRowsT(planes.data() + (b * nd + d) * big, buf.data(), 0, nh, 2 * nw * nc, 0,
                2 * nw * nc);
        float* out = x + (b * nd + d) * small;
        for (int64_t h = 0; h < nh; ++h) UpRowsT(buf.data(), out, h, nw, nc, 0, nc);
      }
  }
}

ffi::Error Upsample2(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto d = x.dimensions();
  if (d.size() != 5)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax upsample2: x (B, D, H, W, C)");
  Upsample2Loop(x.typed_data(), y->typed_data(), d[0], d[1], d[2], d[3], d[4]);
  return ffi::Error::Success();
}

ffi::Error Upsample2T(ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> x) {
  auto d = x->dimensions();
  auto e = g.dimensions();
  if (d.size() != 5 || e.size() != 5 || e[0] != d[0] || e[4] != d[4] || e[1] != 2 * d[1] ||
      e[2] != 2 * d[2] || e[3] != 2 * d[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax upsample2 transpose: g (B, 2D, 2H, 2W, C) -> (B, D, H, W, C)");
  Upsample2TLoop(g.typed_data(), x->typed_data(), d[0], d[1], d[2], d[3], d[4]);
  return ffi::Error::Success();
}

// The point voxel x (flat index into a (D, H, W) grid) maps to: its index plus ux = u[x].
inline std::array<float, 3> Displaced(int64_t x, int64_t nh, int64_t nw, const float* ux) {
  return {static_cast<float>(x / (nw * nh)) + ux[0], static_cast<float>((x / nw) % nh) + ux[1],
          static_cast<float>(x % nw) + ux[2]};
}

ffi::Error ComposeSelf(ffi::Buffer<ffi::F32> field, ffi::ResultBuffer<ffi::F32> out) {
  auto dm = field.dimensions();
  if (dm.size() != 5 || dm[4] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax compose: u (B, D, H, W, 3)");
  const Shapes s = {dm[0], dm[1], dm[2], dm[3], 3, dm[1] * dm[2] * dm[3]};
  const float* u = field.typed_data();
  float* o = out->typed_data();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.b; ++b)
    for (int64_t x = 0; x < s.out; ++x) {
      const float* base = u + b * s.out * 3;
      const float* ux = base + x * 3;
      float acc[3] = {ux[0], ux[1], ux[2]};
      ForEachCorner(s, MakeAxes(s, Displaced(x, s.hi, s.wi, ux).data(), true),
                    [&](int64_t offset, float w0, float w1, float w2, float, float, float) {
        const float wt = w0 * w1 * w2;
        for (int k = 0; k < 3; ++k) acc[k] += wt * base[offset + k];
      });
      float* ov = o + (b * s.out + x) * 3;
      for (int k = 0; k < 3; ++k) ov[k] = acc[k];
    }
  return ffi::Error::Success();
}

ffi::Error ComposeSelfGrad(ffi::Buffer<ffi::F32> field, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> d_field) {
  auto dm = field.dimensions();
  if (dm.size() != 5 || dm[4] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax compose grad: u (B, D, H, W, 3)");
  const Shapes s = {dm[0], dm[1], dm[2], dm[3], 3, dm[1] * dm[2] * dm[3]};
  const float* u = field.typed_data();
  const float* gp = g.typed_data();
  float* du = d_field->typed_data();
  ScatterInParallel(du, s.b * s.out * 3, s.b * s.out, [&](float* acc, int64_t bx) {
    const int64_t b = bx / s.out;
    const float* base = u + b * s.out * 3;
    float* abase = acc + b * s.out * 3;
    const float* gv = gp + bx * 3;
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f;
    ForEachCorner(s, MakeAxes(s, Displaced(bx - b * s.out, s.hi, s.wi, u + bx * 3).data(), true),
                  [&](int64_t offset, float w0, float w1, float w2, float d0, float d1,
                      float d2) {
      const float* v = base + offset;
      const float gdotv = gv[0] * v[0] + gv[1] * v[1] + gv[2] * v[2];
      t0 += gdotv * d0 * w1 * w2;
      t1 += gdotv * w0 * d1 * w2;
      t2 += gdotv * w0 * w1 * d2;
      const float wt = w0 * w1 * w2;
      float* a = abase + offset;
      for (int k = 0; k < 3; ++k) a[k] += wt * gv[k];
    });
    float* a = acc + bx * 3;  // the direct term and the coordinate term at x itself
    a[0] += gv[0] + t0;
    a[1] += gv[1] + t1;
    a[2] += gv[2] + t2;
  });
  return ffi::Error::Success();
}

ffi::Error Sum(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const float* xp = x.typed_data();
  const int64_t n = static_cast<int64_t>(x.element_count());
  const int threads = std::max(1, omp_get_max_threads());
  std::vector<double> partial(threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    int64_t begin, end;
    ThreadRange(n, t, threads, &begin, &end);
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = begin; i < end; ++i) acc += xp[i];
    partial[t] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  out->typed_data()[0] = static_cast<float>(total);
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

// The x2 upsampling and its transpose take one buffer and return one.
#define VMJAX_UNARY_HANDLER(SYMBOL, FUNCTION)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SYMBOL, FUNCTION,                                        \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

VMJAX_UNARY_HANDLER(VmjaxUpsample2, Upsample2)
VMJAX_UNARY_HANDLER(VmjaxUpsample2T, Upsample2T)

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxComposeSelf, ComposeSelf,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxComposeSelfGrad, ComposeSelfGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxSum, Sum,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
