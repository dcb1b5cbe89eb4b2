// Convolution backward pass with respect to the weights and the bias,
// batch-last layout: split-K over slabs of the columns (partial kernel), then a
// fixed-order sum of the slabs (reduce kernel).  Deterministic, no atomics.
//
// Entry points: conv_backward_weight_partial / conv_backward_weight_reduce
// (float32) and the same names with _f64 (float64), each the same template
// instantiated twice; T below is float or double.  Host wrapper:
// gpucnn/cuda/conv.py (conv_backward_weight).  Compiled at run time by
// gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and, in the tests, run
// unchanged on the CPU by tests/cudasim.  No #includes.
//
// ---------------------------------------------------------------------------
// Formula (seed 003: dL/dW = conv(X, dL/dZ)):
//
//   dW[o,c,u,v] = sum_{i,j,n} dz[o,i,j,n] * xpad[c, i*SH+u, j*SW+v, n]
//   db[o]       = sum_{i,j,n} dz[o,i,j,n]
//
// xpad: x with PH / PW zeros on each side.  As a GEMM with the reduction over
// the columns p = (i*OW + j)*N + n (P = OH*OW*N of them):
//   G[o, k] = sum_p dz[o, p] * X[k, p],  k = (c*KH+u)*KW+v < K = C*KH*KW,
//   X[K, p] = 1 (the "ones" row: G[o, K] = db[o]),
// so the partial results have K1 = K + 1 columns.
//
// conv_backward_weight_partial -----------------------------------------------
// Computes partial[s, o, k] = sum over p in slab s of dz[o, p] * X[k, p] for
// every o < O, k <= K, where slab s = [s*slab, min((s+1)*slab, P)).
//   Launch shape: block = (8, 4, 1) exactly (32 threads); grid =
//   (ceil(K1 / 32), ceil(O / 16), S) with S = ceil(P / slab), slab >= 1 (the
//   wrapper uses a multiple of 16).  Static shared memory: 4352 B of column
//   tables + (16*20 + 16*36) T: 7936 B (float) / 11520 B (double).
//   Block tile: 16 output channels (o = 16*blockIdx.y + [0,16)) x 32 columns of
//   G (k = 32*blockIdx.x + [0,32)); thread (tx, ty) owns the 4 x 4 register block
//   o = 16*by + 4*ty + [0,4), k = 32*bx + 4*tx + [0,4).
//   The slab is walked in segments of 256 columns: per segment the block builds
//   a table of its columns in shared memory (offset of x[0, i*SH-PH, j*SW-PW, n]
//   and the "bad tap" masks: bit u set when row i*SH+u-PH lies outside [0, H),
//   bit v likewise, bit 31 always set; columns past the segment: all bits set --
//   the only divisions, once per column per segment).  The main loop walks the
//   segment in slices of 16 columns: the gather of the next slice is issued into
//   registers (X: 8 rows x 2 columns per thread, its rows fixed for the block,
//   coalesced along n; dz: 8 rows of one column per thread, coalesced along p),
//   the current slice is multiplied from shared memory (per column: 4 + 4
//   values, 16 FMAs) and the registers are stored between two barriers.
//   X[k, p] is loaded iff (mask_h(p) & (1<<u)) | (mask_w(p) & (1<<v)) == 0,
//   else it is the row's fill value: 0, or 1 for the ones row (which carries
//   bit 31, so it is never loaded).  dz past the slab reads as 0, so the ones
//   row adds nothing there.  Hence KH, KW <= 31 (the wrapper checks).
//   Order: each partial element is ONE thread's sum over its slab's columns in
//   increasing p (fused multiply-adds).
//
// conv_backward_weight_reduce -------------------------------------------------
// For e = o*K1 + k < O*K1: G = sum_{s=0}^{S-1} partial[s, e], then
//   dW[o*K + k] = G for k < K;  db[o] = G for k == K (only when has_bias != 0).
//   Launch shape: block = (BX, BY, 1), BX*BY <= 256, BY a power of two;
//   grid = (ceil(O*K1 / BX), 1, 1).  Thread (x, y) sums s = y, y+BY, y+2*BY, ...
//   in increasing order for e = BX*blockIdx.x + x; the BY partial sums are then
//   added by a fixed shared-memory tree (y with y + h, h = BY/2, BY/4, ..., 1).
//   The order depends on (S, BY) only: the wrapper derives both from the shapes.
//   Static shared memory: 256 T.
//
// Layouts (all C-contiguous, batch-last):
//   x : (C, H, W, N)    dz : (O, OH, OW, N)    partial : (S, O, K+1)
//   dW : (O, C, KH, KW) written, every element exactly once;  db : (O,) written
//   when has_bias != 0 (any valid pointer otherwise).
//
// Preconditions (checked on the host by gpucnn/cuda/conv.py and the launcher):
//   OH, OW >= 1; SH, SW >= 1; PH, PW >= 0; 1 <= KH, KW <= 31; every array and
//   offset fits int32; S <= 65535; outputs alias no input.
// ---------------------------------------------------------------------------

#define CW_BM 16          // output channels per block
#define CW_TM 4           // output channels per thread
#define CW_BN 32          // G columns (k) per block
#define CW_TN 4           // G columns per thread
#define CW_TX 8           // blockDim.x (CW_BN / CW_TN)
#define CW_TY 4           // blockDim.y (CW_BM / CW_TM)
#define CW_BP 16          // reduction columns (p) per slice
#define CW_SEG 256        // reduction columns per segment (a multiple of CW_BP)
#define CW_XS 36          // row stride of the X slice (32 + 4 pad), X stored as [p][k]
#define CW_DS 20          // row stride of the dz slice (16 + 4 pad), dz stored as [p][o]
#define CW_XR 8           // X rows per thread per slice
#define CW_XC 2           // X columns per thread per slice
#define CW_DR 8           // dz rows per thread per slice
#define CW_RED 256        // largest reduce block

// "Bad tap" mask: bit t clear iff lo <= t < hi (hi <= 31), every other bit set.
__device__ __forceinline__ unsigned conv_bww_bad_bits(int lo, int hi)
{
    lo = lo < 0 ? 0 : lo;
    if (hi <= lo) return 0xffffffffu;
    return ~(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

template <typename T>
__device__ __forceinline__ void conv_backward_weight_partial_impl(
    const T* __restrict__ x, const T* __restrict__ dz, T* __restrict__ partial,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int slab, int4* col, T* xs, T* ds)
{
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * CW_TX + tx;                      // 0 .. 31
    const int P = OH * OW * N, KHW = KH * KW, K = C * KHW, K1 = K + 1;
    const int k0 = blockIdx.x * CW_BN, m0 = blockIdx.y * CW_BM;
    const int ps = blockIdx.z * slab;
    const int pe = min(P, ps + slab);

    // This thread's X rows k0 + tid/8 + 4*q (fixed for the block) and columns
    // tid%8 + 8*j of each slice.
    const T* xrow[CW_XR];                                  // &x[c, u, v, 0] (x for the other rows)
    unsigned kbu[CW_XR], kbv[CW_XR];
    T kfill[CW_XR];
#pragma unroll
    for (int q = 0; q < CW_XR; ++q) {
        const int k = k0 + tid / CW_TX + 4 * q;
        xrow[q] = x;
        kbu[q] = 0x80000000u;                              // never loaded ...
        kbv[q] = 0u;
        kfill[q] = k == K ? T(1) : T(0);                   // ... the ones row reads 1, the rest 0
        if (k < K) {
            const int c = k / KHW, t = k - c * KHW, u = t / KW, v = t - u * KW;
            xrow[q] = x + ((c * H + u) * W + v) * N;
            kbu[q] = 1u << u;
            kbv[q] = 1u << v;
        }
    }
    const int xcol = tid % CW_TX;
    // dz rows m0 + tid/16 + 2*q (clamped into range: rows >= O only feed results
    // that are never written) of column tid%16 of each slice.
    int drow[CW_DR];
#pragma unroll
    for (int q = 0; q < CW_DR; ++q) drow[q] = min(m0 + tid / 16 + 2 * q, O - 1) * P;
    const int dcol = tid % 16;

    T acc[CW_TM][CW_TN];
#pragma unroll
    for (int i = 0; i < CW_TM; ++i)
#pragma unroll
        for (int j = 0; j < CW_TN; ++j) acc[i][j] = T(0);

    T xr[CW_XR][CW_XC], dr[CW_DR];
    T* const xs_store = xs + xcol * CW_XS + tid / CW_TX;  // + j*8*CW_XS + 4*q
    T* const ds_store = ds + dcol * CW_DS + tid / 16;     // + 2*q
    const T* const xs_load = xs + tx * CW_TN;             // + pp*CW_XS + j
    const T* const ds_load = ds + ty * CW_TM;             // + pp*CW_DS + i

    for (int sg0 = ps; sg0 < pe; sg0 += CW_SEG) {
        const int sl = min(CW_SEG, pe - sg0);
        const int ns = (sl + CW_BP - 1) / CW_BP;
        __syncthreads();                                  // previous segment fully consumed
        for (int r = tid; r < ns * CW_BP + CW_BP; r += CW_TX * CW_TY) {
            int4 e = make_int4(0, (int)0xffffffffu, (int)0xffffffffu, 0);
            if (r < sl) {
                const int p = sg0 + r;
                const int q = p / N, n = p - q * N;
                const int i = q / OW, j = q - i * OW;
                const int ih0 = i * SH - PH, iw0 = j * SW - PW;
                e = make_int4((ih0 * W + iw0) * N + n,
                              (int)conv_bww_bad_bits(-ih0, min(KH, H - ih0)),
                              (int)conv_bww_bad_bits(-iw0, min(KW, W - iw0)), 0);
            }
            col[r] = e;
        }
        __syncthreads();

        // Gather slice 0 of the segment.
#pragma unroll
        for (int j = 0; j < CW_XC; ++j) {
            const int4 e = col[xcol + CW_TX * j];
#pragma unroll
            for (int q = 0; q < CW_XR; ++q) {
                T v = kfill[q];
                if ((((unsigned)e.y & kbu[q]) | ((unsigned)e.z & kbv[q])) == 0u) v = xrow[q][e.x];
                xr[q][j] = v;
            }
        }
        {
            const bool ok = dcol < sl;
#pragma unroll
            for (int q = 0; q < CW_DR; ++q) dr[q] = ok ? dz[drow[q] + sg0 + dcol] : T(0);
        }

        for (int s = 0; s < ns; ++s) {
#pragma unroll
            for (int j = 0; j < CW_XC; ++j)
#pragma unroll
                for (int q = 0; q < CW_XR; ++q) xs_store[j * CW_TX * CW_XS + 4 * q] = xr[q][j];
#pragma unroll
            for (int q = 0; q < CW_DR; ++q) ds_store[2 * q] = dr[q];
            __syncthreads();
            // Prefetch slice s+1 (past the segment: the all-bits-set columns, dz 0).
            const int c1 = (s + 1) * CW_BP;
#pragma unroll
            for (int j = 0; j < CW_XC; ++j) {
                const int4 e = col[c1 + xcol + CW_TX * j];
#pragma unroll
                for (int q = 0; q < CW_XR; ++q) {
                    T v = kfill[q];
                    if ((((unsigned)e.y & kbu[q]) | ((unsigned)e.z & kbv[q])) == 0u) v = xrow[q][e.x];
                    xr[q][j] = v;
                }
            }
            {
                const bool ok = c1 + dcol < sl;
                const int pc = sg0 + c1 + dcol;
#pragma unroll
                for (int q = 0; q < CW_DR; ++q) dr[q] = ok ? dz[drow[q] + pc] : T(0);
            }
            // Multiply slice s.
#pragma unroll
            for (int pp = 0; pp < CW_BP; ++pp) {
                T a[CW_TM], bv[CW_TN];
#pragma unroll
                for (int i = 0; i < CW_TM; ++i) a[i] = ds_load[pp * CW_DS + i];
#pragma unroll
                for (int j = 0; j < CW_TN; ++j) bv[j] = xs_load[pp * CW_XS + j];
#pragma unroll
                for (int i = 0; i < CW_TM; ++i)
#pragma unroll
                    for (int j = 0; j < CW_TN; ++j) acc[i][j] += a[i] * bv[j];
            }
            __syncthreads();
        }
    }

    // Epilogue: partial[s, o, k].
#pragma unroll
    for (int i = 0; i < CW_TM; ++i) {
        const int o = m0 + ty * CW_TM + i;
        if (o >= O) continue;
        T* const row = partial + (blockIdx.z * O + o) * K1;
#pragma unroll
        for (int j = 0; j < CW_TN; ++j) {
            const int k = k0 + tx * CW_TN + j;
            if (k < K1) row[k] = acc[i][j];
        }
    }
}

template <typename T>
__device__ __forceinline__ void conv_backward_weight_reduce_impl(
    const T* __restrict__ partial, T* __restrict__ dw, T* __restrict__ db,
    int S, int O, int K, int has_bias, T* red)
{
    const int BX = blockDim.x, BY = blockDim.y;
    const int x = threadIdx.x, y = threadIdx.y;
    const int K1 = K + 1, E = O * K1;
    const int e = blockIdx.x * BX + x;
    T sum = T(0);
    if (e < E)
        for (int s = y; s < S; s += BY) sum += partial[s * E + e];
    red[y * BX + x] = sum;
    __syncthreads();
    for (int h = BY / 2; h > 0; h /= 2) {
        if (y < h) red[y * BX + x] += red[(y + h) * BX + x];
        __syncthreads();
    }
    if (y == 0 && e < E) {
        const int o = e / K1, k = e - o * K1;
        if (k < K) dw[o * K + k] = red[x];
        else if (has_bias != 0) db[o] = red[x];
    }
}

extern "C" __global__ void __launch_bounds__(32) conv_backward_weight_partial(
    const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ partial,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int slab)
{
    __shared__ int4 col[CW_SEG + CW_BP];
    __shared__ float xs[CW_BP * CW_XS];
    __shared__ float ds[CW_BP * CW_DS];
    conv_backward_weight_partial_impl(x, dz, partial, C, H, W, N, O, KH, KW, OH, OW,
                                      SH, SW, PH, PW, slab, col, xs, ds);
}

extern "C" __global__ void __launch_bounds__(32) conv_backward_weight_partial_f64(
    const double* __restrict__ x, const double* __restrict__ dz, double* __restrict__ partial,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int slab)
{
    __shared__ int4 col[CW_SEG + CW_BP];
    __shared__ double xs[CW_BP * CW_XS];
    __shared__ double ds[CW_BP * CW_DS];
    conv_backward_weight_partial_impl(x, dz, partial, C, H, W, N, O, KH, KW, OH, OW,
                                      SH, SW, PH, PW, slab, col, xs, ds);
}

extern "C" __global__ void __launch_bounds__(256) conv_backward_weight_reduce(
    const float* __restrict__ partial, float* __restrict__ dw, float* __restrict__ db,
    int S, int O, int K, int has_bias)
{
    __shared__ float red[CW_RED];
    conv_backward_weight_reduce_impl(partial, dw, db, S, O, K, has_bias, red);
}

extern "C" __global__ void __launch_bounds__(256) conv_backward_weight_reduce_f64(
    const double* __restrict__ partial, double* __restrict__ dw, double* __restrict__ db,
    int S, int O, int K, int has_bias)
{
    __shared__ double red[CW_RED];
    conv_backward_weight_reduce_impl(partial, dw, db, S, O, K, has_bias, red);
}
