// gated_dwconv_gelu.cu - depthwise 3x3 conv + GELU gate of the GDFN, fused, forward.
//
// Semantics (fp32 math for every storage dtype f32/f16/bf16):
//   y = F.conv2d(x, weight, bias, padding=1, groups=2h)    x: (B, 2h, H, W)
//   y1 = y[:, :h], y2 = y[:, h:]                           weight: (2h, 1, 3, 3)
//   gdfn (dual == 0): out = gelu(y1) * y2                  bias: (2h,) or none
//   dual (dual != 0): out = gelu(y2) * y1 + gelu(y1) * y2  out: (B, h, H, W)
// with the exact (erf) GELU v Phi(v) (see gelu below). The conv is a
// cross-correlation with zero padding:
//   y[b,k,i,j] = bias[k] + sum_{dy,dx in 0..2} weight[k, 0, dy, dx] * x[b,k,i+dy-1,j+dx-1]
// (x outside the image = 0). The 2h-channel y never reaches global memory:
// each output needs only the 3x3 neighbourhoods of input channels c and c+h,
// so one kernel reads x and writes out. weight is passed as fp32 (9, 2h),
// tap-major (weight[k, 0, dy, dx] at (dy*3 + dx) * 2h + k: NHWC lanes on neighbouring
// channels load neighbours), bias as fp32 (2h,) or a null pointer.
//
// Every entry is launched with blockDim = (32, 8) (256 threads; required by
// the thread mappings below) and a 1-D grid of any size >= 1: blocks (NCHW:
// warps) loop over work items with a grid stride, so there is no gridDim.y/z
// limit on B*h and the launcher may cap the grid. Work decode and offsets are
// 32-bit unsigned where x has fewer than 2^31 elements, else 64-bit (see the
// entries); H and W must be < 2^31 (the launchers check).
//
// Both layouts: a work item is a warp's, a strip of output rows y0 .. y0+15,
// the 8 warps of a block on 8 consecutive items (no shared memory, no
// barrier); warp ty of block k takes items 8k + ty, 8k + ty + 8*gridDim.x, ...
// Each thread walks its strip's input rows y0-1 .. y0+16 top to bottom, reading
// from each row of channels c and c+h the four columns its two output columns
// need, and adds the row's taps to the outputs they touch, two partial rows in
// registers (Strip below): every input element is loaded once a thread, no
// halo is staged. Strips whose halo lies inside the image (and, NHWC, whose 32
// channels exist) run without bounds checks.
//
// NCHW layout (x, out contiguous), *_nchw_*: a strip is 64 x 16 output pixels
// of one output plane (b, c), lane l on columns x0+2l and x0+2l+1 (the
// neighbours' columns it reads come from L1):
//   total = B*h * ceil(H/16)*ceil(W/64), item = (b*h + c) * strips + strip,
//   strip = strip_row * ceil(W/64) + strip_col.
//
// Channels-last layout (NHWC memory: element (b,k,y,x) at ((b*H+y)*W+x)*C + k,
// C = 2h for x and h for out), *_nhwc_*: a strip is 2 x 16 output pixels x 32
// output channels, lane l on channel c = 32*chunk + l (a warp's loads and
// stores are 32 consecutive channels of one pixel: coalesced; channels are
// scalars, as h is often odd and wider accesses would not be aligned):
//   total = B * ceil(H/16)*ceil(W/2) * ceil(h/32),
//   item = (b * strips + strip) * chunks + chunk (the chunks of one pixel
//   strip are neighbouring warps: they share cache lines of x). Lanes with
//   c >= h load and store nothing.
//
// Issue cost (sm_90a SASS, bf16, gdfn, in the loop): NCHW ~54 instructions an
// output in an inner strip, ~72 at the border; NHWC ~62 and ~79. The previous
// kernels staged each tile's halo in shared memory (NCHW ~121 an output, of
// which ~45 for the halo's loads and stores, bounds and decode; NHWC ~115) and
// computed erff (~26 for the GELU, now ~19). By this count the kernels are
// bound by instruction issue, not memory (not yet timed on a GPU).
//
// Accumulation order per output: bias first, then fmaf over dy (rows) then dx
// (columns), as the rows arrive - a different order from cuDNN's, so results
// match F.conv2d to fp32 rounding, not bit for bit.
//
// NVRTC-compatible (CuPy route): includes only common.cuh, no host headers.
#include "common.cuh"

namespace sipl {
namespace gdg {

// Geometry, mirrored by csrc/sipl_fast_ext.cpp (kGdg*) and
// sipl_fast/ops/_cuda.py (_GDG_*); tests/test_cuda_build.py checks they agree.
constexpr int kThreadsX = 32;   // blockDim.x: a warp
constexpr int kThreadsY = 8;    // blockDim.y: warps of a block, each on its own work items
constexpr int kNchwTileW = 64;  // NCHW: a warp's output columns per work item (2 a lane)
constexpr int kNchwTileH = 16;  // NCHW: a warp's output rows per work item
constexpr int kNhwcTileW = 2;   // NHWC: a warp's output columns per work item (all a lane's)
constexpr int kNhwcTileH = 16;  // NHWC: a warp's output rows per work item
constexpr int kNhwcChunk = 32;  // NHWC: a warp's output channels per work item (1 a lane)

constexpr int kNchwCols = kNchwTileW / kThreadsX;  // output columns per lane (2)
static_assert(kNhwcChunk == kThreadsX, "NHWC: one channel per lane");
static_assert(kThreadsX * kThreadsY == 256, "the entries below declare __launch_bounds__(256, 2)");

// The exact GELU v Phi(v), Phi(v) = erfc(-v / sqrt 2) / 2, with erfc(z), z = |v| / sqrt 2, as
// t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), P of degree 9 (Numerical Recipes' erfcc: relative
// error < 1.2e-7 for every z >= 0). Phi = 1 - erfc(z) / 2 where v >= 0, erfc(z) / 2 below: the
// negative tail keeps its relative accuracy, which 0.5 v (1 + erf(v / sqrt 2)) loses to
// cancellation (PyTorch's form). exp is 2^x with log2(e) folded into the constants (y^2 =
// z^2 log2 e), the 1/2 into P's constant term. Against fp64: relative error <= 5e-6 for |v| < 6
// (PyTorch's fp32 GELU: up to 1 in that tail), absolute <= 2.4e-7; on the GPU the MUFU
// reciprocal and 2^x add ~3e-7 relative. ~19 instructions where erff took ~26 (sm_90a SASS: a
// two-range polynomial whose constants held registers).
__device__ __forceinline__ float gelu(float v) {
  constexpr float kLog2e = 1.4426950408889634f;
  const float y = fabsf(v) * 0.84932180028801904f;  // |v| sqrt(log2(e) / 2) = z sqrt(log2 e)
  const float t = rcp_approx(fmaf(0.41627730557884888f, y, 1.0f));  // 1 / (1 + z / 2)
  float p = 0.17087277f * kLog2e;
  p = fmaf(p, t, -0.82215223f * kLog2e);
  p = fmaf(p, t, 1.48851587f * kLog2e);
  p = fmaf(p, t, -1.13520398f * kLog2e);
  p = fmaf(p, t, 0.27886807f * kLog2e);
  p = fmaf(p, t, -0.18628806f * kLog2e);
  p = fmaf(p, t, 0.09678418f * kLog2e);
  p = fmaf(p, t, 0.37409196f * kLog2e);
  p = fmaf(p, t, 1.00002368f * kLog2e);
  p = fmaf(p, t, -1.26551223f * kLog2e - 1.0f);  // 2^-1: the 1/2 of Phi
  const float e = t * exp2_approx(fmaf(-y, y, p));  // erfc(z) / 2
  return v >= 0.0f ? v - v * e : v * e;
}

// dual: a compile-time constant in the kernels (no branch on the mode per output).
__device__ __forceinline__ float gate(float y1, float y2, bool dual) {
  const float g = gelu(y1) * y2;
  return dual ? gelu(y2) * y1 + g : g;
}

// 0 <= v < n, for the index types I of the kernels below: unsigned (32-bit; a negative index
// has wrapped around past n) or i64 (a negative one passes n as unsigned).
__device__ __forceinline__ bool inside(unsigned v, unsigned n) { return v < n; }
__device__ __forceinline__ bool inside(i64 v, i64 n) {
  return (unsigned long long)v < (unsigned long long)n;
}

// The taps and biases of channels c and c+h (plain loads: weight is tiny and stays in L1);
// zeros where !valid (a lane past the last channel, which loads nothing).
template <typename I>
__device__ __forceinline__ void load_pair(const float* __restrict__ weight,
                                          const float* __restrict__ bias, I c, I h, bool valid,
                                          float (&w1)[9], float (&w2)[9], float& b1, float& b2) {
#pragma unroll
  for (int t = 0; t < 9; ++t) {
    w1[t] = valid ? weight[t * 2 * h + c] : 0.0f;  // tap-major (9, 2h)
    w2[t] = valid ? weight[t * 2 * h + c + h] : 0.0f;
  }
  b1 = valid && bias ? bias[c] : 0.0f;
  b2 = valid && bias ? bias[c + h] : 0.0f;
}

// A loaded element as it waits in a register: 16-bit storage zero-extended to 32 bits (a
// 16-bit variable costs a merge instruction per load and per copy), fp32 as it is.
template <typename T>
struct Raw {
  typedef u32 type;
};
template <>
struct Raw<float> {
  typedef float type;
};

// acc[k] += the taps of kernel row dy on input columns k .. k+2 (output column k).
template <int dy, int kCols>
__device__ __forceinline__ void add_taps(const float (&w)[9], const float (&a)[kCols + 2],
                                         float (&acc)[kCols]) {
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
#pragma unroll
    for (int dx = 0; dx < 3; ++dx) acc[k] = fmaf(w[dy * 3 + dx], a[k + dx], acc[k]);
  }
}

// A strip of kRows output rows x kCols output columns of one thread, for one output channel c
// (see the top of the file). The thread walks the input rows y0-1 .. y0+kRows top to bottom,
// reading the kCols+2 columns it needs of channels c and c+h, and adds each row's taps to the
// outputs it touches: row i completes output row i-1 (taps dy = 2), continues row i (dy = 1)
// and starts row i+1 (bias, dy = 0), so two partial rows (p, then s) stay in registers and
// every input element is loaded once a thread. Loads run ahead of the arithmetic: a ring of two
// raw rows, the loop unrolled twice, so four rows' loads can be in flight. Columns outside the
// image or channels past h (!ok[j]) are never loaded: their ring registers keep the zero they
// start with (a thread's columns are fixed for its strip); rows outside the image are zero rows
// (a warp-uniform branch); outputs where !ok are not stored. kEdge: some of that can happen;
// else (a strip whose halo lies inside the image) nothing is checked.
template <typename S, typename I, int kCols, int kRows, bool kDual, bool kEdge>
struct Strip {
  typedef typename S::T T;
  float w1[9], w2[9];
  const float b1, b2;
  const I y0, H, col, row, ocol, orow;  // strides: input column and row, output column and row
  bool ok[kCols + 2];
  typename Raw<T>::type r1[2][kCols + 2] = {}, r2[2][kCols + 2] = {};
  const T* q1;  // the next input row to load, at the thread's first input column, channel c
  const T* q2;  // ... channel c + h
  T* o;         // the next output row, at the thread's first output column
  float a1[kCols + 2], a2[kCols + 2], p1[kCols], p2[kCols], s1[kCols], s2[kCols];

  // x0c: input column x0-1 of row 0 (x0: the first output column), channel c; to_x2: channel c
  // to c+h; oc: output column x0 of row 0.
  __device__ __forceinline__ Strip(const T* __restrict__ x0c, I to_x2, I col_, I row_,
                                   T* __restrict__ oc, I ocol_, I orow_, I y0_, I H_,
                                   const bool (&ok_)[kCols + 2], const float (&w1_)[9],
                                   const float (&w2_)[9], float b1_, float b2_)
      : b1(b1_), b2(b2_), y0(y0_), H(H_), col(col_), row(row_), ocol(ocol_), orow(orow_) {
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      w1[t] = w1_[t];
      w2[t] = w2_[t];
    }
#pragma unroll
    for (int j = 0; j < kCols + 2; ++j) ok[j] = !kEdge || ok_[j];
    q1 = x0c + y0 * row;
    q1 -= row;  // input row y0-1 (not read where y0 = 0)
    q2 = q1 + to_x2;
    o = oc + y0 * orow;
  }

  __device__ __forceinline__ void run() {
    next_row<0>(y0 > 0);
    next_row<1>(true);
    convert<0>();  // input row y0-1 starts output row y0
    next_row<0>(y0 + 1 < H);
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      p1[k] = s1[k] = b1;
      p2[k] = s2[k] = b2;
    }
    add_taps<0>(w1, a1, p1);
    add_taps<0>(w2, a2, p2);
    convert<1>();  // input row y0 continues output row y0, starts y0+1
    next_row<1>(y0 + 2 < H);
    add_taps<1>(w1, a1, p1);
    add_taps<1>(w2, a2, p2);
    add_taps<0>(w1, a1, s1);
    add_taps<0>(w2, a2, s2);

    // Output rows: pairs with both slots prefetching (rows y0+k+3, y0+k+4: the strip needs
    // them, but for the last pair of an odd count), then the last one or two without; a strip
    // inside the image has kRows rows, so the loop's trip count and the tail are fixed.
    const I rows = kEdge && H - y0 < kRows ? H - y0 : (I)kRows;
    I k = 0;
#pragma unroll 2
    for (; k + 2 < rows; k += 2) {
      step<0>(k, true);
      step<1>(k + 1, true);
    }
    step<0>(k, false);
    if (k + 1 < rows) step<1>(k + 1, false);
  }

  template <int u>  // the next input row into ring slot u (zeros where !row_ok)
  __device__ __forceinline__ void next_row(bool row_ok) {
    if (!kEdge || row_ok) {
#pragma unroll
      for (int j = 0; j < kCols + 2; ++j) {
        if (ok[j]) {
          r1[u][j] = q1[j * col];
          r2[u][j] = q2[j * col];
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kCols + 2; ++j) r1[u][j] = r2[u][j] = 0;
    }
    q1 += row;
    q2 += row;
  }

  template <int u>
  __device__ __forceinline__ void convert() {
#pragma unroll
    for (int j = 0; j < kCols + 2; ++j) {
      a1[j] = S::load((T)r1[u][j]);
      a2[j] = S::load((T)r2[u][j]);
    }
  }

  // Output row y0+k: input row y0+k+1 (slot u) completes it, continues y0+k+1, starts y0+k+2;
  // with `prefetch`, the slot then loads row y0+k+3.
  template <int u>
  __device__ __forceinline__ void step(I k, bool prefetch) {
    convert<u>();
    if (prefetch) next_row<u>(y0 + k + 3 < H);
    add_taps<2>(w1, a1, p1);
    add_taps<2>(w2, a2, p2);
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      if (ok[j + 1]) o[j * ocol] = S::store(gate(p1[j], p2[j], kDual));
      p1[j] = s1[j];
      p2[j] = s2[j];
      s1[j] = b1;
      s2[j] = b2;
    }
    o += orow;
    add_taps<1>(w1, a1, p1);
    add_taps<1>(w2, a2, p2);
    add_taps<0>(w1, a1, s1);
    add_taps<0>(w2, a2, s2);
  }
};

// Runs a thread's strip, with the bounds checks where the warp-uniform `edge` says (the
// arguments are Strip's).
template <typename S, typename I, int kCols, int kRows, bool kDual>
__device__ __forceinline__ void run_strip(bool edge, const typename S::T* __restrict__ x0c,
                                          I to_x2, I col, I row, typename S::T* __restrict__ oc,
                                          I ocol, I orow, I y0, I H, const bool (&ok)[kCols + 2],
                                          const float (&w1)[9], const float (&w2)[9], float b1,
                                          float b2) {
  if (edge)
    Strip<S, I, kCols, kRows, kDual, true>(x0c, to_x2, col, row, oc, ocol, orow, y0, H, ok, w1, w2,
                                           b1, b2).run();
  else
    Strip<S, I, kCols, kRows, kDual, false>(x0c, to_x2, col, row, oc, ocol, orow, y0, H, ok, w1,
                                            w2, b1, b2).run();
}

// ---------------------------------------------------------------- NCHW
template <typename S, typename I, bool kDual>
__device__ __forceinline__ void fwd_nchw(const typename S::T* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ bias,
                                         typename S::T* __restrict__ out, I B, I h, I H, I W) {
  const I strips_x = (W + kNchwTileW - 1) / kNchwTileW;
  const I strips = strips_x * ((H + kNchwTileH - 1) / kNchwTileH);
  const I total = B * h * strips;
  const I hw = H * W;

  for (I work = (I)blockIdx.x * kThreadsY + threadIdx.y; work < total;
       work += (I)gridDim.x * kThreadsY) {
    const I plane = work / strips;  // b*h + c
    const I strip = work - plane * strips;
    const I b = plane / h;
    const I c = plane - b * h;
    const I strip_row = strip / strips_x;
    const I y0 = strip_row * kNchwTileH;                        // first output row
    const I x0 = (strip - strip_row * strips_x) * kNchwTileW;   // first output column
    const I xl = x0 + kNchwCols * threadIdx.x;                  // the lane's first column
    bool ok[kNchwCols + 2];  // the lane's input columns xl-1 .. xl+2 inside the image
#pragma unroll
    for (int j = 0; j < kNchwCols + 2; ++j) ok[j] = inside(xl + j - 1, W);  // unsigned -1 wraps
    const typename S::T* x0c = x + ((plane + b * h) * hw + xl);  // channel c of image b
    typename S::T* oc = out + (plane * hw + xl);                 // output plane (b, c)
    float w1[9], w2[9], b1, b2;
    load_pair(weight, bias, c, h, true, w1, w2, b1, b2);
    run_strip<S, I, kNchwCols, kNchwTileH, kDual>(
        x0 == 0 || x0 + kNchwTileW >= W || y0 == 0 || y0 + kNchwTileH >= H, x0c - 1, h * hw, 1, W,
        oc, 1, W, y0, H, ok, w1, w2, b1, b2);
  }
}

// ---------------------------------------------------------------- NHWC
template <typename S, typename I, bool kDual>
__device__ __forceinline__ void fwd_nhwc(const typename S::T* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ bias,
                                         typename S::T* __restrict__ out, I B, I h, I H, I W) {
  const I c2 = 2 * h;  // channels of x
  const I chunks = (h + kNhwcChunk - 1) / kNhwcChunk;
  const I strips_x = (W + kNhwcTileW - 1) / kNhwcTileW;
  const I strips = strips_x * ((H + kNhwcTileH - 1) / kNhwcTileH);
  const I total = B * strips * chunks;

  for (I work = (I)blockIdx.x * kThreadsY + threadIdx.y; work < total;
       work += (I)gridDim.x * kThreadsY) {
    const I rest = work / chunks;
    const I chunk = work - rest * chunks;
    const I b = rest / strips;
    const I strip = rest - b * strips;
    const I strip_row = strip / strips_x;
    const I y0 = strip_row * kNhwcTileH;                       // first output row
    const I x0 = (strip - strip_row * strips_x) * kNhwcTileW;  // first output column
    const I c = chunk * kNhwcChunk + threadIdx.x;              // the lane's output channel
    const bool cvalid = c < h;
    bool ok[kNhwcTileW + 2];  // input columns x0-1 .. x0+TW inside the image, and c < h
#pragma unroll
    for (int j = 0; j < kNhwcTileW + 2; ++j) ok[j] = cvalid && inside(x0 + j - 1, W);
    float w1[9], w2[9], b1, b2;
    load_pair(weight, bias, c, h, cvalid, w1, w2, b1, b2);
    const I pixel = b * H * W + x0;                             // pixel (b, 0, x0)
    const typename S::T* x0c = x + (pixel * c2 + c);           // its channel c
    run_strip<S, I, kNhwcTileW, kNhwcTileH, kDual>(
        x0 == 0 || x0 + kNhwcTileW >= W || y0 == 0 || y0 + kNhwcTileH >= H ||
            chunk * kNhwcChunk + kNhwcChunk > h,
        x0c - c2, h, c2, W * c2, out + (pixel * h + c), h, W * h, y0, H, ok, w1, w2, b1, b2);
  }
}

// One layout and index type, the mode a template argument (no branch on it per output).
template <typename S, bool kNchw, typename I>
__device__ __forceinline__ void fwd(const typename S::T* __restrict__ x,
                                    const float* __restrict__ weight,
                                    const float* __restrict__ bias, typename S::T* __restrict__ out,
                                    I B, I h, I H, I W, int dual) {
  if (kNchw && dual) fwd_nchw<S, I, true>(x, weight, bias, out, B, h, H, W);
  else if (kNchw) fwd_nchw<S, I, false>(x, weight, bias, out, B, h, H, W);
  else if (dual) fwd_nhwc<S, I, true>(x, weight, bias, out, B, h, H, W);
  else fwd_nhwc<S, I, false>(x, weight, bias, out, B, h, H, W);
}

}  // namespace gdg
}  // namespace sipl

// Unmangled entry points (looked up by name from CuPy, by host-stub address
// from csrc/sipl_fast_ext.cpp), one per layout x storage dtype; f16/bf16 as
// raw 16-bit storage. Parameters: x, weight (fp32, (9, 2h)), bias (fp32, 2h, or
// null), out, B, h (output channels; x has 2h), H, W, dual (0: gdfn, else dual).
// Launch with blockDim (32, 8) and any 1-D grid. __launch_bounds__(256, 2): at
// most 128 registers, 2 blocks an SM (the strip loop, unrolled twice, keeps
// four input rows' loads in flight; at 80 registers it copied and spilled
// them). ptxas for sm_90a (benchmarks/results/cuda_sass.md): up to 28 bytes
// spilled per entry, outside the row loops (per strip or per thread).
//
// Where x has fewer than 2^31 elements (every image but the largest), the work decode and the
// offsets run in 32-bit unsigned arithmetic (index type I = unsigned): in 64 bits, the
// divisions of the decode are calls of a ~200-instruction routine and every address and bound
// takes 64-bit operations, which cost issue slots (sm_90a SASS). (The host build of the tests
// sets the limit to 0 as well, to run the 64-bit path.)
#ifndef SIPL_GDG_NARROW_LIMIT
#define SIPL_GDG_NARROW_LIMIT (1LL << 31)
#endif
#define SIPL_GDG_ENTRY(LAYOUT, SUFFIX, TRAITS, T, NCHW)                                      \
  extern "C" __global__ void __launch_bounds__(256, 2)                                       \
      gated_dwconv_gelu_##LAYOUT##_##SUFFIX(const T* __restrict__ x,                         \
                                            const float* __restrict__ weight,                \
                                            const float* __restrict__ bias,                  \
                                            T* __restrict__ out, i64 B, i64 h, i64 H, i64 W,  \
                                            int dual) {                                      \
    if (B * 2 * h * H * W < SIPL_GDG_NARROW_LIMIT)                                           \
      sipl::gdg::fwd<sipl::TRAITS, NCHW, unsigned>(x, weight, bias, out, (unsigned)B,        \
                                                   (unsigned)h, (unsigned)H, (unsigned)W,    \
                                                   dual);                                    \
    else                                                                                     \
      sipl::gdg::fwd<sipl::TRAITS, NCHW, i64>(x, weight, bias, out, B, h, H, W, dual);       \
  }

SIPL_GDG_ENTRY(nchw, f32, F32, float, true)
SIPL_GDG_ENTRY(nchw, f16, F16, u16, true)
SIPL_GDG_ENTRY(nchw, bf16, BF16, u16, true)
SIPL_GDG_ENTRY(nhwc, f32, F32, float, false)
SIPL_GDG_ENTRY(nhwc, f16, F16, u16, false)
SIPL_GDG_ENTRY(nhwc, bf16, BF16, u16, false)

#undef SIPL_GDG_ENTRY
