// common.cuh - device-side helpers shared by the sipl_fast CUDA kernels.
//
// This header must compile under both nvcc and NVRTC (the CuPy JIT route), so
// it includes nothing: no system headers, no cuda_fp16.h / cuda_bf16.h.
// Half-precision tensors are therefore handled as raw 16-bit storage (u16)
// and converted to fp32 here: fp16 with the PTX `cvt` instructions, bf16 with
// bit manipulation (bf16 is the upper half of an fp32 bit pattern).
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

namespace sipl {

// ---- fp16 <-> fp32 (IEEE binary16 held in a 16-bit register) -------------
// SIPL_CUDA_ON_CPU: the tests' host build of the kernels (tests/cuda_on_cpu.h), where the
// host compiler's _Float16 converts with the same rounding.
#ifdef SIPL_CUDA_ON_CPU
__device__ __forceinline__ float f16_to_f32(u16 h) { return (float)__builtin_bit_cast(_Float16, h); }
__device__ __forceinline__ u16 f32_to_f16(float f) { return __builtin_bit_cast(u16, (_Float16)f); }
#else
__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// Round to nearest even; overflow -> inf, NaN stays NaN (done by the hardware).
__device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif

// ---- bf16 <-> fp32 (bit manipulation) --------------------------------------
__device__ __forceinline__ float bf16_to_f32(u16 b) {
  return __uint_as_float(((u32)b) << 16);  // exact: bf16 is a truncated fp32
}

// Round to nearest even on the 16 dropped bits; overflow rounds to +-inf and NaN stays NaN.
// On the GPU (sm_80+) one cvt instruction; elsewhere (the host build, older targets) by bit
// manipulation, which returns NaN as a quiet NaN with the same sign (rounding could
// otherwise carry a NaN into infinity).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  u16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
#else
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
#endif
}

// ---- approximate reciprocal and 2^x (one MUFU instruction each; ~1 and ~2 ulp) ----------
#ifdef SIPL_CUDA_ON_CPU
__device__ __forceinline__ float rcp_approx(float x) { return 1.0f / x; }
__device__ __forceinline__ float exp2_approx(float x) { return exp2f(x); }
#else
__device__ __forceinline__ float rcp_approx(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#endif

// ---- storage traits: element type in memory + conversion to/from fp32 ------
struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T store(float v) { return v; }
};

struct F16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(T v) { return f16_to_f32(v); }
  static __device__ __forceinline__ T store(float v) { return f32_to_f16(v); }
};

struct BF16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(T v) { return bf16_to_f32(v); }
  static __device__ __forceinline__ T store(float v) { return f32_to_bf16(v); }
};

}  // namespace sipl
