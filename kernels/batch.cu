// Batch gather: pick the N samples idx[0..N) of a device-resident dataset
// (NCHW images, one label each) and write them batch-last.
//
// Entry points: gather_batch (float32 images) and gather_batch_f64 (float64);
// one template body instantiated twice; T below is float or double.  No
// #includes.  Host wrapper: gpucnn/cuda/batch.py.
//
//   x[f, n] = images[idx_n, f]     f = the flat (c, h, w) index, F = C*H*W
//   y[n]    = label[idx_n]
// i.e. x is (C, H, W, N) and y is (N,) int32.
//
// Index and label words: idx and labels arrive as int32 WORDS, 1 per value
// for int32 arrays, 2 per value (little-endian low, high) for int64 arrays
// (idx_words / label_words in {1, 2}).  An index is valid iff its high word
// is 0 (int64) and 0 <= low < Ntotal; an INVALID INDEX makes x[:, n] NaN and
// y[n] = -1 (so the loss of the step is NaN) instead of reading out of bounds.
// A label is copied as its low word when it is valid as an int32 label
// (int64: high word 0 and low >= 0; int32: as is); an int64 label outside
// [0, 2^31) becomes -1, which the loss kernels treat as invalid.
//
// Thread mapping: a 32 x 32 tile transpose through shared memory.  Block
// (bx, by) handles features f0 = 32 bx .. f0+31 and samples n0 = 32 by ..
// n0+31 with 32 x 8 threads.  Phase 1: thread (tx, ty) reads, for the 4
// samples nn = ty + 8 r, images[idx[n0+nn], f0 + tx] (32 consecutive floats
// of one image per warp: coalesced) into tile[nn][tx]; __syncthreads; phase 2:
// it writes x[f0 + ty + 8 r, n0 + tx] = tile[tx][ty + 8 r] (32 consecutive n:
// coalesced).  The tile rows are padded to 33 (no bank conflicts).  Blocks
// with bx == 0 also write y for their 32 samples (threads ty == 0).
// Every x and y element is written exactly once; no atomics, no reductions.
//
// Launch shape: grid (ceil(F / 32), ceil(N / 32), 1), block (32, 8, 1); no
//   dynamic shared memory (static: 32 x 33 elements).
// Layouts (C-contiguous): images (Ntotal, C, H, W) T; labels
//   (Ntotal * label_words,) int32; idx (N * idx_words,) int32; x (C, H, W, N)
//   T; y (N,) int32.
// Preconditions: Ntotal, F, N >= 1; Ntotal * F < 2^31 (int32 offsets);
//   N <= 65535 * 32; no aliasing.

#define GB_TILE 32
#define GB_ROWS 8

template <typename T> struct GbMath;
template <> struct GbMath<float> {
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
};
template <> struct GbMath<double> {
    static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000LL); }
};

// Sample index n of the batch, or -1 when invalid.
__device__ __forceinline__ int gb_index(const int* __restrict__ idx, int idx_words, int n, int Ntotal)
{
    const int lo = idx[n * idx_words];
    const int hi = idx_words == 2 ? idx[n * 2 + 1] : 0;
    return (hi == 0 && lo >= 0 && lo < Ntotal) ? lo : -1;
}

template <typename T>
__device__ __forceinline__ void gather_batch_impl(
    const T* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, T* __restrict__ x, int* __restrict__ y,
    int Ntotal, int F, int N, T* tile)
{
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int f0 = blockIdx.x * GB_TILE;
    const int n0 = blockIdx.y * GB_TILE;
    const int f = f0 + tx;

#pragma unroll
    for (int r = 0; r < GB_TILE / GB_ROWS; ++r) {
        const int nn = ty + GB_ROWS * r;
        const int n = n0 + nn;
        T value = GbMath<T>::nan();
        if (n < N && f < F) {
            const int src = gb_index(idx, idx_words, n, Ntotal);
            if (src >= 0) value = images[src * F + f];
        }
        tile[nn * (GB_TILE + 1) + tx] = value;
    }
    __syncthreads();
    const int n = n0 + tx;
#pragma unroll
    for (int r = 0; r < GB_TILE / GB_ROWS; ++r) {
        const int ff = f0 + ty + GB_ROWS * r;
        if (ff < F && n < N) x[ff * N + n] = tile[tx * (GB_TILE + 1) + ty + GB_ROWS * r];
    }

    if (blockIdx.x == 0 && ty == 0 && n < N) {
        const int src = gb_index(idx, idx_words, n, Ntotal);
        int label = -1;
        if (src >= 0) {
            const int lo = labels[src * label_words];
            const int hi = label_words == 2 ? labels[src * 2 + 1] : 0;
            label = label_words == 2 ? ((hi == 0 && lo >= 0) ? lo : -1) : lo;
        }
        y[n] = label;
    }
}

extern "C" __global__ void gather_batch(
    const float* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, float* __restrict__ x, int* __restrict__ y,
    int Ntotal, int F, int N)
{
    __shared__ float tile[GB_TILE * (GB_TILE + 1)];
    gather_batch_impl(images, labels, label_words, idx, idx_words, x, y, Ntotal, F, N, tile);
}

extern "C" __global__ void gather_batch_f64(
    const double* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, double* __restrict__ x, int* __restrict__ y,
    int Ntotal, int F, int N)
{
    __shared__ double tile[GB_TILE * (GB_TILE + 1)];
    gather_batch_impl(images, labels, label_words, idx, idx_words, x, y, Ntotal, F, N, tile);
}
