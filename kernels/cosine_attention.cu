// cosine_attention.cu - fused cosine-similarity attention, forward.
//
// Semantics (fp32 accumulation for every storage dtype):
//   out[b,h,i,:] = sum_j softmax_j( t_h * <qn_i, kn_j> ) v[b,h,j,:]
//   qn = q / max(||q||_2, 1e-12), kn likewise (torch.nn.functional.normalize).
// q (B,H,Nq,D), k/v (B,H,Nk,D): last dim contiguous, other strides arbitrary
// (16-byte aligned rows; the Python launcher guarantees it). out contiguous.
//
// Normalisation is never materialised. The raw (exact) inputs go into the dot
// products and the logits are rescaled afterwards, in fp32:
//   logit2_ij = <q_i, k_j> * (t_h * log2(e) * invq_i) * invk_j
// (base-2 logits, softmax uses ex2). invk = 1/max(||k_j||,1e-12) comes from the
// tiny pre-pass cosine_attention_kinv_* (B*H*Nk floats); invq is computed from
// the Q tile in shared memory when it is loaded.
//
// Softmax. |cos| <= 1, so logit2 lies in [-m2, m2] with m2 = |t_h| log2(e).
// With the FIXED shift m2, p = 2^(logit2 - m2) lies in [2^(-2 m2), 1]: no running
// max, no rescaling of the accumulator. Used when 2*m2 <= LIM, where P stays a
// normal number of the type it is cast to for the P@V product:
//   fp16 P: LIM = 14  (2^-14 is the smallest normal fp16)   -> |t| <= 4.85
//   bf16 / fp32 P: LIM = 100 (fp32 exponent range, far from 2^-126) -> |t| <= 34.6
// Otherwise (decided per block from t read on the device, no host sync) the
// standard online softmax with a running row max is used. t = 0 or t < 0 are
// fine: only |t| enters the shift.
//
// Split-K. grid = (ceil(Nq/BM), n_split, B*H). Split s handles key tiles
// [s*tps, min((s+1)*tps, ntiles)). With n_split == 1 the block writes out
// directly (o / l); otherwise it writes fp32 partials ws_o (un-normalised o),
// ws_ml (m2, l) and cosine_attention_combine_* merges the splits in a fixed
// order (deterministic):  M = max m_s, L = sum l_s 2^(m_s-M),
//   out = sum_s o_s 2^(m_s-M) / L.
//
// Tensor-core kernel (fp16/bf16), mma.sync.m16n8k16 (fp32 accumulate):
//   DP = D padded to a bucket (32,64,96,128 | 192,256,384,512); the padding
//   columns are zero-filled in shared memory. BN = 64 keys per tile.
//   A block has RG = 4 row groups of 16*MT query rows; each has WD warps.
//   * DP <= 128: WD = 1, MT = 2 (BM = 128, 128 threads, ~254 registers, 2
//     blocks/SM). A warp owns 32 rows (two m16 tiles, so every K / V fragment
//     read from shared memory feeds two mma), computes S = Q K^T for all 64
//     keys (8 n-tiles per m-tile), keeps P in registers (the C fragment of
//     m16n8 is the A fragment of m16n8k16) and O (32 x DP fp32).
//   * DP > 128: WD = 4, MT = 1 (BM = 64, 512 threads). The 4 warps of a row
//     group split the 64 keys for S (16 each) and the DP output columns for
//     P@V (DP/4 each); P goes through shared memory, and in the online mode the
//     row max is exchanged through shared memory too. Keeps registers at
//     ~DP/8 fp32 accumulators per thread.
//   Fragment layouts (lane = 4*g + tig): A regs {(g,2tig..+1), (g+8,2tig..),
//   (g,2tig+8..), (g+8,2tig+8..)}; B regs {(k=2tig..+1, n=g), (k=2tig+8.., n=g)};
//   C {(g,2tig), (g,2tig+1), (g+8,2tig), (g+8,2tig+1)}. All loaded with
//   ldmatrix.x4 from padded rows (stride DP+8 halves: conflict-free): Q and P
//   (A, non-transposed), K (B of Q K^T, non-transposed: rows are keys), V (B of
//   P V, .trans: rows are keys, columns d).
//   Pipeline per key tile, single K and V buffers (cp.async, zero-fill for
//   keys >= Nk and d >= D):  wait K_j; issue V_j; S = Q K_j^T;  wait V_j;
//   issue K_{j+1}; softmax; O += P V_j.
//
// fp32 kernel (SIMT FMA, no TF32): BM = 32 rows, BN = 64 keys, 256 threads;
// D handled in NC chunks of 64 columns (NC = ceil(D/64) compile-time). Q tile in
// shared memory; K / V streamed through shared memory one 64-column chunk at a
// time; a thread owns 2 rows x 4 keys of S and 2 rows x 4 columns of every O
// chunk (8*NC accumulators).
//
// NVRTC-compatible (CuPy route): includes only common.cuh, no host headers.
#include "common.cuh"

namespace sipl {
namespace ca {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int BN = 64;  // keys per tile (all kernels)
#define kNegInf (-__int_as_float(0x7f800000))  // NVRTC has no math.h INFINITY

// ---------------------------------------------------------------- PTX helpers
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ void cp_async16(u32 saddr, const void* g, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async4(u32 saddr, const void* g, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(saddr), "l"(g),
               "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], u32 saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Per-dtype tensor-core traits: mma and packing of two fp32 into one b16x2
// register (`lo` -> bits 0..15, the lower column index).
struct MmaBF16 {
  typedef BF16 S;
  static constexpr float kFixedLimit = 100.f;
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

struct MmaF16 {
  typedef F16 S;
  static constexpr float kFixedLimit = 14.f;
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const float* temp;  // (H,)
  const float* kinv;  // (B*H*Nk,)
  void* out;          // (B,H,Nq,D) contiguous
  float* ws_o;        // (B*H, n_split, Nq, D) when n_split > 1
  float* ws_ml;       // (B*H, n_split, Nq, 2)
  int H, Nq, Nk, D;
  i64 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn;
  int tiles_per_split, n_split;
};

// Shared-memory footprint of the tensor-core kernel (bytes); the host mirrors it.
template <int DP, int WD, int RG, int MT>
struct MmaGeom {
  static constexpr int BM = 16 * MT * RG;
  static constexpr int NT = 32 * WD * RG;
  static constexpr int SROW = DP + 8;   // halves per Q/K/V smem row
  static constexpr int PROW = BN + 8;   // halves per P smem row
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + BM * SROW * 2;
  static constexpr int V_OFF = K_OFF + BN * SROW * 2;
  static constexpr int KI_OFF = V_OFF + BN * SROW * 2;          // BN floats of invk
  static constexpr int P_OFF = KI_OFF + BN * 4;                  // WD > 1 only
  static constexpr int RED_OFF = P_OFF + (WD > 1 ? BM * PROW * 2 : 0);
  static constexpr int BYTES = RED_OFF + (WD > 1 ? RG * WD * 16 * 4 : 0);
};

// Row group rg (of RG) owns the 16*MT block rows [rg*16*MT, (rg+1)*16*MT): MT
// m16 tiles. Its WD warps split the keys of S and the columns of O. MT > 1
// only with WD == 1 (P stays in registers).
template <typename M, int DP, int WD, int RG, int MT>
__device__ __forceinline__ void attn_mma(const Args& a, unsigned char* smem) {
  typedef typename M::S S;
  typedef typename S::T T;
  typedef MmaGeom<DP, WD, RG, MT> G;
  constexpr int BM = G::BM, NT = G::NT, SROW = G::SROW, PROW = G::PROW;
  constexpr int DW = DP / WD;   // O columns per warp
  constexpr int NTO = DW / 8;   // O n-tiles per warp
  constexpr int KW = BN / WD;   // S keys per warp
  constexpr int NTS = KW / 8;   // S n-tiles per warp
  constexpr int KS = DP / 16;   // k-steps of Q K^T
  constexpr int RPW = 16 * MT;  // rows per warp (row group)
  static_assert(DP % 16 == 0 && NTO % 2 == 0 && NTS % 2 == 0, "bad tiling");
  static_assert(MT == 1 || WD == 1, "MT > 1 needs WD == 1");

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int rg = warp / WD, wd = warp % WD;
  const int g = lane >> 2, tig = lane & 3;
  const int lr = lane & 7, lm = lane >> 3;  // ldmatrix: row in matrix, matrix index

  const int bh = blockIdx.z;
  const int b = bh / a.H, h = bh - b * a.H;
  const int m0 = blockIdx.x * BM;
  const int split = blockIdx.y;
  const int Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int ntiles = (Nk + BN - 1) / BN;
  const int tb = split * a.tiles_per_split;
  const int te = min(tb + a.tiles_per_split, ntiles);

  const T* qg = static_cast<const T*>(a.q) + (i64)b * a.sqb + (i64)h * a.sqh;
  const T* kg = static_cast<const T*>(a.k) + (i64)b * a.skb + (i64)h * a.skh;
  const T* vg = static_cast<const T*>(a.v) + (i64)b * a.svb + (i64)h * a.svh;
  const float* kinv = a.kinv + (i64)bh * Nk;

  const u32 s_base = smem_u32(smem);
  const u32 sQ = s_base + G::Q_OFF, sK = s_base + G::K_OFF, sV = s_base + G::V_OFF;
  const u32 sKI = s_base + G::KI_OFF;
  const float* KIs = reinterpret_cast<const float*>(smem + G::KI_OFF);
  u32* Ps = reinterpret_cast<u32*>(smem + G::P_OFF);
  float* red = reinterpret_cast<float*>(smem + G::RED_OFF);

  constexpr int CPR = DP / 8;  // 16-byte chunks per row
  auto load_rows = [&](u32 sdst, const T* src, i64 sn, int row0, int nrows, int rows_valid) {
    for (int c = tid; c < nrows * CPR; c += NT) {
      const int r = c / CPR, d = (c - r * CPR) * 8;
      const bool ok = (row0 + r < rows_valid) && (d < D);
      const T* p = ok ? src + (i64)(row0 + r) * sn + d : src;
      cp_async16(sdst + (u32)((r * SROW + d) * 2), p, ok);
    }
  };
  auto load_k = [&](int tile) {
    load_rows(sK, kg, a.skn, tile * BN, BN, Nk);
    if (tid < BN) {
      const int key = tile * BN + tid;
      cp_async4(sKI + tid * 4, key < Nk ? kinv + key : kinv, key < Nk);
    }
  };

  // Prologue: Q tile and the first K tile.
  load_rows(sQ, qg, a.sqn, m0, BM, Nq);
  if (tb < te) load_k(tb);
  cp_async_commit();

  const float t = a.temp[h];
  const float m2fix = fabsf(t) * kLog2e;
  const bool fixed = 2.f * m2fix <= M::kFixedLimit;

  // Per thread: rows g and g+8 of each of the warp's MT m16 tiles (index 2*mt + r).
  float o[MT][NTO][4];
  float mrun[2 * MT], lsum[2 * MT], qsc[2 * MT];  // qsc: t * log2e * invq
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < NTO; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 2 * MT; ++i) {
    mrun[i] = fixed ? m2fix : kNegInf;
    lsum[i] = 0.f;
    qsc[i] = 0.f;
  }

  const int row_l = rg * RPW;  // first smem row of this warp's row group
  const int kw0 = wd * KW;     // first key (within the tile) of this warp's S slice
  const int dw0 = wd * DW;     // first output column of this warp
  // Per-lane ldmatrix addresses (lane supplies row lr of matrix lm), at k / key
  // offset 0. A operands (Q, P): matrices (rows 0-7|8-15) x (cols 0-7|8-15) in
  // the order (r0,c0) (r8,c0) (r0,c8) (r8,c8). K (B of Q K^T, rows = keys):
  // (k0,d0) (k0,d8) (k8,d0) (k8,d8). V (.trans, rows = keys): (k0,d0) (k8,d0)
  // (k0,d8) (k8,d8).
  const u32 aQ = sQ + (u32)(((row_l + lr + (lm & 1) * 8) * SROW + (lm >> 1) * 8) * 2);
  const u32 aP = s_base + G::P_OFF + (u32)(((row_l + lr + (lm & 1) * 8) * PROW + (lm >> 1) * 8) * 2);
  const u32 aK = sK + (u32)(((kw0 + lr + (lm >> 1) * 8) * SROW + (lm & 1) * 8) * 2);
  const u32 aV = sV + (u32)(((lr + (lm & 1) * 8) * SROW + dw0 + (lm >> 1) * 8) * 2);

  for (int jt = tb; jt < te; ++jt) {
    cp_async_wait_all();
    __syncthreads();  // K_jt (and Q) landed; every warp is done with V_{jt-1} and P
    if (jt == tb) {
      // invq of this warp's RPW rows: lanes (RPW/16) x 16 rows, lane pairs
      // (or single lanes when RPW == 32) sum one row.
      constexpr int LPR = 32 / RPW;  // lanes per row: 2 (MT=1) or 1 (MT=2)
      const int r = lane / LPR, part = lane % LPR;
      const T* qrow = reinterpret_cast<const T*>(smem + G::Q_OFF) + (row_l + r) * SROW;
      float ss = 0.f;
      for (int d0 = part * 8; d0 < DP; d0 += 8 * LPR) {
        const uint4 u = *reinterpret_cast<const uint4*>(qrow + d0);
        const u32 w4[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x0 = S::load((T)(w4[e] & 0xffffu)), x1 = S::load((T)(w4[e] >> 16));
          ss = fmaf(x0, x0, ss);
          ss = fmaf(x1, x1, ss);
        }
      }
      if (LPR == 2) ss += __shfl_xor_sync(0xffffffffu, ss, 1);
      const float sc = t * kLog2e / fmaxf(sqrtf(ss), 1e-12f);
#pragma unroll
      for (int i = 0; i < 2 * MT; ++i)  // row (i/2)*16 + g + 8*(i%2) of the warp
        qsc[i] = __shfl_sync(0xffffffffu, sc, ((i >> 1) * 16 + g + 8 * (i & 1)) * LPR);
    }
    load_rows(sV, vg, a.svn, jt * BN, BN, Nk);
    cp_async_commit();

    // ---- S = Q K^T (RPW rows x KW keys per warp)
    // Opaque copies of the lane addresses: keeps the compiler from hoisting one
    // register per unrolled (k-step, n-tile) address out of the tile loop.
    u32 aQj = aQ, aKj = aK, aVj = aV, aPj = aP;
    asm volatile("" : "+r"(aQj), "+r"(aKj), "+r"(aVj), "+r"(aPj));
    float s[MT][NTS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NTS; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      u32 af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(af[mt], aQj + (u32)((mt * 16 * SROW + ks * 16) * 2));
#pragma unroll
      for (int np = 0; np < NTS / 2; ++np) {
        u32 bf[4];
        ldsm_x4(bf, aKj + (u32)((np * 16 * SROW + ks * 16) * 2));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::mma(s[mt][2 * np], af[mt], bf[0], bf[1]);
          M::mma(s[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
      }
    }
    // ---- base-2 logits, masking keys >= Nk
    const int key0 = jt * BN;
    float mx[2 * MT];
#pragma unroll
    for (int i = 0; i < 2 * MT; ++i) mx[i] = kNegInf;
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      const int c = kw0 + nt * 8 + 2 * tig;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = key0 + c + e < Nk;
        const float ki = KIs[c + e];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          s[mt][nt][e] = ok ? s[mt][nt][e] * qsc[2 * mt] * ki : kNegInf;
          s[mt][nt][2 + e] = ok ? s[mt][nt][2 + e] * qsc[2 * mt + 1] * ki : kNegInf;
          mx[2 * mt] = fmaxf(mx[2 * mt], s[mt][nt][e]);
          mx[2 * mt + 1] = fmaxf(mx[2 * mt + 1], s[mt][nt][2 + e]);
        }
      }
    }
    if (!fixed) {
#pragma unroll
      for (int i = 0; i < 2 * MT; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      }
      if (WD > 1 && tig == 0) {  // (MT == 1 here)
        red[(rg * WD + wd) * 16 + g] = mx[0];
        red[(rg * WD + wd) * 16 + g + 8] = mx[1];
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_jt landed; every warp is done reading K_jt (and red is written)
    if (jt + 1 < te) load_k(jt + 1);
    cp_async_commit();

    if (!fixed) {
      if (WD > 1) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float m = kNegInf;
#pragma unroll
          for (int w = 0; w < WD; ++w) m = fmaxf(m, red[(rg * WD + w) * 16 + g + 8 * r]);
          mx[r] = m;
        }
      }
#pragma unroll
      for (int i = 0; i < 2 * MT; ++i) {
        const float mnew = fmaxf(mrun[i], mx[i]);  // finite: every tile has a valid key
        const float alpha = ex2(mrun[i] - mnew);   // 0 on the first tile (mrun = -inf)
        mrun[i] = mnew;
        lsum[i] *= alpha;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          o[i >> 1][nt][2 * (i & 1)] *= alpha;
          o[i >> 1][nt][2 * (i & 1) + 1] *= alpha;
        }
      }
    }
    // ---- P = 2^(logit2 - m); row sums in fp32 (per thread, reduced at the end)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
        s[mt][nt][0] = ex2(s[mt][nt][0] - mrun[2 * mt]);
        s[mt][nt][1] = ex2(s[mt][nt][1] - mrun[2 * mt]);
        s[mt][nt][2] = ex2(s[mt][nt][2] - mrun[2 * mt + 1]);
        s[mt][nt][3] = ex2(s[mt][nt][3] - mrun[2 * mt + 1]);
        lsum[2 * mt] += s[mt][nt][0] + s[mt][nt][1];
        lsum[2 * mt + 1] += s[mt][nt][2] + s[mt][nt][3];
      }
    }
    if (WD > 1) {
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
        const int c = kw0 + nt * 8 + 2 * tig;  // even -> 4-byte aligned pair
        Ps[((row_l + g) * PROW + c) >> 1] = M::pack(s[0][nt][0], s[0][nt][1]);
        Ps[((row_l + g + 8) * PROW + c) >> 1] = M::pack(s[0][nt][2], s[0][nt][3]);
      }
      __syncthreads();  // the whole row group's P tile is in shared memory
    }

    // ---- O += P V (RPW rows x DW columns per warp)
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      u32 pa[MT][4];
      if constexpr (WD == 1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          pa[mt][0] = M::pack(s[mt][(2 * kk) % NTS][0], s[mt][(2 * kk) % NTS][1]);
          pa[mt][1] = M::pack(s[mt][(2 * kk) % NTS][2], s[mt][(2 * kk) % NTS][3]);
          pa[mt][2] = M::pack(s[mt][(2 * kk + 1) % NTS][0], s[mt][(2 * kk + 1) % NTS][1]);
          pa[mt][3] = M::pack(s[mt][(2 * kk + 1) % NTS][2], s[mt][(2 * kk + 1) % NTS][3]);
        }
      } else {
        ldsm_x4(pa[0], aPj + kk * 32);
      }
#pragma unroll
      for (int np = 0; np < NTO / 2; ++np) {
        u32 bf[4];
        ldsm_x4_t(bf, aVj + (u32)((kk * 16 * SROW + np * 16) * 2));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::mma(o[mt][2 * np], pa[mt], bf[0], bf[1]);
          M::mma(o[mt][2 * np + 1], pa[mt], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait_all();

  // ---- row sums: quad, then (WD > 1) across the row group's warps
#pragma unroll
  for (int i = 0; i < 2 * MT; ++i) {
    lsum[i] += __shfl_xor_sync(0xffffffffu, lsum[i], 1);
    lsum[i] += __shfl_xor_sync(0xffffffffu, lsum[i], 2);
  }
  if (WD > 1) {  // (MT == 1 here)
    __syncthreads();  // last reads of red / P are done
    if (tig == 0) {
      red[(rg * WD + wd) * 16 + g] = lsum[0];
      red[(rg * WD + wd) * 16 + g + 8] = lsum[1];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < WD; ++w) l += red[(rg * WD + w) * 16 + g + 8 * r];
      lsum[r] = l;
    }
  }

  // ---- write out (n_split == 1) or the fp32 partials
#pragma unroll
  for (int i = 0; i < 2 * MT; ++i) {
    const int mt = i >> 1, r = i & 1;
    const int row = m0 + row_l + mt * 16 + g + 8 * r;
    if (row >= Nq) continue;
    if (a.n_split == 1) {
      const float inv = lsum[i] > 0.f ? 1.f / lsum[i] : 0.f;
      u32* orow = reinterpret_cast<u32*>(static_cast<T*>(a.out) + ((i64)bh * Nq + row) * D);
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int d = dw0 + nt * 8 + 2 * tig;
        if (d < D) orow[d >> 1] = M::pack(o[mt][nt][2 * r] * inv, o[mt][nt][2 * r + 1] * inv);
      }
    } else {
      const i64 prow = ((i64)bh * a.n_split + split) * Nq + row;
      float* wrow = a.ws_o + prow * D;
#pragma unroll
      for (int nt = 0; nt < NTO; ++nt) {
        const int d = dw0 + nt * 8 + 2 * tig;
        if (d < D) *reinterpret_cast<float2*>(wrow + d) = make_float2(o[mt][nt][2 * r], o[mt][nt][2 * r + 1]);
      }
      if (wd == 0 && tig == 0) *reinterpret_cast<float2*>(a.ws_ml + prow * 2) = make_float2(mrun[i], lsum[i]);
    }
  }
}

// ------------------------------------------------------------ fp32 (SIMT) path
constexpr int F_BM = 32, F_NT = 256, F_DC = 64, F_KROW = F_DC + 1;

template <int NC>
struct F32Geom {
  static constexpr int QROW = NC * F_DC + 1;
  static constexpr int Q_OFF = 0;                            // floats
  static constexpr int K_OFF = Q_OFF + F_BM * QROW;          // BN x KROW
  static constexpr int V_OFF = K_OFF + BN * F_KROW;          // BN x DC
  static constexpr int P_OFF = V_OFF + BN * F_DC;            // BM x KROW
  static constexpr int KI_OFF = P_OFF + F_BM * F_KROW;       // BN
  static constexpr int QI_OFF = KI_OFF + BN;                 // BM
  static constexpr int BYTES = (QI_OFF + F_BM) * 4;
};

template <int NC>
__device__ __forceinline__ void attn_f32(const Args& a, float* sm) {
  typedef F32Geom<NC> G;
  constexpr int QROW = G::QROW;
  float* Qs = sm + G::Q_OFF;
  float* Ks = sm + G::K_OFF;
  float* Vs = sm + G::V_OFF;
  float* Ps = sm + G::P_OFF;
  float* KI = sm + G::KI_OFF;
  float* QI = sm + G::QI_OFF;

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;  // rows 2ty, 2ty+1; keys / columns tx + 16c
  const int bh = blockIdx.z;
  const int b = bh / a.H, h = bh - b * a.H;
  const int m0 = blockIdx.x * F_BM;
  const int split = blockIdx.y;
  const int Nq = a.Nq, Nk = a.Nk, D = a.D;
  const int ntiles = (Nk + BN - 1) / BN;
  const int tb = split * a.tiles_per_split;
  const int te = min(tb + a.tiles_per_split, ntiles);

  const float* qg = static_cast<const float*>(a.q) + (i64)b * a.sqb + (i64)h * a.sqh;
  const float* kg = static_cast<const float*>(a.k) + (i64)b * a.skb + (i64)h * a.skh;
  const float* vg = static_cast<const float*>(a.v) + (i64)b * a.svb + (i64)h * a.svh;
  const float* kinv = a.kinv + (i64)bh * Nk;

  const float t = a.temp[h];
  const float m2fix = fabsf(t) * kLog2e;
  const bool fixed = 2.f * m2fix <= 100.f;

  // Q tile (zero beyond Nq / D) and its scale t*log2e*invq.
  for (int c = tid; c < F_BM * NC * (F_DC / 4); c += F_NT) {
    const int r = c / (NC * F_DC / 4), d = (c - r * (NC * F_DC / 4)) * 4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (m0 + r < Nq && d < D) x = *reinterpret_cast<const float4*>(qg + (i64)(m0 + r) * a.sqn + d);
    float* dst = Qs + r * QROW + d;
    dst[0] = x.x; dst[1] = x.y; dst[2] = x.z; dst[3] = x.w;
  }
  __syncthreads();
  {
    const int r = tid >> 3, part = tid & 7;  // 8 threads per row
    float ss = 0.f;
    for (int d = part; d < NC * F_DC; d += 8) ss = fmaf(Qs[r * QROW + d], Qs[r * QROW + d], ss);
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
    ss += __shfl_xor_sync(0xffffffffu, ss, 2);
    ss += __shfl_xor_sync(0xffffffffu, ss, 4);
    if (part == 0) QI[r] = t * kLog2e / fmaxf(sqrtf(ss), 1e-12f);
  }
  __syncthreads();
  const float qsc[2] = {QI[2 * ty], QI[2 * ty + 1]};

  float o[NC][2][4];
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int r = 0; r < 2; ++r) o[c][r][0] = o[c][r][1] = o[c][r][2] = o[c][r][3] = 0.f;
  float mrun[2], lsum[2] = {0.f, 0.f};
  mrun[0] = mrun[1] = fixed ? m2fix : kNegInf;

  for (int jt = tb; jt < te; ++jt) {
    const int key0 = jt * BN;
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int dc = 0; dc < NC; ++dc) {
      __syncthreads();  // previous users of Ks (and KI, Ps, Vs) are done
      for (int c = tid; c < BN * (F_DC / 4); c += F_NT) {
        const int r = c / (F_DC / 4), d = dc * F_DC + (c - r * (F_DC / 4)) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (key0 + r < Nk && d < D) x = *reinterpret_cast<const float4*>(kg + (i64)(key0 + r) * a.skn + d);
        float* dst = Ks + r * F_KROW + (d - dc * F_DC);
        dst[0] = x.x; dst[1] = x.y; dst[2] = x.z; dst[3] = x.w;
      }
      if (dc == 0 && tid < BN) KI[tid] = key0 + tid < Nk ? kinv[key0 + tid] : 0.f;
      __syncthreads();
      const float* q0 = Qs + (2 * ty) * QROW + dc * F_DC;
#pragma unroll 8
      for (int d = 0; d < F_DC; ++d) {
        const float qa = q0[d], qb = q0[QROW + d];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float kv = Ks[(tx + 16 * c) * F_KROW + d];
          s[0][c] = fmaf(qa, kv, s[0][c]);
          s[1][c] = fmaf(qb, kv, s[1][c]);
        }
      }
    }
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int key = tx + 16 * c;
      const bool ok = key0 + key < Nk;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        s[r][c] = ok ? s[r][c] * qsc[r] * KI[key] : kNegInf;
        mx[r] = fmaxf(mx[r], s[r][c]);
      }
    }
    if (!fixed) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int off = 1; off < 16; off <<= 1) mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], off));
        const float mnew = fmaxf(mrun[r], mx[r]);
        const float alpha = ex2(mrun[r] - mnew);
        mrun[r] = mnew;
        lsum[r] *= alpha;
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[c][r][e] *= alpha;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float p = ex2(s[r][c] - mrun[r]);
        lsum[r] += p;
        Ps[(2 * ty + r) * F_KROW + tx + 16 * c] = p;
      }
#pragma unroll
    for (int dc = 0; dc < NC; ++dc) {
      __syncthreads();  // Ps written; previous readers of Vs done
      for (int c = tid; c < BN * (F_DC / 4); c += F_NT) {
        const int r = c / (F_DC / 4), d = dc * F_DC + (c - r * (F_DC / 4)) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (key0 + r < Nk && d < D) x = *reinterpret_cast<const float4*>(vg + (i64)(key0 + r) * a.svn + d);
        *reinterpret_cast<float4*>(Vs + r * F_DC + (d - dc * F_DC)) = x;
      }
      __syncthreads();
      const float* p0 = Ps + (2 * ty) * F_KROW;
#pragma unroll 8
      for (int j = 0; j < BN; ++j) {
        const float pa = p0[j], pb = p0[F_KROW + j];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float vv = Vs[j * F_DC + tx + 16 * c];
          o[dc][0][c] = fmaf(pa, vv, o[dc][0][c]);
          o[dc][1][c] = fmaf(pb, vv, o[dc][1][c]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], off);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + 2 * ty + r;
    if (row >= Nq) continue;
    if (a.n_split == 1) {
      const float inv = lsum[r] > 0.f ? 1.f / lsum[r] : 0.f;
      float* orow = static_cast<float*>(a.out) + ((i64)bh * Nq + row) * D;
#pragma unroll
      for (int dc = 0; dc < NC; ++dc)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int d = dc * F_DC + tx + 16 * c;
          if (d < D) orow[d] = o[dc][r][c] * inv;
        }
    } else {
      const i64 prow = ((i64)bh * a.n_split + split) * Nq + row;
      float* wrow = a.ws_o + prow * D;
#pragma unroll
      for (int dc = 0; dc < NC; ++dc)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int d = dc * F_DC + tx + 16 * c;
          if (d < D) wrow[d] = o[dc][r][c];
        }
      if (tx == 0) *reinterpret_cast<float2*>(a.ws_ml + prow * 2) = make_float2(mrun[r], lsum[r]);
    }
  }
}

// ------------------------------------------------------------ k inverse norms
// One warp per key row: kinv[(b*H + h)*Nk + n] = 1 / max(||k[b,h,n,:]||, 1e-12).
template <typename S>
__device__ __forceinline__ void kinv_rows(const typename S::T* __restrict__ k, float* __restrict__ kinv,
                                          int H, int Nk, int D, i64 skb, i64 skh, i64 skn, i64 rows) {
  const int lane = threadIdx.x & 31;
  const i64 wstride = (i64)gridDim.x * (blockDim.x >> 5);
  for (i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += wstride) {
    const i64 bh = row / Nk;
    const i64 n = row - bh * Nk;
    const i64 b = bh / H, h = bh - b * H;
    const typename S::T* p = k + b * skb + h * skh + n * skn;
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float x = S::load(p[d]);
      ss = fmaf(x, x, ss);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (lane == 0) kinv[row] = 1.f / fmaxf(sqrtf(ss), 1e-12f);
  }
}

// ------------------------------------------------------------ split combine
// One warp per output row (bh, i); fixed summation order over the splits.
template <typename S>
__device__ __forceinline__ void combine_rows(const float* __restrict__ ws_o, const float* __restrict__ ws_ml,
                                             typename S::T* __restrict__ out, int Nq, int D, int n_split,
                                             i64 rows) {
  const int lane = threadIdx.x & 31;
  const i64 wstride = (i64)gridDim.x * (blockDim.x >> 5);
  for (i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += wstride) {
    const i64 bh = row / Nq;
    const i64 i = row - bh * Nq;
    const i64 p0 = bh * n_split * (i64)Nq + i;  // partial row of split 0; split s: p0 + s*Nq
    float M = kNegInf;
    for (int s = 0; s < n_split; ++s) M = fmaxf(M, ws_ml[(p0 + (i64)s * Nq) * 2]);
    float L = 0.f;
    for (int s = 0; s < n_split; ++s) {
      const float2 ml = *reinterpret_cast<const float2*>(ws_ml + (p0 + (i64)s * Nq) * 2);
      L += ml.y * ex2(ml.x - M);
    }
    const float invL = L > 0.f ? 1.f / L : 0.f;
    typename S::T* orow = out + row * D;
    for (int d0 = 0; d0 < D; d0 += 32 * 4) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int s = 0; s < n_split; ++s) {
        const i64 pr = p0 + (i64)s * Nq;
        const float w = ex2(ws_ml[pr * 2] - M);
        const float* src = ws_o + pr * D;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = d0 + e * 32 + lane;
          if (d < D) acc[e] = fmaf(w, src[d], acc[e]);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = d0 + e * 32 + lane;
        if (d < D) orow[d] = S::store(acc[e] * invL);
      }
    }
  }
}

}  // namespace ca
}  // namespace sipl

// ------------------------------------------------------------ entry points
// Unmangled names (looked up by CuPy, and by host-stub address from
// csrc/sipl_fast_ext.cpp). All attention entries share one signature; q/k/v/out
// are raw storage (float or 16-bit). Launch: grid (ceil(Nq/BM), n_split, B*H),
// block and dynamic shared memory as listed in the host code / _cuda.py.
#define SIPL_CA_PARAMS                                                                          \
  const void *q, const void *k, const void *v, const float *temp, const float *kinv, void *out,   \
      float *ws_o, float *ws_ml, int H, int Nq, int Nk, int D, i64 sqb, i64 sqh, i64 sqn,        \
      i64 skb, i64 skh, i64 skn, i64 svb, i64 svh, i64 svn, int tiles_per_split, int n_split
#define SIPL_CA_ARGS                                                                            \
  sipl::ca::Args a;                                                                             \
  a.q = q; a.k = k; a.v = v; a.temp = temp; a.kinv = kinv; a.out = out; a.ws_o = ws_o;          \
  a.ws_ml = ws_ml; a.H = H; a.Nq = Nq; a.Nk = Nk; a.D = D; a.sqb = sqb; a.sqh = sqh;            \
  a.sqn = sqn; a.skb = skb; a.skh = skh; a.skn = skn; a.svb = svb; a.svh = svh; a.svn = svn;    \
  a.tiles_per_split = tiles_per_split; a.n_split = n_split;

#define SIPL_CA_MMA(NAME, MMA, DP, WD, RG, MT, MINB)                                            \
  extern "C" __global__ void __launch_bounds__(32 * (WD) * (RG), MINB) NAME(SIPL_CA_PARAMS) {   \
    extern __shared__ __align__(16) unsigned char sipl_smem[];                                  \
    SIPL_CA_ARGS                                                                                \
    sipl::ca::attn_mma<sipl::ca::MMA, DP, WD, RG, MT>(a, sipl_smem);                            \
  }

#define SIPL_CA_F32(NAME, NC)                                                                   \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(SIPL_CA_PARAMS) {                   \
    extern __shared__ __align__(16) unsigned char sipl_smem[];                                  \
    SIPL_CA_ARGS                                                                                \
    sipl::ca::attn_f32<NC>(a, reinterpret_cast<float*>(sipl_smem));                             \
  }

// fp16 / bf16: DP buckets 32, 64, 96, 128 (WD=1, RG=4, MT=2: BM=128, 128 threads) and
// 192, 256, 384, 512 (WD=4, RG=4, MT=1: BM=64, 512 threads).
SIPL_CA_MMA(cosine_attention_fwd_bf16_d32, MmaBF16, 32, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d64, MmaBF16, 64, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d96, MmaBF16, 96, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d128, MmaBF16, 128, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d192, MmaBF16, 192, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d256, MmaBF16, 256, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d384, MmaBF16, 384, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_bf16_d512, MmaBF16, 512, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_f16_d32, MmaF16, 32, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_f16_d64, MmaF16, 64, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_f16_d96, MmaF16, 96, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_f16_d128, MmaF16, 128, 1, 4, 2, 2)
SIPL_CA_MMA(cosine_attention_fwd_f16_d192, MmaF16, 192, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_f16_d256, MmaF16, 256, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_f16_d384, MmaF16, 384, 4, 4, 1, 1)
SIPL_CA_MMA(cosine_attention_fwd_f16_d512, MmaF16, 512, 4, 4, 1, 1)

// fp32: NC = ceil(D / 64) chunks of 64 columns (BM=32, 256 threads).
SIPL_CA_F32(cosine_attention_fwd_f32_d64, 1)
SIPL_CA_F32(cosine_attention_fwd_f32_d128, 2)
SIPL_CA_F32(cosine_attention_fwd_f32_d192, 3)
SIPL_CA_F32(cosine_attention_fwd_f32_d256, 4)
SIPL_CA_F32(cosine_attention_fwd_f32_d320, 5)
SIPL_CA_F32(cosine_attention_fwd_f32_d384, 6)
SIPL_CA_F32(cosine_attention_fwd_f32_d448, 7)
SIPL_CA_F32(cosine_attention_fwd_f32_d512, 8)

// k inverse norms (pre-pass) and split combine: 256 threads (8 warps, one row each).
#define SIPL_CA_AUX(SUFFIX, S)                                                                  \
  extern "C" __global__ void cosine_attention_kinv_##SUFFIX(                                   \
      const S::T* __restrict__ k, float* __restrict__ kinv, int H, int Nk, int D, i64 skb,        \
      i64 skh, i64 skn, i64 rows) {                                                             \
    sipl::ca::kinv_rows<S>(k, kinv, H, Nk, D, skb, skh, skn, rows);                              \
  }                                                                                             \
  extern "C" __global__ void cosine_attention_combine_##SUFFIX(                                \
      const float* __restrict__ ws_o, const float* __restrict__ ws_ml, S::T* __restrict__ out,   \
      int Nq, int D, int n_split, i64 rows) {                                                   \
    sipl::ca::combine_rows<S>(ws_o, ws_ml, out, Nq, D, n_split, rows);                           \
  }

SIPL_CA_AUX(f32, sipl::F32)
SIPL_CA_AUX(f16, sipl::F16)
SIPL_CA_AUX(bf16, sipl::BF16)
