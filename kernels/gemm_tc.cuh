// Tensor-core GEMMs of the precision modes tf32, 3xtf32, bf16 and fp16: one
// implicit-GEMM core, gemm_tc<MODE, P_KIND, Q_KIND, tile>, for conv forward,
// conv backward-input, conv backward-weight and the dense layer's three
// products.  gpucnn/precision.py says what each mode computes;
// gpucnn/cuda/gemm_tc.py is the host wrapper.  Included by gemm_tc_tf32.cu,
// gemm_tc_3xtf32.cu, gemm_tc_bf16.cu and gemm_tc_f16.cu, one module per mode
// (a run compiles only its own mode's), each with the entry points
//
//   gemm_tc_<mode>_<gemm>_<tile>(P, Q, bias, out, zout, M, Nn, K, k_slab, ldo,
//       out_z, p_s0, p_s1, q_s0, q_s1, act, flags, C, H, W, N, O, KH, KW, OH,
//       OW, SH, SW, PH, PW)
//
// gemm: conv_fwd (P IM2COL, Q STRIDED_K), conv_dgrad (P GATHER, Q WTAP),
// conv_wgrad (P IM2COL_T, Q STRIDED_K), dense_fwd (P STRIDED, Q STRIDED_K),
// dense_wgrad (both STRIDED_K), dense_dgrad (both STRIDED) -- the dense
// GEMMs leave the geometry arguments unused; tile: n8, n64 (below).
//
// ---------------------------------------------------------------------------
// Formula.  For m < M, n < Nn, with k over [k0, k1) = the block's K slab:
//
//   D[m, n] = sum_k P[m, k] Q[k, n]                 (FP32 accumulation)
//   v       = D[m, n] + (flags & 1 ? bias[n] : 0)
//   out [z*out_z + n*ldo + m] = activation(v, act)  (activation.cuh)
//   zout[z*out_z + n*ldo + m] = v                   (only when flags & 2)
//
// with z = blockIdx.z, k0 = z*k_slab, k1 = min(K, k0 + k_slab): split-K
// writes one partial result per slab (the weight gradient's slabs, summed by
// conv_backward_weight_reduce).  The output is stored "transposed" (n-major)
// so that m, the long dimension (the columns of the batch-last layout), is
// the contiguous one.  P and Q are read through an operand kind, element
// (i, j) for P (m, k) and for Q (k, n), 0 past the matrix:
//
//   OP_STRIDED  p[i*s0 + j*s1], staged along the tile's rows (for s0 == 1)
//   OP_STRIDED_K the same element, staged along k (for s1 == 1 in P, s0 in Q)
//   OP_IM2COL   P[col, tap]: x[c, oh*SH-PH+u, ow*SW-PW+v, n] (0 in the zero
//               padding), col = (oh*OW + ow)*N + n, tap = (c*KH + u)*KW + v
//   OP_IM2COL_T P[tap, col]: the same element, and 1 for tap = C*KH*KW (the
//               bias's "ones" row of the weight gradient)
//   OP_GATHER   P[q, tap]: dz[o, i, j, n] with i = (h+PH-u)/SH, j = (w+PW-v)/SW
//               when both divide exactly and lie inside, else 0 -- the seeds'
//               full-padding convolution with the rotated kernel, as a gather;
//               q = (h*W + w)*N + n, tap = (o*KH + u)*KW + v
//   OP_WTAP     Q[tap, c]: W[o, c, u, v], tap = (o*KH + u)*KW + v
//               (a column c past Nn holds column Nn - 1: only output columns
//               nobody stores read it)
//
// The GEMMs of gpucnn (C, H, W, N, O, KH, ... the conv geometry):
//   conv forward     P = x  (IM2COL)   Q = W (STRIDED_K s0 1, s1 K)  M = OH*OW*N, Nn = O
//   conv bwd-input   P = dz (GATHER)   Q = W (WTAP)           M = H*W*N,   Nn = C
//   conv bwd-weight  P = x  (IM2COL_T) Q = dz (STRIDED_K 1, OH*OW*N)  M = K+1,  Nn = O, split-K
//   dense forward    P = x^T (STRIDED), Q = W^T (STRIDED_K);  dW: P = x, Q = dz^T (both
//                    STRIDED_K);  dx: P = dz^T, Q = W (both STRIDED)
// A STRIDED kind's orientation changes only which loads coalesce, never the result.
//
// Rounding (rounding.cuh): operands are rounded while they are staged into
// shared memory -- tf32: tf32_bits (nearest even); 3xtf32: hi = tf32(e),
// lo = tf32(e - hi) and D += lo_P hi_Q + hi_P lo_Q + hi_P hi_Q per k step
// (lo*lo, ~2^-22 relative, dropped); bf16: bf16x2_bits; fp16: f16x2_bits (the
// caller scales the loss so dz stays in range).  Bias, activation and every
// sum are FP32.  The NumPy reference (gpucnn.precision.matmul) rounds
// identically; sums may differ in order (the tensor core's internal order).
//
// Thread mapping: 128 threads = 4 warps, arranged WARPS_M x WARPS_N; each
// warp owns FM x FN tiles of 16 x 8 (mma.cuh's m16n8 shapes), block tile
// BM = 16*FM*WARPS_M rows (m) by BN = 8*FN*WARPS_N columns (n):
//   n8   4 x 1 warps, 2 x 1 tiles: BM 128, BN 8   (<= 8 outputs)
//   n64  2 x 2 warps, 2 x 4 tiles: BM 64,  BN 64
// (an n16 tile, BM 128 x BN 16, was dropped: its staging cost 83 instructions
// per HMMA in tf32 conv forward against n64's 44, before the tap tables, so at
// 9-16 outputs n64's wasted tensor-core columns cost less than n16's staging;
// and each entry point adds seconds of NVRTC time to a module)
// K advances in stages of 32: each stage's P (BM x 32) and Q (32 x BN) tiles
// are loaded from global memory into registers one stage ahead (the loads of
// stage s+1 are in flight while stage s multiplies), then rounded into
// shared memory as 32-bit words (one tf32, or two 16-bit values, k pairs,
// per word; rows padded by 4 words: fragment reads are conflict-free).  A
// thread's staging elements run along m for operands contiguous in m (IM2COL,
// GATHER, STRIDED with s0 == 1) and along k otherwise, so loads coalesce.
//
// Tap tables (IM2COL, GATHER, WTAP): a block runs its slab in chunks of
// TC_TAB = 512 k (lenet5's reductions, at most 400, are one chunk) and first
// builds the chunk's tables in shared memory, one entry per k: ktab[k - c0] =
// (the tap's part of the element offset, the tap's bits KW + u and v) and, for
// WTAP, wtab[k - c0] = W[o, c, u, v]'s offset less c*KH*KW.  A thread's fixed
// row (an im2col column, a gather position, a channel c) gives the other part
// of the offset and "out", the complement of the window rows u and columns v
// its element exists for (padding; for the gather also the stride: u counts
// only when SH divides h + PH - u).  So a staged element is one broadcast
// shared-memory read, one AND ((out & bits) == 0: inside) and one load of
// base + offset; k past the slab carries bit 31 (never a window bit), a row
// past the matrix out = ~0: zeros.  IM2COL_T is the same element with the
// roles turned: its table holds the block's BM taps (m), (offset, bits),
// built once; a stage's k are the im2col columns, each decomposed once per
// stage into its base pointer and "out" (a column past the slab: ~0).  Its
// ones row (and any row past it) has bit 31, so it loads nothing: the thread
// that stores that row's word overwrites it with 1 (0 past the slab).
//
// Launch shape: block (128, 1, 1); grid (ceil(M / BM), ceil(Nn / BN), S),
// S = ceil(K / k_slab) (1 without split-K); k_slab a positive multiple of 32.
// Static shared memory (words): (BM + BN) * 36 (tf32), twice that (3xtf32),
// (BM + BN) * 20 (bf16, fp16), plus the tap tables: 1,024 (conv_fwd: ktab),
// 1,536 (conv_dgrad: ktab, wtab), 2 * BM (conv_wgrad): at most 45,312 bytes
// (3xtf32 conv_dgrad n8), under the 48 KiB of static shared memory.
// Preconditions (checked by gpucnn/cuda/gemm_tc.py): sm_80 or later; every
// index and offset fits int32, for the conv GEMMs also the offsets of x and
// dz widened by the padding and the window (a thread's and a tap's parts are
// formed apart); KH + KW <= 31 (TC_MAX_WINDOW) for the conv GEMMs; out / zout
// alias no input.  Deterministic: a
// launch's sums depend on the shapes only.
// ---------------------------------------------------------------------------
#ifndef GPUCNN_GEMM_TC_CUH
#define GPUCNN_GEMM_TC_CUH
#include "rounding.cuh"
#include "mma.cuh"
#include "activation.cuh"
#include "opaque.cuh"   // opaque(p): a thread's gather base stays in registers

#define TC_THREADS 128
#define TC_BK 32
#define TC_PAD 4
#define TC_TAB 512                  // k entries of the per-block tap tables (a multiple of TC_BK)
#define TC_MAX_WINDOW 31            // KH + KW at most: a tap's mask has bits KW + u and v (below)

#define OP_STRIDED 0
#define OP_IM2COL 1
#define OP_IM2COL_T 2
#define OP_GATHER 3
#define OP_WTAP 4
#define OP_STRIDED_K 5

#define MODE_TF32 0
#define MODE_3XTF32 1
#define MODE_BF16 2
#define MODE_F16 3

struct ConvGeom {
    int C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW;
};

// A tap (c*KH + u)*KW + v of a kernel window (c is o for the gather and the weights by tap);
// tap_of divides twice (only where a table is built, never per staged element).
struct Tap {
    int c, u, v;
};

__device__ __forceinline__ Tap tap_of(int tap, const ConvGeom& g)
{
    const int r = tap / g.KW;
    return Tap{r / g.KH, r % g.KH, tap - r * g.KW};
}


// One 32-bit shared-memory word from one (tf32) or two (16-bit: k, k+1) elements.
template <int MODE>
__device__ __forceinline__ unsigned int to_word(float e0, float e1)
{
    if (MODE == MODE_BF16) return bf16x2_bits(e0, e1);
    if (MODE == MODE_F16) return f16x2_bits(e0, e1);
    return tf32_bits(e0);
}

template <int MODE>
__device__ __forceinline__ void mma(float d[4], const unsigned int a[4], const unsigned int b[2])
{
    if (MODE == MODE_BF16) mma_bf16_m16n8k16(d, a, b);
    else if (MODE == MODE_F16) mma_f16_m16n8k16(d, a, b);
    else mma_tf32_m16n8k8(d, a, b);
}

// Staging a ROWS x WORDS tile with 128 threads (ROWS and WORDS divide 128).  Along the rows, a
// thread keeps row tid % ROWS and takes words tid / ROWS + s * (128 / ROWS); along k, it keeps
// word tid % WORDS and takes rows tid / WORDS + s * (128 / WORDS).  So whatever an operand
// derives from the fixed index (an im2col column, a gather position) is computed once per
// kernel or once per stage, not per element.
// STRIDED operands are passed as (stride along the tile's rows, stride along k): P (m, k) as
// (s0, s1), Q (k, n) as (s1, s0); STRIDED stages along the rows, STRIDED_K along k, chosen at
// compile time per entry point so that the main loop holds one staging path, not two.
template <int KIND>
__device__ __forceinline__ constexpr bool rows_fast()
{
    return KIND == OP_STRIDED || KIND == OP_IM2COL || KIND == OP_GATHER || KIND == OP_WTAP;
}

// The fixed part of one thread's staging of one operand (set up once per kernel).
struct Fixed {
    int row;          // the fixed row (rows-fast) or the fixed word (k-fast)
    int first;        // the first word (rows-fast) or the first row (k-fast) of slot 0
    bool ok;          // the fixed row lies inside the matrix (rows-fast)
    unsigned int out; // IM2COL, GATHER: the window taps whose element lies outside (below)
    int off;          // IM2COL, GATHER: added to a tap's offset, the element's; WTAP: c*KH*KW
};

// A window tap (u, v) as a mask: bit KW + u and bit v (KH + KW <= 31, the host checks, so bit 31 is
// never one of them).  A thread's "out" is the complement of the union of the masks of the rows u
// and the columns v its element exists for, so tap (u, v) is inside iff (out & mask) == 0: ONE
// instruction per staged element, whatever the stride.  A row past the matrix: out = ~0u.
//   IM2COL: row m = (oh*OW + ow)*N + n, element x[c, h0 + u, w0 + v, n] (h0 = oh*SH - PH,
//     w0 = ow*SW - PW): u is in iff 0 <= h0 + u < H; off = (h0*W + w0)*N + n, and the tap's
//     offset ((c*H + u)*W + v)*N.
//   GATHER: row m = (h*W + w)*N + n, with h + PH = SH*hq + hr (0 <= hr < SH) and u = SH*au + bu
//     (0 <= bu < SH): h + PH - u = SH*(hq - au) + (hr - bu) divides exactly iff bu == hr, and
//     then i = hq - au, so u is in iff u = hr + SH*j with 0 <= hq - j < OH; likewise v.
//     off = (hq*OW + wq)*N + n and the tap's offset (o*OH*OW - au*OW - av)*N: their sum is
//     dz[o, i, j, n]'s.
__device__ __forceinline__ unsigned int window_bits(int lo, int hi)   // bits [max(lo, 0), hi)
{
    lo = max(lo, 0);
    return hi > lo ? (1u << hi) - (1u << lo) : 0u;
}

__device__ __forceinline__ unsigned int strided_bits(int r, int q, int step, int taps, int len)
{                                                  // bits r + step*j, j >= 0, < taps, with 0 <= q - j < len
    unsigned int bits = 0u;
    for (int j = 0, u = r; u < taps; ++j, u += step)
        if ((unsigned int)(q - j) < (unsigned int)len) bits |= 1u << u;
    return bits;
}

template <int KIND, int ROWS, int WORDS>
__device__ __forceinline__ void fixed_part(Fixed& f, int tid, bool row_fast, int base, int nrows,
                                           const ConvGeom& g)
{
    f.row = row_fast ? tid % ROWS : tid % WORDS;
    f.first = row_fast ? tid / ROWS : tid / WORDS;
    f.ok = base + f.row < nrows;
    f.out = ~0u;
    f.off = 0;
    const int m = base + f.row;
    if (KIND == OP_IM2COL && f.ok) {               // m = (oh*OW + ow)*N + n
        const int q = m / g.N, ow = q % g.OW;
        const int h0 = (q / g.OW) * g.SH - g.PH, w0 = ow * g.SW - g.PW;
        f.out = ~(window_bits(-h0, min(g.KH, g.H - h0)) << g.KW | window_bits(-w0, min(g.KW, g.W - w0)));
        f.off = (h0 * g.W + w0) * g.N + (m - q * g.N);
    } else if (KIND == OP_GATHER && f.ok) {        // m = (h*W + w)*N + n
        const int q = m / g.N, hp = q / g.W + g.PH, wp = q % g.W + g.PW;
        const int hq = hp / g.SH, wq = wp / g.SW;
        f.out = ~(strided_bits(hp - hq * g.SH, hq, g.SH, g.KH, g.OH) << g.KW |
                  strided_bits(wp - wq * g.SW, wq, g.SW, g.KW, g.OW));
        f.off = (hq * g.OW + wq) * g.N + (m - q * g.N);
    } else if (KIND == OP_WTAP) {                  // m = c; a channel past the matrix loads channel
        f.off = min(m, nrows - 1) * g.KH * g.KW;   // nrows - 1 into output columns nobody stores
    }
}

// The tap tables of the k range [c0, c1) of a slab (c1 - c0 <= TC_TAB), built by the whole block.
// ktab[k - c0] = (offset, mask) of tap k (fixed_part says what each is): IM2COL tap (c, u, v),
// GATHER tap (o, u, v).  wtab[k - c0] (Q = WTAP): W[o, c, u, v]'s offset less c*KH*KW,
// o*C*KH*KW + u*KW + v.  Entries from c1 to the end of c1's stage: (0, 1 << 31) and -1: nothing
// loads (zeros).
template <int P_KIND, int Q_KIND>
__device__ __forceinline__ void build_taps(int2* ktab, int* wtab, int c0, int c1, const ConvGeom& g)
{
    const int n = min(TC_TAB, (c1 - c0 + TC_BK - 1) / TC_BK * TC_BK);
#pragma unroll
    for (int j = 0; j < TC_TAB / TC_THREADS; ++j) {   // unrolled: no loop of its own inside the chunk loop
        const int i = threadIdx.x + j * TC_THREADS;
        if (i >= n) break;
        const int k = c0 + i;
        int2 e = make_int2(0, (int)0x80000000u);
        int w = -1;
        if (k < c1) {
            const Tap t = tap_of(k, g);
            const int mask = (1 << (g.KW + t.u)) | (1 << t.v);
            if (P_KIND == OP_IM2COL) {
                e = make_int2(((t.c * g.H + t.u) * g.W + t.v) * g.N, mask);
            } else {
                const int au = t.u / g.SH, av = t.v / g.SW;
                e = make_int2(((t.c * g.OH - au) * g.OW - av) * g.N, mask);
            }
            w = (t.c * g.C * g.KH + t.u) * g.KW + t.v;
        }
        ktab[i] = e;
        if (Q_KIND == OP_WTAP) wtab[i] = w;
    }
}

// Load slot s's EPW elements of an operand into r (the contract's operand kinds).  k0: the
// stage's first k; kt = k0 - c0, its entry in the tap tables ktab / wtab; k_end: the slab's end;
// tab: IM2COL_T's per-block tap table.
template <int KIND, int ROWS, int WORDS, int EPW, int SLOTS>
__device__ __forceinline__ void load_operand(float (&r)[SLOTS][EPW], const float* __restrict__ p, int s0, int s1,
                                             const Fixed& f, int base, int nrows, int k0,
                                             int k_end, const int2* tab, const int2* ktab, const int* wtab,
                                             int kt, const ConvGeom& g)
{
    constexpr bool row_fast = rows_fast<KIND>();
    if (KIND == OP_STRIDED || KIND == OP_STRIDED_K) {  // p[i*s0 + j*s1]; base = the block's first row
#pragma unroll
        for (int s = 0; s < SLOTS; ++s)
#pragma unroll
            for (int e = 0; e < EPW; ++e) {
                const int i = base + (row_fast ? f.row : f.first + s * (TC_THREADS / WORDS));
                const int k = k0 + EPW * (row_fast ? f.first + s * (TC_THREADS / ROWS) : f.row) + e;
                r[s][e] = (i < nrows && k < k_end) ? p[i * s0 + k * s1] : 0.0f;
            }
    } else if (KIND == OP_IM2COL || KIND == OP_GATHER) {   // rows fast: one column / position per thread
        // Per element: one broadcast table read, one mask test, one load.
        const float* const pf = opaque(p + f.off);
        const int2* const te = ktab + kt + EPW * f.first;
#pragma unroll
        for (int s = 0; s < SLOTS; ++s)
#pragma unroll
            for (int e = 0; e < EPW; ++e) {
                const int2 t = te[EPW * s * (TC_THREADS / ROWS) + e];
                r[s][e] = (f.out & (unsigned int)t.y) == 0u ? __ldg(pf + t.x) : 0.0f;
            }
    } else if (KIND == OP_WTAP) {                      // Q rows fast: one input channel c per thread
        const float* const pf = opaque(p + f.off);
        const int* const te = wtab + kt + EPW * f.first;
#pragma unroll
        for (int s = 0; s < SLOTS; ++s)
#pragma unroll
            for (int e = 0; e < EPW; ++e) {
                const int w = te[EPW * s * (TC_THREADS / ROWS) + e];
                r[s][e] = w >= 0 ? __ldg(pf + w) : 0.0f;
            }
    } else {                                           // OP_IM2COL_T, k fast: the column per stage
        // Per stage: each of the thread's EPW columns decomposed once (its "out" mask and base pointer,
        // as IM2COL's per thread); per element: one broadcast table read, one mask test, one load.
        // A column past the slab: out = ~0u, zeros.  The ones row loads nothing (bit 31): the store
        // writes it (ones_word).
        unsigned int out[EPW];
        const float* pc[EPW];
#pragma unroll
        for (int e = 0; e < EPW; ++e) {
            const int col = k0 + EPW * f.row + e;
            const int q = col / g.N, ow = q % g.OW;
            const int h0 = (q / g.OW) * g.SH - g.PH, w0 = ow * g.SW - g.PW;
            out[e] = col < k_end ? ~(window_bits(-h0, min(g.KH, g.H - h0)) << g.KW |
                                     window_bits(-w0, min(g.KW, g.W - w0)))
                                 : ~0u;
            pc[e] = opaque(p + (col < k_end ? (h0 * g.W + w0) * g.N + (col - q * g.N) : 0));
        }
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
            const int2 t = tab[f.first + s * (TC_THREADS / WORDS)];   // (tap offset, tap mask)
#pragma unroll
            for (int e = 0; e < EPW; ++e)
                r[s][e] = (out[e] & (unsigned int)t.y) == 0u ? __ldg(pc[e] + t.x) : 0.0f;
        }
    }
}

// IM2COL_T's ones row (the bias's row of the weight gradient, tap C*KH*KW) as one shared-memory word of
// the stage whose first k is k0: 1 for each of its columns inside the slab, 0 past it.
template <int MODE, int EPW>
__device__ __forceinline__ unsigned int ones_word(int k0, int word, int k_end)
{
    const int col = k0 + EPW * word;
    return to_word<MODE>(col < k_end ? 1.0f : 0.0f, col + EPW - 1 < k_end ? 1.0f : 0.0f);
}

template <int MODE, int P_KIND, int Q_KIND, int WARPS_M, int WARPS_N, int FM, int FN>
__device__ __forceinline__ void gemm_tc(
    const float* __restrict__ P, const float* __restrict__ Q, const float* __restrict__ bias,
    float* __restrict__ out, float* __restrict__ zout,
    int M, int Nn, int K, int k_slab, int ldo, int out_z,
    int p_s0, int p_s1, int q_s0, int q_s1, int act, int flags, const ConvGeom& g)
{
    constexpr bool PAIRS = MODE == MODE_BF16 || MODE == MODE_F16;   // two k per word
    constexpr int SPLIT = MODE == MODE_3XTF32 ? 2 : 1;              // hi (and lo) words
    constexpr int EPW = PAIRS ? 2 : 1;                               // elements per word
    constexpr int WORDS = TC_BK / EPW;                               // words per row per stage
    constexpr int LD = WORDS + TC_PAD;
    constexpr int BM = 16 * FM * WARPS_M, BN = 8 * FN * WARPS_N;
    constexpr int P_SLOTS = BM * WORDS / TC_THREADS, Q_SLOTS = BN * WORDS / TC_THREADS;
    constexpr int KSTEP = PAIRS ? 16 : 8;                            // k per mma
    static_assert(BM * WORDS % TC_THREADS == 0 && BN * WORDS % TC_THREADS == 0, "tile / thread mismatch");

    __shared__ unsigned int Ps[SPLIT][BM][LD];   // P tile, m-major: word w holds k = EPW*w (+1)
    __shared__ unsigned int Qs[SPLIT][BN][LD];   // Q tile, n-major
    __shared__ int2 tab[P_KIND == OP_IM2COL_T ? BM : 1];   // IM2COL_T: the block's taps
    constexpr bool TABLED = P_KIND == OP_IM2COL || P_KIND == OP_GATHER;   // Q = WTAP only with GATHER
    __shared__ int2 ktab[TABLED ? TC_TAB : 1];              // IM2COL, GATHER: a chunk's taps
    __shared__ int wtab[Q_KIND == OP_WTAP ? TC_TAB : 1];    // WTAP: a chunk's weight offsets

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp % WARPS_M) * 16 * FM, wn = (warp / WARPS_M) * 8 * FN;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_begin = blockIdx.z * k_slab, k_end = min(K, k_begin + k_slab);
    constexpr bool p_rows = rows_fast<P_KIND>(), q_rows = rows_fast<Q_KIND>();
    Fixed fp, fq;
    fixed_part<P_KIND, BM, WORDS>(fp, tid, p_rows, m0, M, g);
    fixed_part<Q_KIND, BN, WORDS>(fq, tid, q_rows, n0, Nn, g);
    // IM2COL_T: the block's taps, (offset in x, mask bits KW + u and v); the ones row and the rows past
    // it (0, bit 31): nothing loads.  ones_row: the ones row's row in the tile if this thread stores it.
    int ones_row = -1;
    if (P_KIND == OP_IM2COL_T) {
        const int kc = g.C * g.KH * g.KW;
        if (tid < BM) {
            const int tap = m0 + tid;
            const Tap t = tap_of(tap, g);
            tab[tid] = tap < kc ? make_int2(((t.c * g.H + t.u) * g.W + t.v) * g.N, (1 << (g.KW + t.u)) | (1 << t.v))
                                : make_int2(0, (int)0x80000000u);
        }
        const int r1 = kc - m0;
        if (r1 >= 0 && r1 < BM && r1 >= fp.first && (r1 - fp.first) % (TC_THREADS / WORDS) == 0) ones_row = r1;
        __syncthreads();
    }

    float pr[P_SLOTS][EPW], qr[Q_SLOTS][EPW];    // the next stage, in flight
    float acc[FM][FN][4];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    auto load = [&](int k0, int kt) {
        load_operand<P_KIND, BM, WORDS, EPW, P_SLOTS>(pr, P, p_s0, p_s1, fp, m0, M, k0, k_end, tab,
                                                      ktab, wtab, kt, g);
        load_operand<Q_KIND, BN, WORDS, EPW, Q_SLOTS>(qr, Q, q_s1, q_s0, fq, n0, Nn, k0, k_end, tab,
                                                      ktab, wtab, kt, g);
    };
    auto store = [&](int k0) {
#pragma unroll
        for (int s = 0; s < P_SLOTS; ++s) {
            const int row = p_rows ? fp.row : fp.first + s * (TC_THREADS / WORDS);
            const int word = p_rows ? fp.first + s * (TC_THREADS / BM) : fp.row;
            const unsigned int hi = to_word<MODE>(pr[s][0], pr[s][EPW - 1]);
            Ps[0][row][word] = hi;
            if (SPLIT == 2) Ps[SPLIT - 1][row][word] = tf32_bits(pr[s][0] - __uint_as_float(hi));
        }
        if (P_KIND == OP_IM2COL_T && ones_row >= 0) {   // after this thread's own store of that word
            Ps[0][ones_row][fp.row] = ones_word<MODE, EPW>(k0, fp.row, k_end);
            if (SPLIT == 2) Ps[SPLIT - 1][ones_row][fp.row] = 0u;
        }
#pragma unroll
        for (int s = 0; s < Q_SLOTS; ++s) {
            const int col = q_rows ? fq.row : fq.first + s * (TC_THREADS / WORDS);
            const int word = q_rows ? fq.first + s * (TC_THREADS / BN) : fq.row;
            const unsigned int hi = to_word<MODE>(qr[s][0], qr[s][EPW - 1]);
            Qs[0][col][word] = hi;
            if (SPLIT == 2) Qs[SPLIT - 1][col][word] = tf32_bits(qr[s][0] - __uint_as_float(hi));
        }
    };

    // The stages of [c0, c1), each stage's loads in flight while the previous one multiplies.
    auto stages = [&](int c0, int c1) {
        load(c0, 0);
        for (int k0 = c0; k0 < c1; k0 += TC_BK) {
            store(k0);
            __syncthreads();
            if (k0 + TC_BK < c1) load(k0 + TC_BK, k0 + TC_BK - c0);
#pragma unroll
            for (int kk = 0; kk < WORDS; kk += KSTEP / EPW) {       // kk: word offset of this mma's k step
                unsigned int a[SPLIT][FM][4], b[SPLIT][FN][2];
#pragma unroll
                for (int sp = 0; sp < SPLIT; ++sp) {
#pragma unroll
                    for (int i = 0; i < FM; ++i) {
                        const int r = wm + 16 * i + gid;
                        a[sp][i][0] = Ps[sp][r][kk + tig];
                        a[sp][i][1] = Ps[sp][r + 8][kk + tig];
                        a[sp][i][2] = Ps[sp][r][kk + tig + 4];
                        a[sp][i][3] = Ps[sp][r + 8][kk + tig + 4];
                    }
#pragma unroll
                    for (int j = 0; j < FN; ++j) {
                        const int c = wn + 8 * j + gid;
                        b[sp][j][0] = Qs[sp][c][kk + tig];
                        b[sp][j][1] = Qs[sp][c][kk + tig + 4];
                    }
                }
#pragma unroll
                for (int i = 0; i < FM; ++i)
#pragma unroll
                    for (int j = 0; j < FN; ++j) {
                        if (SPLIT == 2) {                            // the small terms first
                            mma<MODE>(acc[i][j], a[SPLIT - 1][i], b[0][j]);
                            mma<MODE>(acc[i][j], a[0][i], b[SPLIT - 1][j]);
                        }
                        mma<MODE>(acc[i][j], a[0][i], b[0][j]);
                    }
            }
            __syncthreads();
        }
    };
    // A tabled GEMM runs its slab in chunks of TC_TAB k, building each chunk's tables first (the
    // previous chunk's loads all ended before its last barrier); a chunk's first load is the one
    // not overlapped with a multiply.
    if (TABLED) {
        for (int c0 = k_begin; c0 < k_end; c0 += TC_TAB) {
            const int c1 = min(k_end, c0 + TC_TAB);
            build_taps<P_KIND, Q_KIND>(ktab, wtab, c0, c1, g);
            __syncthreads();
            stages(c0, c1);
        }
    } else if (k_begin < k_end) {
        stages(k_begin, k_end);
    }

    float* const o = out + blockIdx.z * out_z;
    float* const zo = zout + blockIdx.z * out_z;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + wm + 16 * i + gid + 8 * (e >> 1);
                const int n = n0 + wn + 8 * j + 2 * tig + (e & 1);
                if (m < M && n < Nn) {
                    const float v = acc[i][j][e] + ((flags & 1) ? bias[n] : 0.0f);
                    if (flags & 2) zo[n * ldo + m] = v;
                    o[n * ldo + m] = activation(v, act);
                }
            }
}

#endif  // GPUCNN_GEMM_TC_CUH
