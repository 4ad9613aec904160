// 3-D convolution on the CPU through oneDNN, exposed to XLA as FFI custom calls.
//
// Layouts are JAX's channels-last ones, row-major:
//   x  (N, D, H, W, Ci)  "ndhwc"      activations (input)
//   w  (KD, KH, KW, Ci, Co) "dhwio"   kernel
//   y  (N, Do, Ho, Wo, Co) "ndhwc"    output
// Attributes: strides, pad_lo, pad_hi (3 each, int64). No dilation, no groups: the Python side
// routes only such convolutions here (vmjax/conv.py) and everything else to lax.
// Each handler exists for f32 and for bf16 (x, w, y all of that type; oneDNN accumulates in f32;
// AVX512-BF16 / AMX kernels where the CPU has them: vmjax/conv.py sends bf16 here only then).
//
// One template, ConvPass, serves the three convolution passes: forward (y = x * w), backward
// data (dx from dy) and backward weights (dw from x, dy), plus a bf16 forward with an f32 y (a
// bf16 network's last conv); SubpixelEpilogue is the native pass of the coarse-grid decoder step
// (vmjax/blocks.py). oneDNN picks the kernel (brgemm/AMX on Sapphire Rapids) and the weights'
// internal layout; weights are reordered from/to dhwio on each call (tiny next to the
// convolution).
// Primitives are cached per shape so a training loop builds each one once. XLA may run
// independent custom calls on several threads at once: executions are serialised (each one
// already uses every core through OpenMP) and share one user-managed scratchpad.

#include <array>
#include <cstring>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  memory::dims x, w, y, strides, pad_lo, pad_hi;  // oneDNN order: N C D H W / O I D H W
  dt type = dt::f32;                                // of x and w (and y unless out_type says)
  dt out_type = dt::f32;                            // of y
  bool operator<(const Geometry& o) const {
    return std::tie(x, w, y, strides, pad_lo, pad_hi, type, out_type) <
           std::tie(o.x, o.w, o.y, o.strides, o.pad_lo, o.pad_hi, o.type, o.out_type);
  }
};

template <ffi::DataType T>
constexpr dt OneDnnType() {
  static_assert(T == ffi::DataType::F32 || T == ffi::DataType::BF16);
  return T == ffi::DataType::F32 ? dt::f32 : dt::bf16;
}

ffi::Error ReadGeometry(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims,
                        ffi::Span<const int64_t> y_dims, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
                        dt type, Geometry* g) {
  if (x_dims.size() != 5 || w_dims.size() != 5 || y_dims.size() != 5)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax onednn conv: rank must be 5");
  if (strides.size() != 3 || pad_lo.size() != 3 || pad_hi.size() != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "vmjax onednn conv: strides/pad_lo/pad_hi need 3 entries");
  if (w_dims[3] != x_dims[4] || w_dims[4] != y_dims[4] || x_dims[0] != y_dims[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax onednn conv: shape mismatch");
  g->x = {x_dims[0], x_dims[4], x_dims[1], x_dims[2], x_dims[3]};
  g->w = {w_dims[4], w_dims[3], w_dims[0], w_dims[1], w_dims[2]};
  g->y = {y_dims[0], y_dims[4], y_dims[1], y_dims[2], y_dims[3]};
  g->strides = {strides[0], strides[1], strides[2]};
  g->pad_lo = {pad_lo[0], pad_lo[1], pad_lo[2]};
  g->pad_hi = {pad_hi[0], pad_hi[1], pad_hi[2]};
  g->type = type;
  g->out_type = type;
  return ffi::Error::Success();
}

// Everything one geometry needs, built once (no backward primitives for a mixed-type forward:
// bf16 x and w to an f32 y).
struct Plan {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_w_pd;
  dnnl::convolution_backward_weights bwd_w;
  memory::desc x_md, w_md, y_md;  // user layouts
};

std::unique_ptr<Plan> MakePlan(const Geometry& g) {
  auto plan = std::make_unique<Plan>();
  dnnl::engine& eng = Engine();
  plan->x_md = memory::desc(g.x, g.type, tag::ndhwc);
  plan->w_md = memory::desc(g.w, g.type, tag::dhwio);
  plan->y_md = memory::desc(g.y, g.out_type, tag::ndhwc);
  memory::desc w_any(g.w, g.type, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  plan->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, plan->x_md,
      w_any, plan->y_md, g.strides, g.pad_lo, g.pad_hi, attr);
  plan->fwd = dnnl::convolution_forward(plan->fwd_pd);
  if (g.out_type != g.type) return plan;
  plan->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, plan->x_md, w_any, plan->y_md, g.strides,
      g.pad_lo, g.pad_hi, plan->fwd_pd, attr);
  plan->bwd_data = dnnl::convolution_backward_data(plan->bwd_data_pd);
  plan->bwd_w_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, plan->x_md, w_any, plan->y_md, g.strides,
      g.pad_lo, g.pad_hi, plan->fwd_pd, attr);
  plan->bwd_w = dnnl::convolution_backward_weights(plan->bwd_w_pd);
  return plan;
}

std::mutex& ExecutionMutex() {
  static std::mutex mu;
  return mu;
}

// Caller holds ExecutionMutex().
Plan* GetPlan(const Geometry& g) {
  static std::map<Geometry, std::unique_ptr<Plan>> plans;
  auto it = plans.find(g);
  if (it == plans.end()) it = plans.emplace(g, MakePlan(g)).first;
  return it->second.get();
}

// Runs `body` and turns oneDNN exceptions into FFI errors.
template <typename F>
ffi::Error Guard(F body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("vmjax onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

void* Ptr(const void* p) { return const_cast<void*>(p); }

// Caller holds ExecutionMutex().
memory Scratchpad(const memory::desc& md) {
  static std::vector<char> buffer;
  if (buffer.size() < md.get_size()) buffer.resize(md.get_size());
  return memory(md, Engine(), buffer.data());
}

// The three passes of a convolution, one template: each reads two buffers `a`, `b` and writes
// `out`, in these roles (oneDNN's argument names), the weights in dhwio reordered to and from
// the primitive's own layout where it differs:
//   kForward          a = x  (SRC)       b = w  (WEIGHTS)    out = y  (DST)           weights in
//   kBackwardData     a = dy (DIFF_DST)  b = w  (WEIGHTS)    out = dx (DIFF_SRC)      weights in
//   kBackwardWeights  a = x  (SRC)       b = dy (DIFF_DST)   out = dw (DIFF_WEIGHTS)  weights out
enum class Pass { kForward, kBackwardData, kBackwardWeights };

struct Step {
  dnnl::primitive primitive;
  memory::desc weights, scratchpad;  // the primitive's weights layout and scratchpad
  int a_arg, b_arg, out_arg;
};

template <Pass P>
Step StepOf(const Plan& p) {
  if constexpr (P == Pass::kForward)
    return {p.fwd, p.fwd_pd.weights_desc(), p.fwd_pd.scratchpad_desc(), DNNL_ARG_SRC,
            DNNL_ARG_WEIGHTS, DNNL_ARG_DST};
  else if constexpr (P == Pass::kBackwardData)
    return {p.bwd_data, p.bwd_data_pd.weights_desc(), p.bwd_data_pd.scratchpad_desc(),
            DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC};
  else
    return {p.bwd_w, p.bwd_w_pd.diff_weights_desc(), p.bwd_w_pd.scratchpad_desc(), DNNL_ARG_SRC,
            DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS};
}

template <Pass P, ffi::DataType T, ffi::DataType TOut = T>
ffi::Error ConvPass(ffi::Buffer<T> a, ffi::Buffer<T> b, ffi::ResultBuffer<TOut> out,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                    ffi::Span<const int64_t> pad_hi) {
  static_assert(P == Pass::kForward || TOut == T, "only the forward pass mixes types");
  constexpr bool kForward = P == Pass::kForward, kData = P == Pass::kBackwardData;
  constexpr bool kWeightsOut = P == Pass::kBackwardWeights;
  Geometry g;
  if (auto err = ReadGeometry(kData ? out->dimensions() : a.dimensions(),          // x
                              kWeightsOut ? out->dimensions() : b.dimensions(),    // w
                              kForward ? out->dimensions()
                                       : (kData ? a.dimensions() : b.dimensions()),  // y
                              strides, pad_lo, pad_hi, OneDnnType<T>(), &g);
      !err.success())
    return err;
  g.out_type = OneDnnType<TOut>();
  return Guard([&] {
    std::lock_guard<std::mutex> lock(ExecutionMutex());
    Plan* p = GetPlan(g);
    Step step = StepOf<P>(*p);
    dnnl::engine& eng = Engine();
    dnnl::stream s(eng);
    memory a_mem(kData ? p->y_md : p->x_md, eng, Ptr(a.typed_data()));
    memory b_mem(kWeightsOut ? p->y_md : p->w_md, eng, Ptr(b.typed_data()));
    memory out_mem(kForward ? p->y_md : (kData ? p->x_md : p->w_md), eng, out->typed_data());
    memory w_user = kWeightsOut ? out_mem : b_mem;
    bool reorder = step.weights != p->w_md;
    memory w_mem = reorder ? memory(step.weights, eng) : w_user;
    if (reorder && !kWeightsOut) dnnl::reorder(w_user, w_mem).execute(s, w_user, w_mem);
    step.primitive.execute(s, {{step.a_arg, a_mem},
                               {step.b_arg, kWeightsOut ? b_mem : w_mem},
                               {step.out_arg, kWeightsOut ? w_mem : out_mem},
                               {DNNL_ARG_SCRATCHPAD, Scratchpad(step.scratchpad)}});
    if (reorder && kWeightsOut) dnnl::reorder(w_mem, w_user).execute(s, w_mem, w_user);
    s.wait();
  });
}

float ToF32(float v) { return v; }
float ToF32(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename N> N FromF32(float v);
template <> float FromF32<float>(float v) { return v; }
template <> uint16_t FromF32<uint16_t>(float f) {  // bf16, round to nearest even as XLA does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// The epilogue of a convolution of nearest-x2-upsampled activations computed on the coarse grid
// (vmjax/conv.py, upsample_concat_conv_block): z (N, n1+1, n2+1, n3+1, 8*C) holds, for each
// parity (p1, p2, p3) of a fine voxel 2i + p, its value at coarse position i + p in channel block
// (p1*4 + p2*2 + p3)*C; s (N, 2n1, 2n2, 2n3, C) the convolution of the skip connection, b (C).
//   y[n, 2i+p, c] = leaky_relu(z[n, i+p, p, c] + s[n, 2i+p, c] + b[c], slope)
// (slope 1: no activation). Computed in f32, rounded once to y's type.
template <ffi::DataType T>
ffi::Error SubpixelEpilogue(ffi::Buffer<T> z, ffi::Buffer<T> s, ffi::Buffer<T> b,
                            ffi::ResultBuffer<T> y, float slope) {
  auto zd = z.dimensions(), sd = s.dimensions(), yd = y->dimensions();
  if (zd.size() != 5 || sd.size() != 5 || yd.size() != 5 || b.dimensions().size() != 1)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax subpixel epilogue: bad rank");
  const int64_t n = yd[0], d = yd[1], h = yd[2], w = yd[3], c = yd[4];
  for (int i = 0; i < 5; ++i)
    if (sd[i] != yd[i])
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax subpixel epilogue: s != y");
  if (d % 2 || h % 2 || w % 2 || zd[0] != n || zd[1] != d / 2 + 1 || zd[2] != h / 2 + 1 ||
      zd[3] != w / 2 + 1 || zd[4] != 8 * c || b.dimensions()[0] != c)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vmjax subpixel epilogue: bad shapes");
  using N = ffi::NativeType<T>;
  const N* zp = z.typed_data();
  const N* sp = s.typed_data();
  const N* bp = b.typed_data();
  N* yp = y->typed_data();
  std::vector<float> bias(c);
  for (int64_t k = 0; k < c; ++k) bias[k] = ToF32(bp[k]);
  const int64_t n1 = d / 2, n2 = h / 2, n3 = w / 2;
  std::lock_guard<std::mutex> lock(ExecutionMutex());
  // Coarse-major: z is read once, in order, and each coarse voxel writes its (up to) 8 fine
  // voxels, 2j - p per axis. 4x faster than a fine-major loop, whose reads of z stride over 4
  // passes (160x192x224, 32 channels, bf16, 2-core AMD EPYC: 0.16 s against 0.6 s standalone;
  // 0.10 s in a profile of VM-2's bf16 register). Every fine voxel has exactly one (j, p):
  // threads write disjoint rows.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b0 = 0; b0 < n; ++b0)
    for (int64_t j1 = 0; j1 <= n1; ++j1)
      for (int64_t j2 = 0; j2 <= n2; ++j2)
        for (int64_t j3 = 0; j3 <= n3; ++j3) {
          const N* zvox = zp + (((b0 * (n1 + 1) + j1) * (n2 + 1) + j2) * (n3 + 1) + j3) * 8 * c;
          for (int64_t p1 = 0; p1 < 2; ++p1) {
            const int64_t i1 = 2 * j1 - p1;
            if (i1 < 0 || i1 >= d) continue;
            for (int64_t p2 = 0; p2 < 2; ++p2) {
              const int64_t i2 = 2 * j2 - p2;
              if (i2 < 0 || i2 >= h) continue;
              for (int64_t p3 = 0; p3 < 2; ++p3) {
                const int64_t i3 = 2 * j3 - p3;
                if (i3 < 0 || i3 >= w) continue;
                const int64_t offset = (((b0 * d + i1) * h + i2) * w + i3) * c;
                const N* __restrict__ zv = zvox + (p1 * 4 + p2 * 2 + p3) * c;
                const N* sv = sp + offset;  // y may overwrite s (aliased buffers)
                N* yv = yp + offset;
                const float* __restrict__ bv = bias.data();
#pragma omp simd
                for (int64_t k = 0; k < c; ++k) {
                  const float v = ToF32(zv[k]) + ToF32(sv[k]) + bv[k];
                  const float a = slope * v;  // 0 < slope <= 1: leaky_relu(v) = max(v, slope v),
                  yv[k] = FromF32<N>(v > a ? v : a);  // branch-free (random signs mispredict)
                }
              }
            }
          }
        }
  return ffi::Error::Success();
}

}  // namespace

#define VMJAX_CONV_HANDLER(SYMBOL, PASS, TYPE, OUT_TYPE)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                  \
      SYMBOL, (ConvPass<Pass::PASS, ffi::DataType::TYPE, ffi::DataType::OUT_TYPE>), \
      ffi::Ffi::Bind()                                                            \
          .Arg<ffi::Buffer<ffi::TYPE>>()                                          \
          .Arg<ffi::Buffer<ffi::TYPE>>()                                          \
          .Ret<ffi::Buffer<ffi::OUT_TYPE>>()                                      \
          .Attr<ffi::Span<const int64_t>>("strides")                              \
          .Attr<ffi::Span<const int64_t>>("pad_lo")                               \
          .Attr<ffi::Span<const int64_t>>("pad_hi"));

VMJAX_CONV_HANDLER(VmjaxConvForward, kForward, F32, F32)
VMJAX_CONV_HANDLER(VmjaxConvBackwardData, kBackwardData, F32, F32)
VMJAX_CONV_HANDLER(VmjaxConvBackwardWeights, kBackwardWeights, F32, F32)
VMJAX_CONV_HANDLER(VmjaxConvForwardBf16, kForward, BF16, BF16)
VMJAX_CONV_HANDLER(VmjaxConvBackwardDataBf16, kBackwardData, BF16, BF16)
VMJAX_CONV_HANDLER(VmjaxConvBackwardWeightsBf16, kBackwardWeights, BF16, BF16)
// bf16 x and w, f32 y (oneDNN accumulates in f32): a bf16 network's last conv, whose output is
// the displacement and stays f32.
VMJAX_CONV_HANDLER(VmjaxConvForwardBf16F32, kForward, BF16, F32)

#define VMJAX_EPILOGUE_HANDLER(SYMBOL, TYPE)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SYMBOL, SubpixelEpilogue<ffi::DataType::TYPE>,   \
                                ffi::Ffi::Bind()                                \
                                    .Arg<ffi::Buffer<ffi::TYPE>>()              \
                                    .Arg<ffi::Buffer<ffi::TYPE>>()              \
                                    .Arg<ffi::Buffer<ffi::TYPE>>()              \
                                    .Ret<ffi::Buffer<ffi::TYPE>>()              \
                                    .Attr<float>("slope"));

VMJAX_EPILOGUE_HANDLER(VmjaxSubpixelEpilogue, F32)
VMJAX_EPILOGUE_HANDLER(VmjaxSubpixelEpilogueBf16, BF16)
