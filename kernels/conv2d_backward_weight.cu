// conv2d backward pass with respect to the weights and the bias.
//
// Entry points: conv2d_backward_weight / conv2d_backward_bias (float32) and
// conv2d_backward_weight_f64 / conv2d_backward_bias_f64 (float64), each the same
// template instantiated twice; T below is float or double.
//
// Compiled at run time by gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and,
// in the tests, run unchanged on the CPU by tests/cudasim.  No #includes.

// Largest block the reductions below accept (size of the static shared buffer).
#define GPUCNN_REDUCE_MAX_BLOCK 256

// ---------------------------------------------------------------------------
// Block-wide sum of one T per thread, deterministic.
//
// Every thread of the block calls it with its partial sum; thread 0 gets the
// total (other threads get an unspecified value).  The tree is fixed by
// blockDim.x alone: for a given block size the additions happen in the same
// order on every run.  Requires blockDim.x a power of two <= 256, and all
// threads of the block must reach the call (it contains __syncthreads()).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T gpucnn_block_sum(T value, T* partial)
{
    const int tid = threadIdx.x;
    partial[tid] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        __syncthreads();
    }
    return partial[0];
}

// ---------------------------------------------------------------------------
// conv2d_backward_weight / conv2d_backward_weight_f64
//
// Given the forward input x and dy = dL/dy of
//   y[n,o,i,j] = b[o] + sum_{c,u,v} x[n,c,i*SH+u-PH, j*SW+v-PW] * w[o,c,u,v],
// computes
//   dw[o,c,u,v] = sum_{n,i,j} dy[n,o,i,j] * x[n, c, i*SH + u - PH, j*SW + v - PW]
// with x read as zero outside the image (those terms are skipped).
//
// Thread mapping: ONE BLOCK PER WEIGHT ELEMENT.  blockIdx.x is the C-order
// flat index of dw[o,c,u,v] (grid.x == O*C*KH*KW exactly).  The block's
// threads split the (n,i,j) terms that touch the image: thread k takes terms
// k, k + blockDim.x, k + 2*blockDim.x, ... in C order over (n, i, j), sums
// them in that order, and the block then adds the per-thread partial sums
// with a fixed shared-memory tree (gpucnn_block_sum).  No atomics: the result
// depends only on the inputs and blockDim.x, so it is deterministic.
//
// Launch shape: block = (B,1,1) with B a power of two, 1 <= B <= 256 (the
//   loader picks B from the reduction length); grid = (O*C*KH*KW, 1, 1).
//   Static shared memory: 256 T (1 KiB for float, 2 KiB for double).
//
// Layouts (all C-contiguous):
//   x  : (N, C, H, W)
//   dy : (N, O, OH, OW)
//   dw : (O, C, KH, KW)   written, every element exactly once (by thread 0)
//
// Preconditions (checked on the host): OH = (H + 2*PH - KH)/SH + 1 >= 1 and
// OW likewise, SH, SW >= 1, PH, PW >= 0, every array has fewer than 2^31
// elements, dw aliases nothing.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void conv2d_backward_weight_impl(
    const T* __restrict__ x,
    const T* __restrict__ dy,
    T* __restrict__ dw,
    T* partial,                  // the block's shared buffer, >= blockDim.x elements
    int N, int C, int H, int W,
    int O, int KH, int KW,
    int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    // Unflatten the weight index e = ((o*C + c)*KH + u)*KW + v.
    const int e = blockIdx.x;
    const int v = e % KW;
    const int u = (e / KW) % KH;
    const int c = (e / (KW * KH)) % C;
    const int o = e / (KW * KH * C);

    // Output rows i whose tap u lands inside the image:
    //   0 <= i*SH + u - PH < H   ->   ceil((PH-u)/SH) <= i <= floor((H-1+PH-u)/SH).
    // Same for columns.  Only these (i, j) contribute; the others read padding.
    const int i_lo = PH - u > 0 ? (PH - u + SH - 1) / SH : 0;
    int i_end = H - 1 + PH - u < 0 ? 0 : (H - 1 + PH - u) / SH + 1;   // exclusive
    if (i_end > OH) i_end = OH;
    const int j_lo = PW - v > 0 ? (PW - v + SW - 1) / SW : 0;
    int j_end = W - 1 + PW - v < 0 ? 0 : (W - 1 + PW - v) / SW + 1;
    if (j_end > OW) j_end = OW;
    const int ni = i_end > i_lo ? i_end - i_lo : 0;
    const int nj = j_end > j_lo ? j_end - j_lo : 0;
    const int count = N * ni * nj;

    T acc = 0;
    for (int r = threadIdx.x; r < count; r += blockDim.x) {
        const int j = j_lo + r % nj;
        const int i = i_lo + (r / nj) % ni;
        const int n = r / (nj * ni);
        const int h = i * SH + u - PH;
        const int w_ = j * SW + v - PW;
        acc += dy[((n * O + o) * OH + i) * OW + j] * x[((n * C + c) * H + h) * W + w_];
    }

    const T total = gpucnn_block_sum(acc, partial);
    if (threadIdx.x == 0) dw[e] = total;
}

// The entry points call the templates with deduced (not explicit) template
// arguments: tests/cudasim spots kernels that reach __syncthreads() through a
// helper by matching "helper(" calls, and would miss "helper<float>(".
extern "C" __global__ void conv2d_backward_weight(
    const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
    int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    __shared__ float partial[GPUCNN_REDUCE_MAX_BLOCK];
    conv2d_backward_weight_impl(x, dy, dw, partial, N, C, H, W, O, KH, KW,
                                OH, OW, SH, SW, PH, PW);
}

extern "C" __global__ void conv2d_backward_weight_f64(
    const double* __restrict__ x, const double* __restrict__ dy, double* __restrict__ dw,
    int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    __shared__ double partial[GPUCNN_REDUCE_MAX_BLOCK];
    conv2d_backward_weight_impl(x, dy, dw, partial, N, C, H, W, O, KH, KW,
                                OH, OW, SH, SW, PH, PW);
}

// ---------------------------------------------------------------------------
// conv2d_backward_bias / conv2d_backward_bias_f64
//
// Computes db[o] = sum_{n,i,j} dy[n,o,i,j].
//
// Thread mapping: ONE BLOCK PER OUTPUT CHANNEL.  blockIdx.x is o (grid.x == O
// exactly); thread k sums terms k, k + blockDim.x, ... in C order over
// (n, i, j), then the block adds the partial sums with the fixed tree of
// gpucnn_block_sum.  Deterministic, no atomics.
//
// Launch shape: block = (B,1,1) with B a power of two, 1 <= B <= 256;
//   grid = (O, 1, 1).  Static shared memory: 256 T (1 or 2 KiB).
//
// Layouts (C-contiguous): dy : (N, O, OH, OW);  db : (O,) written once per o.
// Preconditions: every array has fewer than 2^31 elements, db aliases nothing.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void conv2d_backward_bias_impl(
    const T* __restrict__ dy, T* __restrict__ db, T* partial,
    int N, int O, int OH, int OW)
{
    const int o = blockIdx.x;
    const int plane = OH * OW;
    const int count = N * plane;

    T acc = 0;
    for (int r = threadIdx.x; r < count; r += blockDim.x) {
        const int n = r / plane;
        const int s = r % plane;
        acc += dy[(n * O + o) * plane + s];
    }

    const T total = gpucnn_block_sum(acc, partial);
    if (threadIdx.x == 0) db[o] = total;
}

extern "C" __global__ void conv2d_backward_bias(
    const float* __restrict__ dy, float* __restrict__ db, int N, int O, int OH, int OW)
{
    __shared__ float partial[GPUCNN_REDUCE_MAX_BLOCK];
    conv2d_backward_bias_impl(dy, db, partial, N, O, OH, OW);
}

extern "C" __global__ void conv2d_backward_bias_f64(
    const double* __restrict__ dy, double* __restrict__ db, int N, int O, int OH, int OW)
{
    __shared__ double partial[GPUCNN_REDUCE_MAX_BLOCK];
    conv2d_backward_bias_impl(dy, db, partial, N, O, OH, OW);
}
