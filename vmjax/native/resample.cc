// Trilinear resampling, windowed box sums and local NCC on the CPU, exposed to XLA as FFI custom
// calls (vmjax/kernels.py). XLA:CPU runs these as scalar gathers, scatter-adds and reduce_window
// loops; here they are plain OpenMP loops over contiguous memory. float32, channels-last,
// row-major, the same math as the XLA reference in vmjax/transforms.py and vmjax/losses.py.
//
//   VmjaxTrilinear(image (B, Di, Hi, Wi, C), coords (B, D, H, W, 3)) -> out (B, D, H, W, C)
//     out[x] = sum over the 8 corners of floor(coords[x]) of weight * image[corner];
//     attr mode: 0 = "constant" (corners outside the image count 0), 1 = "nearest" (corner
//     indices clamped to the image); attr relative: 1 = coords is a displacement, the sample
//     of x at x's own grid index plus coords[x] (a warp without a grid of coordinates).
//     Samples whose corners all lie inside the image (nearly all of a smooth warp) take a
//     fast path (Interior); the rest the general one.
//   VmjaxTrilinearGradCoords(image, coords, g (B, D, H, W, C)) -> d_coords (B, D, H, W, 3)
//   VmjaxTrilinearGradImage(image, coords, g) -> d_image (B, Di, Hi, Wi, C)  (the scatter-add;
//     each thread accumulates into its own buffer, summed in a fixed order: deterministic for a
//     given thread count; ScatterInParallel)
//   VmjaxBoxSum(x (B, D, H, W, C)) -> y: the sum over a window^3 cube around each voxel, zero
//     padded (attr window, odd). Separable: running sums along D, then windowed sums along H
//     and W per (b, d) slab (BoxSumOf, which NCC's kernels share).
//   VmjaxNccSums(f, m (B, D, H, W, C), the box sums of f, f² (.., 2C)) -> the box sums of m,
//     m², f m (B, D, H, W, 3C) and the sum of local NCC's cc (); the terms are made and cc
//     summed inside the box sum's passes, never stored;
//   VmjaxNccGrad(f, m, the two sums, g (1,)) -> the gradient of g * -mean(cc) with respect to
//     m (attr wrt_fixed 0) or f (1), and a (.., 3C) work buffer (the caller drops it: XLA
//     allocates it with the program's buffers, reused across a loop's steps, instead of the
//     kernel at each call). vmjax/losses.py ncc_loss in two calls.
//   VmjaxUpsample2(x (B, D, H, W, C)) -> y (B, 2D, 2H, 2W, C): linear resampling to twice the
//     size, jax.image.resize(method="linear")'s values (half-pixel centres: output 2i samples
//     i - 1/4, output 2i + 1 samples i + 1/4; the edge voxels extended), and a (B, D, 2H, 2W, C)
//     work buffer.
//   VmjaxUpsample2T(g (B, 2D, 2H, 2W, C)) -> x (B, D, H, W, C): its transpose (the gradient),
//     and the same work buffer.
//   VmjaxComposeSelf(u (B, D, H, W, 3)) -> u(x) + u(x + u(x)): one squaring of scaling and
//     squaring (trilinear, indices clamped to the field), without the coordinates in memory.
//   VmjaxComposeSelfGrad(u, g) -> d_u: its gradient, the coordinate and the scattered image
//     parts in one pass (ScatterInSlabs straight into d_u where the field's D component is
//     small against a thread's share of D, else ScatterInParallel).
// With -march=native on a CPU with AVX2 and FMA, interior samples of 1-channel images go 8 at a
// time (gathers) and those of 3-channel fields one corner row per load (VMJAX_AVX2).
//   VmjaxComposeAffine(disp (Di, Hi, Wi, 3), m (2, 3, 4)) -> u (D, H, W, 3): vmjax.pipeline's
//     composed field on another grid, in one pass: for its voxel x, t = m[0] x (a voxel of
//     disp's grid), u(x) = m[1] (t + disp(t)) - x (trilinear, indices clamped).
//   VmjaxAffineNcc(fixed (D, H, W), moving (D', H', W'), m (3, 4)) -> (-NCC (), its gradient
//     with respect to m (3, 4)): the affine step's loss, -NCC (global) of the fixed image and the
//     moving one sampled (trilinear, 0 outside) at m's map of each fixed voxel, in two passes
//     (the sums, then the gradient), float64 sums; vmjax/affine.py's loss without XLA's
//     coordinates, samples and reductions in memory.
//   VmjaxReverseAxesHost(in, out, D, H, W, C): a plain C function (ctypes, on host arrays; no
//     XLA program) writing the transpose (C, W, H, D) of a C-ordered (D, H, W, C) array of
//     4-byte elements, cache-blocked: a volume's or field's data in NIfTI's (Fortran) order
//     and back.
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

#if defined(__AVX2__) && defined(__FMA__)  // -march=native on a CPU with them
#define VMJAX_AVX2 1
#include <immintrin.h>
#endif

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
  int64_t oh, ow;  // its H and W sizes: the grid is out / ow rows of ow samples
};

// Where a sample lies: coords[x] itself, or with `relative` (a displacement field) its grid
// index (d, h, w) plus coords[x].
struct Position {
  bool relative;
  float d = 0.0f, h = 0.0f;  // the row's D and H indices (relative only)

  Position(const Shapes& s, bool rel, int64_t x0) : relative(rel) {
    if (relative) {
      d = static_cast<float>(x0 / (s.oh * s.ow));
      h = static_cast<float>((x0 / s.ow) % s.oh);
    }
  }
  // The sample of the row's w-th voxel, whose coords are p.
  std::array<float, 3> At(const float* p, int64_t w) const {
    if (!relative) return {p[0], p[1], p[2]};
    return {d + p[0], h + p[1], static_cast<float>(w) + p[2]};
  }
};

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& image, const ffi::Buffer<ffi::F32>& coords,
                       Shapes* s) {
  auto id = image.dimensions(), cd = coords.dimensions();
  if (id.size() != 5 || cd.size() != 5 || cd[4] != 3 || cd[0] != id[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax trilinear: image (B, D, H, W, C) and coords (B, D, H, W, 3)");
  *s = {id[0], id[1], id[2], id[3], id[4], cd[1] * cd[2] * cd[3], cd[2], cd[3]};
  return ffi::Error::Success();
}

struct Axes {
  Axis a0, a1, a2;
};

inline Axes MakeAxes(const Shapes& s, const float* p, bool nearest) {
  return {MakeAxis(p[0], s.di, nearest), MakeAxis(p[1], s.hi, nearest),
          MakeAxis(p[2], s.wi, nearest)};
}

// Calls f(b, x0) for every row of the coords' grid (batch item b, its first sample's flat
// index x0 within the item; the row is samples x0 .. x0 + ow - 1), rows in parallel. Loops
// over a row's samples carry their indices: no division per sample.
template <typename F>
inline void ForEachRow(const Shapes& s, F&& f) {
  const int64_t rows = s.out / s.ow;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.b; ++b)
    for (int64_t r = 0; r < rows; ++r) f(b, r * s.ow);
}

// Calls f(offset, w0, w1, w2, d0, d1, d2) for the 8 corners of one sample: the corner's offset
// into its batch item's image, its per-axis weights (their product is the corner's weight) and
// the per-axis weight derivatives. The general case (edges, outside, NaN); see Interior.
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

// The fast path of every sampling loop: a sample whose 8 corners all lie inside the image
// (nearly every sample of a smooth warp), where both modes agree and no index needs clamping.
// Its lower corner's offset into the image, its fractional parts, and the image's strides.
struct Interior {
  int64_t offset;
  float f0, f1, f2;
  int64_t sd, sh, sw;  // strides in floats along D, H, W
};

// Fills `in` for the sample whose lower corner is (l0, l1, l2) and fractional parts f0, f1, f2.
inline void SetInterior(const Shapes& s, int64_t l0, int64_t l1, int64_t l2, float f0, float f1,
                        float f2, Interior* in) {
  in->offset = ((l0 * s.hi + l1) * s.wi + l2) * s.c;
  in->f0 = f0;
  in->f1 = f1;
  in->f2 = f2;
  in->sw = s.c;
  in->sh = s.wi * s.c;
  in->sd = s.hi * s.wi * s.c;
}

// Whether p's corners are all inside; if so, fills `in`. NaN fails the comparisons.
inline bool Inside(const Shapes& s, float p0, float p1, float p2, Interior* in) {
  if (!(p0 >= 0.0f && p0 < static_cast<float>(s.di - 1) && p1 >= 0.0f &&
        p1 < static_cast<float>(s.hi - 1) && p2 >= 0.0f && p2 < static_cast<float>(s.wi - 1)))
    return false;
  const int64_t l0 = static_cast<int64_t>(p0), l1 = static_cast<int64_t>(p1),
                l2 = static_cast<int64_t>(p2);  // floor: p >= 0
  SetInterior(s, l0, l1, l2, p0 - static_cast<float>(l0), p1 - static_cast<float>(l1),
              p2 - static_cast<float>(l2), in);
  return true;
}

// One channel's trilinear value at an interior sample, v its lower corner in that channel:
// linear along W, then H, then D.
inline float Lerp3(const float* v, const Interior& in) {
  const int64_t sd = in.sd, sh = in.sh, sw = in.sw;
  const float c00 = v[0] + in.f2 * (v[sw] - v[0]);
  const float c01 = v[sh] + in.f2 * (v[sh + sw] - v[sh]);
  const float c10 = v[sd] + in.f2 * (v[sd + sw] - v[sd]);
  const float c11 = v[sd + sh] + in.f2 * (v[sd + sh + sw] - v[sd + sh]);
  const float c0 = c00 + in.f1 * (c01 - c00);
  return c0 + in.f0 * (c10 + in.f1 * (c11 - c10) - c0);
}

// Adds g times the derivatives of Lerp3(v, in) with respect to the sample's three coordinates
// to t[0..2].
inline void Lerp3Grad(const float* v, const Interior& in, float g, float* t) {
  const int64_t sd = in.sd, sh = in.sh, sw = in.sw;
  const float e00 = v[sw] - v[0], e01 = v[sh + sw] - v[sh];
  const float e10 = v[sd + sw] - v[sd], e11 = v[sd + sh + sw] - v[sd + sh];
  const float c00 = v[0] + in.f2 * e00, c01 = v[sh] + in.f2 * e01;
  const float c10 = v[sd] + in.f2 * e10, c11 = v[sd + sh] + in.f2 * e11;
  const float c0 = c00 + in.f1 * (c01 - c00), c1 = c10 + in.f1 * (c11 - c10);
  const float a0 = 1.0f - in.f0;
  t[0] += g * (c1 - c0);
  t[1] += g * (a0 * (c01 - c00) + in.f0 * (c11 - c10));
  t[2] += g * (a0 * (e00 + in.f1 * (e01 - e00)) + in.f0 * (e10 + in.f1 * (e11 - e10)));
}

// The 8 corners of an interior sample, (D, H, W) bits in that order: their weights and
// offsets from the lower corner.
inline void Corners(const Interior& in, float w[8], int64_t off[8]) {
  const float a0 = 1.0f - in.f0, a1 = 1.0f - in.f1, a2 = 1.0f - in.f2;
  const float w00 = a0 * a1, w01 = a0 * in.f1, w10 = in.f0 * a1, w11 = in.f0 * in.f1;
  const float wd[4] = {w00, w01, w10, w11};
  const int64_t od[4] = {0, in.sh, in.sd, in.sd + in.sh};
  for (int k = 0; k < 4; ++k) {
    w[2 * k] = wd[k] * a2;
    w[2 * k + 1] = wd[k] * in.f2;
    off[2 * k] = od[k];
    off[2 * k + 1] = od[k] + in.sw;
  }
}

#ifdef VMJAX_AVX2
// 8 consecutive samples of a row of a 1-channel image (an image warp) at once, with AVX2
// gathers: the lanes whose corners all lie inside (Inside's test, per lane), their lower
// corners' offsets and fractional parts. The other lanes take the scalar path.
struct Lanes8 {
  __m256i offset;
  __m256 f0, f1, f2;
  int inside;  // bit k: lane k lies inside
};

// Whether a batch item's offsets fit the gathers' 32-bit indices, and every axis has two
// voxels (a lane outside gathers the corners of voxel 0, which must exist).
inline bool Gatherable(const Shapes& s) {
  return s.di >= 2 && s.hi >= 2 && s.wi >= 2 && s.di * s.hi * s.wi * s.c < (int64_t{1} << 31);
}

inline Lanes8 Interior8(const Shapes& s, __m256 p0, __m256 p1, __m256 p2) {
  const __m256 zero = _mm256_setzero_ps();
  auto within = [&](__m256 p, int64_t n) {
    return _mm256_and_ps(_mm256_cmp_ps(p, zero, _CMP_GE_OQ),
                         _mm256_cmp_ps(p, _mm256_set1_ps(static_cast<float>(n - 1)),
                                       _CMP_LT_OQ));
  };
  const __m256 ok = _mm256_and_ps(_mm256_and_ps(within(p0, s.di), within(p1, s.hi)),
                                  within(p2, s.wi));
  Lanes8 l;
  l.inside = _mm256_movemask_ps(ok);
  p0 = _mm256_and_ps(p0, ok);  // lanes outside (NaN included) at 0: valid indices
  p1 = _mm256_and_ps(p1, ok);
  p2 = _mm256_and_ps(p2, ok);
  const __m256i i0 = _mm256_cvttps_epi32(p0), i1 = _mm256_cvttps_epi32(p1),
                i2 = _mm256_cvttps_epi32(p2);  // floor: p >= 0
  l.f0 = _mm256_sub_ps(p0, _mm256_cvtepi32_ps(i0));
  l.f1 = _mm256_sub_ps(p1, _mm256_cvtepi32_ps(i1));
  l.f2 = _mm256_sub_ps(p2, _mm256_cvtepi32_ps(i2));
  l.offset = _mm256_add_epi32(
      _mm256_mullo_epi32(_mm256_add_epi32(_mm256_mullo_epi32(i0, _mm256_set1_epi32(s.hi)), i1),
                         _mm256_set1_epi32(s.wi)),
      i2);
  return l;
}

// The corners of trilinear samples in vector lanes (8 image samples, or the 3 channels of one
// field sample), by their 4 rows along W: (D, H) = (0, 0), (0, 1), (1, 0), (1, 1).
struct CornerRows {
  __m256 a[4];  // each row's lower W corner
  __m256 e[4];  // its upper W corner minus the lower
};

inline __m256 Lerp(__m256 a, __m256 b, __m256 f) {  // a + f (b - a)
  return _mm256_fmadd_ps(f, _mm256_sub_ps(b, a), a);
}

// The trilinear value in each lane (Lerp3's), with the fractional parts f0, f1, f2 along D, H, W.
inline __m256 LerpRows(const CornerRows& r, __m256 f0, __m256 f1, __m256 f2) {
  __m256 c[4];
  for (int k = 0; k < 4; ++k) c[k] = _mm256_fmadd_ps(f2, r.e[k], r.a[k]);
  return Lerp(Lerp(c[0], c[1], f1), Lerp(c[2], c[3], f1), f0);
}

// Its derivatives with respect to f0, f1, f2 (Lerp3Grad's, before the weight g).
inline void LerpRowsGrad(const CornerRows& r, __m256 f0, __m256 f1, __m256 f2, __m256 d[3]) {
  const __m256 a0 = _mm256_sub_ps(_mm256_set1_ps(1.0f), f0);
  __m256 c[4];
  for (int k = 0; k < 4; ++k) c[k] = _mm256_fmadd_ps(f2, r.e[k], r.a[k]);
  const __m256 c01 = _mm256_sub_ps(c[1], c[0]), c23 = _mm256_sub_ps(c[3], c[2]);
  d[0] = _mm256_sub_ps(_mm256_fmadd_ps(f1, c23, c[2]), _mm256_fmadd_ps(f1, c01, c[0]));
  d[1] = _mm256_fmadd_ps(a0, c01, _mm256_mul_ps(f0, c23));
  d[2] = _mm256_fmadd_ps(a0, Lerp(r.e[0], r.e[1], f1), _mm256_mul_ps(f0, Lerp(r.e[2], r.e[3], f1)));
}

// The corners of each lane of a 1-channel image.
inline CornerRows Gather8(const float* img, const Shapes& s, const Lanes8& l) {
  const __m256i sh = _mm256_set1_epi32(s.wi), sd = _mm256_set1_epi32(s.hi * s.wi);
  const __m256i rows[4] = {l.offset, _mm256_add_epi32(l.offset, sh),
                           _mm256_add_epi32(l.offset, sd),
                           _mm256_add_epi32(_mm256_add_epi32(l.offset, sd), sh)};
  CornerRows r;
  for (int k = 0; k < 4; ++k) {
    r.a[k] = _mm256_i32gather_ps(img, rows[k], 4);
    r.e[k] = _mm256_sub_ps(_mm256_i32gather_ps(img + 1, rows[k], 4), r.a[k]);
  }
  return r;
}

// The positions of the 8 samples x .. x + 7 of a row (see Position): coords[x + lane] itself,
// or with `relative` the lane's grid index plus it.
inline void Positions8(const Position& at, const float* coords, int64_t x, int64_t w,
                       __m256 p[3]) {
  const __m256i stride3 = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  for (int k = 0; k < 3; ++k)  // gathers do not start the hardware prefetcher: ahead by hand
    _mm_prefetch(reinterpret_cast<const char*>(coords + x * 3 + 512 + 16 * k), _MM_HINT_T0);
  for (int k = 0; k < 3; ++k) p[k] = _mm256_i32gather_ps(coords + x * 3 + k, stride3, 4);
  if (at.relative) {
    p[0] = _mm256_add_ps(p[0], _mm256_set1_ps(at.d));
    p[1] = _mm256_add_ps(p[1], _mm256_set1_ps(at.h));
    p[2] = _mm256_add_ps(p[2], _mm256_add_ps(_mm256_set1_ps(static_cast<float>(w)),
                                             _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)));
  }
}
#endif

// Calls f(b, x, p) for every sample of the coords' grid: its batch item, its flat index over
// the batch, and where it lies (Position), rows in parallel. With `block8` (AVX2 builds),
// first block8(b, x, w, at) for each run of 8 samples of a row, which returns a mask of the
// lanes it did; f then does the others.
template <typename F, typename G>
inline void ForEachSampleIn8(const Shapes& s, const float* coords, bool relative, F&& f,
                             G&& block8) {
  ForEachRow(s, [&](int64_t b, int64_t x0) {
    const Position at(s, relative, x0);
    int64_t w = 0;
#ifdef VMJAX_AVX2
    for (; w + 8 <= s.ow; w += 8) {
      const int64_t x = b * s.out + x0 + w;
      const int done = block8(b, x, w, at);
      for (int lane = 0; lane < 8; ++lane)
        if (!(done >> lane & 1)) f(b, x + lane, at.At(coords + (x + lane) * 3, w + lane));
    }
#endif
    for (; w < s.ow; ++w) {
      const int64_t x = b * s.out + x0 + w;
      f(b, x, at.At(coords + x * 3, w));
    }
  });
}

// C > 0: the channel count known at compile time (1: images, 3: fields); 0: any.
template <int C>
void TrilinearLoop(const Shapes& s0, const float* img, const float* coords, float* o,
                   bool nearest, bool relative) {
  Shapes s = s0;
  if (C > 0) s.c = C;
  const int64_t per_item = s.di * s.hi * s.wi * s.c;
  auto one = [&](int64_t b, int64_t x, const std::array<float, 3>& p) {
    const float* base = img + b * per_item;
    float* ov = o + x * s.c;
    Interior in;
    if (Inside(s, p[0], p[1], p[2], &in)) {
      for (int64_t k = 0; k < s.c; ++k) ov[k] = Lerp3(base + in.offset + k, in);
      return;
    }
    for (int64_t k = 0; k < s.c; ++k) ov[k] = 0.0f;
    ForEachCorner(s, MakeAxes(s, p.data(), nearest), [&](int64_t offset, float w0, float w1,
                                                         float w2, float, float, float) {
      const float wt = w0 * w1 * w2;
      for (int64_t k = 0; k < s.c; ++k) ov[k] += wt * base[offset + k];
    });
  };
  auto block8 = [&](int64_t b, int64_t x, int64_t w, const Position& at) -> int {
#ifdef VMJAX_AVX2
    if (C == 1 && Gatherable(s)) {
      __m256 p[3];
      Positions8(at, coords, x, w, p);
      const Lanes8 l = Interior8(s, p[0], p[1], p[2]);
      if (!l.inside) return 0;
      const __m256 value = LerpRows(Gather8(img + b * per_item, s, l), l.f0, l.f1, l.f2);
      _mm256_storeu_ps(o + x, value);  // the lanes outside are overwritten by `one`
      return l.inside;
    }
#endif
    return 0;
  };
  ForEachSampleIn8(s, coords, relative, one, block8);
}

ffi::Error Trilinear(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> coords,
                     ffi::ResultBuffer<ffi::F32> out, int64_t mode, int64_t relative) {
  Shapes s;
  if (auto e = CheckShapes(image, coords, &s); e.failure()) return e;
  auto loop = s.c == 1 ? TrilinearLoop<1> : s.c == 3 ? TrilinearLoop<3> : TrilinearLoop<0>;
  loop(s, image.typed_data(), coords.typed_data(), out->typed_data(), mode == 1, relative != 0);
  return ffi::Error::Success();
}

template <int C>
void TrilinearGradCoordsLoop(const Shapes& s0, const float* img, const float* coords,
                             const float* gp, float* dc, bool nearest, bool relative) {
  Shapes s = s0;
  if (C > 0) s.c = C;
  const int64_t per_item = s.di * s.hi * s.wi * s.c;
  auto one = [&](int64_t b, int64_t x, const std::array<float, 3>& p) {
    const float* base = img + b * per_item;
    const float* gv = gp + x * s.c;
    float t[3] = {0.0f, 0.0f, 0.0f};
    Interior in;
    if (Inside(s, p[0], p[1], p[2], &in)) {
      for (int64_t k = 0; k < s.c; ++k) Lerp3Grad(base + in.offset + k, in, gv[k], t);
    } else {
      ForEachCorner(s, MakeAxes(s, p.data(), nearest), [&](int64_t offset, float w0, float w1,
                                                           float w2, float d0, float d1,
                                                           float d2) {
        const float* v = base + offset;
        float gdotv = 0.0f;
        for (int64_t k = 0; k < s.c; ++k) gdotv += gv[k] * v[k];
        t[0] += gdotv * d0 * w1 * w2;
        t[1] += gdotv * w0 * d1 * w2;
        t[2] += gdotv * w0 * w1 * d2;
      });
    }
    for (int k = 0; k < 3; ++k) dc[x * 3 + k] = t[k];
  };
  auto block8 = [&](int64_t b, int64_t x, int64_t w, const Position& at) -> int {
#ifdef VMJAX_AVX2
    if (C == 1 && Gatherable(s)) {
      __m256 p[3], d[3];
      Positions8(at, coords, x, w, p);
      const Lanes8 l = Interior8(s, p[0], p[1], p[2]);
      if (!l.inside) return 0;
      LerpRowsGrad(Gather8(img + b * per_item, s, l), l.f0, l.f1, l.f2, d);
      const __m256 g = _mm256_loadu_ps(gp + x);
      alignas(32) float t[3][8];
      for (int k = 0; k < 3; ++k) _mm256_store_ps(t[k], _mm256_mul_ps(g, d[k]));
      for (int lane = 0; lane < 8; ++lane)
        for (int k = 0; k < 3; ++k) dc[(x + lane) * 3 + k] = t[k][lane];
      return l.inside;
    }
#endif
    return 0;
  };
  ForEachSampleIn8(s, coords, relative, one, block8);
}

ffi::Error TrilinearGradCoords(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> coords,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> d_coords,
                               int64_t mode, int64_t relative) {
  Shapes s;
  if (auto e = CheckShapes(image, coords, &s); e.failure()) return e;
  auto loop = s.c == 1 ? TrilinearGradCoordsLoop<1>
              : s.c == 3 ? TrilinearGradCoordsLoop<3> : TrilinearGradCoordsLoop<0>;
  loop(s, image.typed_data(), coords.typed_data(), g.typed_data(), d_coords->typed_data(),
       mode == 1, relative != 0);
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
// The other threads' buffers are kept from call to call (OpenMP's threads live on): no fresh
// pages to fault in at every call.
template <typename F>
void ScatterInParallel(float* out, int64_t total, int64_t n, F&& f) {
  const int threads = std::max(1, omp_get_max_threads());
  std::vector<float*> partial(threads, out);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    static thread_local std::vector<float> own;
    float* acc = out;
    if (t > 0) {
      if (static_cast<int64_t>(own.size()) < total) own.resize(total);
      acc = partial[t] = own.data();
    }
    std::fill(acc, acc + total, 0.0f);
    int64_t begin, end;
    ThreadRange(n, t, threads, &begin, &end);
    for (int64_t i = begin; i < end; ++i) f(acc, i);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < total; ++i) {
      float sum = out[i];
      for (int u = 1; u < threads; ++u) sum += partial[u][i];
      out[i] = sum;
    }
  }
}

// A scatter-add whose writes stay near their source along D, straight into `out`: calls
// f(out, row) for every row of `items` batch items of `layers` (D) x `rows_per_layer` (H) rows,
// where a row of layer d writes only layers d - reach .. d + reach + 1 of its own item. Each
// item's layers are cut into 2 chunks per thread; the even chunks run side by side, then the odd
// ones: while no chunk is thinner than 2 reach + 2 layers, two chunks that run at once never
// write the same layer. Deterministic (a fixed order per address), and no per-thread buffers to
// zero and sum (ScatterInParallel's cost: a 80x96x80 field's squaring gradient 9.6 -> 7.3 ms,
// medians of 3 alternated runs; 2-core AMD EPYC Zen 4, 2026-12-06). Returns false, having done
// nothing, where the chunks would be too thin for `reach` (or reach < 0: unknown); the caller
// then takes ScatterInParallel.
template <typename F>
bool ScatterInSlabs(float* out, int64_t items, int64_t layers, int64_t rows_per_layer,
                    int64_t floats_per_item, int64_t reach, F&& f) {
  const int threads = std::max(1, omp_get_max_threads());
  const int64_t chunks = 2 * threads;
  if (threads > 1 && (reach < 0 || layers / chunks < 2 * reach + 2)) return false;
  const int64_t total = items * floats_per_item;
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    ThreadRange(total, omp_get_thread_num(), threads, &begin, &end);
    std::fill(out + begin, out + end, 0.0f);
#pragma omp barrier
    for (int64_t b = 0; b < items; ++b)
      for (int64_t phase = 0; phase < 2; ++phase) {
#pragma omp for schedule(static)
        for (int64_t c = phase; c < chunks; c += 2) {
          const int64_t first = c * layers / chunks, last = (c + 1) * layers / chunks;
          for (int64_t row = first * rows_per_layer; row < last * rows_per_layer; ++row)
            f(out, b * layers * rows_per_layer + row);
        }
      }
  }
  return true;
}

ffi::Error TrilinearGradImage(ffi::Buffer<ffi::F32> image, ffi::Buffer<ffi::F32> coords,
                              ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> d_image,
                              int64_t mode, int64_t relative) {
  Shapes s;
  if (auto e = CheckShapes(image, coords, &s); e.failure()) return e;
  const float* cp = coords.typed_data();
  const float* gp = g.typed_data();
  const int64_t per_item = s.di * s.hi * s.wi * s.c;
  const bool nearest = mode == 1;
  const int64_t rows = s.out / s.ow;
  ScatterInParallel(d_image->typed_data(), s.b * per_item, s.b * rows,
                    [&](float* acc, int64_t row) {
    const int64_t b = row / rows;
    float* base = acc + b * per_item;
    const Position at(s, relative != 0, (row - b * rows) * s.ow);
    for (int64_t w = 0; w < s.ow; ++w) {
      const int64_t x = row * s.ow + w;  // flat over the batch
      const std::array<float, 3> p = at.At(cp + x * 3, w);
      const float* gv = gp + x * s.c;
      Interior in;
      if (Inside(s, p[0], p[1], p[2], &in)) {
        float w[8];
        int64_t off[8];
        Corners(in, w, off);
        float* v = base + in.offset;
        for (int c = 0; c < 8; ++c)
          for (int64_t k = 0; k < s.c; ++k) v[off[c] + k] += w[c] * gv[k];
        continue;
      }
      ForEachCorner(s, MakeAxes(s, p.data(), nearest),
                    [&](int64_t offset, float w0, float w1, float w2, float, float, float) {
        const float wt = w0 * w1 * w2;
        if (wt == 0.0f) return;
        float* v = base + offset;
        for (int64_t k = 0; k < s.c; ++k) v[k] += wt * gv[k];
      });
    }
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

// Floats per block of a plane in the D pass: a block's running sums and its window of input
// rows stay in L1/L2.
constexpr int64_t kSumBlock = 1024;

// The box sum (window^3, zero padded) of nc-channel terms that are made as they are needed,
// into y (nb, nd, nh, nw, nc); then epilogue(b, j, slab) on each finished (b, j) slab of y while
// it is in cache. source(b, j, v0, v1, out) writes the terms of voxels [v0, v1) of plane j of
// item b (a voxel's nc floats together). Along D as running sums (f64) over blocks of the
// planes, each term row made once and kept in a ring of `window` rows until it leaves the
// window; then along H and W per (b, d) slab as windowed sums (vectorised). NCC's terms and
// their use never pass through memory: the D pass reads the images (or sums) the terms come
// from, and the epilogue the slab just summed.
template <typename Source, typename Epilogue>
void BoxSumOf(const Source& source, const Epilogue& epilogue, float* yp, int64_t nb, int64_t nd,
              int64_t nh, int64_t nw, int64_t nc, int64_t window) {
  const int64_t half = window / 2, row = nw * nc, plane = nh * row, voxels = nh * nw;
  const int64_t block = std::max<int64_t>(1, kSumBlock / nc);  // voxels per block
  const int64_t blocks = (voxels + block - 1) / block;
#pragma omp parallel
  {
    std::vector<double> acc(block * nc);
    std::vector<float> ring(window * block * nc);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t v0 = k * block, v1 = std::min(voxels, v0 + block), len = (v1 - v0) * nc;
        double* __restrict__ a = acc.data();
        auto slot = [&](int64_t j) { return ring.data() + (j % window) * len; };
        std::fill(a, a + len, 0.0);
        for (int64_t j = 0; j <= std::min(half, nd - 1); ++j) {
          float* __restrict__ r = slot(j);
          source(b, j, v0, v1, r);
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) a[i] += r[i];
        }
        float* out = yp + b * nd * plane + v0 * nc;
        for (int64_t j = 0; j < nd; ++j) {
          float* __restrict__ o = out + j * plane;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) o[i] = static_cast<float>(a[i]);
          if (j - half >= 0) {  // leaves the window; its slot takes the row that enters
            const float* __restrict__ r = slot(j - half);
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) a[i] -= r[i];
          }
          if (j + half + 1 < nd) {
            float* __restrict__ r = slot(j + half + 1);
            source(b, j + half + 1, v0, v1, r);
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) a[i] += r[i];
          }
        }
      }
    std::vector<float> buf(plane);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < nd; ++j) {
        float* slab = yp + (b * nd + j) * plane;
        for (int64_t h = 0; h < nh; ++h)
          WindowSum(slab, buf.data() + h * row, h, nh, row, row, half);
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
        epilogue(b, j, slab);
      }
  }
}

ffi::Error BoxSum(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t window) {
  auto d = x.dimensions();
  if (d.size() != 5 || window < 1 || window % 2 == 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax box sum: x (B, D, H, W, C) and an odd window");
  const float* xp = x.typed_data();
  const int64_t nd = d[1], nc = d[4], plane = d[2] * d[3] * nc;
  BoxSumOf([&](int64_t b, int64_t j, int64_t v0, int64_t v1, float* out) {
             const float* in = xp + (b * nd + j) * plane + v0 * nc;
             std::copy(in, in + (v1 - v0) * nc, out);
           },
           [](int64_t, int64_t, const float*) {}, y->typed_data(), d[0], nd, d[2], d[3], nc,
           window);
  return ffi::Error::Success();
}

// Local NCC (vmjax/losses.py ncc_loss) of f and m (B, D, H, W, C), given the box sums of f's
// terms fs = (Σf, Σf²) (2C channels, computed once per fixed scan) and of m's
// s = (Σm, Σm², Σfm) (3C channels): per voxel and channel, with n = window³,
//   cross = Σfm - Σf Σm / n,  v_f = max(Σf² - (Σf)² / n, 0),  v_m likewise,
//   cc = cross² / (v_f v_m + 1e-5).
struct NccTerms {
  float cross, vf, vm, den;
  bool vf_pos, vm_pos;  // the variances before clamping were > 0
};

inline NccTerms Ncc(float sf, float sff, float sm, float smm, float sfm, float inv_n) {
  NccTerms t;
  t.cross = sfm - sf * sm * inv_n;
  const float vf = sff - sf * sf * inv_n, vm = smm - sm * sm * inv_n;
  t.vf_pos = vf > 0.0f;
  t.vm_pos = vm > 0.0f;
  t.vf = t.vf_pos ? vf : 0.0f;
  t.vm = t.vm_pos ? vm : 0.0f;
  t.den = t.vf * t.vm + 1e-5f;
  return t;
}

struct NccShape {
  int64_t nb, nd, nh, nw, nc, voxels, plane;  // voxels: nb * nd * nh * nw; plane: nh * nw
};

ffi::Error CheckNcc(const ffi::Buffer<ffi::F32>& f, const ffi::Buffer<ffi::F32>& m,
                    const ffi::Buffer<ffi::F32>& fixed_sums, NccShape* s) {
  auto d = f.dimensions(), e = m.dimensions();
  if (d.size() != 5 || e.size() != 5 || !std::equal(d.begin(), d.end(), e.begin()))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax ncc: fixed and moved (B, D, H, W, C) of one shape");
  if (fixed_sums.element_count() != 2 * f.element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax ncc: fixed sums (.., 2C)");
  *s = {d[0], d[1], d[2], d[3], d[4], d[0] * d[1] * d[2] * d[3], d[2] * d[3]};
  return ffi::Error::Success();
}

// NccSums' and NccGrad's loops, NC the channel count where it is known when compiling (1: a
// scan; the loops over voxels then vectorise) or 0 (s.nc at run time).
template <int64_t NC>
void NccSumsLoop(const float* fp, const float* mp, const float* fs, float* sums, double* total,
                 const NccShape& s, int64_t window) {
  const int64_t nc = NC ? NC : s.nc;
  const float inv_n = 1.0f / static_cast<float>(window * window * window);
  std::vector<double> partial(std::max(1, omp_get_max_threads()), 0.0);
  BoxSumOf(
      [&](int64_t b, int64_t j, int64_t v0, int64_t v1, float* __restrict__ out) {
        const int64_t first = (b * s.nd + j) * s.plane;
        const float* __restrict__ fv = fp + (first + v0) * nc;
        const float* __restrict__ mv = mp + (first + v0) * nc;
#pragma omp simd
        for (int64_t v = 0; v < v1 - v0; ++v)
          for (int64_t c = 0; c < nc; ++c) {
            const float x = mv[v * nc + c];
            out[v * 3 * nc + c] = x;
            out[v * 3 * nc + nc + c] = x * x;
            out[v * 3 * nc + 2 * nc + c] = fv[v * nc + c] * x;
          }
      },
      [&](int64_t b, int64_t j, const float* __restrict__ slab) {
        const float* __restrict__ a = fs + (b * s.nd + j) * s.plane * 2 * nc;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t v = 0; v < s.plane; ++v)
          for (int64_t c = 0; c < nc; ++c) {
            const float* t = slab + v * 3 * nc + c;
            const float* q = a + v * 2 * nc + c;
            const NccTerms k = Ncc(q[0], q[nc], t[0], t[nc], t[2 * nc], inv_n);
            acc += k.cross * k.cross / k.den;
          }
        partial[omp_get_thread_num()] += acc;
      },
      sums, s.nb, s.nd, s.nh, s.nw, 3 * nc, window);
  *total = 0.0;
  for (double p : partial) *total += p;
}

// The box sums s of (m, m², f m) (channel blocks of C; each voxel's terms made in the D pass)
// and, slab by slab as they are finished, the sum of cc over every voxel and channel (f64,
// per-thread partial sums added in a fixed order: deterministic for a given thread count).
ffi::Error NccSums(ffi::Buffer<ffi::F32> f, ffi::Buffer<ffi::F32> m,
                   ffi::Buffer<ffi::F32> fixed_sums, ffi::ResultBuffer<ffi::F32> sums,
                   ffi::ResultBuffer<ffi::F32> total, int64_t window) {
  NccShape s;
  if (auto e = CheckNcc(f, m, fixed_sums, &s); e.failure()) return e;
  if (sums->element_count() != 3 * f.element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax ncc sums: a (.., 3C) result");
  double sum;
  (s.nc == 1 ? NccSumsLoop<1> : NccSumsLoop<0>)(f.typed_data(), m.typed_data(),
                                                fixed_sums.typed_data(), sums->typed_data(),
                                                &sum, s, window);
  total->typed_data()[0] = static_cast<float>(sum);
  return ffi::Error::Success();
}

template <int64_t NC>
void NccGradLoop(const float* xp, const float* yp, const float* fs, const float* sp, float* out,
                 float* boxed, bool swap, float scale, const NccShape& s, int64_t window) {
  const int64_t nc = NC ? NC : s.nc;
  const float inv_n = 1.0f / static_cast<float>(window * window * window);
  BoxSumOf(
      [&](int64_t b, int64_t j, int64_t v0, int64_t v1, float* __restrict__ cot) {
        const int64_t first = (b * s.nd + j) * s.plane + v0;
        const float* __restrict__ a0 = fs + first * 2 * nc;
        const float* __restrict__ q0 = sp + first * 3 * nc;
#pragma omp simd
        for (int64_t v = 0; v < v1 - v0; ++v)
          for (int64_t c = 0; c < nc; ++c) {
            const float* a = a0 + v * 2 * nc + c;
            const float* q = q0 + v * 3 * nc + c;
            const NccTerms k = Ncc(a[0], a[nc], q[0], q[nc], q[2 * nc], inv_n);
            // The differentiated image's sum Σx, its variance, the other's variance.
            const float sx = swap ? a[0] : q[0];
            const float vy = swap ? k.vm : k.vf;
            const bool vx_pos = swap ? k.vf_pos : k.vm_pos;
            const float d_cross = scale * 2.0f * k.cross / k.den;
            const float d_vx = vx_pos ? -scale * k.cross * k.cross * vy / (k.den * k.den) : 0.0f;
            const float sy = swap ? q[0] : a[0];
            float* t = cot + v * 3 * nc + c;
            t[0] = (-d_cross * sy - 2.0f * d_vx * sx) * inv_n;  // d/dΣx
            t[nc] = d_vx;                                        // d/dΣx²
            t[2 * nc] = d_cross;                                 // d/dΣxy
          }
      },
      [&](int64_t b, int64_t j, const float* __restrict__ slab) {
        const int64_t first = (b * s.nd + j) * s.plane * nc;
        float* __restrict__ o = out + first;
        const float* __restrict__ x = xp + first;
        const float* __restrict__ y = yp + first;
#pragma omp simd
        for (int64_t v = 0; v < s.plane; ++v)
          for (int64_t c = 0; c < nc; ++c) {
            const float* t = slab + v * 3 * nc + c;
            o[v * nc + c] = t[0] + 2.0f * x[v * nc + c] * t[nc] + y[v * nc + c] * t[2 * nc];
          }
      },
      boxed, s.nb, s.nd, s.nh, s.nw, 3 * nc, window);
}

// The gradient of g * -mean(cc) with respect to m (attr wrt_fixed 0) or f (1; cc is symmetric
// in the two, so the roles swap): the cotangents of the three box sums per voxel (made in the
// D pass), their box sums (the box filter is symmetric) into the work buffer `boxed`, and, per
// finished slab, the chain rule through m, m², f m.
ffi::Error NccGrad(ffi::Buffer<ffi::F32> f, ffi::Buffer<ffi::F32> m,
                   ffi::Buffer<ffi::F32> fixed_sums, ffi::Buffer<ffi::F32> sums,
                   ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> grad,
                   ffi::ResultBuffer<ffi::F32> boxed, int64_t window, int64_t wrt_fixed) {
  NccShape s;
  if (auto e = CheckNcc(f, m, fixed_sums, &s); e.failure()) return e;
  if (sums.element_count() != 3 * f.element_count() ||
      boxed->element_count() != 3 * f.element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax ncc grad: (.., 3C) sums and work");
  const float scale = -g.typed_data()[0] / static_cast<float>(s.voxels * s.nc);
  const bool swap = wrt_fixed != 0;
  const float* xp = swap ? f.typed_data() : m.typed_data();  // the image differentiated
  const float* yp = swap ? m.typed_data() : f.typed_data();  // the other
  (s.nc == 1 ? NccGradLoop<1> : NccGradLoop<0>)(xp, yp, fixed_sums.typed_data(),
                                                sums.typed_data(), grad->typed_data(),
                                                boxed->typed_data(), swap, scale, s, window);
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
// `planes` (B, D, 2H, 2W, C: a work buffer), then along D into y, in blocks of kBlock floats of
// a plane (so that both threads share the D pass).
constexpr int64_t kBlock = 4096;

void Upsample2Loop(const float* x, float* y, float* planes, int64_t nb, int64_t nd, int64_t nh,
                   int64_t nw, int64_t nc) {
  const int64_t small = nh * nw * nc, big = 4 * small;  // one plane before / after H and W
#pragma omp parallel
  {
    std::vector<float> buf(nh * 2 * nw * nc);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t d = 0; d < nd; ++d) {
        const float* in = x + (b * nd + d) * small;
        for (int64_t h = 0; h < nh; ++h) UpRows(in, buf.data(), h, nw, nc, 0, nc);
        UpRows(buf.data(), planes + (b * nd + d) * big, 0, nh, 2 * nw * nc, 0, 2 * nw * nc);
      }
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < big; c += kBlock)
        UpRows(planes, y, b, nd, big, c, std::min(kBlock, big - c));
  }
}

// The transpose of Upsample2Loop, y (B, 2D, 2H, 2W, C) -> x (B, D, H, W, C): along D into
// `planes` (a work buffer as there), then along H and W per plane.
void Upsample2TLoop(const float* y, float* x, float* planes, int64_t nb, int64_t nd, int64_t nh,
                    int64_t nw, int64_t nc) {
  const int64_t small = nh * nw * nc, big = 4 * small;
#pragma omp parallel
  {
    std::vector<float> buf(nh * 2 * nw * nc);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < big; c += kBlock)
        UpRowsT(y, planes, b, nd, big, c, std::min(kBlock, big - c));
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t d = 0; d < nd; ++d) {
        UpRowsT(planes + (b * nd + d) * big, buf.data(), 0, nh, 2 * nw * nc, 0, 2 * nw * nc);
        float* out = x + (b * nd + d) * small;
        for (int64_t h = 0; h < nh; ++h) UpRowsT(buf.data(), out, h, nw, nc, 0, nc);
      }
  }
}

// The work buffers below are results that the caller drops: XLA allocates them with a program's
// other buffers (reused from one step of a loop to the next), not the kernel at each call.
ffi::Error Upsample2(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> planes) {
  auto d = x.dimensions();
  if (d.size() != 5 || planes->element_count() != 4 * x.element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax upsample2: x (B, D, H, W, C), work (B, D, 2H, 2W, C)");
  Upsample2Loop(x.typed_data(), y->typed_data(), planes->typed_data(), d[0], d[1], d[2], d[3],
                d[4]);
  return ffi::Error::Success();
}

ffi::Error Upsample2T(ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::F32> planes) {
  auto d = x->dimensions();
  auto e = g.dimensions();
  if (d.size() != 5 || e.size() != 5 || e[0] != d[0] || e[4] != d[4] || e[1] != 2 * d[1] ||
      e[2] != 2 * d[2] || e[3] != 2 * d[3] || planes->element_count() != 4 * x->element_count())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax upsample2 transpose: g (B, 2D, 2H, 2W, C) -> (B, D, H, W, C), "
                      "work (B, D, 2H, 2W, C)");
  Upsample2TLoop(g.typed_data(), x->typed_data(), planes->typed_data(), d[0], d[1], d[2], d[3],
                 d[4]);
  return ffi::Error::Success();
}

#ifdef VMJAX_AVX2
// 3-channel interior samples (a field sampling itself in scaling and squaring) with AVX2: each
// of the 4 (D, H) rows of a sample's corners is one load of 8 floats, its two W corners' 3
// channels and 2 floats beyond (used only where they lie inside the buffer: Fits3). Lanes 0-2
// hold the channels.

inline bool Fits3(const Interior& in, int64_t size) {
  return in.offset + in.sd + in.sh + 8 <= size;
}

inline CornerRows LoadRows3(const float* v, const Interior& in) {
  const __m256i upper = _mm256_setr_epi32(3, 4, 5, 3, 4, 5, 3, 4);
  const int64_t off[4] = {0, in.sh, in.sd, in.sd + in.sh};
  CornerRows r;
  for (int k = 0; k < 4; ++k) {
    const __m256 row = _mm256_loadu_ps(v + off[k]);
    r.a[k] = row;
    r.e[k] = _mm256_sub_ps(_mm256_permutevar8x32_ps(row, upper), row);
  }
  return r;
}

// Lerp3 of the three channels (lanes 0-2).
inline __m256 Lerp3x3(const CornerRows& r, const Interior& in) {
  return LerpRows(r, _mm256_set1_ps(in.f0), _mm256_set1_ps(in.f1), _mm256_set1_ps(in.f2));
}

// Lerp3Grad summed over the three channels with weights g (lanes 0-2, zeros beyond): t[0..2]
// += the derivatives with respect to the sample's coordinates.
inline void Lerp3x3Grad(const CornerRows& r, const Interior& in, __m256 g, float* t) {
  __m256 d[3];
  LerpRowsGrad(r, _mm256_set1_ps(in.f0), _mm256_set1_ps(in.f1), _mm256_set1_ps(in.f2), d);
  // The channel sums of d_i * g: only lanes 0-2 are non-zero, all in the low half.
  const __m128 p0 = _mm256_castps256_ps128(_mm256_mul_ps(d[0], g));
  const __m128 p1 = _mm256_castps256_ps128(_mm256_mul_ps(d[1], g));
  const __m128 p2 = _mm256_castps256_ps128(_mm256_mul_ps(d[2], g));
  const __m128 sums = _mm_hadd_ps(_mm_hadd_ps(p0, p1), _mm_hadd_ps(p2, _mm_setzero_ps()));
  alignas(16) float out[4];
  _mm_store_ps(out, sums);
  t[0] += out[0];
  t[1] += out[1];
  t[2] += out[2];
}

// Scatters weight * g (lanes 0-2) into the 8 corners of an interior sample of acc: per row,
// one load, multiply-add and store of 8 floats (adding 0 to the 2 beyond its corners).
inline void Scatter3x3(float* acc, const Interior& in, __m256 g) {
  const __m256 split = _mm256_setr_ps(1.0f - in.f2, 1.0f - in.f2, 1.0f - in.f2, in.f2, in.f2,
                                      in.f2, 0.0f, 0.0f);
  const __m256 gg = _mm256_mul_ps(
      _mm256_permutevar8x32_ps(g, _mm256_setr_epi32(0, 1, 2, 0, 1, 2, 3, 3)), split);
  const float a0 = 1.0f - in.f0, a1 = 1.0f - in.f1;
  const float weight[4] = {a0 * a1, a0 * in.f1, in.f0 * a1, in.f0 * in.f1};
  const int64_t off[4] = {0, in.sh, in.sd, in.sd + in.sh};
  for (int k = 0; k < 4; ++k) {
    float* p = acc + off[k];
    _mm256_storeu_ps(p, _mm256_fmadd_ps(_mm256_set1_ps(weight[k]), gg, _mm256_loadu_ps(p)));
  }
}

// The 3 channels of g at gv in lanes 0-2, zeros beyond.
inline __m256 Load3(const float* gv) {
  return _mm256_setr_ps(gv[0], gv[1], gv[2], 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
}
#endif

ffi::Error ComposeSelf(ffi::Buffer<ffi::F32> field, ffi::ResultBuffer<ffi::F32> out) {
  auto dm = field.dimensions();
  if (dm.size() != 5 || dm[4] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax compose: u (B, D, H, W, 3)");
  const Shapes s = {dm[0], dm[1], dm[2], dm[3], 3, dm[1] * dm[2] * dm[3], dm[2], dm[3]};
  const float* u = field.typed_data();
  float* o = out->typed_data();
  ForEachRow(s, [&](int64_t b, int64_t x0) {
    const float* base = u + b * s.out * 3;
    const Position at(s, true, x0);  // voxel x samples its own index plus u[x]
    for (int64_t x = x0; x < x0 + s.ow; ++x) {
      const float* ux = base + x * 3;
      float* ov = o + (b * s.out + x) * 3;
      const std::array<float, 3> p = at.At(ux, x - x0);
      Interior in;
      if (Inside(s, p[0], p[1], p[2], &in)) {
#ifdef VMJAX_AVX2
        if (Fits3(in, s.out * 3)) {
          alignas(32) float value[8];
          _mm256_store_ps(value, Lerp3x3(LoadRows3(base + in.offset, in), in));
          for (int k = 0; k < 3; ++k) ov[k] = ux[k] + value[k];
          continue;
        }
#endif
        for (int k = 0; k < 3; ++k) ov[k] = ux[k] + Lerp3(base + in.offset + k, in);
        continue;
      }
      float acc[3] = {ux[0], ux[1], ux[2]};
      ForEachCorner(s, MakeAxes(s, p.data(), true),
                    [&](int64_t offset, float w0, float w1, float w2, float, float, float) {
        const float wt = w0 * w1 * w2;
        for (int k = 0; k < 3; ++k) acc[k] += wt * base[offset + k];
      });
      for (int k = 0; k < 3; ++k) ov[k] = acc[k];
    }
  });
  return ffi::Error::Success();
}

ffi::Error ComposeSelfGrad(ffi::Buffer<ffi::F32> field, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> d_field) {
  auto dm = field.dimensions();
  if (dm.size() != 5 || dm[4] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax compose grad: u (B, D, H, W, 3)");
  const Shapes s = {dm[0], dm[1], dm[2], dm[3], 3, dm[1] * dm[2] * dm[3], dm[2], dm[3]};
  const float* u = field.typed_data();
  const float* gp = g.typed_data();
  const int64_t rows = s.out / s.ow;
  auto one_row = [&](float* acc, int64_t row) {
    const int64_t b = row / rows, x0 = (row - b * rows) * s.ow;
    const float* base = u + b * s.out * 3;
    float* abase = acc + b * s.out * 3;
    const Position at(s, true, x0);
    // Every third voxel of the row, three times over: neighbours scatter into the same corners,
    // and in turn each add would wait for the previous voxel's store to the same address.
    const int64_t third = (s.ow + 2) / 3;
    for (int64_t k = 0; k < 3 * third; ++k) {
      const int64_t x = x0 + 3 * (k % third) + k / third;
      if (x >= x0 + s.ow) continue;
      const float* ux = base + x * 3;
      const float* gv = gp + (b * s.out + x) * 3;
      float t[3] = {0.0f, 0.0f, 0.0f};
      const std::array<float, 3> p = at.At(ux, x - x0);
      Interior in;
      const bool inside = Inside(s, p[0], p[1], p[2], &in);
#ifdef VMJAX_AVX2
      if (inside && Fits3(in, s.out * 3)) {
        const __m256 g = Load3(gv);
        Lerp3x3Grad(LoadRows3(base + in.offset, in), in, g, t);
        Scatter3x3(abase + in.offset, in, g);
      } else
#endif
      if (inside) {
        float w[8];
        int64_t off[8];
        Corners(in, w, off);
        for (int k = 0; k < 3; ++k) Lerp3Grad(base + in.offset + k, in, gv[k], t);
        float* a = abase + in.offset;
        for (int c = 0; c < 8; ++c)
          for (int k = 0; k < 3; ++k) a[off[c] + k] += w[c] * gv[k];
      } else {
        ForEachCorner(s, MakeAxes(s, p.data(), true),
                      [&](int64_t offset, float w0, float w1, float w2, float d0, float d1,
                          float d2) {
          const float* v = base + offset;
          const float gdotv = gv[0] * v[0] + gv[1] * v[1] + gv[2] * v[2];
          t[0] += gdotv * d0 * w1 * w2;
          t[1] += gdotv * w0 * d1 * w2;
          t[2] += gdotv * w0 * w1 * d2;
          const float wt = w0 * w1 * w2;
          float* a = abase + offset;
          for (int k = 0; k < 3; ++k) a[k] += wt * gv[k];
        });
      }
      float* a = abase + x * 3;  // the direct term and the coordinate term at x itself
      for (int k = 0; k < 3; ++k) a[k] += gv[k] + t[k];
    }
  };
  // A voxel at layer d scatters to layers floor(d + u_D) and the next (clamped): within
  // ceil(max |u_D|) of d, and one beyond.
  const int64_t n = s.b * s.out;
  float reach = 0.0f;
#pragma omp parallel for reduction(max : reach) schedule(static)
  for (int64_t x = 0; x < n; ++x) {
    const float a = std::fabs(u[x * 3]);
    reach = std::max(reach, a <= 1e30f ? a : INFINITY);  // NaN too: where it scatters is unknown
  }
  const bool known = reach < static_cast<float>(s.di);
  if (!ScatterInSlabs(d_field->typed_data(), s.b, s.di, s.oh, s.out * 3,
                      known ? static_cast<int64_t>(std::ceil(reach)) : -1, one_row))
    ScatterInParallel(d_field->typed_data(), s.b * s.out * 3, s.b * rows, one_row);
  return ffi::Error::Success();
}

// Where indices are clamped (mode "nearest"), a sample's value is that of its coordinates
// clamped to [0, n - 1] (a sample beyond an edge gets the edge's values either way): fills `in`
// for the clamped sample, its lower corner at most n - 2 (a sample on the last voxel weighs
// its upper corner 1), so that every sample takes the interior path. False for NaN or an axis
// of fewer than 2 voxels (ForEachCorner's general path then). Values only: the gradient with
// respect to the coordinates differs beyond the edges.
inline bool ClampedInside(const Shapes& s, float p0, float p1, float p2, Interior* in) {
  if (!(p0 == p0 && p1 == p1 && p2 == p2) || s.di < 2 || s.hi < 2 || s.wi < 2) return false;
  int64_t l[3];
  float f[3];
  const float p[3] = {p0, p1, p2};
  const int64_t n[3] = {s.di, s.hi, s.wi};
  for (int k = 0; k < 3; ++k) {
    const float q = std::min(std::max(p[k], 0.0f), static_cast<float>(n[k] - 1));
    l[k] = std::min(static_cast<int64_t>(q), n[k] - 2);
    f[k] = q - static_cast<float>(l[k]);
  }
  SetInterior(s, l[0], l[1], l[2], f[0], f[1], f[2], in);
  return true;
}

// y = m (x0, x1, x2, 1) for a 3x4 matrix m (row-major), summed as vmjax.transforms.apply_affine
// sums it.
inline void AffineMap(const float* m, float x0, float x1, float x2, float y[3]) {
  for (int r = 0; r < 3; ++r)
    y[r] = m[4 * r] * x0 + m[4 * r + 1] * x1 + m[4 * r + 2] * x2 + m[4 * r + 3];
}

ffi::Error ComposeAffine(ffi::Buffer<ffi::F32> disp, ffi::Buffer<ffi::F32> matrices,
                         ffi::ResultBuffer<ffi::F32> out) {
  auto dd = disp.dimensions(), od = out->dimensions();
  if (dd.size() != 4 || dd[3] != 3 || od.size() != 4 || od[3] != 3 ||
      matrices.element_count() != 24)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax compose affine: disp (D, H, W, 3), matrices (2, 3, 4), out (., 3)");
  const Shapes s = {1, dd[0], dd[1], dd[2], 3, od[0] * od[1] * od[2], od[1], od[2]};
  const float* u = disp.typed_data();
  const float* m = matrices.typed_data();  // m[0..11]: to disp's grid; m[12..23]: onwards
  float* o = out->typed_data();
  ForEachRow(s, [&](int64_t, int64_t x0) {
    const float d = static_cast<float>(x0 / (s.oh * s.ow)),
                h = static_cast<float>((x0 / s.ow) % s.oh);
    for (int64_t w = 0; w < s.ow; ++w) {
      const float x[3] = {d, h, static_cast<float>(w)};
      float t[3];
      AffineMap(m, x[0], x[1], x[2], t);
      float v[3] = {0.0f, 0.0f, 0.0f};
      Interior in;
      if (ClampedInside(s, t[0], t[1], t[2], &in)) {
#ifdef VMJAX_AVX2
        if (Fits3(in, s.di * s.hi * s.wi * 3)) {
          alignas(32) float value[8];
          _mm256_store_ps(value, Lerp3x3(LoadRows3(u + in.offset, in), in));
          for (int k = 0; k < 3; ++k) v[k] = value[k];
        } else
#endif
          for (int k = 0; k < 3; ++k) v[k] = Lerp3(u + in.offset + k, in);
      } else {
        ForEachCorner(s, MakeAxes(s, t, true),
                      [&](int64_t offset, float w0, float w1, float w2, float, float, float) {
          const float wt = w0 * w1 * w2;
          for (int k = 0; k < 3; ++k) v[k] += wt * u[offset + k];
        });
      }
      float y[3];
      AffineMap(m + 12, t[0] + v[0], t[1] + v[1], t[2] + v[2], y);
      float* ov = o + (x0 + w) * 3;
      for (int r = 0; r < 3; ++r) ov[r] = y[r] - x[r];
    }
  });
  return ffi::Error::Success();
}

// One sample of the affine step: the moving image (constant mode) at m's map of the fixed voxel
// (d, h, w), and with `grad` its derivatives with respect to the sample's coordinates.
inline float AffineSample(const Shapes& s, const float* img, const float* m, float d, float h,
                          float w, float* grad) {
  float p[3];
  AffineMap(m, d, h, w, p);
  Interior in;
  if (Inside(s, p[0], p[1], p[2], &in)) {
    if (grad) {
      grad[0] = grad[1] = grad[2] = 0.0f;
      Lerp3Grad(img + in.offset, in, 1.0f, grad);
    }
    return Lerp3(img + in.offset, in);
  }
  float value = 0.0f;
  if (grad) grad[0] = grad[1] = grad[2] = 0.0f;
  ForEachCorner(s, MakeAxes(s, p, false), [&](int64_t offset, float w0, float w1, float w2,
                                              float d0, float d1, float d2) {
    const float v = img[offset];
    value += w0 * w1 * w2 * v;
    if (grad) {
      grad[0] += d0 * w1 * w2 * v;
      grad[1] += w0 * d1 * w2 * v;
      grad[2] += w0 * w1 * d2 * v;
    }
  });
  return value;
}

#ifdef VMJAX_AVX2
// The 8 voxels w .. w + 7 of the fixed grid's row (d, h) sampled at m's map of them: their W
// indices (x), the lanes (Interior8) and a mask of the lanes inside (all bits set).
inline Lanes8 AffineLanes8(const Shapes& s, const float* m, float d, float h, int64_t w,
                           __m256* x, __m256* mask) {
  *x = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(w)),
                     _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 p[3];
  for (int r = 0; r < 3; ++r)
    p[r] = _mm256_fmadd_ps(_mm256_set1_ps(m[4 * r + 2]), *x,
                           _mm256_set1_ps(m[4 * r] * d + m[4 * r + 1] * h + m[4 * r + 3]));
  const Lanes8 l = Interior8(s, p[0], p[1], p[2]);
  *mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
      _mm256_and_si256(_mm256_set1_epi32(l.inside), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128)),
      _mm256_setzero_si256()));
  return l;
}

inline double Total(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double total = 0.0;
  for (float x : lanes) total += x;
  return total;
}
#endif

// Calls f(thread, d, h, row) for every row (d, h) of a (D, H, W) grid, rows in parallel (row:
// its first voxel's flat index).
template <typename F>
inline void ForEachGridRow(int64_t nd, int64_t nh, int64_t nw, int threads, F&& f) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t d = 0; d < nd; ++d)
    for (int64_t h = 0; h < nh; ++h)
      f(omp_get_thread_num(), static_cast<float>(d), static_cast<float>(h), (d * nh + h) * nw);
}

ffi::Error AffineNcc(ffi::Buffer<ffi::F32> fixed, ffi::Buffer<ffi::F32> moving,
                     ffi::Buffer<ffi::F32> matrix, ffi::ResultBuffer<ffi::F32> loss,
                     ffi::ResultBuffer<ffi::F32> d_matrix) {
  auto fd = fixed.dimensions(), md = moving.dimensions();
  if (fd.size() != 3 || md.size() != 3 || matrix.element_count() != 12)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax affine ncc: fixed (D, H, W), moving (D', H', W'), matrix (3, 4)");
  const Shapes s = {1, md[0], md[1], md[2], 1, fd[0] * fd[1] * fd[2], fd[1], fd[2]};
  const float* f = fixed.typed_data();
  const float* img = moving.typed_data();
  const float* m = matrix.typed_data();
  const int threads = std::max(1, omp_get_max_threads());
  const int64_t nw = fd[2];
#ifdef VMJAX_AVX2
  const bool vector = Gatherable(s);
#endif
  // Pass 1: the sums of f, m, f², m², f m (float64 per thread and row, added in a fixed order).
  std::vector<std::array<double, 5>> part(threads, std::array<double, 5>{});
  auto one = [&](std::array<double, 5>& p, float d, float h, int64_t w, int64_t k) {
    const double a = f[k], b = AffineSample(s, img, m, d, h, static_cast<float>(w), nullptr);
    p[0] += a;
    p[1] += b;
    p[2] += a * a;
    p[3] += b * b;
    p[4] += a * b;
  };
  ForEachGridRow(fd[0], fd[1], nw, threads, [&](int t, float d, float h, int64_t row) {
    auto& p = part[t];
    int64_t w = 0;
#ifdef VMJAX_AVX2
    if (vector) {
      __m256 sum[5] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (; w + 8 <= nw; w += 8) {
        __m256 x, in;
        const Lanes8 l = AffineLanes8(s, m, d, h, w, &x, &in);
        const __m256 a = _mm256_loadu_ps(f + row + w);
        const __m256 b = _mm256_and_ps(in, LerpRows(Gather8(img, s, l), l.f0, l.f1, l.f2));
        const __m256 a_in = _mm256_and_ps(in, a);
        sum[0] = _mm256_add_ps(sum[0], a_in);
        sum[1] = _mm256_add_ps(sum[1], b);
        sum[2] = _mm256_fmadd_ps(a_in, a_in, sum[2]);
        sum[3] = _mm256_fmadd_ps(b, b, sum[3]);
        sum[4] = _mm256_fmadd_ps(a_in, b, sum[4]);
        for (int lane = 0; lane < 8; ++lane)
          if (!(l.inside >> lane & 1)) one(p, d, h, w + lane, row + w + lane);
      }
      for (int i = 0; i < 5; ++i) p[i] += Total(sum[i]);
    }
#endif
    for (; w < nw; ++w) one(p, d, h, w, row + w);
  });
  std::array<double, 5> sum{};
  for (const auto& p : part)
    for (int i = 0; i < 5; ++i) sum[i] += p[i];
  const double n = static_cast<double>(s.out);
  const double mean_f = sum[0] / n, mean_m = sum[1] / n;
  const double s_aa = sum[2] - n * mean_f * mean_f, s_bb = sum[3] - n * mean_m * mean_m,
               s_ab = sum[4] - n * mean_f * mean_m;
  const double r = std::sqrt(s_aa * s_bb + 1e-8);
  loss->typed_data()[0] = static_cast<float>(-s_ab / r);
  // Pass 2: dL/dm_k = -(a_k / r - s_ab s_aa b_k / r^3) (a, b the centred values), times the
  // sample's coordinate derivatives and the voxel's (d, h, w, 1): the 3x4 matrix's gradient.
  const double ca = -1.0 / r, cb = s_ab * s_aa / (r * r * r);
  std::vector<std::array<double, 12>> grad(threads, std::array<double, 12>{});
  auto add = [](std::array<double, 12>& acc, double g, const float* dp, double d, double h,
                double w) {
    for (int i = 0; i < 3; ++i) {
      const double gi = g * dp[i];
      acc[4 * i] += gi * d;
      acc[4 * i + 1] += gi * h;
      acc[4 * i + 2] += gi * w;
      acc[4 * i + 3] += gi;
    }
  };
  auto one_grad = [&](std::array<double, 12>& acc, float d, float h, int64_t w, int64_t k) {
    float dp[3];
    const double b = AffineSample(s, img, m, d, h, static_cast<float>(w), dp) - mean_m;
    add(acc, ca * (f[k] - mean_f) + cb * b, dp, d, h, static_cast<double>(w));
  };
  ForEachGridRow(fd[0], fd[1], nw, threads, [&](int t, float d, float h, int64_t row) {
    auto& acc = grad[t];
    int64_t w = 0;
#ifdef VMJAX_AVX2
    if (vector) {
      // Per row: S_i = sum of g dp_i and W_i = sum of g dp_i w over the vector lanes.
      __m256 sums[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      __m256 wsums[3] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      const __m256 vca = _mm256_set1_ps(static_cast<float>(ca)),
                   vcb = _mm256_set1_ps(static_cast<float>(cb)),
                   vmf = _mm256_set1_ps(static_cast<float>(mean_f)),
                   vmm = _mm256_set1_ps(static_cast<float>(mean_m));
      for (; w + 8 <= nw; w += 8) {
        __m256 x, in, dv[3];
        const Lanes8 l = AffineLanes8(s, m, d, h, w, &x, &in);
        const CornerRows corners = Gather8(img, s, l);
        const __m256 b = _mm256_sub_ps(LerpRows(corners, l.f0, l.f1, l.f2), vmm);
        LerpRowsGrad(corners, l.f0, l.f1, l.f2, dv);
        const __m256 g = _mm256_and_ps(in, _mm256_fmadd_ps(
            vca, _mm256_sub_ps(_mm256_loadu_ps(f + row + w), vmf), _mm256_mul_ps(vcb, b)));
        for (int i = 0; i < 3; ++i) {
          const __m256 gd = _mm256_mul_ps(g, dv[i]);
          sums[i] = _mm256_add_ps(sums[i], gd);
          wsums[i] = _mm256_fmadd_ps(gd, x, wsums[i]);
        }
        for (int lane = 0; lane < 8; ++lane)
          if (!(l.inside >> lane & 1)) one_grad(acc, d, h, w + lane, row + w + lane);
      }
      for (int i = 0; i < 3; ++i) {
        const double total = Total(sums[i]);
        acc[4 * i] += total * d;
        acc[4 * i + 1] += total * h;
        acc[4 * i + 2] += Total(wsums[i]);
        acc[4 * i + 3] += total;
      }
    }
#endif
    for (; w < nw; ++w) one_grad(acc, d, h, w, row + w);
  });
  float* out = d_matrix->typed_data();
  for (int i = 0; i < 12; ++i) {
    double total = 0.0;
    for (const auto& acc : grad) total += acc[i];
    out[i] = static_cast<float>(total);
  }
  return ffi::Error::Success();
}

// out[c, w, h, d] = in[d, h, w, c] for 4-byte elements (float32 or int32 alike).
void ReverseAxesLoop(const float* in, float* out, int64_t nd, int64_t nh, int64_t nw,
                     int64_t nc) {
  // Per (h, block of 16 d): the block's 16 rows of `in` (W C floats each, in cache) give each
  // (c, w) a run of 16 consecutive floats of `out`: whole cache lines written, rows read once.
  constexpr int64_t kLayers = 16;
  const int64_t blocks = (nd + kLayers - 1) / kLayers;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t d0 = blk * kLayers, d1 = std::min(nd, d0 + kLayers);
      for (int64_t w = 0; w < nw; ++w)
        for (int64_t c = 0; c < nc; ++c) {
          float* o = out + ((c * nw + w) * nh + h) * nd;
          const float* i = in + (h * nw + w) * nc + c;
          for (int64_t d = d0; d < d1; ++d) o[d] = i[d * nh * nw * nc];
        }
    }
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

extern "C" void VmjaxReverseAxesHost(const float* in, float* out, int64_t nd, int64_t nh,
                                     int64_t nw, int64_t nc) {
  ReverseAxesLoop(in, out, nd, nh, nw, nc);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxTrilinear, Trilinear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("relative"));

// The two gradients take (image, coords, g) and return one buffer.
#define VMJAX_TRILINEAR_GRAD_HANDLER(SYMBOL, FUNCTION)                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SYMBOL, FUNCTION,                        \
                                ffi::Ffi::Bind()                         \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Arg<ffi::Buffer<ffi::F32>>()        \
                                    .Ret<ffi::Buffer<ffi::F32>>()        \
                                    .Attr<int64_t>("mode")               \
                                    .Attr<int64_t>("relative"));

VMJAX_TRILINEAR_GRAD_HANDLER(VmjaxTrilinearGradCoords, TrilinearGradCoords)
VMJAX_TRILINEAR_GRAD_HANDLER(VmjaxTrilinearGradImage, TrilinearGradImage)

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxBoxSum, BoxSum,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxNccSums, NccSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxNccGrad, NccGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("wrt_fixed"));

// The x2 upsampling and its transpose take one buffer and return it and a work buffer.
#define VMJAX_UPSAMPLE_HANDLER(SYMBOL, FUNCTION)                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SYMBOL, FUNCTION,                 \
                                ffi::Ffi::Bind()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());

VMJAX_UPSAMPLE_HANDLER(VmjaxUpsample2, Upsample2)
VMJAX_UPSAMPLE_HANDLER(VmjaxUpsample2T, Upsample2T)

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxComposeSelf, ComposeSelf,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxComposeSelfGrad, ComposeSelfGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxComposeAffine, ComposeAffine,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxAffineNcc, AffineNcc,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VmjaxSum, Sum,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
