// Dense (fully connected) layers on batch-last (BL) vectors: forward with bias
// and activation, the activation/bias backward, and the two GEMMs of the
// backward pass.
//
// Entry points (float32; the _f64 twins take double): dense_forward,
// dense_backward_act, gemm_nt, gemm_tn.  One template body each, instantiated
// twice; T below is float or double.  Host wrappers: gpucnn/cuda/dense.py.
// Includes activation.cuh (gpucnn/cuda/sources.py expands it in place).
//
// Layouts (all C-contiguous): x (Fin, N), W (Fout, Fin), b (Fout,),
// y / z / dy / dz (Fout, N), dW (Fout, Fin), dx (Fin, N).
//
// Activation codes (int act): 0 none, 1 relu, 2 sigmoid, 3 tanh; the rules
// (activation(z, act) forward, activation_backward(dy, saved, act) with relu'
// from z and sigmoid' / tanh' from y) are kernels/activation.cuh's.
//
// ===========================================================================
// The tiled GEMM core (dense_forward, gemm_nt, gemm_tn)
//
//   C (M, Nc) = op(A) @ op(B), reduction length K, where
//     dense_forward: A = W stored (M, K),   B = x  stored (K, Nc)   [C = W x]
//     gemm_nt:       A stored (M, K),       B stored (Nc, K)        [C = A B^T]
//     gemm_tn:       A stored (K, M),       B stored (K, Nc)        [C = A^T B]
//
// Block tile: DG_BM x DG_BN = 32 x 32 outputs, K consumed in slices of
// DG_BK = 16.  A block is (64, KS, 1) threads: KS "k-groups" (threadIdx.y) of
// 64 threads.  Group g handles the k-slices g, g + KS, g + 2 KS, ... : per
// slice its 64 threads stage the 32 x 16 A tile and the 16 x 32 B tile in
// shared memory (8 elements each per thread, coalesced: consecutive threads
// read consecutive addresses of the stored matrix; zero-filled past M, Nc,
// K), loaded into registers one slice ahead (the loads of slice kt + KS are
// issued before slice kt is multiplied, and stored after it), then every thread accumulates its DG_TM x DG_TN = 4 x 4 outputs, rows
// m0 + 4 ty + i and columns n0 + 4 tx + j (tx = tid & 7, ty = tid >> 3,
// i, j < 4), in registers: per k, two 4-wide (16-byte for float) shared loads
// for 16 FMAs.  The tile rows are padded to 36 elements (16-byte aligned rows;
// at most 2-way bank conflicts on the transposing stores).  The outputs of a
// warp are 4 rows x 32 consecutive columns: coalesced stores.
//
// Reduction order (deterministic, atomic-free): each accumulator sums its
// k-slices in increasing k within a group; then the KS group partials are
// combined in shared memory as ((p0 + p1) + p2) + p3, and group 0 writes the
// output.  The order depends on K and KS only (KS is a launch-shape choice of
// the wrapper, a function of the shapes).  Every output element is written
// exactly once.
//
// Launch shape: grid = (ceil(Nc / 32), GY, GZ), block = (64, KS, 1) with
//   1 <= KS <= 4; no dynamic shared memory (static: 4 * 1152 elements,
//   18 KiB float, 36 KiB double).  Block (bx, by, bz) computes column tile bx
//   and row tile by + GY * bz (dg_row_tile): the ceil(M / 32) row tiles are
//   spread over y and, past CUDA's 65535 for gridDim.y, over z too.  GY * GZ
//   may exceed the row tiles; a block past the last one exits at once (the
//   whole block, before any barrier).  The wrapper uses GZ = 1, GY =
//   ceil(M / 32) whenever that fits, so the tiles, and every sum, are the same
//   for every grid.
// Preconditions: M, Nc, K >= 1; M, Nc <= 2^31 - 33 (tile indices stay in
//   int); every array < 2^31 elements; outputs do not alias inputs.
// ===========================================================================

#include "activation.cuh"   // activation, activation_backward

#define DG_BM 32
#define DG_BN 32
#define DG_BK 16
#define DG_TM 4
#define DG_TN 4
#define DG_GROUP_THREADS 64
#define DG_MAX_KS 4
#define DG_LDA (DG_BM + 4)
#define DG_LDB (DG_BN + 4)
#define DG_TILE_A (DG_BK * DG_LDA)
#define DG_TILE_B (DG_BK * DG_LDB)
#define DG_GROUP_SMEM (DG_TILE_A + DG_TILE_B)
#define DG_SMEM (DG_MAX_KS * DG_GROUP_SMEM)
#define DG_ACC (DG_TM * DG_TN)

// Row tile of this block: blockIdx.y + gridDim.y * blockIdx.z (see Launch shape).
__device__ __forceinline__ int dg_row_tile() { return (int)(blockIdx.y + gridDim.y * blockIdx.z); }

// True for a block past the last row tile of an M-row result (it must exit).
__device__ __forceinline__ bool dg_past_rows(int M) { return dg_row_tile() > (M - 1) / DG_BM; }

// The operands of the GEMM core: where element i of a stored matrix comes from.
// DgArray reads it from memory; DgDz computes it as it is staged, dz[i] =
// activation_backward(dy[i], saved[i], act) (dy[i] alone for act 0): the
// dense backward's dz, never written to memory (dense_backward below).  Both
// give the same value for an element wherever it is loaded.
template <typename T>
struct DgArray {
    const T* __restrict__ p;
    __device__ __forceinline__ T at(int i) const { return p[i]; }
};

template <typename T>
struct DgDz {
    const T* __restrict__ dy;
    const T* __restrict__ saved;    // z for relu, y for sigmoid / tanh; not read for act 0
    int act;
    __device__ __forceinline__ T at(int i) const { return act ? activation_backward(dy[i], saved[i], act) : dy[i]; }
};

// Stored-matrix layouts of the GEMM core, as a tag argument (deduced, so the
// syncing helper below is called without explicit template arguments).
template <bool A_KM, bool B_NK> struct DgLayout {};

// The k-slice starting at k0 of A (rows m0..m0+31), 8 elements per thread: loaded
// into registers (dg_load_a), later stored into As[kk][mm] (dg_store_a), so that
// the loads of the next slice are in flight while the current one is multiplied.
//   A_KM == false: A stored (M, K): element (m, k) at A[m*K + k]
//   A_KM == true:  A stored (K, M): element (m, k) at A[k*M + m]
// Thread tid holds (A_KM false) kk = tid & 15, mm = (tid >> 4) + 4 r, or
// (A_KM true) mm = tid & 31, kk = (tid >> 5) + 2 r, for r < 8: consecutive
// threads read consecutive addresses of the stored matrix.
template <typename T, bool A_KM, typename Src>
__device__ __forceinline__ void dg_load_a(const Src& A, T (&ra)[8], int M, int K, int m0, int k0, int tid)
{
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const int kk = A_KM ? (tid >> 5) + 2 * r : tid & (DG_BK - 1);
        const int mm = A_KM ? tid & (DG_BM - 1) : (tid >> 4) + 4 * r;
        const int m = m0 + mm, k = k0 + kk;
        ra[r] = (m < M && k < K) ? A.at(A_KM ? k * M + m : m * K + k) : (T)0;
    }
}

template <typename T, bool A_KM>
__device__ __forceinline__ void dg_store_a(T* As, const T (&ra)[8], int tid)
{
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const int kk = A_KM ? (tid >> 5) + 2 * r : tid & (DG_BK - 1);
        const int mm = A_KM ? tid & (DG_BM - 1) : (tid >> 4) + 4 * r;
        As[kk * DG_LDA + mm] = ra[r];
    }
}

// The same for B (columns n0..n0+31) into Bs[kk][nn]:
//   B_NK == false: B stored (K, Nc): element (k, n) at B[k*Nc + n]
//   B_NK == true:  B stored (Nc, K): element (k, n) at B[n*K + k]
// Thread tid holds (B_NK false) nn = tid & 31, kk = (tid >> 5) + 2 r, or
// (B_NK true) kk = tid & 15, nn = (tid >> 4) + 4 r.
template <typename T, bool B_NK, typename Src>
__device__ __forceinline__ void dg_load_b(const Src& B, T (&rb)[8], int Nc, int K, int n0, int k0, int tid)
{
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const int kk = B_NK ? tid & (DG_BK - 1) : (tid >> 5) + 2 * r;
        const int nn = B_NK ? (tid >> 4) + 4 * r : tid & (DG_BN - 1);
        const int n = n0 + nn, k = k0 + kk;
        rb[r] = (n < Nc && k < K) ? B.at(B_NK ? n * K + k : k * Nc + n) : (T)0;
    }
}

template <typename T, bool B_NK>
__device__ __forceinline__ void dg_store_b(T* Bs, const T (&rb)[8], int tid)
{
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const int kk = B_NK ? tid & (DG_BK - 1) : (tid >> 5) + 2 * r;
        const int nn = B_NK ? (tid >> 4) + 4 * r : tid & (DG_BN - 1);
        Bs[kk * DG_LDB + nn] = rb[r];
    }
}

// The main loop and the fixed-order combination of the k-groups, for the
// 32 x 32 tile at rows m0.., columns n0.. with KS k-groups.  On return
// acc[i*DG_TN + j] of group 0's threads holds C[m0 + 4 ty + i, n0 + 4 tx + j]
// (other groups' acc are partials and must not be used).  KS <= blockDim.y:
// groups g >= KS take no slice and add nothing, but like every thread of the
// block they must call it (it synchronizes; the barrier count depends on K and
// KS only).  The sums are those of a block of exactly KS groups.
template <typename T, bool A_KM, bool B_NK, typename SrcA, typename SrcB>
__device__ __forceinline__ void dg_mainloop(const SrcA& A, const SrcB& B, int M, int Nc, int K, int m0, int n0,
                                            int KS, T* smem, T* acc, DgLayout<A_KM, B_NK>)
{
    const int tid = threadIdx.x;
    const int g = threadIdx.y;
    const int tx = tid & 7;
    const int ty = tid >> 3;
    const bool member = g < KS;                         // group-uniform
    T* As = smem + g * DG_GROUP_SMEM;
    T* Bs = As + DG_TILE_A;

#pragma unroll
    for (int e = 0; e < DG_ACC; ++e) acc[e] = (T)0;

    const int nkt = (K + DG_BK - 1) / DG_BK;
    T ra[8], rb[8];
    if (member && g < nkt) {                            // the group's first slice
        dg_load_a<T, A_KM>(A, ra, M, K, m0, g * DG_BK, tid);
        dg_load_b<T, B_NK>(B, rb, Nc, K, n0, g * DG_BK, tid);
    }
    for (int base = 0; base < nkt; base += KS) {        // block-uniform trip count
        const int kt = base + g;
        const bool active = member && kt < nkt;
        if (active) {
            dg_store_a<T, A_KM>(As, ra, tid);
            dg_store_b<T, B_NK>(Bs, rb, tid);
        }
        __syncthreads();
        if (member && kt + KS < nkt) {                  // prefetch the group's next slice
            dg_load_a<T, A_KM>(A, ra, M, K, m0, (kt + KS) * DG_BK, tid);
            dg_load_b<T, B_NK>(B, rb, Nc, K, n0, (kt + KS) * DG_BK, tid);
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < DG_BK; ++kk) {
                T a[DG_TM], b[DG_TN];
#pragma unroll
                for (int i = 0; i < DG_TM; ++i) a[i] = As[kk * DG_LDA + ty * DG_TM + i];
#pragma unroll
                for (int j = 0; j < DG_TN; ++j) b[j] = Bs[kk * DG_LDB + tx * DG_TN + j];
#pragma unroll
                for (int i = 0; i < DG_TM; ++i)
#pragma unroll
                    for (int j = 0; j < DG_TN; ++j) acc[i * DG_TN + j] += a[i] * b[j];
            }
        }
        __syncthreads();                                // tiles free for the next slice
    }

    if (KS > 1) {                                       // block-uniform
        // Groups 1..KS-1 park their partials (3 * 1024 <= DG_SMEM elements).
        if (g > 0 && member) {
#pragma unroll
            for (int e = 0; e < DG_ACC; ++e)
                smem[((g - 1) * DG_ACC + e) * DG_GROUP_THREADS + tid] = acc[e];
        }
        __syncthreads();
        if (g == 0) {
            for (int s = 1; s < KS; ++s) {
#pragma unroll
                for (int e = 0; e < DG_ACC; ++e)
                    acc[e] += smem[((s - 1) * DG_ACC + e) * DG_GROUP_THREADS + tid];
            }
        }
    }
}

// The tile origin of a block of the plain GEMM grid (see Launch shape).
__device__ __forceinline__ int dg_m0() { return dg_row_tile() * DG_BM; }
__device__ __forceinline__ int dg_n0() { return (int)blockIdx.x * DG_BN; }

// Plain store of group 0's outputs of the tile at (m0, n0): C (M, Nc) row-major.
template <typename T>
__device__ __forceinline__ void dg_store(T* __restrict__ Cout, const T* acc, int M, int Nc, int m0, int n0)
{
    if (threadIdx.y != 0) return;
    const int tx = threadIdx.x & 7;
    const int ty = threadIdx.x >> 3;
#pragma unroll
    for (int i = 0; i < DG_TM; ++i) {
        const int m = m0 + ty * DG_TM + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < DG_TN; ++j) {
            const int n = n0 + tx * DG_TN + j;
            if (n < Nc) Cout[m * Nc + n] = acc[i * DG_TN + j];
        }
    }
}

// ---------------------------------------------------------------------------
// dense_forward / dense_forward_f64
//
//   z[f, n] = sum_k W[f, k] x[k, n]  (+ b[f] when has_bias; added last)
//   y[f, n] = act(z[f, n])            (y = z for act 0)
//   z is also written when write_z != 0 (relu: its backward needs z).
// The GEMM core with A = W (M = Fout, K = Fin), B = x (Nc = N).
// Launch shape: grid (ceil(N/32), GY, GZ) covering ceil(Fout/32) row tiles, block (64, KS, 1).
// b is read only when has_bias, z written only when write_z (else they may be
// dummies: any T arrays, e.g. y for z).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void dense_forward_impl(
    const T* __restrict__ Wt, const T* __restrict__ x, const T* b, T* __restrict__ y, T* z,
    int Fout, int Fin, int N, int act, int has_bias, int write_z, T* smem)
{
    if (dg_past_rows(Fout)) return;                     // block-uniform
    T acc[DG_ACC];
    const int m0 = dg_m0(), n0 = dg_n0();
    dg_mainloop(DgArray<T>{Wt}, DgArray<T>{x}, Fout, N, Fin, m0, n0, (int)blockDim.y, smem, acc,
                DgLayout<false, false>());
    if (threadIdx.y != 0) return;
    const int tx = threadIdx.x & 7;
    const int ty = threadIdx.x >> 3;
#pragma unroll
    for (int i = 0; i < DG_TM; ++i) {
        const int f = m0 + ty * DG_TM + i;
        if (f >= Fout) continue;
        const T bias = has_bias ? b[f] : (T)0;
#pragma unroll
        for (int j = 0; j < DG_TN; ++j) {
            const int n = n0 + tx * DG_TN + j;
            if (n >= N) continue;
            const T zz = has_bias ? acc[i * DG_TN + j] + bias : acc[i * DG_TN + j];
            y[f * N + n] = activation(zz, act);
            if (write_z) z[f * N + n] = zz;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) dense_forward(
    const float* __restrict__ Wt, const float* __restrict__ x, const float* b, float* __restrict__ y, float* z,
    int Fout, int Fin, int N, int act, int has_bias, int write_z)
{
    __shared__ __align__(16) float smem[DG_SMEM];
    dense_forward_impl(Wt, x, b, y, z, Fout, Fin, N, act, has_bias, write_z, smem);
}

extern "C" __global__ void __launch_bounds__(256) dense_forward_f64(
    const double* __restrict__ Wt, const double* __restrict__ x, const double* b, double* __restrict__ y, double* z,
    int Fout, int Fin, int N, int act, int has_bias, int write_z)
{
    __shared__ __align__(16) double smem[DG_SMEM];
    dense_forward_impl(Wt, x, b, y, z, Fout, Fin, N, act, has_bias, write_z, smem);
}

// ---------------------------------------------------------------------------
// gemm_nt / gemm_nt_f64:  C (M, Nc) = A (M, K) @ B (Nc, K)^T
//   (dW = dz @ x^T: A = dz (Fout, N), B = x (Fin, N), K = N, the batch.)
// gemm_tn / gemm_tn_f64:  C (M, Nc) = A (K, M)^T @ B (K, Nc)
//   (dx = W^T @ dz: A = W (Fout, Fin), M = Fin, K = Fout, B = dz (Fout, N).)
// Launch shape: grid (ceil(Nc/32), GY, GZ) covering ceil(M/32) row tiles, block (64, KS, 1).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void gemm_nt_impl(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ Cout,
                                             int M, int Nc, int K, T* smem)
{
    if (dg_past_rows(M)) return;                        // block-uniform
    T acc[DG_ACC];
    dg_mainloop(DgArray<T>{A}, DgArray<T>{B}, M, Nc, K, dg_m0(), dg_n0(), (int)blockDim.y, smem, acc,
                DgLayout<false, true>());
    dg_store(Cout, acc, M, Nc, dg_m0(), dg_n0());
}

template <typename T>
__device__ __forceinline__ void gemm_tn_impl(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ Cout,
                                             int M, int Nc, int K, T* smem)
{
    if (dg_past_rows(M)) return;                        // block-uniform
    T acc[DG_ACC];
    dg_mainloop(DgArray<T>{A}, DgArray<T>{B}, M, Nc, K, dg_m0(), dg_n0(), (int)blockDim.y, smem, acc,
                DgLayout<true, false>());
    dg_store(Cout, acc, M, Nc, dg_m0(), dg_n0());
}

extern "C" __global__ void __launch_bounds__(256) gemm_nt(
    const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ Cout, int M, int Nc, int K)
{
    __shared__ __align__(16) float smem[DG_SMEM];
    gemm_nt_impl(A, B, Cout, M, Nc, K, smem);
}

extern "C" __global__ void __launch_bounds__(256) gemm_nt_f64(
    const double* __restrict__ A, const double* __restrict__ B, double* __restrict__ Cout, int M, int Nc, int K)
{
    __shared__ __align__(16) double smem[DG_SMEM];
    gemm_nt_impl(A, B, Cout, M, Nc, K, smem);
}

extern "C" __global__ void __launch_bounds__(256) gemm_tn(
    const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ Cout, int M, int Nc, int K)
{
    __shared__ __align__(16) float smem[DG_SMEM];
    gemm_tn_impl(A, B, Cout, M, Nc, K, smem);
}

extern "C" __global__ void __launch_bounds__(256) gemm_tn_f64(
    const double* __restrict__ A, const double* __restrict__ B, double* __restrict__ Cout, int M, int Nc, int K)
{
    __shared__ __align__(16) double smem[DG_SMEM];
    gemm_tn_impl(A, B, Cout, M, Nc, K, smem);
}

// ---------------------------------------------------------------------------
// dense_backward / dense_backward_f64: the whole dense backward in ONE launch
//
//   dz[f, n] = activation_backward(dy[f, n], saved[f, n], act)  (never stored)
//   dW       = dz @ x^T               (Fout, Fin)   -- gemm_nt's product
//   dx       = W^T @ dz               (Fin, N)      -- gemm_tn's product, when input_grad
//   db[f]    = sum_n dz[f, n]         (Fout,)       -- when has_bias
//
// Roles by blockIdx.x (a 1-D grid; every block takes exactly one role, the
// role is block-uniform):
//   [0, TW)             dW tiles: TW = ceil(Fout/32) * ceil(Fin/32); block b
//                       computes row tile b / ceil(Fin/32), column tile
//                       b % ceil(Fin/32) of the GEMM core with A = dz (Fout, N)
//                       (DgDz: dz computed from dy and saved while staging),
//                       B = x stored (Fin, N), K = N, ks_w k-groups;
//   [TW, TW + TX)       dx tiles (only when input_grad; else TX = 0):
//                       TX = ceil(Fin/32) * ceil(N/32); block TW + b computes
//                       row tile b / ceil(N/32), column tile b % ceil(N/32)
//                       with A = W stored (Fout, Fin) (A_KM), B = dz (Fout, N)
//                       computed while staging, K = Fout, ks_x k-groups;
//   [TW + TX, + Fout)   db rows (only when has_bias): block TW + TX + f sums
//                       row f of dz.
// Grid (TW + TX + (has_bias ? Fout : 0), 1, 1); block (64, KS, 1) with
//   KS = max(ks_w, ks_x) (ks_x only when input_grad), 1 <= ks <= 4.  The
//   block shape is one for the grid: a GEMM role passes its own k-group count
//   to dg_mainloop, and the groups beyond it idle through the barriers.
//   No dynamic shared memory (static as the GEMM core's).
//
// Reduction order, and the bits:
//   * dW and dx: the GEMM core's (see the top of this file) with ks_w = KS of
//     gemm_nt (Fout, Fin, N) and ks_x = KS of gemm_tn (Fin, N, Fout) as the
//     wrapper chooses them (gpucnn.cuda.dense.gemm_k_groups), and dz the same
//     activation_backward expression as dense_backward_act's: dW and dx are
//     bit-identical to dense_backward_act + gemm_nt + gemm_tn.
//   * db: the fixed order of dense_backward_act with R = red_block "virtual
//     threads" (R a power of two in [32, 256]; the wrapper: reduce_block(N)):
//     virtual thread v sums dz[f, v], dz[f, v + R], ... in increasing n; the
//     64 * KS threads of the block run virtual threads v = tid, tid + 64 KS,
//     ...; then the tree red[v] += red[v + s] for s = R/2, ..., 1; thread 0
//     writes db[f].  Bit-identical to dense_backward_act with block R.
//   No atomics; every output element is written exactly once.
// Layouts (C-contiguous): dy, saved (Fout, N); x (Fin, N); W (Fout, Fin);
//   dW (Fout, Fin); dx (Fin, N); db (Fout,).  saved is read only for act != 0,
//   dx written only when input_grad, db only when has_bias (else any T arrays
//   as dummies, e.g. dy).
// Preconditions: Fout, Fin, N >= 1; 1 <= ks_w, ks_x <= blockDim.y <= 4;
//   red_block a power of two in [32, 256]; the grid exactly as above (< 2^31
//   blocks); every array < 2^31 elements; outputs do not alias inputs or each
//   other.
// ---------------------------------------------------------------------------

// db[f] = sum_n dz[f, n] in dense_backward_act's order (R virtual threads, then a tree).
template <typename T>
__device__ __forceinline__ void dense_db_row(const DgDz<T>& dz, T* __restrict__ db, int f, int N, int R, T* red)
{
    const int threads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int row = f * N;
    for (int v = tid; v < R; v += threads) {
        T acc = (T)0;
        for (int n = v; n < N; n += R) acc += dz.at(row + n);
        red[v] = acc;
    }
    __syncthreads();
    for (int s = R >> 1; s > 0; s >>= 1) {
        for (int v = tid; v < s; v += threads) red[v] += red[v + s];
        __syncthreads();
    }
    if (tid == 0) db[f] = red[0];
}

template <typename T>
__device__ __forceinline__ void dense_backward_impl(
    const T* __restrict__ dy, const T* __restrict__ saved, const T* __restrict__ x, const T* __restrict__ Wt,
    T* __restrict__ dW, T* __restrict__ dx, T* __restrict__ db, int Fout, int Fin, int N, int act,
    int has_bias, int input_grad, int ks_w, int ks_x, int red_block, T* smem)
{
    const DgDz<T> dz{dy, saved, act};
    const int cols_w = (Fin + DG_BN - 1) / DG_BN;
    const int tiles_w = (Fout + DG_BM - 1) / DG_BM * cols_w;
    const int cols_x = (N + DG_BN - 1) / DG_BN;
    const int tiles_x = input_grad ? (Fin + DG_BM - 1) / DG_BM * cols_x : 0;
    int b = blockIdx.x;
    T acc[DG_ACC];
    if (b < tiles_w) {                                  // dW = dz x^T (gemm_nt)
        const int m0 = b / cols_w * DG_BM, n0 = b % cols_w * DG_BN;
        dg_mainloop(dz, DgArray<T>{x}, Fout, Fin, N, m0, n0, ks_w, smem, acc, DgLayout<false, true>());
        dg_store(dW, acc, Fout, Fin, m0, n0);
        return;
    }
    b -= tiles_w;
    if (b < tiles_x) {                                  // dx = W^T dz (gemm_tn)
        const int m0 = b / cols_x * DG_BM, n0 = b % cols_x * DG_BN;
        dg_mainloop(DgArray<T>{Wt}, dz, Fin, N, Fout, m0, n0, ks_x, smem, acc, DgLayout<true, false>());
        dg_store(dx, acc, Fin, N, m0, n0);
        return;
    }
    b -= tiles_x;
    if (has_bias && b < Fout) dense_db_row(dz, db, b, N, red_block, smem);   // block-uniform
}

extern "C" __global__ void __launch_bounds__(256) dense_backward(
    const float* __restrict__ dy, const float* __restrict__ saved, const float* __restrict__ x,
    const float* __restrict__ Wt, float* __restrict__ dW, float* __restrict__ dx, float* __restrict__ db,
    int Fout, int Fin, int N, int act, int has_bias, int input_grad, int ks_w, int ks_x, int red_block)
{
    __shared__ __align__(16) float smem[DG_SMEM];
    dense_backward_impl(dy, saved, x, Wt, dW, dx, db, Fout, Fin, N, act, has_bias, input_grad, ks_w, ks_x,
                        red_block, smem);
}

extern "C" __global__ void __launch_bounds__(256) dense_backward_f64(
    const double* __restrict__ dy, const double* __restrict__ saved, const double* __restrict__ x,
    const double* __restrict__ Wt, double* __restrict__ dW, double* __restrict__ dx, double* __restrict__ db,
    int Fout, int Fin, int N, int act, int has_bias, int input_grad, int ks_w, int ks_x, int red_block)
{
    __shared__ __align__(16) double smem[DG_SMEM];
    dense_backward_impl(dy, saved, x, Wt, dW, dx, db, Fout, Fin, N, act, has_bias, input_grad, ks_w, ks_x,
                        red_block, smem);
}

// ---------------------------------------------------------------------------
// dense_backward_act / dense_backward_act_f64
//
//   dz[f, n] = dy[f, n] * act'(saved[f, n])     (act 0: dz = dy)
//   db[f]    = sum_n dz[f, n]                    (only when has_bias)
//
// Thread mapping: ONE BLOCK PER ROW f (blockIdx.x).  Thread t of the B-thread
// block handles n = t, t + B, t + 2B, ... in increasing order: writes dz and
// sums it into a register; then a shared-memory tree (s = B/2, B/4, ..., 1:
// red[t] += red[t + s]) combines the B partials and thread 0 writes db[f].
// The order depends on N and B only.  Reads and writes are coalesced along n.
//
// Launch shape: grid (F, 1, 1), block (B, 1, 1) with B a power of two in
//   [32, 256] (the wrapper: the smallest >= N, at most 256).  No dynamic
//   shared memory (static: 256 elements).
// Layouts: dy, saved, dz (F, N); db (F,).  db is written only when has_bias
//   (else it may be a dummy, e.g. dz).  dz may not alias dy or saved.
// ---------------------------------------------------------------------------
#define DBA_MAX_BLOCK 256

template <typename T>
__device__ __forceinline__ void dense_backward_act_impl(
    const T* __restrict__ dy, const T* __restrict__ saved, T* __restrict__ dz, T* db,
    int F, int N, int act, int has_bias, T* red)
{
    const int f = blockIdx.x;
    const int t = threadIdx.x;
    const int B = blockDim.x;
    const int row = f * N;
    T acc = (T)0;
    for (int n = t; n < N; n += B) {
        const T d = activation_backward(dy[row + n], saved[row + n], act);
        dz[row + n] = d;
        acc += d;
    }
    if (!has_bias) return;                              // block-uniform
    red[t] = acc;
    __syncthreads();
    for (int s = B >> 1; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        __syncthreads();
    }
    if (t == 0) db[f] = red[0];
}

extern "C" __global__ void __launch_bounds__(DBA_MAX_BLOCK) dense_backward_act(
    const float* __restrict__ dy, const float* __restrict__ saved, float* __restrict__ dz, float* db,
    int F, int N, int act, int has_bias)
{
    __shared__ float red[DBA_MAX_BLOCK];
    dense_backward_act_impl(dy, saved, dz, db, F, N, act, has_bias, red);
}

extern "C" __global__ void __launch_bounds__(DBA_MAX_BLOCK) dense_backward_act_f64(
    const double* __restrict__ dy, const double* __restrict__ saved, double* __restrict__ dz, double* db,
    int F, int N, int act, int has_bias)
{
    __shared__ double red[DBA_MAX_BLOCK];
    dense_backward_act_impl(dy, saved, dz, db, F, N, act, has_bias, red);
}
