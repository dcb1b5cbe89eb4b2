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
// gemm: conv_fwd (P IM2COL, Q STRIDED), conv_dgrad (P GATHER, Q WTAP),
// conv_wgrad (P IM2COL_T, Q STRIDED), dense (both STRIDED; the geometry
// arguments are unused); tile: n8, n16, n64 (below).
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
//   OP_STRIDED  p[i*s0 + j*s1]
//   OP_IM2COL   P[col, tap]: x[c, oh*SH-PH+u, ow*SW-PW+v, n] (0 in the zero
//               padding), col = (oh*OW + ow)*N + n, tap = (c*KH + u)*KW + v
//   OP_IM2COL_T P[tap, col]: the same element, and 1 for tap = C*KH*KW (the
//               bias's "ones" row of the weight gradient)
//   OP_GATHER   P[q, tap]: dz[o, i, j, n] with i = (h+PH-u)/SH, j = (w+PW-v)/SW
//               when both divide exactly and lie inside, else 0 -- the seeds'
//               full-padding convolution with the rotated kernel, as a gather;
//               q = (h*W + w)*N + n, tap = (o*KH + u)*KW + v
//   OP_WTAP     Q[tap, c]: W[o, c, u, v], tap = (o*KH + u)*KW + v
//
// The GEMMs of gpucnn (C, H, W, N, O, KH, ... the conv geometry):
//   conv forward     P = x  (IM2COL)   Q = W (STRIDED s0 1, s1 K)  M = OH*OW*N, Nn = O
//   conv bwd-input   P = dz (GATHER)   Q = W (WTAP)           M = H*W*N,   Nn = C
//   conv bwd-weight  P = x  (IM2COL_T) Q = dz (STRIDED 1, OH*OW*N)  M = K+1,  Nn = O, split-K
//   dense forward    P = x^T, Q = W^T;  dW: P = x, Q = dz^T;  dx: P = dz^T, Q = W
//
// Rounding (rounding.cuh): operands are rounded while they are staged into
// shared memory -- tf32: tf32_bits (nearest even); 3xtf32: hi = tf32(e),
// lo = tf32(e - hi) and D += lo_P hi_Q + hi_P lo_Q + hi_P hi_Q per k step
// (lo*lo, ~2^-22 relative, dropped); bf16: bf16_bits; fp16: f16_bits (the
// caller scales the loss so dz stays in range).  Bias, activation and every
// sum are FP32.  The NumPy reference (gpucnn.precision.matmul) rounds
// identically; sums may differ in order (the tensor core's internal order).
//
// Thread mapping: 128 threads = 4 warps, arranged WARPS_M x WARPS_N; each
// warp owns FM x FN tiles of 16 x 8 (mma.cuh's m16n8 shapes), block tile
// BM = 16*FM*WARPS_M rows (m) by BN = 8*FN*WARPS_N columns (n):
//   n8   4 x 1 warps, 2 x 1 tiles: BM 128, BN 8   (<= 8 outputs)
//   n16  4 x 1 warps, 2 x 2 tiles: BM 128, BN 16
//   n64  2 x 2 warps, 2 x 4 tiles: BM 64,  BN 64
// K advances in stages of 32: each stage's P (BM x 32) and Q (32 x BN) tiles
// are loaded from global memory into registers one stage ahead (the loads of
// stage s+1 are in flight while stage s multiplies), then rounded into
// shared memory as 32-bit words (one tf32, or two 16-bit values, k pairs,
// per word; rows padded by 4 words: fragment reads are conflict-free).  A
// thread's staging elements run along m for operands contiguous in m (IM2COL,
// GATHER, STRIDED with s0 == 1) and along k otherwise, so loads coalesce.
//
// Launch shape: block (128, 1, 1); grid (ceil(M / BM), ceil(Nn / BN), S),
// S = ceil(K / k_slab) (1 without split-K); k_slab a positive multiple of 32.
// Static shared memory (words): (BM + BN) * 36 (tf32), twice that (3xtf32),
// (BM + BN) * 20 (bf16, fp16): at most 39,168 bytes.
// Preconditions (checked by gpucnn/cuda/gemm_tc.py): sm_80 or later; every
// index and offset fits int32; out / zout alias no input.  Deterministic: a
// launch's sums depend on the shapes only.
// ---------------------------------------------------------------------------
#ifndef GPUCNN_GEMM_TC_CUH
#define GPUCNN_GEMM_TC_CUH
#include "rounding.cuh"
#include "mma.cuh"
#include "activation.cuh"

#define TC_THREADS 128
#define TC_BK 32
#define TC_PAD 4

#define OP_STRIDED 0
#define OP_IM2COL 1
#define OP_IM2COL_T 2
#define OP_GATHER 3
#define OP_WTAP 4

#define MODE_TF32 0
#define MODE_3XTF32 1
#define MODE_BF16 2
#define MODE_F16 3

struct ConvGeom {
    int C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW;
};

__device__ __forceinline__ float im2col_at(const float* __restrict__ x, int tap, int col, const ConvGeom& g)
{
    const int n = col % g.N, r = col / g.N, ow = r % g.OW, oh = r / g.OW;
    const int v = tap % g.KW, r2 = tap / g.KW, u = r2 % g.KH, c = r2 / g.KH;
    const int h = oh * g.SH - g.PH + u, w = ow * g.SW - g.PW + v;
    if (h < 0 || h >= g.H || w < 0 || w >= g.W) return 0.0f;
    return x[((c * g.H + h) * g.W + w) * g.N + n];
}

__device__ __forceinline__ float gather_at(const float* __restrict__ dz, int q, int tap, const ConvGeom& g)
{
    const int n = q % g.N, r = q / g.N, w = r % g.W, h = r / g.W;
    const int v = tap % g.KW, r2 = tap / g.KW, u = r2 % g.KH, o = r2 / g.KH;
    const int hh = h + g.PH - u, ww = w + g.PW - v;
    if (hh < 0 || ww < 0 || hh % g.SH != 0 || ww % g.SW != 0) return 0.0f;
    const int i = hh / g.SH, j = ww / g.SW;
    if (i >= g.OH || j >= g.OW) return 0.0f;
    return dz[((o * g.OH + i) * g.OW + j) * g.N + n];
}

// Element (i, j) of an operand of rows x cols (0 past it), by kind (the contract above).
template <int KIND>
__device__ __forceinline__ float operand_at(const float* __restrict__ p, int s0, int s1, int i, int j,
                                            int rows, int cols, const ConvGeom& g)
{
    if (i >= rows || j >= cols) return 0.0f;
    if (KIND == OP_STRIDED) return p[i * s0 + j * s1];
    if (KIND == OP_IM2COL) return im2col_at(p, j, i, g);
    if (KIND == OP_IM2COL_T) return i == g.C * g.KH * g.KW ? 1.0f : im2col_at(p, i, j, g);
    if (KIND == OP_GATHER) return gather_at(p, i, j, g);
    const int v = i % g.KW, r = i / g.KW, u = r % g.KH, o = r / g.KH;     // OP_WTAP
    return p[((o * g.C + j) * g.KH + u) * g.KW + v];
}

// Whether a thread's staging slots run along the operand's rows (m of P, n of Q -- the
// contiguous index of IM2COL / GATHER / WTAP, and of STRIDED with s0 == 1 for P) or along k.
template <int KIND, bool IS_P>
__device__ __forceinline__ bool rows_fast(int s0)
{
    if (KIND == OP_STRIDED) return IS_P ? s0 == 1 : s0 != 1;
    return KIND == OP_IM2COL || KIND == OP_GATHER || KIND == OP_WTAP;
}

// One 32-bit shared-memory word from one (tf32) or two (16-bit: k, k+1) elements.
template <int MODE>
__device__ __forceinline__ unsigned int to_word(float e0, float e1)
{
    if (MODE == MODE_BF16) return pack2(bf16_bits(e0), bf16_bits(e1));
    if (MODE == MODE_F16) return pack2(f16_bits(e0), f16_bits(e1));
    return tf32_bits(e0);
}

template <int MODE>
__device__ __forceinline__ void mma(float d[4], const unsigned int a[4], const unsigned int b[2])
{
    if (MODE == MODE_BF16) mma_bf16_m16n8k16(d, a, b);
    else if (MODE == MODE_F16) mma_f16_m16n8k16(d, a, b);
    else mma_tf32_m16n8k8(d, a, b);
}

// The s-th staging slot of thread tid in a ROWS x WORDS tile -> (row, word).  Along the rows a
// thread keeps one row for every slot (ROWS divides the 128 threads, or 128 divides ROWS), so
// whatever the operand derives from its row (im2col's column decomposition) is computed once.
template <int ROWS, int WORDS>
__device__ __forceinline__ void slot(int tid, int s, bool row_fast, int& row, int& word)
{
    if (row_fast) {
        if (TC_THREADS % ROWS == 0) { row = tid % ROWS; word = tid / ROWS + s * (TC_THREADS / ROWS); }
        else { const int idx = tid + s * TC_THREADS; row = idx % ROWS; word = idx / ROWS; }
    } else {
        const int idx = tid + s * TC_THREADS;
        row = idx / WORDS; word = idx % WORDS;
    }
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

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int wm = (warp % WARPS_M) * 16 * FM, wn = (warp / WARPS_M) * 8 * FN;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_begin = blockIdx.z * k_slab, k_end = min(K, k_begin + k_slab);
    const bool p_row_fast = rows_fast<P_KIND, true>(p_s0), q_row_fast = rows_fast<Q_KIND, false>(q_s0);

    float pr[P_SLOTS][EPW], qr[Q_SLOTS][EPW];    // the next stage, in flight
    float acc[FM][FN][4];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    auto load = [&](int k0) {
#pragma unroll
        for (int s = 0; s < P_SLOTS; ++s) {
            int row, word;
            slot<BM, WORDS>(tid, s, p_row_fast, row, word);
#pragma unroll
            for (int e = 0; e < EPW; ++e)
                pr[s][e] = operand_at<P_KIND>(P, p_s0, p_s1, m0 + row, k0 + EPW * word + e, M, k_end, g);
        }
#pragma unroll
        for (int s = 0; s < Q_SLOTS; ++s) {
            int col, word;
            slot<BN, WORDS>(tid, s, q_row_fast, col, word);
#pragma unroll
            for (int e = 0; e < EPW; ++e)
                qr[s][e] = operand_at<Q_KIND>(Q, q_s0, q_s1, k0 + EPW * word + e, n0 + col, k_end, Nn, g);
        }
    };
    auto store = [&]() {
#pragma unroll
        for (int s = 0; s < P_SLOTS; ++s) {
            int row, word;
            slot<BM, WORDS>(tid, s, p_row_fast, row, word);
            const unsigned int hi = to_word<MODE>(pr[s][0], pr[s][EPW - 1]);
            Ps[0][row][word] = hi;
            if (SPLIT == 2) Ps[SPLIT - 1][row][word] = tf32_bits(pr[s][0] - __uint_as_float(hi));
        }
#pragma unroll
        for (int s = 0; s < Q_SLOTS; ++s) {
            int col, word;
            slot<BN, WORDS>(tid, s, q_row_fast, col, word);
            const unsigned int hi = to_word<MODE>(qr[s][0], qr[s][EPW - 1]);
            Qs[0][col][word] = hi;
            if (SPLIT == 2) Qs[SPLIT - 1][col][word] = tf32_bits(qr[s][0] - __uint_as_float(hi));
        }
    };

    if (k_begin < k_end) load(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += TC_BK) {
        store();
        __syncthreads();
        if (k0 + TC_BK < k_end) load(k0 + TC_BK);
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
