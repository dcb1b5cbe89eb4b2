// Softmax + cross-entropy over integer labels (batch mean), forward and
// backward: the fused loss of gpucnn.losses.SoftmaxCrossEntropy.
//
// Entry points: softmax_xent_forward / softmax_xent_mean / softmax_xent_backward
// (float32) and the same names with _f64 (float64), each the same template
// instantiated twice; T below is float or double.
//
// Compiled at run time by gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and,
// in the tests, run unchanged on the CPU by tests/cudasim.  No #includes.
//
// Math (the NumPy path, row by row):
//   m_n      = max_k z[n,k]
//   s_n      = sum_k exp(z[n,k] - m_n)
//   logp     = (z[n,k] - m_n) - log(s_n)
//   p[n,k]   = exp(logp)
//   loss_n   = -logp[n, y_n]
//   loss     = (sum_n loss_n) / N
//   dz[n,k]  = (p[n,k] - [k == y_n]) * coef,   coef = scale / N (host-computed)
//
// Labels.  The launcher only passes int pointers, so labels arrive as int32
// WORDS: label_words == 1 for int32 labels (word n is y_n), label_words == 2
// for int64 labels viewed as int32 pairs (little-endian, as on every CUDA
// platform: word 2n is the low half, word 2n+1 the high half).  A label is
// VALID iff the high half is 0 (int64 only) and 0 <= low half < K.  An invalid
// label makes that row's loss NaN (hence the mean loss NaN) and that row's
// gradient NaN; its probabilities are still written.  No error is raised and
// nothing syncs: the host's optional range check (check_labels=True) is the
// place for a clear error.
//
// NaN / Inf follow the NumPy formulas: the row maximum propagates NaN (a NaN
// logit makes the row's probs, loss and gradient NaN); a +inf logit gives
// inf - inf = NaN; -inf logits get probability 0.
//
// Determinism: no atomics.  Each row is computed by ONE WARP whose lane l
// handles k = l, l+32, l+64, ... in increasing order, then combines the 32
// partial results with an xor butterfly (every lane ends with the same bits),
// so a row's results depend only on the row, never on the grid or block.  The
// mean is computed by ONE WARP (warp_mean below) in an order fixed by N
// alone: lane l sums rows l, l+32, ... in increasing order, then an xor
// butterfly.  Hence every result is bit-identical for any launch shape.
//
// Launch sequences (gpucnn/cuda/ops.py):
//   * fused (small N):  softmax_xent_forward with grid = 1; the block's warps
//     loop over all rows, __syncthreads, then warp 0 writes the mean.  1 launch.
//   * large N:  softmax_xent_forward with grid > 1 (writes probs, row_loss),
//     then softmax_xent_mean with grid = 1, block = 32.  2 launches.
//   * backward: softmax_xent_backward, one thread per element.  1 launch.

template <typename T> struct SxMath;

template <> struct SxMath<float> {
    static __device__ __forceinline__ float ex(float x) { return expf(x); }
    static __device__ __forceinline__ float ln(float x) { return logf(x); }
    static __device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
};

template <> struct SxMath<double> {
    static __device__ __forceinline__ double ex(double x) { return exp(x); }
    static __device__ __forceinline__ double ln(double x) { return log(x); }
    static __device__ __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000LL); }
    static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000LL); }
};

// max that propagates NaN (like numpy.max): a NaN in either argument wins.
template <typename T>
__device__ __forceinline__ T sx_nanmax(T a, T b)
{
    return (a > b || a != a) ? a : b;
}

// Label of row n, or -1 when invalid (see "Labels" above).
__device__ __forceinline__ int sx_label(const int* __restrict__ labels, int label_words,
                                        int n, int K)
{
    const int lo = labels[n * label_words];
    const int hi = label_words == 2 ? labels[n * 2 + 1] : 0;
    return (hi == 0 && lo >= 0 && lo < K) ? lo : -1;
}

// Fixed-order mean of row_loss[0..N) by the 32 lanes of ONE warp (all 32
// lanes must call it); lane 0 writes *loss.  The order depends on N only.
template <typename T>
__device__ __forceinline__ void sx_warp_mean(const T* row_loss, T* __restrict__ loss,
                                             int N, int lane)
{
    T acc = 0;
    for (int i = lane; i < N; i += 32) acc += row_loss[i];
    for (int m = 16; m >= 1; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) loss[0] = acc / (T)N;
}

// ---------------------------------------------------------------------------
// softmax_xent_forward / softmax_xent_forward_f64
//
// Writes probs[n,k] and row_loss[n] for every row; when gridDim.x == 1 it
// also writes loss[0] (the mean; the block reduces after __syncthreads), and
// when gridDim.x > 1 it leaves loss untouched (run softmax_xent_mean next).
//
// Thread mapping: ONE WARP PER ROW.  Warp w of block b starts at row
// b * (blockDim.x / 32) + w and strides by gridDim.x * (blockDim.x / 32), so
// any grid covers all rows.  Per row: pass 1 reads z for the (NaN-propagating)
// maximum, pass 2 reads z again for s = sum exp(z - m), pass 3 reads z a third
// time and writes p (and the lane with k == y writes row_loss).  Any K >= 1
// (lanes with no k contribute -inf / 0).  Re-reads hit L1/L2 for small K.
//
// Launch shape: 1-D; block = (B,1,1) with B a multiple of 32, 32 <= B <= 1024
//   (the loader uses 256; 32 * min(N, 32) for the fused launch); any grid >= 1
//   (ops.py uses ceil(N / (B/32)), or 1 for the fused launch).  No shared memory.
//
// Layouts (all C-contiguous):
//   logits   : (N, K)    T
//   labels   : (N * label_words,) int32 words (see "Labels")
//   probs    : (N, K)    T, written once per element
//   row_loss : (N,)      T, written once per element (NaN for an invalid label)
//   loss     : (1,)      T, written once iff gridDim.x == 1
//
// Preconditions (checked on the host): N >= 1, K >= 1, label_words in {1, 2},
// N <= 2^30 and gridDim.x * blockDim.x / 32 <= 2^30 (so the row index plus
// the stride fits int32), every array has fewer than 2^31 elements, no aliasing.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void softmax_xent_forward_impl(
    const T* __restrict__ logits,
    const int* __restrict__ labels,
    int label_words,
    T* __restrict__ probs,
    T* row_loss,                 // written, then (fused) re-read by warp 0
    T* __restrict__ loss,
    int N, int K)
{
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int first = blockIdx.x * warps + (threadIdx.x >> 5);
    const int stride = gridDim.x * warps;

    for (int n = first; n < N; n += stride) {          // warp-uniform loop
        const T* z = logits + n * K;
        T* p = probs + n * K;

        T m = -SxMath<T>::inf();
        for (int k = lane; k < K; k += 32) m = sx_nanmax(m, z[k]);
        for (int s = 16; s >= 1; s >>= 1) m = sx_nanmax(m, __shfl_xor_sync(0xffffffffu, m, s));

        T sum = 0;
        for (int k = lane; k < K; k += 32) sum += SxMath<T>::ex(z[k] - m);
        for (int s = 16; s >= 1; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
        const T log_sum = SxMath<T>::ln(sum);

        const int y = sx_label(labels, label_words, n, K);
        for (int k = lane; k < K; k += 32) {
            const T logp = (z[k] - m) - log_sum;
            p[k] = SxMath<T>::ex(logp);
            if (k == y) row_loss[n] = -logp;
        }
        if (y < 0 && lane == 0) row_loss[n] = SxMath<T>::nan();
    }

    if (gridDim.x == 1) {                               // block-uniform
        __syncthreads();                                // row_loss visible to warp 0
        if (threadIdx.x < 32) sx_warp_mean(row_loss, loss, N, lane);
    }
}

extern "C" __global__ void softmax_xent_forward(
    const float* __restrict__ logits, const int* __restrict__ labels, int label_words,
    float* __restrict__ probs, float* row_loss, float* __restrict__ loss, int N, int K)
{
    softmax_xent_forward_impl(logits, labels, label_words, probs, row_loss, loss, N, K);
}

extern "C" __global__ void softmax_xent_forward_f64(
    const double* __restrict__ logits, const int* __restrict__ labels, int label_words,
    double* __restrict__ probs, double* row_loss, double* __restrict__ loss, int N, int K)
{
    softmax_xent_forward_impl(logits, labels, label_words, probs, row_loss, loss, N, K);
}

// ---------------------------------------------------------------------------
// softmax_xent_mean / softmax_xent_mean_f64
//
//   loss[0] = (sum_n row_loss[n]) / N, summed in the fixed order of
//   sx_warp_mean (identical bits to the fused forward's mean).
//
// Launch shape: grid = (1,1,1), block = (32,1,1) exactly (one warp; extra
//   warps would only idle).  No shared memory.  Cost grows as N / 32 loads
//   per lane: fine for batch sizes, slow for N in the millions.
//
// Layouts: row_loss (N,) T as written by softmax_xent_forward; loss (1,) T.
// Preconditions: N >= 1.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void softmax_xent_mean_impl(
    const T* __restrict__ row_loss, T* __restrict__ loss, int N)
{
    if (blockIdx.x != 0 || threadIdx.x >= 32) return;   // warp-uniform
    sx_warp_mean(row_loss, loss, N, (int)threadIdx.x);
}

extern "C" __global__ void softmax_xent_mean(
    const float* __restrict__ row_loss, float* __restrict__ loss, int N)
{
    softmax_xent_mean_impl(row_loss, loss, N);
}

extern "C" __global__ void softmax_xent_mean_f64(
    const double* __restrict__ row_loss, double* __restrict__ loss, int N)
{
    softmax_xent_mean_impl(row_loss, loss, N);
}

// ---------------------------------------------------------------------------
// softmax_xent_backward / softmax_xent_backward_f64
//
//   dlogits[n,k] = (probs[n,k] - (k == y_n ? 1 : 0)) * coef
// with coef = scale / N computed on the host in double and rounded to T (the
// NumPy path's g.dtype.type(scale / N)), so given the same probs the result
// has the same bits as the NumPy path.  A row with an invalid label gets NaN.
//
// Thread mapping: ONE THREAD PER ELEMENT; the flat thread index
// t = blockIdx.x * blockDim.x + threadIdx.x is the C-order flat index of
// dlogits[n,k]; threads with t >= N*K exit.
//
// Launch shape: 1-D; block = (B,1,1) for any B >= 1 (the loader uses 256),
//   grid = (ceil(N*K / B), 1, 1); grid.x * B fits int32.  No shared memory.
//
// Layouts (all C-contiguous):
//   probs   : (N, K) T, as written by softmax_xent_forward
//   labels  : (N * label_words,) int32 words, as for the forward pass
//   dlogits : (N, K) T, written once per element (may not alias probs)
//
// Preconditions: N >= 1, K >= 1, label_words in {1, 2}.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void softmax_xent_backward_impl(
    const T* __restrict__ probs,
    const int* __restrict__ labels,
    int label_words,
    T* __restrict__ dlogits,
    int N, int K, T coef)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * K) return;
    const int n = t / K;
    const int k = t - n * K;
    const int y = sx_label(labels, label_words, n, K);
    const T onehot = k == y ? (T)1 : (T)0;
    dlogits[t] = y < 0 ? SxMath<T>::nan() : (probs[t] - onehot) * coef;
}

extern "C" __global__ void softmax_xent_backward(
    const float* __restrict__ probs, const int* __restrict__ labels, int label_words,
    float* __restrict__ dlogits, int N, int K, float coef)
{
    softmax_xent_backward_impl(probs, labels, label_words, dlogits, N, K, coef);
}

extern "C" __global__ void softmax_xent_backward_f64(
    const double* __restrict__ probs, const int* __restrict__ labels, int label_words,
    double* __restrict__ dlogits, int N, int K, double coef)
{
    softmax_xent_backward_impl(probs, labels, label_words, dlogits, N, K, coef);
}
