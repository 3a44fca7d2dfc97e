// gated_dwconv_gelu.cu - depthwise 3x3 conv + GELU gate of the GDFN, fused, forward.
//
// Semantics (fp32 math for every storage dtype f32/f16/bf16):
//   y = F.conv2d(x, weight, bias, padding=1, groups=2h)    x: (B, 2h, H, W)
//   y1 = y[:, :h], y2 = y[:, h:]                           weight: (2h, 1, 3, 3)
//   gdfn (dual == 0): out = gelu(y1) * y2                  bias: (2h,) or none
//   dual (dual != 0): out = gelu(y2) * y1 + gelu(y1) * y2  out: (B, h, H, W)
// with the exact erf GELU 0.5 v (1 + erf(v / sqrt(2))). The conv is a
// cross-correlation with zero padding:
//   y[b,k,i,j] = bias[k] + sum_{dy,dx in 0..2} weight[k*9 + dy*3 + dx] * x[b,k,i+dy-1,j+dx-1]
// (x outside the image = 0). The 2h-channel y never reaches global memory:
// each output needs only the 3x3 neighbourhoods of input channels c and c+h,
// so one kernel reads x and writes out. weight is passed as fp32 (2h*9,
// contiguous), bias as fp32 (2h,) or a null pointer.
//
// Every entry is launched with blockDim = (32, 8) (256 threads; required by
// the thread mapping below) and a 1-D grid of any size >= 1: a block loops
// over work items w = blockIdx.x, blockIdx.x + gridDim.x, ... < total, so
// there is no gridDim.y/z limit on B*h and the launcher may cap the grid. Work
// decode and offsets are 32-bit unsigned where x has fewer than 2^31 elements,
// else 64-bit (see the entries); H and W must be < 2^31 (the launchers check).
//
// NCHW layout (x, out contiguous), *_nchw_*: a work item is one output tile
// of TW x TH = 30 x 64 pixels of one output plane (b, c):
//   total = B*h * ceil(H/64)*ceil(W/30), w = (b*h + c) * tiles + tile,
//   tile = tile_row * ceil(W/30) + tile_col (consecutive blocks walk one plane).
//   1. The (TH+2) x (TW+2) = 66 x 32 halo of input channel c and of channel
//      c+h is loaded into shared memory as fp32 (zeros outside the image).
//      Thread t of the block loads the flattened halo elements t, t+256, ...
//      (9 of each channel): halo rows ty, ty+8, ... at column tx, a warp one
//      contiguous run of 32 pixels along W (coalesced); the halo is 32 wide,
//      one column a lane, so the rows and columns come from the thread index
//      by shifts, and every load of a warp is one instruction (a 32-wide tile's
//      34-column halo took a second load for two lanes and a division per
//      element). All 18 go to registers first and then to shared memory, so
//      that they are in flight together: a tall tile keeps ~9 KB of loads in
//      flight per block (a 16-row tile kept 2.4 KB, and 4 blocks an SM left the
//      H200's memory ~90% idle) with 3% halo overhead instead of 12%.
//   2. Thread (tx, ty), tx < 30, computes the 8 vertically adjacent outputs at
//      column tx, rows 8*ty .. 8*ty+7 of the tile, with a sliding 3 x 3 register
//      window per channel (3 new smem reads per channel and output; a warp
//      reads consecutive floats: no bank conflicts). A warp stores 30
//      consecutive pixels of one row (coalesced); lanes 30 and 31 only load.
//   Partial tiles (odd sizes, W < 30, H = W = 1) just skip the stores outside
//   the image; the halo loads of them are zero-filled.
//
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
constexpr int kNchwTileW = 30;  // NCHW: output pixels per tile along W (kThreadsX - 2)
constexpr int kNchwTileH = 64;  // NCHW: output rows per tile (kThreadsY * kNchwRows)
constexpr int kNhwcTileW = 8;   // NHWC: output pixels per tile along W
constexpr int kNhwcTileH = 8;   // NHWC: output rows per tile (= kThreadsY)
constexpr int kNhwcChunk = 32;  // NHWC: output channels per tile (= kThreadsX)

constexpr int kNchwRows = kNchwTileH / kThreadsY;  // output rows per thread (8)
constexpr int kNchwHaloW = kNchwTileW + 2;         // 32
constexpr int kNchwHaloH = kNchwTileH + 2;         // 66
constexpr int kNchwHaloRowsPerWarp = (kNchwHaloH + kThreadsY - 1) / kThreadsY;  // 9
constexpr int kNhwcHaloW = kNhwcTileW + 2;         // 10
constexpr int kNhwcHaloH = kNhwcTileH + 2;         // 10
constexpr int kNhwcHaloPix = kNhwcHaloW * kNhwcHaloH;  // 100
constexpr int kThreads = kThreadsX * kThreadsY;

static_assert(kNchwHaloW == kThreadsX, "NCHW: one halo column per lane");
static_assert(kNchwTileH % kThreadsY == 0, "NCHW: whole rows per thread");
static_assert(kNhwcTileH == kThreadsY, "NHWC: one output row per warp");
static_assert(kNhwcChunk == kThreadsX, "NHWC: one channel per lane");
static_assert(kThreads == 256, "the entries below declare __launch_bounds__(256, 4)");

__device__ __forceinline__ float gelu_erf(float v) {
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

__device__ __forceinline__ float gate(float y1, float y2, int dual) {
  const float g = gelu_erf(y1) * y2;
  return dual ? gelu_erf(y2) * y1 + g : g;
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
// The halos in shared memory, at namespace scope: one array per kernel however many index
// types (I) its entry instantiates the layout's function with.
__shared__ float nchw_halo[2][kNchwHaloH][kNchwHaloW];
__shared__ float nhwc_halo[2][kNhwcHaloPix][kNhwcChunk];

template <typename S, typename I>
__device__ __forceinline__ void fwd_nchw(const typename S::T* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ bias,
                                         typename S::T* __restrict__ out, I B, I h, I H, I W,
                                         int dual) {
  float (&s)[2][kNchwHaloH][kNchwHaloW] = nchw_halo;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const I tiles_x = (W + kNchwTileW - 1) / kNchwTileW;
  const I tiles = tiles_x * ((H + kNchwTileH - 1) / kNchwTileH);
  const I total = B * h * tiles;
  const I hw = H * W;

  for (I work = blockIdx.x; work < total; work += gridDim.x) {
    const I plane = work / tiles;  // b*h + c
    const I tile = work - plane * tiles;
    const I b = plane / h;
    const I c = plane - b * h;
    const I tile_row = tile / tiles_x;
    const I y0 = tile_row * kNchwTileH;                  // first output row of the tile
    const I x0 = (tile - tile_row * tiles_x) * kNchwTileW;  // first output column
    const typename S::T* x1 = x + ((i64)b * 2 * h + c) * (i64)hw;  // input channel c of image b
    const i64 to_x2 = (i64)h * hw;                                 // ... to input channel c + h

    // 1. halo (rows y0-1 .. y0+TH, columns x0-1 .. x0+TW) -> shared memory: warp ty loads
    //    halo rows ty, ty+8, ..., lane tx column tx, 9 loads per channel, all in flight
    //    together (registers first). A lane's address moves by whole rows: one multiply-add
    //    per row, the second channel at a fixed distance.
    const I gx = x0 - 1 + tx;  // unsigned I: -1 wraps past W
    const bool col_ok = inside(gx, W);
    const typename S::T* p1 = x1 + (col_ok ? gx : 0);
    typename S::T v1[kNchwHaloRowsPerWarp], v2[kNchwHaloRowsPerWarp];
#pragma unroll
    for (int k = 0; k < kNchwHaloRowsPerWarp; ++k) {
      const int r = ty + k * kThreadsY;
      const I gy = y0 - 1 + r;
      v1[k] = v2[k] = typename S::T{};  // +0 in every storage type
      if (col_ok && r < kNchwHaloH && inside(gy, H)) {
        const typename S::T* p = p1 + gy * W;
        v1[k] = p[0];
        v2[k] = p[to_x2];
      }
    }
#pragma unroll
    for (int k = 0; k < kNchwHaloRowsPerWarp; ++k) {
      const int r = ty + k * kThreadsY;
      if (r < kNchwHaloH) {
        s[0][r][tx] = S::load(v1[k]);
        s[1][r][tx] = S::load(v2[k]);
      }
    }
    float w1[9], w2[9];
    load_taps(weight, c, w1);
    load_taps(weight, c + h, w2);
    const float b1 = bias ? bias[c] : 0.0f;
    const float b2 = bias ? bias[c + h] : 0.0f;
    __syncthreads();

    // 2. rows r0 .. r0+kNchwRows-1 of the tile at column tx, a sliding window over halo rows
    //    r0 .. r0+kNchwRows+1: window row d holds halo row r+d of output row r.
    if (tx < kNchwTileW) {  // lanes 30 and 31 loaded the halo's last columns: no output
      const int r0 = ty * kNchwRows;
      float a1[3][3], a2[3][3];
#pragma unroll
      for (int d = 0; d < 2; ++d) {
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          a1[d][k] = s[0][r0 + d][tx + k];
          a2[d][k] = s[1][r0 + d][tx + k];
        }
      }
      const I ox = x0 + tx;
      typename S::T* op = out + (i64)plane * hw;  // output plane (b, c)
#pragma unroll
      for (int r = 0; r < kNchwRows; ++r) {
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          a1[2][k] = s[0][r0 + r + 2][tx + k];
          a2[2][k] = s[1][r0 + r + 2][tx + k];
        }
        const I oy = y0 + r0 + r;
        if (oy < H && ox < W) {
          const float y1 = conv3x3(w1, b1, a1[0][0], a1[0][1], a1[0][2], a1[1][0], a1[1][1],
                                   a1[1][2], a1[2][0], a1[2][1], a1[2][2]);
          const float y2 = conv3x3(w2, b2, a2[0][0], a2[0][1], a2[0][2], a2[1][0], a2[1][1],
                                   a2[1][2], a2[2][0], a2[2][1], a2[2][2]);
          op[oy * W + ox] = S::store(gate(y1, y2, dual));
        }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          a1[0][k] = a1[1][k];
          a1[1][k] = a1[2][k];
          a2[0][k] = a2[1][k];
          a2[1][k] = a2[2][k];
        }
      }
    }
    __syncthreads();  // the next work item overwrites s
  }
}

// ---------------------------------------------------------------- NHWC
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

}  // namespace gdg
}  // namespace sipl

// __launch_bounds__(256, 4): at most 64 registers, so 4 blocks (1024 threads)
// fit per SM; ptxas reports no spills for sm_80 / sm_90a.
//
// Unmangled entry points (looked up by name from CuPy, by host-stub address
// from csrc/sipl_fast_ext.cpp), one per layout x storage dtype; f16/bf16 as
// raw 16-bit storage. Parameters: x, weight (fp32, 2h*9), bias (fp32, 2h, or
// null), out, B, h (output channels; x has 2h), H, W, dual (0: gdfn, else dual).
// Launch with blockDim (32, 8) and any 1-D grid.
//
// Where x has fewer than 2^31 elements (every image but the largest), the work decode and the
// offsets run in 32-bit unsigned arithmetic (index type I = unsigned): in 64 bits, the three
// divisions of the decode are calls of a ~200-instruction routine and every halo element's
// address and bounds take 64-bit operations, which together cost more issue slots (sm_90a
// SASS) than the convolution and the gate (the kernel is bound by instruction issue).
// (The host build of the tests sets the limit to 0 as well, to run the 64-bit path.)
#ifndef SIPL_GDG_NARROW_LIMIT
#define SIPL_GDG_NARROW_LIMIT (1LL << 31)
#endif
#define SIPL_GDG_ENTRY(LAYOUT, SUFFIX, TRAITS, T)                                            \
  extern "C" __global__ void __launch_bounds__(256, 4)                                       \
      gated_dwconv_gelu_##LAYOUT##_##SUFFIX(const T* __restrict__ x,                         \
                                            const float* __restrict__ weight,                \
                                            const float* __restrict__ bias,                  \
                                            T* __restrict__ out, i64 B, i64 h, i64 H, i64 W,  \
                                            int dual) {                                      \
    if (B * 2 * h * H * W < SIPL_GDG_NARROW_LIMIT)                                           \
      sipl::gdg::fwd_##LAYOUT<sipl::TRAITS, unsigned>(x, weight, bias, out, (unsigned)B,     \
                                                      (unsigned)h, (unsigned)H, (unsigned)W, \
                                                      dual);                                 \
    else                                                                                     \
      sipl::gdg::fwd_##LAYOUT<sipl::TRAITS, i64>(x, weight, bias, out, B, h, H, W, dual);    \
  }

SIPL_GDG_ENTRY(nchw, f32, F32, float)
SIPL_GDG_ENTRY(nchw, f16, F16, u16)
SIPL_GDG_ENTRY(nchw, bf16, BF16, u16)
SIPL_GDG_ENTRY(nhwc, f32, F32, float)
SIPL_GDG_ENTRY(nhwc, f16, F16, u16)
SIPL_GDG_ENTRY(nhwc, bf16, BF16, u16)

#undef SIPL_GDG_ENTRY
