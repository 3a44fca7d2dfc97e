// gated_dwconv_gelu.cu - depthwise 3x3 conv + GELU gate of the GDFN, fused, forward.
//
// Semantics (fp32 math for every storage dtype f32/f16/bf16):
//   y = F.conv2d(x, weight, bias, padding=1, groups=2h)    x: (B, 2h, H, W)
//   y1 = y[:, :h], y2 = y[:, h:]                           weight: (2h, 1, 3, 3)
//   gdfn (dual == 0): out = gelu(y1) * y2                  bias: (2h,) or none
//   dual (dual != 0): out = gelu(y2) * y1 + gelu(y1) * y2  out: (B, h, H, W)
// with the exact (erf) GELU v Phi(v) (see gelu below). The conv is a
// cross-correlation with zero padding:
//   y[b,k,i,j] = bias[k] + sum_{dy,dx in 0..2} weight[k*9 + dy*3 + dx] * x[b,k,i+dy-1,j+dx-1]
// (x outside the image = 0). The 2h-channel y never reaches global memory:
// each output needs only the 3x3 neighbourhoods of input channels c and c+h,
// so one kernel reads x and writes out. weight is passed as fp32 (2h*9,
// contiguous), bias as fp32 (2h,) or a null pointer.
//
// Every entry is launched with blockDim = (32, 8) (256 threads; required by
// the thread mappings below) and a 1-D grid of any size >= 1: blocks (NCHW:
// warps) loop over work items with a grid stride, so there is no gridDim.y/z
// limit on B*h and the launcher may cap the grid. Work decode and offsets are
// 32-bit unsigned where x has fewer than 2^31 elements, else 64-bit (see the
// entries); H and W must be < 2^31 (the launchers check).
//
// NCHW layout (x, out contiguous), *_nchw_*: a work item is a warp's: a strip
// of TW x TH = 64 x 16 output pixels of one output plane (b, c), the 8 warps of
// a block on 8 consecutive items (no shared memory, no barrier):
//   total = B*h * ceil(H/16)*ceil(W/64), item = (b*h + c) * strips + strip,
//   strip = strip_row * ceil(W/64) + strip_col; warp ty of block k takes items
//   8k + ty, 8k + ty + 8*gridDim.x, ...
//   Lane l computes output columns x0+2l and x0+2l+1 of every row of the strip.
//   It walks the strip's input rows y0-1 .. y0+16 top to bottom, reading from
//   each row of channels c and c+h the four columns x0+2l-1 .. x0+2l+2 (plain
//   loads: the neighbours' columns come from L1), and adds the row's three taps
//   to the outputs it touches: row i completes output row i-1 (taps dy = 2),
//   continues row i (dy = 1) and starts row i+1 (bias, dy = 0), so two partial
//   rows stay in registers and each input element is loaded once a lane. Loads
//   run ahead of the arithmetic (a ring of two raw rows; the loop, unrolled
//   twice, lets the compiler issue four rows' loads together), keeping memory
//   busy without a shared-memory stage. Columns outside the image are never
//   loaded: their ring registers keep the zero they start with (a lane's
//   columns are fixed for the strip); rows outside it are zero rows (a
//   warp-uniform branch); outputs outside it are not stored. Strips whose halo
//   lies inside the image skip all of these checks.
//   Issue cost (sm_90a SASS, bf16, gdfn): ~54 instructions an output in the
//   loop of an inner strip, ~72 at the border, against ~121 for the previous
//   kernel, which staged a 30 x 64 tile's halo in shared memory (its halo
//   loads and stores, bounds and decode took ~45 of them) and computed erff
//   (~26 for the GELU, now ~19). By this count the kernel is bound by
//   instruction issue, not memory (not yet timed on a GPU).
//   Every output is accumulated in the order bias, dy = 0, 1, 2, dx = 0, 1, 2.

// Channels-last layout (NHWC memory: element (b,k,y,x) at ((b*H+y)*W+x)*C + k,
// C = 2h for x and h for out), *_nhwc_*: a work item is an 8 x 8 pixel tile x
// a chunk of 32 output channels:
//   total = B * ceil(H/8)*ceil(W/8) * ceil(h/32),
//   w = (b * tiles + tile) * chunks + chunk (the chunks of one pixel tile are
//   adjacent blocks: they share cache lines of x).
//   threadIdx.x = channel lane (channel c = 32*chunk + tx), threadIdx.y = pixel
//   row. 1. The 10 x 10 pixel halo of channels c and c+h is loaded into shared
//   memory s[2][100][32] (fp32, 25.6 KB): warp ty loads halo pixels ty, ty+8,
//   ...; each load is 32 consecutive channels of one pixel (coalesced; 128 B
//   for fp32, 64 B for 16-bit types); a thread's 26 loads go to registers
//   first, so that they are in flight together. 2. Thread (tx, ty) computes
//   output row ty of the tile, 8 pixels left to right with a sliding 3 x 3 register
//   window per channel (3 new smem reads per channel per pixel; a warp reads
//   32 consecutive floats: conflict-free), and a warp stores 32 consecutive
//   channels of one pixel (coalesced). Lanes with c >= h (h not a multiple of
//   32) load nothing and store nothing but still take part in __syncthreads.
//   Channels are one per thread and accessed as scalars: h is often odd
//   (e.g. 127), so wider vector accesses of x and out would not be aligned.
//   The 9 taps of a lane's channels are read straight from global memory
//   (36-byte stride across lanes; 2h*9 floats in total, L1/L2 resident).
//
// Accumulation order per output: bias first, then fmaf over dy (rows) then dx
// (columns) - a different order from cuDNN's, so results match F.conv2d to
// fp32 rounding, not bit for bit.
//
// NVRTC-compatible (CuPy route): includes only common.cuh, no host headers.
#include "common.cuh"

namespace sipl {
namespace gdg {

// Geometry, mirrored by csrc/sipl_fast_ext.cpp (kGdg*) and
// sipl_fast/ops/_cuda.py (_GDG_*); tests/test_cuda_build.py checks they agree.
constexpr int kThreadsX = 32;  // blockDim.x
constexpr int kThreadsY = 8;   // blockDim.y
constexpr int kNchwTileW = 64;  // NCHW: a warp's output columns per work item (2 a lane)
constexpr int kNchwTileH = 16;  // NCHW: a warp's output rows per work item
constexpr int kNhwcTileW = 8;   // NHWC: output pixels per tile along W
constexpr int kNhwcTileH = 8;   // NHWC: output rows per tile (= kThreadsY)
constexpr int kNhwcChunk = 32;  // NHWC: output channels per tile (= kThreadsX)

constexpr int kNchwCols = kNchwTileW / kThreadsX;  // output columns per lane (2)
constexpr int kNhwcHaloW = kNhwcTileW + 2;         // 10
constexpr int kNhwcHaloH = kNhwcTileH + 2;         // 10
constexpr int kNhwcHaloPix = kNhwcHaloW * kNhwcHaloH;  // 100
constexpr int kThreads = kThreadsX * kThreadsY;

static_assert(kNchwCols == 2, "NCHW: two output columns a lane (the row loads below)");
static_assert(kNhwcTileH == kThreadsY, "NHWC: one output row per warp");
static_assert(kNhwcChunk == kThreadsX, "NHWC: one channel per lane");
static_assert(kThreads == 256, "the entries below declare __launch_bounds__(256, 4)");

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

// dual: a constant where the caller has one (NCHW), else a branch per output (NHWC).
__device__ __forceinline__ float gate(float y1, float y2, bool dual) {
  const float g = gelu(y1) * y2;
  return dual ? gelu(y2) * y1 + g : g;
}


// bias + sum_{dy,dx} w[dy*3+dx] * a[dy][dx]
__device__ __forceinline__ float conv3x3(const float (&w)[9], float bias, float a00, float a01,
                                         float a02, float a10, float a11, float a12, float a20,
                                         float a21, float a22) {
  float acc = bias;
  acc = fmaf(w[0], a00, acc);
  acc = fmaf(w[1], a01, acc);
  acc = fmaf(w[2], a02, acc);
  acc = fmaf(w[3], a10, acc);
  acc = fmaf(w[4], a11, acc);
  acc = fmaf(w[5], a12, acc);
  acc = fmaf(w[6], a20, acc);
  acc = fmaf(w[7], a21, acc);
  acc = fmaf(w[8], a22, acc);
  return acc;
}

// 0 <= v < n, for the index types I of the kernels below: unsigned (32-bit; a negative index
// has wrapped around past n) or i64 (a negative one passes n as unsigned).
__device__ __forceinline__ bool inside(unsigned v, unsigned n) { return v < n; }
__device__ __forceinline__ bool inside(i64 v, i64 n) {
  return (unsigned long long)v < (unsigned long long)n;
}

// Loads the 9 taps of channel k (plain loads: weight is tiny and stays in L1).
template <typename I>
__device__ __forceinline__ void load_taps(const float* __restrict__ weight, I k, float (&w)[9]) {
  const float* p = weight + k * 9;
#pragma unroll
  for (int t = 0; t < 9; ++t) w[t] = p[t];
}

// The halo of one work item into shared memory: halo element i = first + k * step (k < kLoads,
// i < count) is halo row i / kHaloW, column i % kHaloW, image pixel (y0 - 1 + row, x0 - 1 +
// column), of the two input channels at x1 and x2 (element offset(y, x)); zero outside the
// image or where !valid. All 2 * kLoads loads go to registers before the first
// store(i, v1, v2), so that they are in flight together: the kernel waits on memory latency.
template <typename S, int kLoads, int kHaloW, typename I, typename Offset, typename Store>
__device__ __forceinline__ void load_halo(const typename S::T* __restrict__ x1,
                                          const typename S::T* __restrict__ x2, int first,
                                          int step, int count, bool valid, I y0, I x0, I H, I W,
                                          Offset offset, Store store) {
  typename S::T v1[kLoads], v2[kLoads];
#pragma unroll
  for (int k = 0; k < kLoads; ++k) {
    const int i = first + k * step;
    const int r = i / kHaloW;
    const I gy = y0 - 1 + r;  // unsigned I: -1 wraps past H (or W), so inside() is false
    const I gx = x0 - 1 + (i - r * kHaloW);
    v1[k] = v2[k] = typename S::T{};  // +0 in every storage type
    if (valid && i < count && inside(gy, H) && inside(gx, W)) {
      const I o = offset(gy, gx);
      v1[k] = x1[o];
      v2[k] = x2[o];
    }
  }
#pragma unroll
  for (int k = 0; k < kLoads; ++k) {
    const int i = first + k * step;
    if (i < count) store(i, S::load(v1[k]), S::load(v2[k]));
  }
}

// ---------------------------------------------------------------- NCHW
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

// One input row of channels c and c+h at a lane's columns xl-1 .. xl+2 (q1, q2: column xl of
// the row) into v1, v2. Columns outside the image (!ok[j]) are not loaded: they keep the zero
// the ring starts with (a lane's columns are fixed for its strip); a row outside the image
// (!row_ok, warp-uniform) is zeros.
template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ q1, const T* __restrict__ q2,
                                         bool row_ok, const bool (&ok)[4],
                                         typename Raw<T>::type (&v1)[4],
                                         typename Raw<T>::type (&v2)[4]) {
  if (row_ok) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (ok[j]) {
        v1[j] = q1[j - 1];
        v2[j] = q2[j - 1];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v1[j] = v2[j] = 0;
  }
}

template <typename S>
__device__ __forceinline__ void to_f32(const typename Raw<typename S::T>::type (&v)[4],
                                       float (&a)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j] = S::load((typename S::T)v[j]);
}

// acc[k] += the taps of kernel row dy on the lane's input columns k .. k+2 (output column k).
template <int dy>
__device__ __forceinline__ void add_taps(const float (&w)[9], const float (&a)[4], float (&acc)[2]) {
#pragma unroll
  for (int k = 0; k < 2; ++k) {
#pragma unroll
    for (int dx = 0; dx < 3; ++dx) acc[k] = fmaf(w[dy * 3 + dx], a[k + dx], acc[k]);
  }
}

// A warp's strip (see the top of the file): output rows y0 .. y0+TH-1 of one plane, the lane's
// columns xl and xl+1. kEdge: the strip or its halo meets the image's border, so columns, rows
// and stores are checked; else all are inside and nothing is (70% of the strips of a 512 x 512
// plane). State: the ring of two raw input rows (loads run two rows ahead of the arithmetic)
// with the pointers of the next row to load, the converted row a, and two partial output rows:
// p completes with the next input row, s with the one after.
template <typename S, typename I, bool kDual, bool kEdge>
struct NchwStrip {
  typedef typename S::T T;
  float w1[9], w2[9];
  const float b1, b2;
  const I y0, H, W;
  bool ok[4];  // the lane's input columns xl-1 .. xl+2 inside the image
  typename Raw<T>::type r1[2][4] = {}, r2[2][4] = {};
  const T* q1;
  const T* q2;
  T* o;
  float a1[4], a2[4], p1[2], p2[2], s1[2], s2[2];

  // xc, oc: column xl of row 0 of input channel c and of the output plane; to_x2: input
  // channel c to c+h. Runs the strip.
  __device__ __forceinline__ NchwStrip(const T* __restrict__ xc, I to_x2, T* __restrict__ oc,
                                       I y0_, I xl, I H_, I W_, const float (&w1_)[9],
                                       const float (&w2_)[9], float b1_, float b2_)
      : b1(b1_), b2(b2_), y0(y0_), H(H_), W(W_) {
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      w1[t] = w1_[t];
      w2[t] = w2_[t];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) ok[j] = !kEdge || inside(xl + j - 1, W);  // unsigned -1 wraps
    q1 = xc + y0 * W;
    q1 -= W;  // input row y0-1 (not read where y0 = 0)
    q2 = q1 + to_x2;
    o = oc + y0 * W;
    next_row<0>(y0 > 0);
    next_row<1>(true);
    convert<0>();  // input row y0-1 starts output row y0
    next_row<0>(y0 + 1 < H);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      p1[j] = s1[j] = b1;
      p2[j] = s2[j] = b2;
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
    // inside the image has TH rows, so the loop's trip count and the tail are fixed.
    const I rows = kEdge && H - y0 < kNchwTileH ? H - y0 : (I)kNchwTileH;
    I k = 0;
#pragma unroll 2
    for (; k + 2 < rows; k += 2) {
      step<0>(k, true);
      step<1>(k + 1, true);
    }
    step<0>(k, false);
    if (k + 1 < rows) step<1>(k + 1, false);
  }

  template <int u>  // the next input row into ring slot u
  __device__ __forceinline__ void next_row(bool row_ok) {
    load_row(q1, q2, !kEdge || row_ok, ok, r1[u], r2[u]);
    q1 += W;
    q2 += W;
  }

  template <int u>
  __device__ __forceinline__ void convert() {
    to_f32<S>(r1[u], a1);
    to_f32<S>(r2[u], a2);
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
    for (int j = 0; j < 2; ++j) {
      if (ok[j + 1]) o[j] = S::store(gate(p1[j], p2[j], kDual));
      p1[j] = s1[j];
      p2[j] = s2[j];
      s1[j] = b1;
      s2[j] = b2;
    }
    o += W;
    add_taps<1>(w1, a1, p1);
    add_taps<1>(w2, a2, p2);
    add_taps<0>(w1, a1, s1);
    add_taps<0>(w2, a2, s2);
  }
};

template <typename S, typename I, bool kDual>
__device__ __forceinline__ void fwd_nchw(const typename S::T* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ bias,
                                         typename S::T* __restrict__ out, I B, I h, I H, I W) {
  const I strips_x = (W + kNchwTileW - 1) / kNchwTileW;
  const I strips = strips_x * ((H + kNchwTileH - 1) / kNchwTileH);
  const I total = B * h * strips;
  const I hw = H * W;
  const I to_x2 = h * hw;  // input channel c to c + h

  for (I work = (I)blockIdx.x * kThreadsY + threadIdx.y; work < total;
       work += (I)gridDim.x * kThreadsY) {
    const I plane = work / strips;  // b*h + c
    const I strip = work - plane * strips;
    const I b = plane / h;
    const I c = plane - b * h;
    const I strip_row = strip / strips_x;
    const I y0 = strip_row * kNchwTileH;                         // first output row
    const I x0 = (strip - strip_row * strips_x) * kNchwTileW;    // first output column
    const I xl = x0 + kNchwCols * threadIdx.x;                   // the lane's first column
    const typename S::T* xc = x + ((plane + b * h) * hw + xl);  // input channel c of image b
    typename S::T* oc = out + (plane * hw + xl);                 // output plane (b, c)
    float w1[9], w2[9];
    load_taps(weight, c, w1);
    load_taps(weight, c + h, w2);
    const float b1 = bias ? bias[c] : 0.0f;
    const float b2 = bias ? bias[c + h] : 0.0f;
    if (x0 == 0 || x0 + kNchwTileW >= W || y0 == 0 || y0 + kNchwTileH >= H)
      NchwStrip<S, I, kDual, true>(xc, to_x2, oc, y0, xl, H, W, w1, w2, b1, b2);
    else
      NchwStrip<S, I, kDual, false>(xc, to_x2, oc, y0, xl, H, W, w1, w2, b1, b2);
  }
}

// ---------------------------------------------------------------- NHWC
__shared__ float nhwc_halo[2][kNhwcHaloPix][kNhwcChunk];  // namespace scope: one array a kernel

template <typename S, typename I>
__device__ __forceinline__ void fwd_nhwc(const typename S::T* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ bias,
                                         typename S::T* __restrict__ out, I B, I h, I H, I W,
                                         int dual) {
  float (&s)[2][kNhwcHaloPix][kNhwcChunk] = nhwc_halo;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const I c2 = 2 * h;  // channels of x
  const I chunks = (h + kNhwcChunk - 1) / kNhwcChunk;
  const I tiles_x = (W + kNhwcTileW - 1) / kNhwcTileW;
  const I tiles = tiles_x * ((H + kNhwcTileH - 1) / kNhwcTileH);
  const I total = B * tiles * chunks;

  for (I work = blockIdx.x; work < total; work += gridDim.x) {
    const I rest = work / chunks;
    const I chunk = work - rest * chunks;
    const I b = rest / tiles;
    const I tile = rest - b * tiles;
    const I tile_row = tile / tiles_x;
    const I y0 = tile_row * kNhwcTileH;
    const I x0 = (tile - tile_row * tiles_x) * kNhwcTileW;
    const I c = chunk * kNhwcChunk + tx;  // this lane's output channel
    const bool cvalid = c < h;

    // 1. halo pixels (rows y0-1 .. y0+TH, columns x0-1 .. x0+TW), channels c and c+h: 13
    //    loads per channel (loaded and stored one pair at a time, they waited for memory 13 times).
    load_halo<S, (kNhwcHaloPix + kThreadsY - 1) / kThreadsY, kNhwcHaloW>(
        x, x + h, ty, kThreadsY, kNhwcHaloPix, cvalid, y0, x0, H, W,
        [&](I gy, I gx) { return ((b * H + gy) * W + gx) * c2 + c; },
        [&](int p, float v1, float v2) {
          s[0][p][tx] = v1;
          s[1][p][tx] = v2;
        });
    float w1[9], w2[9];
    float b1 = 0.0f, b2 = 0.0f;
    if (cvalid) {
      load_taps(weight, c, w1);
      load_taps(weight, c + h, w2);
      if (bias) {
        b1 = bias[c];
        b2 = bias[c + h];
      }
    } else {
#pragma unroll
      for (int t = 0; t < 9; ++t) w1[t] = w2[t] = 0.0f;
    }
    __syncthreads();

    // 2. output row ty of the tile, pixels 0..TW-1, sliding 3x3 window over halo
    //    rows ty..ty+2; window column k holds halo column j+k.
    const I oy = y0 + ty;
    const float* s1 = &s[0][ty * kNhwcHaloW][tx];  // halo (row ty, col 0) of channel c
    const float* s2 = &s[1][ty * kNhwcHaloW][tx];  // ... of channel c+h
    constexpr int RS = kNhwcHaloW * kNhwcChunk;    // halo row stride in s (floats)
    constexpr int CS = kNhwcChunk;                 // halo column stride in s
    float a1[3][3], a2[3][3];
#pragma unroll
    for (int dy = 0; dy < 3; ++dy) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        a1[dy][k] = s1[dy * RS + k * CS];
        a2[dy][k] = s2[dy * RS + k * CS];
      }
    }
    const bool row_ok = cvalid && oy < H;
    const I obase = ((b * H + oy) * W + x0) * h + c;  // out: pixel (oy, x0), channel c
#pragma unroll
    for (int j = 0; j < kNhwcTileW; ++j) {
#pragma unroll
      for (int dy = 0; dy < 3; ++dy) {
        a1[dy][2] = s1[dy * RS + (j + 2) * CS];
        a2[dy][2] = s2[dy * RS + (j + 2) * CS];
      }
      if (row_ok && x0 + j < W) {
        const float y1 = conv3x3(w1, b1, a1[0][0], a1[0][1], a1[0][2], a1[1][0], a1[1][1],
                                 a1[1][2], a1[2][0], a1[2][1], a1[2][2]);
        const float y2 = conv3x3(w2, b2, a2[0][0], a2[0][1], a2[0][2], a2[1][0], a2[1][1],
                                 a2[1][2], a2[2][0], a2[2][1], a2[2][2]);
        out[obase + (I)j * h] = S::store(gate(y1, y2, dual));
      }
#pragma unroll
      for (int dy = 0; dy < 3; ++dy) {
        a1[dy][0] = a1[dy][1];
        a1[dy][1] = a1[dy][2];
        a2[dy][0] = a2[dy][1];
        a2[dy][1] = a2[dy][2];
      }
    }
    __syncthreads();  // the next work item overwrites s
  }
}

// One layout and index type. NCHW takes the mode as a template argument (no branch on it per
// output; its 128 registers hold either); NHWC branches per output, as both modes inlined in
// one entry would not fit its 64 registers (spills in the 64-bit path).
template <typename S, bool kNchw, typename I>
__device__ __forceinline__ void fwd(const typename S::T* __restrict__ x,
                                    const float* __restrict__ weight,
                                    const float* __restrict__ bias, typename S::T* __restrict__ out,
                                    I B, I h, I H, I W, int dual) {
  if (!kNchw) fwd_nhwc<S, I>(x, weight, bias, out, B, h, H, W, dual);
  else if (dual) fwd_nchw<S, I, true>(x, weight, bias, out, B, h, H, W);
  else fwd_nchw<S, I, false>(x, weight, bias, out, B, h, H, W);
}

}  // namespace gdg
}  // namespace sipl

// Unmangled entry points (looked up by name from CuPy, by host-stub address
// from csrc/sipl_fast_ext.cpp), one per layout x storage dtype; f16/bf16 as
// raw 16-bit storage. Parameters: x, weight (fp32, 2h*9), bias (fp32, 2h, or
// null), out, B, h (output channels; x has 2h), H, W, dual (0: gdfn, else dual).
// Launch with blockDim (32, 8) and any 1-D grid. __launch_bounds__: NCHW at
// most 128 registers (2 blocks an SM: its strip loop, unrolled twice, keeps
// four input rows' loads in flight; at 80 registers it copied and spilled
// them), NHWC 64 (4 blocks). ptxas for sm_90a (benchmarks/results/cuda_sass.md):
// no spills on the 32-bit path; the 64-bit one (inputs of 2^31 elements or
// more), inlined beside it, spills 8 to 24 bytes in four entries, reloaded
// once a work item.
//
// Where x has fewer than 2^31 elements (every image but the largest), the work decode and the
// offsets run in 32-bit unsigned arithmetic (index type I = unsigned): in 64 bits, the
// divisions of the decode are calls of a ~200-instruction routine and every address and bound
// takes 64-bit operations, which cost issue slots (sm_90a SASS): the kernels are bound by
// instruction issue. (The host build of the tests sets the limit to 0 as well, to run the
// 64-bit path.)
#ifndef SIPL_GDG_NARROW_LIMIT
#define SIPL_GDG_NARROW_LIMIT (1LL << 31)
#endif
#define SIPL_GDG_ENTRY(LAYOUT, SUFFIX, TRAITS, T, NCHW, MIN_BLOCKS)                          \
  extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                              \
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

SIPL_GDG_ENTRY(nchw, f32, F32, float, true, 2)
SIPL_GDG_ENTRY(nchw, f16, F16, u16, true, 2)
SIPL_GDG_ENTRY(nchw, bf16, BF16, u16, true, 2)
SIPL_GDG_ENTRY(nhwc, f32, F32, float, false, 4)
SIPL_GDG_ENTRY(nhwc, f16, F16, u16, false, 4)
SIPL_GDG_ENTRY(nhwc, bf16, BF16, u16, false, 4)

#undef SIPL_GDG_ENTRY
