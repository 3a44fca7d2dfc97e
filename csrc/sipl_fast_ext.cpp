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
// kernels/layer_norm2d.cu; their addresses identify the kernels to
// cudaLaunchKernel. Signatures must match the kernel definitions exactly.
extern "C" {
void layer_norm2d_fwd_f32(const float*, const float*, const float*, float*,
                          long long, long long, long long, float);
void layer_norm2d_fwd_f16(const unsigned short*, const float*, const float*,
                          unsigned short*, long long, long long, long long, float);
void layer_norm2d_fwd_bf16(const unsigned short*, const float*, const float*,
                           unsigned short*, long long, long long, long long, float);
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
