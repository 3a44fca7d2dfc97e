// sipl_fast._C - launches the kernels in kernels/*.cu from Python.
//
// Deliberately independent of torch: no torch headers, no libtorch linkage,
// Python *limited API* only (one abi3 binary for all CPython >= 3.9), and the
// CUDA runtime linked statically. Python passes raw device pointers, sizes,
// eps and the cudaStream_t as ints, so upgrading torch never needs a rebuild.
// Nothing here touches the GPU at import time, and launches never synchronize
// (safe inside CUDA-graph capture).
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x03090000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifndef SIPL_FAST_CUDA_ARCHS
#define SIPL_FAST_CUDA_ARCHS "unknown"
#endif

// Host stubs that nvcc emits for the extern "C" __global__ kernels in
// kernels/*.cu; their addresses identify the kernels to
// cudaLaunchKernel. Signatures must match the kernel definitions exactly.
extern "C" {
void layer_norm2d_fwd_f32(const float*, const float*, const float*, float*,
                          long long, long long, long long, float);
void layer_norm2d_fwd_f16(const unsigned short*, const float*, const float*,
                          unsigned short*, long long, long long, long long, float);
void layer_norm2d_fwd_bf16(const unsigned short*, const float*, const float*,
                           unsigned short*, long long, long long, long long, float);

// kernels/cosine_attention.cu: every attention entry has this parameter list.
#define SIPL_CA_DECL(NAME)                                                                  \
  void NAME(const void*, const void*, const void*, const float*, const float*, void*, float*, \
            float*, int, int, int, int, long long, long long, long long, long long, long long, \
            long long, long long, long long, long long, int, int);
SIPL_CA_DECL(cosine_attention_fwd_bf16_d32)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d64)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d96)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d128)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d192)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d256)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d384)
SIPL_CA_DECL(cosine_attention_fwd_bf16_d512)
SIPL_CA_DECL(cosine_attention_fwd_f16_d32)
SIPL_CA_DECL(cosine_attention_fwd_f16_d64)
SIPL_CA_DECL(cosine_attention_fwd_f16_d96)
SIPL_CA_DECL(cosine_attention_fwd_f16_d128)
SIPL_CA_DECL(cosine_attention_fwd_f16_d192)
SIPL_CA_DECL(cosine_attention_fwd_f16_d256)
SIPL_CA_DECL(cosine_attention_fwd_f16_d384)
SIPL_CA_DECL(cosine_attention_fwd_f16_d512)
SIPL_CA_DECL(cosine_attention_fwd_f32_d64)
SIPL_CA_DECL(cosine_attention_fwd_f32_d128)
SIPL_CA_DECL(cosine_attention_fwd_f32_d192)
SIPL_CA_DECL(cosine_attention_fwd_f32_d256)
SIPL_CA_DECL(cosine_attention_fwd_f32_d320)
SIPL_CA_DECL(cosine_attention_fwd_f32_d384)
SIPL_CA_DECL(cosine_attention_fwd_f32_d448)
SIPL_CA_DECL(cosine_attention_fwd_f32_d512)
#undef SIPL_CA_DECL
void cosine_attention_kinv_f32(const void*, float*, int, int, int, long long, long long,
                               long long, long long);
void cosine_attention_kinv_f16(const void*, float*, int, int, int, long long, long long,
                               long long, long long);
void cosine_attention_kinv_bf16(const void*, float*, int, int, int, long long, long long,
                                long long, long long);
void cosine_attention_combine_f32(const float*, const float*, void*, int, int, int, long long);
void cosine_attention_combine_f16(const float*, const float*, void*, int, int, int, long long);
void cosine_attention_combine_bf16(const float*, const float*, void*, int, int, int, long long);

// kernels/gated_dwconv_gelu.cu: (x, weight, bias, out, B, h, H, W, dual).
#define SIPL_GDG_DECL(NAME, T) \
  void NAME(const T*, const float*, const float*, T*, long long, long long, long long, long long, int);
SIPL_GDG_DECL(gated_dwconv_gelu_nchw_f32, float)
SIPL_GDG_DECL(gated_dwconv_gelu_nchw_f16, unsigned short)
SIPL_GDG_DECL(gated_dwconv_gelu_nchw_bf16, unsigned short)
SIPL_GDG_DECL(gated_dwconv_gelu_nhwc_f32, float)
SIPL_GDG_DECL(gated_dwconv_gelu_nhwc_f16, unsigned short)
SIPL_GDG_DECL(gated_dwconv_gelu_nhwc_bf16, unsigned short)
#undef SIPL_GDG_DECL
}

namespace {

constexpr unsigned kThreads = 256;       // threads per block (1 pixel each)
constexpr long long kMaxBlocks = 65535;  // the kernel grid-strides past this

// "O&" converter: Python int -> raw pointer (OverflowError if negative/too big).
int to_pointer(PyObject* obj, void* out) {
  unsigned long long v = PyLong_AsUnsignedLongLong(obj);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) return 0;
  *static_cast<uintptr_t*>(out) = static_cast<uintptr_t>(v);
  return 1;
}

PyObject* layer_norm2d_fwd(PyObject*, PyObject* args) {
  int dtype_code;
  uintptr_t x, w, b, y, stream;
  long long n, c, hw;
  double eps;
  if (!PyArg_ParseTuple(args, "iO&O&O&O&LLLdO&:layer_norm2d_fwd", &dtype_code,
                        to_pointer, &x, to_pointer, &w, to_pointer, &b, to_pointer, &y,
                        &n, &c, &hw, &eps, to_pointer, &stream))
    return nullptr;

  const void* kernel = nullptr;
  switch (dtype_code) {
    case 0: kernel = reinterpret_cast<const void*>(&layer_norm2d_fwd_f32); break;
    case 1: kernel = reinterpret_cast<const void*>(&layer_norm2d_fwd_f16); break;
    case 2: kernel = reinterpret_cast<const void*>(&layer_norm2d_fwd_bf16); break;
    default:
      PyErr_Format(PyExc_ValueError,
                   "layer_norm2d_fwd: bad dtype code %d (0=f32, 1=f16, 2=bf16)", dtype_code);
      return nullptr;
  }
  if (n < 1 || c < 1 || hw < 1 || n > INT64_MAX / c / hw) {
    PyErr_Format(PyExc_ValueError, "layer_norm2d_fwd: bad sizes N=%lld C=%lld HW=%lld", n, c, hw);
    return nullptr;
  }

  // Kernel arguments, typed exactly as the kernel parameters.
  const void* xp = reinterpret_cast<const void*>(x);
  const void* wp = reinterpret_cast<const void*>(w);
  const void* bp = reinterpret_cast<const void*>(b);
  void* yp = reinterpret_cast<void*>(y);
  float eps_f = static_cast<float>(eps);
  void* kargs[] = {&xp, &wp, &bp, &yp, &n, &c, &hw, &eps_f};

  const long long pixels = n * hw;
  long long blocks = (pixels + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;

  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = cudaLaunchKernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), kargs, 0,
                         reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) cudaGetLastError();  // clear this runtime's error state
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) {
    PyErr_Format(PyExc_RuntimeError, "layer_norm2d_fwd: CUDA launch failed: %s (%s)",
                 cudaGetErrorString(err), cudaGetErrorName(err));
    return nullptr;
  }
  Py_RETURN_NONE;
}

// ------------------------------------------------------------ cosine attention
// Geometry of the kernels in kernels/cosine_attention.cu, mirrored by
// sipl_fast/ops/_cuda.py (_ca_geometry). Tensor-core kernels (f16/bf16): DP <= 128:
// 128 rows, 128 threads (4 warps x 32 rows); DP > 128: 64 rows, 512 threads (4
// warps per 16 rows). fp32: 32 rows, 256 threads, DP = 64 * ceil(D / 64).
constexpr int kCaBN = 64;  // keys per tile

struct CaKernel {
  const void* fn;
  int bm, threads, smem;
};

int ca_mma_smem(int dp) {
  const int wd = dp <= 128 ? 1 : 4, rg = 4, mt = dp <= 128 ? 2 : 1, bm = 16 * mt * rg, srow = dp + 8;
  int bytes = bm * srow * 2 + 2 * kCaBN * srow * 2 + kCaBN * 4;
  if (wd > 1) bytes += bm * (kCaBN + 8) * 2 + rg * wd * 16 * 4;
  return bytes;
}

int ca_f32_smem(int dp) { return 4 * (32 * (dp + 1) + kCaBN * 65 + kCaBN * 64 + 32 * 65 + kCaBN + 32); }

// dp: the padded head dim the caller chose (must be the bucket of D).
bool ca_kernel(int code, int dp, CaKernel* out) {
  static const int mma_dps[8] = {32, 64, 96, 128, 192, 256, 384, 512};
  static const void* const bf16[8] = {
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d32),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d64),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d96),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d128),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d192),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d256),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d384),
      reinterpret_cast<const void*>(&cosine_attention_fwd_bf16_d512)};
  static const void* const f16[8] = {
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d32),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d64),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d96),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d128),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d192),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d256),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d384),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f16_d512)};
  static const void* const f32[8] = {
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d64),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d128),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d192),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d256),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d320),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d384),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d448),
      reinterpret_cast<const void*>(&cosine_attention_fwd_f32_d512)};
  if (code == 0) {
    if (dp % 64 != 0 || dp < 64 || dp > 512) return false;
    *out = CaKernel{f32[dp / 64 - 1], 32, 256, ca_f32_smem(dp)};
    return true;
  }
  for (int i = 0; i < 8; ++i) {
    if (mma_dps[i] != dp) continue;
    *out = CaKernel{code == 1 ? f16[i] : bf16[i], dp <= 128 ? 128 : 64, dp <= 128 ? 128 : 512,
                    ca_mma_smem(dp)};
    return true;
  }
  return false;
}

int ca_bucket(int code, long long d) {
  if (code == 0) return static_cast<int>((d + 63) / 64 * 64);
  static const int dps[8] = {32, 64, 96, 128, 192, 256, 384, 512};
  for (int i = 0; i < 8; ++i)
    if (d <= dps[i]) return dps[i];
  return -1;
}

PyObject* cosine_attention_fwd(PyObject*, PyObject* args) {
  int code, dp;
  uintptr_t q, k, v, temp, kinv, out, ws_o, ws_ml, stream;
  long long B, H, Nq, Nk, D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, n_split, tps;
  if (!PyArg_ParseTuple(args, "iiO&O&O&O&O&O&O&O&LLLLLLLLLLLLLLLLO&:cosine_attention_fwd", &code,
                        &dp, to_pointer, &q, to_pointer, &k, to_pointer, &v, to_pointer, &temp,
                        to_pointer, &kinv, to_pointer, &out, to_pointer, &ws_o, to_pointer,
                        &ws_ml, &B, &H, &Nq, &Nk, &D, &sqb, &sqh, &sqn, &skb, &skh, &skn, &svb,
                        &svh, &svn, &n_split, &tps, to_pointer, &stream))
    return nullptr;
  if (code < 0 || code > 2) {
    PyErr_Format(PyExc_ValueError,
                 "cosine_attention_fwd: bad dtype code %d (0=f32, 1=f16, 2=bf16)", code);
    return nullptr;
  }
  if (B < 1 || H < 1 || B * H > 65535 || Nq < 1 || Nq > 0x7fffffffLL || Nk < 1 ||
      Nk > 0x7fffffffLL || D < 8 || D > 512 || D % 8 != 0) {
    PyErr_Format(PyExc_ValueError,
                 "cosine_attention_fwd: bad sizes B=%lld H=%lld Nq=%lld Nk=%lld D=%lld (expected "
                 "B, H, Nq, Nk >= 1, B*H <= 65535, N < 2^31, D a multiple of 8 in [8, 512])",
                 B, H, Nq, Nk, D);
    return nullptr;
  }
  CaKernel kern;
  if (dp != ca_bucket(code, D) || !ca_kernel(code, dp, &kern)) {
    PyErr_Format(PyExc_ValueError, "cosine_attention_fwd: padded head dim %d is not the bucket %d of D=%lld",
                 dp, ca_bucket(code, D), D);
    return nullptr;
  }
  const long long ntiles = (Nk + kCaBN - 1) / kCaBN;
  if (n_split < 1 || n_split > 65535 || tps < 1 || tps * n_split < ntiles ||
      (n_split - 1) * tps >= ntiles || (n_split > 1 && (ws_o == 0 || ws_ml == 0))) {
    PyErr_Format(PyExc_ValueError,
                 "cosine_attention_fwd: bad split n_split=%lld tiles_per_split=%lld for %lld key "
                 "tiles (every split must be non-empty; workspace needed when n_split > 1)",
                 n_split, tps, ntiles);
    return nullptr;
  }
  static const void* const kinv_fns[3] = {
      reinterpret_cast<const void*>(&cosine_attention_kinv_f32),
      reinterpret_cast<const void*>(&cosine_attention_kinv_f16),
      reinterpret_cast<const void*>(&cosine_attention_kinv_bf16)};
  static const void* const combine_fns[3] = {
      reinterpret_cast<const void*>(&cosine_attention_combine_f32),
      reinterpret_cast<const void*>(&cosine_attention_combine_f16),
      reinterpret_cast<const void*>(&cosine_attention_combine_bf16)};

  const void* qp = reinterpret_cast<const void*>(q);
  const void* kp = reinterpret_cast<const void*>(k);
  const void* vp = reinterpret_cast<const void*>(v);
  const float* tp = reinterpret_cast<const float*>(temp);
  float* kip = reinterpret_cast<float*>(kinv);
  void* op = reinterpret_cast<void*>(out);
  float* wop = reinterpret_cast<float*>(ws_o);
  float* wmp = reinterpret_cast<float*>(ws_ml);
  int Hi = static_cast<int>(H), Nqi = static_cast<int>(Nq), Nki = static_cast<int>(Nk),
      Di = static_cast<int>(D), tpsi = static_cast<int>(tps), nsi = static_cast<int>(n_split);
  long long krows = B * H * Nk, orows = B * H * Nq;
  const float* kicp = kip;
  void* kinv_args[] = {&kp, &kip, &Hi, &Nki, &Di, &skb, &skh, &skn, &krows};
  void* attn_args[] = {&qp, &kp, &vp, &tp, &kicp, &op, &wop, &wmp, &Hi, &Nqi, &Nki, &Di,
                       &sqb, &sqh, &sqn, &skb, &skh, &skn, &svb, &svh, &svn, &tpsi, &nsi};
  const float* wocp = wop;
  const float* wmcp = wmp;
  void* comb_args[] = {&wocp, &wmcp, &op, &Nqi, &Di, &nsi, &orows};
  auto aux_blocks = [](long long rows) {  // 8 rows (warps) per 256-thread block
    long long b = (rows + 7) / 8;
    return static_cast<unsigned>(b > (1LL << 20) ? (1LL << 20) : b);
  };
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>((Nq + kern.bm - 1) / kern.bm),
                  static_cast<unsigned>(n_split), static_cast<unsigned>(B * H));

  cudaError_t err;
  const char* what = "";
  Py_BEGIN_ALLOW_THREADS
  do {
    what = "k norms";
    err = cudaLaunchKernel(kinv_fns[code], dim3(aux_blocks(krows)), dim3(256), kinv_args, 0, st);
    if (err != cudaSuccess) break;
    what = "cudaFuncSetAttribute";
    err = cudaFuncSetAttribute(kern.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kern.smem);
    if (err != cudaSuccess) break;
    what = "attention";
    err = cudaLaunchKernel(kern.fn, grid, dim3(kern.threads), attn_args, kern.smem, st);
    if (err != cudaSuccess) break;
    if (n_split > 1) {
      what = "split combine";
      err = cudaLaunchKernel(combine_fns[code], dim3(aux_blocks(orows)), dim3(256), comb_args, 0, st);
      if (err != cudaSuccess) break;
    }
    what = "cudaGetLastError";
    err = cudaGetLastError();
  } while (false);
  if (err != cudaSuccess) cudaGetLastError();  // clear this runtime's error state
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) {
    PyErr_Format(PyExc_RuntimeError, "cosine_attention_fwd: CUDA launch failed (%s): %s (%s)", what,
                 cudaGetErrorString(err), cudaGetErrorName(err));
    return nullptr;
  }
  Py_RETURN_NONE;
}

// ------------------------------------------------------------ gated dwconv + gelu
// Geometry of kernels/gated_dwconv_gelu.cu (sipl::gdg), mirrored by
// sipl_fast/ops/_cuda.py (_GDG_*); tests/test_cuda_build.py checks they agree.
// Blocks are (32, 8) threads, each warp on its own work items; the 1-D grid
// has one block per 8 work items (capped at 2^31-1: the kernels loop over work
// items with a grid stride). A work item is an NCHW strip of 64 x 16 output
// pixels of one (b, c) plane, or an NHWC strip of 2 x 16 pixels x 32 output
// channels.
constexpr unsigned kGdgThreadsX = 32;
constexpr unsigned kGdgThreadsY = 8;
constexpr long long kGdgNchwTileW = 64;
constexpr long long kGdgNchwTileH = 16;
constexpr long long kGdgNhwcTileW = 2;
constexpr long long kGdgNhwcTileH = 16;
constexpr long long kGdgNhwcChunk = 32;
constexpr long long kGdgMaxGrid = 0x7fffffffLL;

PyObject* gated_dwconv_gelu_fwd(PyObject*, PyObject* args) {
  int code, layout, dual;
  uintptr_t x, w, b, y, stream;
  long long B, h, H, W;
  if (!PyArg_ParseTuple(args, "iiiO&O&O&O&LLLLO&:gated_dwconv_gelu_fwd", &code, &layout, &dual,
                        to_pointer, &x, to_pointer, &w, to_pointer, &b, to_pointer, &y, &B, &h, &H,
                        &W, to_pointer, &stream))
    return nullptr;
  if (code < 0 || code > 2) {
    PyErr_Format(PyExc_ValueError,
                 "gated_dwconv_gelu_fwd: bad dtype code %d (0=f32, 1=f16, 2=bf16)", code);
    return nullptr;
  }
  if (layout < 0 || layout > 1) {
    PyErr_Format(PyExc_ValueError, "gated_dwconv_gelu_fwd: bad layout %d (0=nchw, 1=nhwc)", layout);
    return nullptr;
  }
  if (dual < 0 || dual > 1) {
    PyErr_Format(PyExc_ValueError, "gated_dwconv_gelu_fwd: bad mode dual=%d (0=gdfn, 1=dual)", dual);
    return nullptr;
  }
  // x has B*2h*H*W elements; that count must fit in int64 (the kernels' offsets).
  if (B < 1 || h < 1 || H < 1 || W < 1 || H > 0x7fffffffLL || W > 0x7fffffffLL ||
      B > INT64_MAX / 2 / h / H / W) {
    PyErr_Format(PyExc_ValueError,
                 "gated_dwconv_gelu_fwd: bad sizes B=%lld h=%lld H=%lld W=%lld (expected B, h, H, W "
                 ">= 1, H and W < 2^31, B*2h*H*W < 2^63)",
                 B, h, H, W);
    return nullptr;
  }
  static const void* const kernels[2][3] = {
      {reinterpret_cast<const void*>(&gated_dwconv_gelu_nchw_f32),
       reinterpret_cast<const void*>(&gated_dwconv_gelu_nchw_f16),
       reinterpret_cast<const void*>(&gated_dwconv_gelu_nchw_bf16)},
      {reinterpret_cast<const void*>(&gated_dwconv_gelu_nhwc_f32),
       reinterpret_cast<const void*>(&gated_dwconv_gelu_nhwc_f16),
       reinterpret_cast<const void*>(&gated_dwconv_gelu_nhwc_bf16)}};

  // Work items (each holds >= 1 output, so this cannot exceed B*h*H*W), then blocks: one per
  // kGdgThreadsY items (a warp each).
  long long work;
  if (layout == 0) {
    work = B * h * ((W + kGdgNchwTileW - 1) / kGdgNchwTileW) *
           ((H + kGdgNchwTileH - 1) / kGdgNchwTileH);
  } else {
    work = B * ((W + kGdgNhwcTileW - 1) / kGdgNhwcTileW) *
           ((H + kGdgNhwcTileH - 1) / kGdgNhwcTileH) * ((h + kGdgNhwcChunk - 1) / kGdgNhwcChunk);
  }
  work = (work + kGdgThreadsY - 1) / kGdgThreadsY;
  const long long blocks = work < kGdgMaxGrid ? work : kGdgMaxGrid;

  const void* xp = reinterpret_cast<const void*>(x);
  const float* wp = reinterpret_cast<const float*>(w);
  const float* bp = reinterpret_cast<const float*>(b);  // null: no bias
  void* yp = reinterpret_cast<void*>(y);
  void* kargs[] = {&xp, &wp, &bp, &yp, &B, &h, &H, &W, &dual};

  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = cudaLaunchKernel(kernels[layout][code], dim3(static_cast<unsigned>(blocks)),
                         dim3(kGdgThreadsX, kGdgThreadsY), kargs, 0,
                         reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) cudaGetLastError();  // clear this runtime's error state
  Py_END_ALLOW_THREADS
  if (err != cudaSuccess) {
    PyErr_Format(PyExc_RuntimeError, "gated_dwconv_gelu_fwd: CUDA launch failed: %s (%s)",
                 cudaGetErrorString(err), cudaGetErrorName(err));
    return nullptr;
  }
  Py_RETURN_NONE;
}

// None when this build's (static) CUDA runtime can run here, else why not: no
// driver, or a driver of an older CUDA major version than the runtime.
PyObject* runtime_problem(PyObject*, PyObject*) {
  int driver = 0;
  const cudaError_t err = cudaDriverGetVersion(&driver);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return PyUnicode_FromFormat("cannot query the CUDA driver (%s)", cudaGetErrorString(err));
  }
  if (driver == 0) return PyUnicode_FromString("no CUDA driver found");
  if (driver / 1000 < CUDART_VERSION / 1000) {
    return PyUnicode_FromFormat(
        "the CUDA driver supports CUDA %d.%d but the extension was built with CUDA %d.%d; update "
        "the driver, rebuild with an older toolkit, or use the CuPy route",
        driver / 1000, (driver % 1000) / 10, CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10);
  }
  Py_RETURN_NONE;
}

PyObject* cuda_arch_list(PyObject*, PyObject*) {
  return PyUnicode_FromString(SIPL_FAST_CUDA_ARCHS);
}

PyMethodDef methods[] = {
    {"layer_norm2d_fwd", layer_norm2d_fwd, METH_VARARGS,
     "layer_norm2d_fwd(dtype_code, x_ptr, w_ptr, b_ptr, y_ptr, N, C, HW, eps, stream) -> None\n"
     "Launch LayerNorm2d forward on `stream` (no sync). dtype_code: 0=f32, 1=f16, 2=bf16."},
    {"cosine_attention_fwd", cosine_attention_fwd, METH_VARARGS,
     "cosine_attention_fwd(dtype_code, dp, q, k, v, temp32, kinv_ws, out, ws_o, ws_ml, B, H, Nq, Nk,\n"
     "  D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, n_split, tiles_per_split, stream) -> None\n"
     "Cosine attention forward on `stream` (no sync): k inverse norms into kinv_ws (B*H*Nk fp32),\n"
     "attention (grid ceil(Nq/BM) x n_split x B*H), then the split combine when n_split > 1\n"
     "(ws_o: B*H*n_split*Nq*D fp32, ws_ml: B*H*n_split*Nq*2 fp32). dtype_code: 0=f32, 1=f16, 2=bf16;\n"
     "dp: padded head dim (f16/bf16: 32,64,96,128,192,256,384,512 bucket of D; f32: 64*ceil(D/64))."},
    {"gated_dwconv_gelu_fwd", gated_dwconv_gelu_fwd, METH_VARARGS,
     "gated_dwconv_gelu_fwd(dtype_code, layout, dual, x, w32, b32, out, B, h, H, W, stream) -> None\n"
     "Depthwise 3x3 conv (zero padding 1) of x (B, 2h, H, W) + GELU gate into out (B, h, H, W), on\n"
     "`stream` (no sync). dtype_code: 0=f32, 1=f16, 2=bf16; layout: 0=NCHW, 1=NHWC (channels-last;\n"
     "x and out alike); dual: 0 -> gelu(y1)*y2, 1 -> gelu(y2)*y1 + gelu(y1)*y2. w32: fp32 (9, 2h) tap-major,\n"
     "b32: fp32 (2h,) or 0 for no bias."},
    {"runtime_problem", runtime_problem, METH_NOARGS,
     "runtime_problem() -> str | None: why this build cannot run on this machine, or None."},
    {"cuda_arch_list", cuda_arch_list, METH_NOARGS,
     "cuda_arch_list() -> str: GPU targets compiled into this build."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "sipl_fast._C",
                          "Torch-independent CUDA kernels for sipl_fast (limited API).",
                          -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
