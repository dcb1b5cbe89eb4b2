// Softmax cross-entropy over integer labels on batch-last (BL) logits (K, N):
// forward (probabilities, batch-mean loss and the number of correct argmax
// predictions) and backward.  The numerics, NaN and invalid-label rules and
// the int32 label words are those of kernels/softmax_xent.cu; only the layout
// (classes outer, batch inner) and the thread mapping differ.
//
// Entry points: xent_forward / xent_forward_backward / xent_mean /
// xent_backward (float32) and the same names with _f64 (float64); one template
// body each, instantiated twice;
// T below is float or double.  No #includes.  Host wrappers: gpucnn/cuda/loss.py.
//
// Math, per sample n (column n of the logits z):
//   m_n     = max_k z[k, n]            (NaN-propagating)
//   s_n     = sum_k exp(z[k, n] - m_n) (k increasing)
//   logp    = (z[k, n] - m_n) - log(s_n)
//   p[k, n] = exp(logp)
//   loss_n  = -logp[y_n, n]
//   loss    = (sum_n loss_n) / N
//   correct = #{n : argmax_k z[k, n] == y_n}, the argmax being the FIRST
//             maximum (strict '>' scan from k = 0); a row holding a NaN logit
//             (m_n NaN) and a row with an invalid label count as wrong.
//   dz[k, n] = (p[k, n] - [k == y_n]) * coef,  coef = scale / N (host, rounded to T)
//
// Labels arrive as int32 WORDS: label_words == 1 for int32 labels (word n is
// y_n), label_words == 2 for int64 labels viewed as little-endian int32 pairs
// (word 2n low half, 2n+1 high half).  A label is VALID iff the high half is
// 0 (int64 only) and 0 <= low half < K.  An invalid label makes the sample's
// loss NaN (hence the mean NaN), its gradient column NaN and its "correct" 0;
// its probabilities are still written.  Nothing raises, nothing syncs.
//
// NaN / Inf follow the formulas: a NaN logit makes the sample's probs, loss
// and gradient NaN; a +inf logit gives inf - inf = NaN; -inf gets p = 0.
//
// Determinism (no atomics): each sample is computed by ONE THREAD in
// increasing k, so its results depend on that column only; the mean and the
// count are computed by ONE WARP (xent_warp_reduce) in an order fixed by N
// alone (lane l sums samples l, l+32, ... in increasing order, then an xor
// butterfly).  Every result is bit-identical for any launch shape.
//
// Launch sequences (gpucnn/cuda/loss.py):
//   * fused (N <= fused_max_rows): xent_forward with grid 1 and one block of
//     B = min(1024, ceil(N/32)*32) threads; its threads loop over the samples,
//     __syncthreads, then warp 0 writes loss and correct.  1 launch.
//   * split: xent_forward with grid ceil(N/B) > 1 (writes probs, row_loss,
//     row_correct), then xent_mean with grid 1, block 32.  2 launches.
//   * backward: xent_backward, grid (ceil(N/B), K), one thread per element.
//   * forward + backward (the train step): xent_forward_backward in place of
//     xent_forward (the same grid and block, fused or split), which also
//     writes dlogits: 1 launch (N <= fused_max_rows) or 2 (+ xent_mean).

// Largest block of xent_forward and xent_backward (the wrappers launch up to
// 1024 threads).  Declared with __launch_bounds__: a block of more than 256
// threads fits the 64K-register file only at <= 65536 / threads registers a
// thread, which ptxas keeps to only when it knows the block size (the float64
// xent_forward used 56 of the 64 that 1024 threads allow, without the bound).
#define XE_MAX_BLOCK 1024

template <typename T> struct XeMath;
template <> struct XeMath<float> {
    static __device__ __forceinline__ float ex(float v) { return expf(v); }
    static __device__ __forceinline__ float ln(float v) { return logf(v); }
    static __device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
};
template <> struct XeMath<double> {
    static __device__ __forceinline__ double ex(double v) { return exp(v); }
    static __device__ __forceinline__ double ln(double v) { return log(v); }
    static __device__ __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000LL); }
    static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000LL); }
};

// Label of sample n, or -1 when invalid.
__device__ __forceinline__ int xe_label(const int* __restrict__ labels, int label_words, int n, int K)
{
    const int lo = labels[n * label_words];
    const int hi = label_words == 2 ? labels[n * 2 + 1] : 0;
    return (hi == 0 && lo >= 0 && lo < K) ? lo : -1;
}

// Fixed-order mean of row_loss[0..N) and sum of row_correct[0..N) by the 32
// lanes of ONE warp (all 32 must call it); lane 0 writes loss[0], correct[0].
template <typename T>
__device__ __forceinline__ void xent_warp_reduce(const T* row_loss, const int* row_correct,
                                                 T* __restrict__ loss, int* __restrict__ correct, int N, int lane)
{
    T acc = (T)0;
    int cnt = 0;
    for (int i = lane; i < N; i += 32) {
        acc += row_loss[i];
        cnt += row_correct[i];
    }
    for (int m = 16; m >= 1; m >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, m);
        cnt += __shfl_xor_sync(0xffffffffu, cnt, m);
    }
    if (lane == 0) {
        loss[0] = acc / (T)N;
        correct[0] = cnt;
    }
}

// ---------------------------------------------------------------------------
// xent_forward / xent_forward_f64
//
// Writes probs[k, n], row_loss[n], row_correct[n] for every sample; when
// gridDim.x == 1 it also writes loss[0] and correct[0] (after __syncthreads,
// by warp 0); with gridDim.x > 1 it leaves them alone (run xent_mean next).
//
// Thread mapping: ONE THREAD PER SAMPLE: thread t of block b starts at
// n = b * B + t and strides by gridDim.x * B.  Pass 1 reads the column for
// the maximum and the first argmax, pass 2 for s, pass 3 writes p.  A warp
// reads 32 consecutive n of one row k at a time: coalesced.
//
// Launch shape: 1-D; block (B,1,1) with B a multiple of 32 in [32, 1024];
//   any grid >= 1.  No shared memory.
// Layouts (C-contiguous): logits (K, N) T; labels (N * label_words,) int32;
//   probs (K, N) T; row_loss (N,) T; row_correct (N,) int32; loss (1,) T;
//   correct (1,) int32.
// Preconditions: N >= 1, K >= 1, label_words in {1, 2}, N <= 2^30 and
//   gridDim.x * B <= 2^30, every array < 2^31 elements, no aliasing.
//
// xent_forward_backward / xent_forward_backward_f64: the same, and in pass 3
// also dlogits[k, n] = (p - [k == y_n]) * coef (NaN column for an invalid
// label), xent_backward's expression on the very p it stores: the same bits
// as xent_forward then xent_backward.  Extra layout: dlogits (K, N) T, not
// aliasing probs; coef = scale / N (host, double rounded to T).
// ---------------------------------------------------------------------------
template <bool GRAD, typename T>
__device__ __forceinline__ void xent_forward_impl(
    const T* __restrict__ logits, const int* __restrict__ labels, int label_words,
    T* __restrict__ probs, T* row_loss, int* row_correct, T* __restrict__ loss, int* __restrict__ correct,
    T* __restrict__ dlogits, T coef, int K, int N)
{
    const int stride = gridDim.x * blockDim.x;
    for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += stride) {
        const T* z = logits + n;
        T* p = probs + n;

        T m = -XeMath<T>::inf();
        T best = z[0];
        int arg = 0;
        for (int k = 0, o = 0; k < K; ++k, o += N) {
            const T v = z[o];
            m = (m > v || m != m) ? m : v;              // NaN-propagating max
            if (v > best) { best = v; arg = k; }        // first strict maximum
        }

        T sum = (T)0;
        for (int k = 0, o = 0; k < K; ++k, o += N) sum += XeMath<T>::ex(z[o] - m);
        const T log_sum = XeMath<T>::ln(sum);

        const int y = xe_label(labels, label_words, n, K);
        T loss_n = XeMath<T>::nan();
        for (int k = 0, o = 0; k < K; ++k, o += N) {
            const T logp = (z[o] - m) - log_sum;
            const T pk = XeMath<T>::ex(logp);
            p[o] = pk;
            if (k == y) loss_n = -logp;
            if (GRAD) {                                 // xent_backward_impl's expression
                const T onehot = k == y ? (T)1 : (T)0;
                dlogits[o + n] = y < 0 ? XeMath<T>::nan() : (pk - onehot) * coef;
            }
        }
        row_loss[n] = loss_n;
        row_correct[n] = (y >= 0 && m == m && arg == y) ? 1 : 0;
    }

    if (gridDim.x == 1) {                               // grid-uniform
        __syncthreads();                                // rows visible to warp 0
        if (threadIdx.x < 32) xent_warp_reduce(row_loss, row_correct, loss, correct, N, (int)threadIdx.x);
    }
}

extern "C" __global__ void __launch_bounds__(XE_MAX_BLOCK) xent_forward(
    const float* __restrict__ logits, const int* __restrict__ labels, int label_words,
    float* __restrict__ probs, float* row_loss, int* row_correct, float* __restrict__ loss, int* __restrict__ correct,
    int K, int N)
{
    xent_forward_impl<false>(logits, labels, label_words, probs, row_loss, row_correct, loss, correct,
                             (float*)nullptr, 0.0f, K, N);
}

extern "C" __global__ void __launch_bounds__(XE_MAX_BLOCK) xent_forward_f64(
    const double* __restrict__ logits, const int* __restrict__ labels, int label_words,
    double* __restrict__ probs, double* row_loss, int* row_correct, double* __restrict__ loss,
    int* __restrict__ correct, int K, int N)
{
    xent_forward_impl<false>(logits, labels, label_words, probs, row_loss, row_correct, loss, correct,
                             (double*)nullptr, 0.0, K, N);
}

extern "C" __global__ void __launch_bounds__(XE_MAX_BLOCK) xent_forward_backward(
    const float* __restrict__ logits, const int* __restrict__ labels, int label_words,
    float* __restrict__ probs, float* row_loss, int* row_correct, float* __restrict__ loss, int* __restrict__ correct,
    float* __restrict__ dlogits, int K, int N, float coef)
{
    xent_forward_impl<true>(logits, labels, label_words, probs, row_loss, row_correct, loss, correct,
                            dlogits, coef, K, N);
}

extern "C" __global__ void __launch_bounds__(XE_MAX_BLOCK) xent_forward_backward_f64(
    const double* __restrict__ logits, const int* __restrict__ labels, int label_words,
    double* __restrict__ probs, double* row_loss, int* row_correct, double* __restrict__ loss,
    int* __restrict__ correct, double* __restrict__ dlogits, int K, int N, double coef)
{
    xent_forward_impl<true>(logits, labels, label_words, probs, row_loss, row_correct, loss, correct,
                            dlogits, coef, K, N);
}

// ---------------------------------------------------------------------------
// xent_mean / xent_mean_f64
//
//   loss[0] = (sum_n row_loss[n]) / N, correct[0] = sum_n row_correct[n], in
//   the fixed order of xent_warp_reduce (the same bits as the fused forward).
// Launch shape: grid (1,1,1), block (32,1,1).  No shared memory.
// Preconditions: N >= 1; row_loss / row_correct as written by xent_forward.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void xent_mean_impl(const T* __restrict__ row_loss, const int* __restrict__ row_correct,
                                               T* __restrict__ loss, int* __restrict__ correct, int N)
{
    if (blockIdx.x != 0 || threadIdx.x >= 32) return;  // warp-uniform
    xent_warp_reduce(row_loss, row_correct, loss, correct, N, (int)threadIdx.x);
}

extern "C" __global__ void xent_mean(const float* __restrict__ row_loss, const int* __restrict__ row_correct,
                                     float* __restrict__ loss, int* __restrict__ correct, int N)
{
    xent_mean_impl(row_loss, row_correct, loss, correct, N);
}

extern "C" __global__ void xent_mean_f64(const double* __restrict__ row_loss, const int* __restrict__ row_correct,
                                         double* __restrict__ loss, int* __restrict__ correct, int N)
{
    xent_mean_impl(row_loss, row_correct, loss, correct, N);
}

// ---------------------------------------------------------------------------
// xent_backward / xent_backward_f64
//
//   dlogits[k, n] = (probs[k, n] - (k == y_n ? 1 : 0)) * coef
// with coef = scale / N computed on the host in double and rounded to T; an
// invalid label gives a NaN column.
//
// Thread mapping: ONE THREAD PER ELEMENT: n = blockIdx.x * B + threadIdx.x,
// k = blockIdx.y (no division); threads with n >= N exit.  Coalesced along n.
// Launch shape: grid (ceil(N / B), K, 1), block (B,1,1) with B <= 1024 (the
//   wrapper's default: 256); K <= 65535.  No shared memory.
// Layouts: probs, dlogits (K, N) T; labels (N * label_words,) int32.
// Preconditions: N >= 1, 1 <= K <= 65535, label_words in {1, 2}; dlogits may
//   alias probs (each thread reads its element before writing it).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void xent_backward_impl(const T* probs, const int* __restrict__ labels, int label_words,
                                                   T* dlogits, int K, int N, T coef)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int k = blockIdx.y;
    const int y = xe_label(labels, label_words, n, K);
    const int o = k * N + n;
    const T onehot = k == y ? (T)1 : (T)0;
    dlogits[o] = y < 0 ? XeMath<T>::nan() : (probs[o] - onehot) * coef;
}

extern "C" __global__ void __launch_bounds__(XE_MAX_BLOCK) xent_backward(
    const float* probs, const int* __restrict__ labels, int label_words, float* dlogits, int K, int N, float coef)
{
    xent_backward_impl(probs, labels, label_words, dlogits, K, N, coef);
}

extern "C" __global__ void __launch_bounds__(XE_MAX_BLOCK) xent_backward_f64(
    const double* probs, const int* __restrict__ labels, int label_words, double* dlogits, int K, int N, double coef)
{
    xent_backward_impl(probs, labels, label_words, dlogits, K, N, coef);
}
