// Convolution backward pass with respect to the input, batch-last layout: a
// deterministic gather, tiled per stride phase as a shared-memory implicit GEMM.
//
// Entry points: conv_backward_input (float32) and conv_backward_input_f64
// (float64), the same template instantiated twice; T below is float or double.
// Host wrapper: gpucnn/cuda/conv.py (conv_backward_input).  Compiled at run time
// by gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and, in the tests, run
// unchanged on the CPU by tests/cudasim.  Includes opaque.cuh (gpucnn/cuda/sources.py
// expands it in place).
//
// ---------------------------------------------------------------------------
// Formula (seed 003: dx = conv(padded(dL/dZ) dilated by the stride, rot180 K),
// cropped), as a gather:
//
//   dx[c,h,w,n] = sum over (o,u,v) with (h+PH-u) % SH == 0, (w+PW-v) % SW == 0,
//                 0 <= (h+PH-u)/SH < OH, 0 <= (w+PW-v)/SW < OW of
//                 dz[o, (h+PH-u)/SH, (w+PW-v)/SW, n] * W[o,c,u,v]
//
// and 0 where no window reaches (h, w).  OH = (H + 2*PH - KH)/SH + 1, OW likewise.
//
// Phases.  Position h has the phase rh = (h+PH) mod SH; only the taps
// u = rh + SH*a (a = 0 .. KHp-1, KHp = ceil((KH-rh)/SH), 0 when rh >= KH) reach
// it, from the dz row i = qh - a where qh = (h+PH) div SH.  Columns likewise
// (rw, v = rw + SW*b, KWp, qw).  So for each phase (rh, rw) the positions of
// that phase form one GEMM:
//   M = C (rows), reduction index k = (o*KHp + a)*KWp + b (Kp = O*KHp*KWp rows),
//   columns p = (th*nw + tw)*N + n over the phase's positions
//   h = hf + SH*th (th < nh), w = wf + SW*tw (tw < nw), hf = (rh-PH) mod SH,
//   dx[c, p] = sum_k W[o, c, rh+SH*a, rw+SW*b] * dz[o, qh-a, qw-b, n]
// with the terms whose dz row/column falls outside [0,OH) x [0,OW) skipped
// (read as 0).  Stride 1 is one phase: the plain "full" correlation with
// rot180(W) and every tap.  A phase with Kp == 0 (stride > kernel) writes zeros.
//
// Layouts (all C-contiguous, batch-last):
//   dz : (O, OH, OW, N)    W : (O, C, KH, KW)
//   dx : (C, H, W, N)      written, every element exactly once
//
// Launch shape: block = (TX, TY, 1) with TX in {1, 2, 4, 8, 16} and TY = 4
// (BM = 16 rows per block) or TY = 2 (BM = 8 rows: the wrapper's choice when
// C <= 8); grid = (sum over the SH*SW phases, in order ph = rh*SW + rw, of
// ceil(nh*nw*N / (4*TX)), ceil(C / BM), 1): blockIdx.x enumerates the column
// tiles of phase 0, then of phase 1, ... (each block finds its phase with a
// short loop over the phases, once).  Static shared memory: 2816 B of tables
// + (160*16 + 16*68) T: 17408 B (float) / 32000 B (double).
//
// Block tile: BM input channels (c = BM*blockIdx.y + [0, BM)) x BP = 4*TX
// columns of one phase; thread (tx, ty) owns the 4 x 4 register block
// c = BM*by + 4*ty + [0,4), p = p0 + 4*tx + [0,4).  The main loop is the one of
// kernels/conv_forward.cu: the reduction in chunks of 160 rows (a shared table
// per chunk: dz offset of (o, -a, -b), tap bits 1<<a, 1<<b, and the W offset;
// the W chunk staged transposed from it), slices of BM rows gathered into
// registers one slice ahead (4 rows x 4 columns per thread, coalesced along n)
// and multiplied from shared memory.  Validity: per gathered column the bit
// masks of the a with qh-a outside [0, OH) and of the b with qw-b outside
// [0, OW) (bit 31 always set: the padding rows past a chunk carry it).  Hence
// KHp, KWp <= 31, i.e. KH, KW <= 31 (the wrapper checks).
//
// Determinism: each dx element is ONE thread's sum over k = 0 .. Kp-1 of its
// phase in increasing order (o, then a, then b), independent of the launch
// shape; no atomics.
//
// Preconditions (checked on the host by gpucnn/cuda/conv.py and the launcher):
//   OH, OW >= 1 as above; SH, SW >= 1; PH, PW >= 0; 1 <= KH, KW <= 31; every
//   array and offset fits int32; dx aliases neither dz nor W.
// ---------------------------------------------------------------------------

#include "opaque.cuh"   // opaque(p): each column's gather base stays in registers

#define CI_BM 16          // input channels per block (GEMM rows), at most: 16 or 8
#define CI_TM 4           // rows per thread
#define CI_TP 4           // columns per thread
#define CI_XS 68          // row stride of the dz slice in shared memory (64 + 4 pad)
#define CI_BK 16          // reduction rows per slice
#define CI_KC 160         // reduction rows per chunk (a multiple of CI_BK)

// "Bad tap" mask: bit t clear iff lo <= t < hi (hi <= 31), every other bit set.
__device__ __forceinline__ unsigned conv_bwi_bad_bits(int lo, int hi)
{
    lo = lo < 0 ? 0 : lo;
    if (hi <= lo) return 0xffffffffu;
    return ~(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// The block's rows as a deduced tag (cudasim spots helpers that synchronize by "name(").
template <int BM> struct CiRows {};

// BM = 16 rows (blockDim.y == TY == 4) or 8 rows (TY == 2); slices of BK = BM
// rows, of which each thread gathers RPT = 4 rows x 4 columns.  (16-row slices
// at BM = 8 would need 8 gathered rows per thread: ~100 registers, which the
// 16-row tiles of this one entry point would then pay too.)
template <typename T, int BM>
__device__ __forceinline__ void conv_backward_input_impl(
    const T* __restrict__ dz, const T* __restrict__ w, T* __restrict__ dx,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int4* tab, T* ws, T* xs, CiRows<BM>)
{
    enum { TY = BM / CI_TM, BK = BM, RPT = BK / TY };
    const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x;
    const int nthreads = TX * TY, tid = ty * TX + tx;
    const int BP = TX * CI_TP;
    const int KHW = KH * KW;
    const int m0 = blockIdx.y * BM;

    // Find this block's phase (block-uniform; once).
    int rh = 0, rw = 0, hf = 0, wf = 0, nw = 0, ncols = 0, tile = -1;
    {
        int start = 0;
        const int bx = blockIdx.x;
        for (int ph = 0; ph < SH * SW; ++ph) {
            const int rh_ = ph / SW, rw_ = ph - rh_ * SW;
            const int hf_ = ((rh_ - PH) % SH + SH) % SH, wf_ = ((rw_ - PW) % SW + SW) % SW;
            const int nh_ = hf_ < H ? (H - hf_ + SH - 1) / SH : 0;
            const int nw_ = wf_ < W ? (W - wf_ + SW - 1) / SW : 0;
            const int cols = nh_ * nw_ * N;
            const int tiles = (cols + BP - 1) / BP;
            if (bx < start + tiles) {
                rh = rh_; rw = rw_; hf = hf_; wf = wf_; nw = nw_; ncols = cols; tile = bx - start;
                break;
            }
            start += tiles;
        }
    }
    if (tile < 0) return;                          // not reached with the documented grid
    const int KHp = rh < KH ? (KH - rh + SH - 1) / SH : 0;
    const int KWp = rw < KW ? (KW - rw + SW - 1) / SW : 0;
    const int Kp = O * KHp * KWp;
    const int qh0 = (hf + PH - rh) / SH, qw0 = (wf + PW - rw) / SW;   // exact divisions
    const int p0 = tile * BP;

    // The gather columns of this thread, p0 + tx + TX*j: decomposed once.  zb[j] = dz + the
    // column's offset, kept in registers (opaque.cuh): an element is zb[j][tab offset].
    int cb[CI_TP];
    unsigned cmh[CI_TP], cmw[CI_TP];
#pragma unroll
    for (int j = 0; j < CI_TP; ++j) {
        const int p = p0 + tx + TX * j;
        cb[j] = 0;
        cmh[j] = 0xffffffffu;
        cmw[j] = 0xffffffffu;
        if (p < ncols) {
            const int t = p / N, n = p - t * N;
            const int th = t / nw, tw = t - th * nw;
            const int qh = qh0 + th, qw = qw0 + tw;
            cb[j] = (qh * OW + qw) * N + n;
            cmh[j] = conv_bwi_bad_bits(qh - OH + 1, min(KHp, qh + 1));
            cmw[j] = conv_bwi_bad_bits(qw - OW + 1, min(KWp, qw + 1));
        }
    }

    const T* zb[CI_TP];
#pragma unroll
    for (int j = 0; j < CI_TP; ++j) zb[j] = opaque(dz + cb[j]);

    T acc[CI_TM][CI_TP];
#pragma unroll
    for (int i = 0; i < CI_TM; ++i)
#pragma unroll
        for (int j = 0; j < CI_TP; ++j) acc[i][j] = T(0);

    T reg[RPT][CI_TP];
    T* const xs_store = xs + ty * CI_XS + tx;
    const T* const xs_load = xs + tx * CI_TP;
    const T* const ws_load = ws + ty * CI_TM;
    const int KHWp = KHp * KWp;

    for (int kc0 = 0; kc0 < Kp; kc0 += CI_KC) {
        const int kc = min(CI_KC, Kp - kc0);
        const int ns = (kc + BK - 1) / BK;
        __syncthreads();
        // Row table (+ one slice of never-valid rows), then the W chunk from it:
        // each thread reads back only the table entries it wrote itself.
        for (int r = tid; r < ns * BK + BK; r += nthreads) {
            int4 e = make_int4(0, (int)0x80000000u, 0, -1);
            if (r < kc) {
                const int k = kc0 + r;
                const int o = k / KHWp, t = k - o * KHWp;
                const int a = t / KWp, bb = t - a * KWp;
                e = make_int4(((o * OH - a) * OW - bb) * N, 1 << a, 1 << bb,
                              ((o * C) * KH + rh + SH * a) * KW + rw + SW * bb);
            }
            tab[r] = e;
        }
        // A thread's 16 loads of a row r are all issued before any of its stores.
        for (int r = tid; r < ns * BK; r += nthreads) {
            const int wo = tab[r].w;
            T wv[BM];
#pragma unroll
            for (int m = 0; m < BM; ++m)
                wv[m] = (m0 + m < C && wo >= 0) ? w[wo + (m0 + m) * KHW] : T(0);
#pragma unroll
            for (int m = 0; m < BM; ++m) ws[r * BM + m] = wv[m];
        }
        __syncthreads();

#pragma unroll
        for (int rr = 0; rr < RPT; ++rr) {
            const int4 e = tab[ty + TY * rr];
#pragma unroll
            for (int j = 0; j < CI_TP; ++j) {
                T v = T(0);
                if (((cmh[j] & (unsigned)e.y) | (cmw[j] & (unsigned)e.z)) == 0u) v = __ldg(zb[j] + e.x);
                reg[rr][j] = v;
            }
        }

        for (int s = 0; s < ns; ++s) {
#pragma unroll
            for (int rr = 0; rr < RPT; ++rr)
#pragma unroll
                for (int j = 0; j < CI_TP; ++j) xs_store[TY * rr * CI_XS + TX * j] = reg[rr][j];
            __syncthreads();
            const int4* const trow = tab + (s + 1) * BK + ty;
#pragma unroll
            for (int rr = 0; rr < RPT; ++rr) {
                const int4 e = trow[TY * rr];
#pragma unroll
                for (int j = 0; j < CI_TP; ++j) {
                    T v = T(0);
                    if (((cmh[j] & (unsigned)e.y) | (cmw[j] & (unsigned)e.z)) == 0u) v = __ldg(zb[j] + e.x);
                    reg[rr][j] = v;
                }
            }
            const T* const wrow = ws_load + s * (BK * BM);
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                T a[CI_TM], bv[CI_TP];
#pragma unroll
                for (int i = 0; i < CI_TM; ++i) a[i] = wrow[kk * BM + i];
#pragma unroll
                for (int j = 0; j < CI_TP; ++j) bv[j] = xs_load[kk * CI_XS + j];
#pragma unroll
                for (int i = 0; i < CI_TM; ++i)
#pragma unroll
                    for (int j = 0; j < CI_TP; ++j) acc[i][j] += a[i] * bv[j];
            }
            __syncthreads();
        }
    }

    // Epilogue: scatter the phase's columns back to (h, w, n); coalesced along n.
    const int HWN = H * W * N;
#pragma unroll
    for (int j = 0; j < CI_TP; ++j) {
        const int p = p0 + tx * CI_TP + j;
        if (p >= ncols) continue;
        const int t = p / N, n = p - t * N;
        const int th = t / nw, tw = t - th * nw;
        const int off = ((hf + SH * th) * W + wf + SW * tw) * N + n;
#pragma unroll
        for (int i = 0; i < CI_TM; ++i) {
            const int c = m0 + ty * CI_TM + i;
            if (c < C) dx[c * HWN + off] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(64) conv_backward_input(
    const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ dx,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    __shared__ int4 tab[CI_KC + CI_BK];
    __shared__ float ws[CI_KC * CI_BM];
    __shared__ float xs[CI_BK * CI_XS];
    if (blockDim.y == 2)                                   // 8-row tiles (C <= 8)
        conv_backward_input_impl(dz, w, dx, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW, tab, ws, xs,
                                 CiRows<8>());
    else
        conv_backward_input_impl(dz, w, dx, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW, tab, ws, xs,
                                 CiRows<16>());
}

// minBlocksPerSM 1: ptxas then gives the float64 body the ~150 registers it
// needs; left to its own occupancy target it aimed at 128 on sm_90 and spilled
// 4 bytes (nvcc 13.0).  Registers only: the arithmetic is unchanged.
extern "C" __global__ void __launch_bounds__(64, 1) conv_backward_input_f64(
    const double* __restrict__ dz, const double* __restrict__ w, double* __restrict__ dx,
    int C, int H, int W, int N, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    __shared__ int4 tab[CI_KC + CI_BK];
    __shared__ double ws[CI_KC * CI_BM];
    __shared__ double xs[CI_BK * CI_XS];
    if (blockDim.y == 2)                                   // 8-row tiles (C <= 8)
        conv_backward_input_impl(dz, w, dx, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW, tab, ws, xs,
                                 CiRows<8>());
    else
        conv_backward_input_impl(dz, w, dx, C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW, tab, ws, xs,
                                 CiRows<16>());
}
