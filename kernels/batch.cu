// Batch gather: pick the N samples idx[0..N) of a device-resident dataset
// (NCHW images, one label each) and write them batch-last.
//
// Entry points: gather_batch (float32 images) and gather_batch_f64 (float64);
// gather_batch_augment / gather_batch_augment_f64 (the same gather with the
// training-time shift and mirror folded in: see its contract further down);
// gather_batch_augment_u8 (uint8 images, normalised per channel on the way:
// see its contract at the end); each one template body instantiated; T below
// is float or double, S the images' type (T, or unsigned char).  No
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


// ---------------------------------------------------------------------------
// gather_batch_augment: the gather above with gpucnn.data.augment.augment_batch
// folded in, so an augmented training batch is one launch with no host sync.
//
//   s_n        = gb_index(idx, n)                         (as gather_batch)
//   p_n        = start + n        (the sample's position in the epoch's order)
//   dy_n, dx_n = floor(u * (2m + 1)) - m,  u = U(key, 3 p_n), U(key, 3 p_n + 1)
//   mirror_n   = flip && U(key, 3 p_n + 2) < 1/2
//   w'         = mirror_n ? W - 1 - w : w
//   x[c, h, w, n] = images[s_n, c, h - dy_n, w' - dx_n]   when 0 <= h - dy_n < H
//                                                          and 0 <= w' - dx_n < W,
//                   fill                                    otherwise
//   y[n] = label[s_n]
// with m = max_shift and U(key, i) = (splitmix64(key, i) >> 40) * 2^-24 -- the
// 24-bit uniforms of gpucnn.random.hash_uniform(key, (N, 3), start=3 start),
// element (n, r) at counter 3 (start + n) + r.  So a sample's shift depends on
// its position in the epoch, not on the batch or the rank that gathers it.
// floor(u (2m+1)) is computed exactly as the integer
// ((z >> 40) (2m+1)) >> 24 (u (2m+1) is exact in float64), and u < 1/2 as
// (z >> 40) < 2^23, so the shifts and mirrors are the NumPy path's bit for bit
// and x is the same as to_internal(augment_batch(images[idx], key, ..., start=start)).
// An invalid index makes x[:, n] NaN and y[n] = -1, as gather_batch.
//
// key_words: 4 int32 words in DEVICE memory: the 64-bit folded key of the
//   epoch (gpucnn.random.hash_key of (seed, epoch)) and the 64-bit position
//   start of the batch's first sample, each as (low, high): the trainer
//   uploads one row per step with the epoch's learning rates, so the launch's
//   scalar arguments do not change from step to step (a replayed or captured
//   step reads the step's key from a fixed buffer).
// Thread mapping: as gather_batch (32 x 32 tile transpose, 32 x 8 threads);
//   before it, threads ty == 0 compute their sample's source row, shifts and
//   mirror into shared memory (one hash of 3 per sample, not one per pixel).
//   Each thread splits its feature index f = (c H + h) W + w once.
// Launch shape, layouts and preconditions: as gather_batch, plus
//   F = C*H*W, max_shift >= 0, flip in {0, 1}.

// One source pixel as the batch's value: a float image's element as it is; a
// uint8 image's normalised with its channel's affine map (gather_batch_augment_u8).
template <typename T>
__device__ __forceinline__ T gb_pixel(const T* __restrict__ images, int off, int c,
                                      const float* __restrict__ scale, const float* __restrict__ shift)
{
    return images[off];
}

__device__ __forceinline__ float gb_pixel(const unsigned char* __restrict__ images, int off, int c,
                                          const float* __restrict__ scale, const float* __restrict__ shift)
{
    // (float)p * scale[c], rounded, then - shift[c], rounded: __f*_rn are never contracted into an
    // FMA, so this is NumPy's x.astype(float32) * scale - shift (gpucnn.data.normalize) bit for bit
    return __fadd_rn(__fmul_rn((float)images[off], scale[c]), -shift[c]);
}

__device__ __forceinline__ unsigned long long gb_mix(unsigned long long key, unsigned long long counter)
{
    unsigned long long z = counter * 0x9E3779B97F4A7C15ULL + key;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z;
}

template <typename T, typename S>
__device__ __forceinline__ void gather_batch_augment_impl(
    const S* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, const int* __restrict__ key_words,
    T* __restrict__ x, int* __restrict__ y, int Ntotal, int C, int H, int W, int N,
    int max_shift, int flip, T fill, const float* __restrict__ scale, const float* __restrict__ shift,
    T* tile, int* s_src, int* s_dy, int* s_dx, int* s_mirror)
{
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int f0 = blockIdx.x * GB_TILE;
    const int n0 = blockIdx.y * GB_TILE;
    const int HW = H * W;
    const int F = C * HW;

    if (ty == 0) {
        const int n = n0 + tx;
        int src = -1, dy = 0, dx = 0, mirror = 0;
        if (n < N) {
            const unsigned long long key = (unsigned long long)(unsigned int)key_words[0]
                                         | ((unsigned long long)(unsigned int)key_words[1] << 32);
            const unsigned long long start = (unsigned long long)(unsigned int)key_words[2]
                                           | ((unsigned long long)(unsigned int)key_words[3] << 32);
            const unsigned long long span = 2ULL * (unsigned long long)max_shift + 1ULL;
            const unsigned long long c = 3ULL * (start + (unsigned long long)n);   // this sample's counters
            src = gb_index(idx, idx_words, n, Ntotal);
            dy = (int)(((gb_mix(key, c) >> 40) * span) >> 24) - max_shift;
            dx = (int)(((gb_mix(key, c + 1ULL) >> 40) * span) >> 24) - max_shift;
            mirror = flip && (gb_mix(key, c + 2ULL) >> 40) < (1ULL << 23);
        }
        s_src[tx] = src;
        s_dy[tx] = dy;
        s_dx[tx] = dx;
        s_mirror[tx] = mirror;
    }
    __syncthreads();

    const int f = f0 + tx;
    const int c = f / HW;
    const int rem = f - c * HW;
    const int h = rem / W;
    const int w = rem - h * W;
#pragma unroll
    for (int r = 0; r < GB_TILE / GB_ROWS; ++r) {
        const int nn = ty + GB_ROWS * r;
        const int n = n0 + nn;
        T value = GbMath<T>::nan();
        if (n < N && f < F) {
            const int src = s_src[nn];
            if (src >= 0) {
                const int sh = h - s_dy[nn];
                const int sw = (s_mirror[nn] ? W - 1 - w : w) - s_dx[nn];
                value = (sh >= 0 && sh < H && sw >= 0 && sw < W)
                      ? gb_pixel(images, src * F + c * HW + sh * W + sw, c, scale, shift) : fill;
            }
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
        const int src = s_src[tx];
        int label = -1;
        if (src >= 0) {
            const int lo = labels[src * label_words];
            const int hi = label_words == 2 ? labels[src * 2 + 1] : 0;
            label = label_words == 2 ? ((hi == 0 && lo >= 0) ? lo : -1) : lo;
        }
        y[n] = label;
    }
}

extern "C" __global__ void gather_batch_augment(
    const float* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, const int* __restrict__ key_words,
    float* __restrict__ x, int* __restrict__ y, int Ntotal, int C, int H, int W, int N,
    int max_shift, int flip, float fill)
{
    __shared__ float tile[GB_TILE * (GB_TILE + 1)];
    __shared__ int s_src[GB_TILE];
    __shared__ int s_dy[GB_TILE];
    __shared__ int s_dx[GB_TILE];
    __shared__ int s_mirror[GB_TILE];
    gather_batch_augment_impl(images, labels, label_words, idx, idx_words, key_words, x, y, Ntotal, C, H, W, N,
                              max_shift, flip, fill, nullptr, nullptr, tile, s_src, s_dy, s_dx, s_mirror);
}

extern "C" __global__ void gather_batch_augment_f64(
    const double* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, const int* __restrict__ key_words,
    double* __restrict__ x, int* __restrict__ y, int Ntotal, int C, int H, int W, int N,
    int max_shift, int flip, double fill)
{
    __shared__ double tile[GB_TILE * (GB_TILE + 1)];
    __shared__ int s_src[GB_TILE];
    __shared__ int s_dy[GB_TILE];
    __shared__ int s_dx[GB_TILE];
    __shared__ int s_mirror[GB_TILE];
    gather_batch_augment_impl(images, labels, label_words, idx, idx_words, key_words, x, y, Ntotal, C, H, W, N,
                              max_shift, flip, fill, nullptr, nullptr, tile, s_src, s_dy, s_dx, s_mirror);
}


// ---------------------------------------------------------------------------
// gather_batch_augment_u8: gather_batch_augment on a uint8 dataset, the batch
// normalised per channel on the way -- so the device holds the training set
// as its raw bytes (a quarter of float32's memory) and one launch still makes
// the float32 batch.
//
//   x[c, h, w, n] = (float)P * scale[c] - shift[c]   (each op rounded to float32,
//                                                     in that order, no FMA)
//                   where P = images[s_n, c, h - dy_n, w' - dx_n] is in bounds,
//                   fill otherwise
// with s_n, dy_n, dx_n, mirror_n, w' and y[n] exactly as gather_batch_augment
// (max_shift = 0 and flip = 0 is a plain normalising gather).  scale and
// shift are (C,) float32 in device memory: scale[c] = float32(1 / (255
// std[c])), shift[c] = float32(mean[c] / std[c]) (gpucnn.data.channel_affine),
// so x is, bit for bit, to_internal(augment_batch(normalize(images[idx],
// mean=mean, std=std), key, fill=fill, max_shift, flip, start)) -- the NumPy
// path.  Normalising a pixel does not depend on where it moves, so normalising
// after the shift is the same as before it.  An invalid index makes x[:, n]
// NaN and y[n] = -1.
// Thread mapping, launch shape and preconditions: as gather_batch_augment;
//   layouts as it, with images (Ntotal, C, H, W) unsigned char and x float.
//   scale and shift hold C floats each.

extern "C" __global__ void gather_batch_augment_u8(
    const unsigned char* __restrict__ images, const int* __restrict__ labels, int label_words,
    const int* __restrict__ idx, int idx_words, const int* __restrict__ key_words,
    const float* __restrict__ scale, const float* __restrict__ shift,
    float* __restrict__ x, int* __restrict__ y, int Ntotal, int C, int H, int W, int N,
    int max_shift, int flip, float fill)
{
    __shared__ float tile[GB_TILE * (GB_TILE + 1)];
    __shared__ int s_src[GB_TILE];
    __shared__ int s_dy[GB_TILE];
    __shared__ int s_dx[GB_TILE];
    __shared__ int s_mirror[GB_TILE];
    gather_batch_augment_impl(images, labels, label_words, idx, idx_words, key_words, x, y, Ntotal, C, H, W, N,
                              max_shift, flip, fill, scale, shift, tile, s_src, s_dy, s_dx, s_mirror);
}
