// Convolution forward pass, batch-last layout, as a shared-memory tiled
// implicit GEMM with the bias and the activation fused into the epilogue.
//
// Entry points: conv_forward (float32) and conv_forward_f64 (float64), the same
// template instantiated twice; T below is float or double.  Host wrapper:
// gpucnn/cuda/conv.py (conv_forward).  Compiled at run time by
// gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and, in the tests, run
// unchanged on the CPU by tests/cudasim.  Includes activation.cuh (the act
// codes) and opaque.cuh (gpucnn/cuda/sources.py expands both in place).
//
// ---------------------------------------------------------------------------
// Formula (the seeds' cross-correlation; W is the seeds' rot180(k)):
//
//   z[o,i,j,n] = b[o] + sum_{c,u,v} xpad[c, i*SH+u, j*SW+v, n] * W[o,c,u,v]
//   y[o,i,j,n] = act(z[o,i,j,n])
//
// xpad is x with PH rows / PW columns of zeros on each side; the b[o] term only
// when has_bias != 0.  act codes (kernels/activation.cuh): 0 none (y = z),
// 1 relu (NaN in, NaN out), 2 sigmoid (stable: e = exp(-|z|),
// z >= 0 ? 1/(1+e) : e/(1+e)), 3 tanh.
// When write_z != 0, z is written as well (relu without a following pool keeps
// it for its backward pass).
//
// As a GEMM: M = O (rows), the reduction K = C*KH*KW (index k = (c*KH+u)*KW+v),
// the columns P = OH*OW*N (index p = (i*OW+j)*N+n, batch innermost):
//   z[o, p] = b[o] + sum_k W[o, k] * X[k, p],   X[k, p] = xpad[c, i*SH+u, j*SW+v, n]
// (W is read as its C-contiguous (O, K) view; X is never materialised).
//
// Layouts (all C-contiguous, batch-last):
//   x : (C, H, W, N)       b : (O,)  (read only when has_bias != 0; any valid pointer otherwise)
//   W : (O, C, KH, KW)     y, z : (O, OH, OW, N), every element written exactly once
//                          (z only when write_z != 0; z may then alias nothing, and
//                          may be any valid pointer, even y, when write_z == 0)
//
// Launch shape: block = (TX, TY, 1) with TX in {1, 2, 4, 8, 16} and TY = 4
// (BM = 16 rows per block) or TY = 2 (BM = 8 rows: the wrapper's choice when
// O <= 8, so that a 6-channel layer does not multiply 10 rows of zeros);
// grid = (ceil(P / (4*TX)), ceil(O / BM), 1).  Static shared memory:
// 2816 B of tables + (160*16 + 16*68) T: 17408 B (float) / 32000 B (double)
// (BM = 8 uses half of the W chunk); no dynamic shared memory.
//
// Block tile: BM output channels (o = BM*blockIdx.y + [0, BM)) x BP = 4*TX
// columns (p = BP*blockIdx.x + [0, BP)).  Thread (tx, ty) owns the 4 x 4
// register block o = BM*by + 4*ty + [0,4), p = BP*bx + 4*tx + [0,4).
//
// Reduction: the K axis is walked in chunks of CF_KC = 160 rows; per chunk the
// block builds a table of the chunk's rows in shared memory (tab[r]: offset of
// x[c, u, v, 0] relative to x[0, 0, 0, 0] and the tap bits 1<<u, 1<<v: the only
// divisions, once per row per chunk) and stages the chunk of W transposed
// (ws[r][m]).  Then the main loop walks the chunk in slices of CF_BK = 16 rows:
// the im2col gather of the next slice is issued into registers (16/TY rows x 4
// columns per thread, coalesced along p, i.e. along n), the current slice is
// multiplied from shared memory (per row: 4 + 4 values, 16 FMAs), and the
// registers are stored into the one X slice buffer between two barriers.
// Zero padding: each gathered column keeps two "bad tap" bit masks (bit u set
// when row i*SH+u-PH lies outside [0, H), bit v likewise for columns, bit 31
// always set); a row is loaded iff (mask_h & (1<<u)) | (mask_w & (1<<v)) == 0,
// else 0 is used.  Rows past the chunk carry bit 31 (never loaded, 0), columns
// past P have all bits set.  Hence KH, KW <= 31 (the wrapper checks).
//
// Determinism: every output is ONE thread's sum over k = 0, 1, ..., K-1 in
// increasing order (fused multiply-adds), then + b[o], independent of the
// launch shape; no atomics.
//
// Preconditions (checked on the host by gpucnn/cuda/conv.py and the launcher):
//   OH = (H + 2*PH - KH)/SH + 1 >= 1, OW likewise; SH, SW >= 1; PH, PW >= 0;
//   1 <= KH, KW <= 31; every array and every offset fits int32; y, z alias
//   neither x, W nor b.
// ---------------------------------------------------------------------------

#include "activation.cuh"   // activation(z, act): the epilogue's act
#include "opaque.cuh"       // opaque(p): each column's gather base stays in registers

#define CF_BM 16          // output channels per block (GEMM rows), at most: 16 or 8
#define CF_TM 4           // rows per thread
#define CF_TP 4           // columns per thread
#define CF_MAX_TX 16      // blockDim.x at most: BP = 4 * blockDim.x <= 64
#define CF_XS 68          // row stride of the X slice in shared memory (64 + 4 pad)
#define CF_BK 16          // reduction rows per slice
#define CF_KC 160         // reduction rows per chunk (a multiple of CF_BK)

// "Bad tap" mask: bit t clear iff lo <= t < hi (hi <= 31), every other bit set.
__device__ __forceinline__ unsigned conv_fwd_bad_bits(int lo, int hi)
{
    lo = lo < 0 ? 0 : lo;
    if (hi <= lo) return 0xffffffffu;
    return ~(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// The block's rows as a deduced tag (cudasim spots helpers that synchronize by "name(").
template <int BM> struct CfRows {};

// BM = 16 rows (blockDim.y == TY == 4) or 8 rows (TY == 2); slices of BK = 16
// rows, of which each thread gathers RPT = 16 / TY rows x 4 columns.
template <typename T, int BM>
__device__ __forceinline__ void conv_forward_impl(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
    T* __restrict__ y, T* __restrict__ z,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int has_bias, int act, int write_z,
    int4* tab, T* ws, T* xs, CfRows<BM>)
{
    enum { TY = BM / CF_TM, BK = CF_BK, RPT = BK / TY };
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x;
    const int nthreads = TX * TY, tid = ty * TX + tx;
    const int P = OH * OW * N, KHW = KH * KW, K = C * KHW;
    const int p0 = blockIdx.x * (TX * CF_TP);
    const int m0 = blockIdx.y * BM;

    // The gather columns of this thread, p0 + tx + TX*j: decomposed once.  xb[j] = x + the
    // column's offset, kept in registers (opaque.cuh): an element is xb[j][tab offset].
    int cb[CF_TP];
    unsigned cmh[CF_TP], cmw[CF_TP];
#pragma unroll
    for (int j = 0; j < CF_TP; ++j) {
        const int p = p0 + tx + TX * j;
        cb[j] = 0;
        cmh[j] = 0xffffffffu;
        cmw[j] = 0xffffffffu;
        if (p < P) {
            const int q = p / N, n = p - q * N;
            const int i = q / OW, jj = q - i * OW;
            const int ih0 = i * SH - PH, iw0 = jj * SW - PW;
            cb[j] = (ih0 * W + iw0) * N + n;
            cmh[j] = conv_fwd_bad_bits(-ih0, min(KH, H - ih0));
            cmw[j] = conv_fwd_bad_bits(-iw0, min(KW, W - iw0));
        }
    }

    const T* xb[CF_TP];
#pragma unroll
    for (int j = 0; j < CF_TP; ++j) xb[j] = opaque(x + cb[j]);

    T acc[CF_TM][CF_TP];
#pragma unroll
    for (int i = 0; i < CF_TM; ++i)
#pragma unroll
        for (int j = 0; j < CF_TP; ++j) acc[i][j] = T(0);

    T reg[RPT][CF_TP];
    T* const xs_store = xs + ty * CF_XS + tx;              // + (TY*rr)*CF_XS + TX*j
    const T* const xs_load = xs + tx * CF_TP;              // + kk*CF_XS + j
    const T* const ws_load = ws + ty * CF_TM;              // + (s*BK + kk)*BM + i

    for (int kc0 = 0; kc0 < K; kc0 += CF_KC) {
        const int kc = min(CF_KC, K - kc0);
        const int ns = (kc + BK - 1) / BK;
        __syncthreads();                                   // previous chunk fully consumed
        // Row table of the chunk, plus one slice of "never valid" rows so that the
        // prefetch of slice ns (past the chunk) loads nothing.
        for (int r = tid; r < ns * BK + BK; r += nthreads) {
            int4 e = make_int4(0, (int)0x80000000u, 0, 0);
            if (r < kc) {
                const int k = kc0 + r;
                const int c = k / KHW, t = k - c * KHW;
                const int u = t / KW, v = t - u * KW;
                e = make_int4(((c * H + u) * W + v) * N, 1 << u, 1 << v, 0);
            }
            tab[r] = e;
        }
        // W chunk, transposed: ws[r*16 + m] = W[m0+m, kc0+r] (0 outside), coalesced along r.
        // A thread's 16 loads of a row r are all issued before any of its stores (16
        // independent loads in flight, not one load -> store -> branch per element).
        for (int r = tid; r < ns * BK; r += nthreads) {
            const T* const wr = w + (m0 * K + kc0 + r);
            const int mv = r < kc ? min(BM, O - m0) : 0;   // rows of W that exist
            T wv[BM];
#pragma unroll
            for (int m = 0; m < BM; ++m) wv[m] = m < mv ? wr[m * K] : T(0);
#pragma unroll
            for (int m = 0; m < BM; ++m) ws[r * BM + m] = wv[m];
        }
        __syncthreads();

        // Gather slice 0.
#pragma unroll
        for (int rr = 0; rr < RPT; ++rr) {
            const int4 e = tab[ty + TY * rr];
#pragma unroll
            for (int j = 0; j < CF_TP; ++j) {
                T v = T(0);
                if (((cmh[j] & (unsigned)e.y) | (cmw[j] & (unsigned)e.z)) == 0u) v = __ldg(xb[j] + (unsigned)e.x);
                reg[rr][j] = v;
            }
        }

        for (int s = 0; s < ns; ++s) {
#pragma unroll
            for (int rr = 0; rr < RPT; ++rr)
#pragma unroll
                for (int j = 0; j < CF_TP; ++j) xs_store[TY * rr * CF_XS + TX * j] = reg[rr][j];
            __syncthreads();
            // Prefetch slice s+1 (the padding rows when s+1 == ns: nothing is loaded).
            const int4* const trow = tab + (s + 1) * BK + ty;
#pragma unroll
            for (int rr = 0; rr < RPT; ++rr) {
                const int4 e = trow[TY * rr];
#pragma unroll
                for (int j = 0; j < CF_TP; ++j) {
                    T v = T(0);
                    if (((cmh[j] & (unsigned)e.y) | (cmw[j] & (unsigned)e.z)) == 0u) v = __ldg(xb[j] + (unsigned)e.x);
                    reg[rr][j] = v;
                }
            }
            // Multiply slice s.
            const T* const wrow = ws_load + s * (BK * BM);
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                T a[CF_TM], bv[CF_TP];
#pragma unroll
                for (int i = 0; i < CF_TM; ++i) a[i] = wrow[kk * BM + i];
#pragma unroll
                for (int j = 0; j < CF_TP; ++j) bv[j] = xs_load[kk * CF_XS + j];
#pragma unroll
                for (int i = 0; i < CF_TM; ++i)
#pragma unroll
                    for (int j = 0; j < CF_TP; ++j) acc[i][j] += a[i] * bv[j];
            }
            __syncthreads();
        }
    }

    // Epilogue: + bias, activation, coalesced stores along p.
#pragma unroll
    for (int i = 0; i < CF_TM; ++i) {
        const int o = m0 + ty * CF_TM + i;
        if (o >= O) continue;
        const T bias = has_bias != 0 ? b[o] : T(0);
#pragma unroll
        for (int j = 0; j < CF_TP; ++j) {
            const int p = p0 + tx * CF_TP + j;
            if (p < P) {
                const T zv = acc[i][j] + bias;
                if (write_z != 0) z[o * P + p] = zv;
                y[o * P + p] = activation(zv, act);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(64) conv_forward(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, float* __restrict__ z,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int has_bias, int act, int write_z)
{
    __shared__ int4 tab[CF_KC + CF_BK];
    __shared__ float ws[CF_KC * CF_BM];
    __shared__ float xs[CF_BK * CF_XS];
    if (blockDim.y == 2)                                   // 8-row tiles (O <= 8)
        conv_forward_impl(x, w, b, y, z, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW,
                          has_bias, act, write_z, tab, ws, xs, CfRows<8>());
    else
        conv_forward_impl(x, w, b, y, z, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW,
                          has_bias, act, write_z, tab, ws, xs, CfRows<16>());
}

extern "C" __global__ void __launch_bounds__(64) conv_forward_f64(
    const double* __restrict__ x, const double* __restrict__ w, const double* __restrict__ b,
    double* __restrict__ y, double* __restrict__ z,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int has_bias, int act, int write_z)
{
    __shared__ int4 tab[CF_KC + CF_BK];
    __shared__ double ws[CF_KC * CF_BM];
    __shared__ double xs[CF_BK * CF_XS];
    if (blockDim.y == 2)                                   // 8-row tiles (O <= 8)
        conv_forward_impl(x, w, b, y, z, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW,
                          has_bias, act, write_z, tab, ws, xs, CfRows<8>());
    else
        conv_forward_impl(x, w, b, y, z, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW,
                          has_bias, act, write_z, tab, ws, xs, CfRows<16>());
}
