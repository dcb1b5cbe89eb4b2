// Max pooling on batch-last (BL) activations, forward (optionally fused with a
// following-then-swapped relu) and backward.
//
// Entry points: pool_max_forward / pool_max_backward (float32) and
// pool_max_forward_f64 / pool_max_backward_f64 (float64): one template body
// each, instantiated twice; T below is float or double.  Host wrappers:
// gpucnn/cuda/pool.py.  Includes activation.cuh (relu_grad; expanded in place
// by gpucnn/cuda/sources.py).
//
// Geometry: kernel (KH, KW), stride (SH, SW), no padding, floor output size
//   OH = (H - KH) / SH + 1,  OW = (W - KW) / SW + 1,
// so every window lies inside the input; windows may overlap (stride < kernel)
// or leave gaps (stride > kernel).  Window (i, j) covers rows i*SH .. i*SH+KH-1
// and columns j*SW .. j*SW+KW-1; its TAP t = u*KW + v names the element at
// (i*SH + u, j*SW + v), stored as uint8 (the host guarantees KH*KW <= 256).
//
// Layouts (all C-contiguous, batch innermost):
//   x, dx          : (C, H, W, N)    T
//   y, dy, factor  : (C, OH, OW, N)  T
//   tap            : (C, OH, OW, N)  unsigned char
//
// Determinism: no atomics, no shared memory; every output element is written
// exactly once by one thread; the backward sum runs in increasing window order
// (i, then j), independent of the launch shape.

#include "activation.cuh"   // relu_grad

// ---------------------------------------------------------------------------
// pool_max_forward / pool_max_forward_f64
//
// Per output (c, i, j, n), with z the window's values in row-major tap order:
//   m, k = the FIRST maximum of z and its tap: the scan starts at tap 0 and
//          replaces the running best only when "z[t] > best" (a later equal
//          value never wins) or when z[t] is NaN and best is not (the first
//          NaN wins over any number and is never replaced).
//   relu == 0:  y = m, tap = k.  factor is not touched (may be a dummy).
//   relu != 0:  the fused pool + relu (equal to relu-then-maxpool's forward):
//          m > 0        : y = m,              tap = k, factor = 1
//          m <= 0       : y = max(z[0], 0)=0, tap = 0, factor = relu'(z[0])
//                         (activation.cuh's relu_grad: 1/2 when z[0] == 0
//                         exactly, else 0)
//          m is NaN     : y = m (NaN),        tap = k (the first NaN), factor = NaN
//
// Thread mapping: ONE THREAD PER OUTPUT ELEMENT.  The flat thread index
// t = blockIdx.x * blockDim.x + threadIdx.x is the C-order flat index of
// y[c, i, j, n] (n fastest, so a warp reads and writes 32 consecutive n:
// coalesced); threads with t >= C*OH*OW*N exit.  t is decomposed into
// (c, i, j, n) once per thread; the window loop only adds pointer offsets.
//
// Launch shape: 1-D, block (B,1,1) for any B (the wrapper uses 256), grid
//   (ceil(C*OH*OW*N / B), 1, 1).  No shared memory.
//
// Preconditions (host-checked): 1 <= KH <= H, 1 <= KW <= W, SH, SW >= 1,
//   KH*KW <= 256, OH/OW as above, every array < 2^31 elements, y/tap/factor
//   distinct from x (factor may alias y when relu == 0: it is then unused).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void pool_max_forward_impl(
    const T* __restrict__ x, T* __restrict__ y, unsigned char* __restrict__ tap, T* factor,
    int C, int H, int W, int N, int KH, int KW, int SH, int SW, int OH, int OW, int relu)
{
    const int total = C * OH * OW * N;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;

    // t = ((c*OH + i)*OW + j)*N + n
    const int n = t % N;
    int r = t / N;
    const int j = r % OW;
    r /= OW;
    const int i = r % OH;
    const int c = r / OH;

    const int rowstride = W * N;                        // one input row, in elements
    const T* win = x + ((c * H + i * SH) * W + j * SW) * N + n;

    const T first = win[0];
    T best = first;
    int best_tap = 0;
    int tp = 0;
    for (int u = 0; u < KH; ++u) {
        const T* row = win + u * rowstride;
        for (int v = 0; v < KW; ++v, ++tp) {
            const T value = row[v * N];
            // Strict '>' keeps the first of tied maxima; a NaN replaces a
            // non-NaN best and is never replaced itself.
            if (value > best || (value != value && best == best)) {
                best = value;
                best_tap = tp;
            }
        }
    }

    if (relu) {
        T f;
        if (best > (T)0) {
            f = (T)1;
        } else if (best == best) {                      // every tap <= 0: relu-then-pool picks tap 0
            best = (T)0;
            best_tap = 0;
            f = relu_grad(first);                       // first <= 0, not NaN: 1/2 or 0
        } else {                                        // NaN: y NaN, tap = first NaN, factor NaN
            f = best;
        }
        factor[t] = f;
    }
    y[t] = best;
    tap[t] = (unsigned char)best_tap;
}

extern "C" __global__ void pool_max_forward(
    const float* __restrict__ x, float* __restrict__ y, unsigned char* __restrict__ tap, float* factor,
    int C, int H, int W, int N, int KH, int KW, int SH, int SW, int OH, int OW, int relu)
{
    pool_max_forward_impl(x, y, tap, factor, C, H, W, N, KH, KW, SH, SW, OH, OW, relu);
}

extern "C" __global__ void pool_max_forward_f64(
    const double* __restrict__ x, double* __restrict__ y, unsigned char* __restrict__ tap, double* factor,
    int C, int H, int W, int N, int KH, int KW, int SH, int SW, int OH, int OW, int relu)
{
    pool_max_forward_impl(x, y, tap, factor, C, H, W, N, KH, KW, SH, SW, OH, OW, relu);
}

// ---------------------------------------------------------------------------
// pool_max_backward / pool_max_backward_f64
//
//   dx[c, h, w, n] = sum over windows (i, j) that contain (h, w) and whose
//                    tap[c, i, j, n] == (h - i*SH)*KW + (w - j*SW)
//                    of dy[c, i, j, n] * (has_factor ? factor[c, i, j, n] : 1)
// summed in increasing i, then j, starting from 0 (so an element no window
// chose, or that lies in no window, gets exactly 0).
//
// Thread mapping: ONE THREAD PER INPUT ELEMENT (a gather: no atomics), on a
// 3-D grid that names the element without a division:
//   h = blockIdx.z, w = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x
//   (blockDim.x = 32: a warp covers 32 consecutive n, coalesced), and channels
//   c = threadIdx.y, threadIdx.y + blockDim.y, ... (a loop when C > blockDim.y).
// The windows containing (h, w) are
//   i in [i_lo, i_hi], i_hi = min(h / SH, OH - 1), i_lo the least i >= 0 with
//   i*SH + KH > h (found by stepping down from i_hi + 1: at most
//   ceil(KH / SH) steps; none contain h when i_lo > i_hi), and j likewise;
// so a thread divides twice (h / SH and w / SW, the same for the whole block),
// once for all its channels.  The tap the element has in window (i_lo, j_lo)
// is computed once; inside the loops the expected tap steps by -SH*KW per i
// and -SW per j (no division in the loops).
//
// Launch shape: block (32, BY, 1) for any BY >= 1 (the wrapper uses
//   min(C, 8)), grid (ceil(N / 32), W, H) (H, W <= 65535).  No shared memory.
//
// Preconditions: the forward geometry; tap as written by pool_max_forward
//   (any other value just routes nothing); factor is read only when
//   has_factor != 0 (else it may be any T array, e.g. dy itself).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void pool_max_backward_impl(
    const T* __restrict__ dy, const unsigned char* __restrict__ tap, const T* factor,
    T* __restrict__ dx,
    int C, int H, int W, int N, int KH, int KW, int SH, int SW, int OH, int OW, int has_factor)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int w = blockIdx.y;
    const int h = blockIdx.z;

    const int i_hi = min(h / SH, OH - 1);               // inclusive
    int i_lo = i_hi + 1;
    while (i_lo > 0 && (i_lo - 1) * SH + KH > h) --i_lo;
    const int j_hi = min(w / SW, OW - 1);               // inclusive
    int j_lo = j_hi + 1;
    while (j_lo > 0 && (j_lo - 1) * SW + KW > w) --j_lo;
    const bool any = i_lo <= i_hi && j_lo <= j_hi;
    const int want0 = (h - i_lo * SH) * KW + (w - j_lo * SW);   // the tap in window (i_lo, j_lo)

    const int in_plane = H * W * N, out_plane = OH * OW * N;
    int t = threadIdx.y * in_plane + (h * W + w) * N + n;
    int base = threadIdx.y * out_plane + j_lo * N + n;
    for (int c = threadIdx.y; c < C; c += blockDim.y, t += blockDim.y * in_plane,
                                     base += blockDim.y * out_plane) {
        T acc = (T)0;
        if (any) {
            int want_row = want0;                       // expected tap in window (i, j_lo)
            for (int i = i_lo; i <= i_hi; ++i, want_row -= SH * KW) {
                int o = base + i * OW * N;
                int want = want_row;
                for (int j = j_lo; j <= j_hi; ++j, want -= SW, o += N) {
                    if ((int)tap[o] == want) acc += has_factor ? dy[o] * factor[o] : dy[o];
                }
            }
        }
        dx[t] = acc;
    }
}

extern "C" __global__ void pool_max_backward(
    const float* __restrict__ dy, const unsigned char* __restrict__ tap, const float* factor,
    float* __restrict__ dx,
    int C, int H, int W, int N, int KH, int KW, int SH, int SW, int OH, int OW, int has_factor)
{
    pool_max_backward_impl(dy, tap, factor, dx, C, H, W, N, KH, KW, SH, SW, OH, OW, has_factor);
}

extern "C" __global__ void pool_max_backward_f64(
    const double* __restrict__ dy, const unsigned char* __restrict__ tap, const double* factor,
    double* __restrict__ dx,
    int C, int H, int W, int N, int KH, int KW, int SH, int SW, int OH, int OW, int has_factor)
{
    pool_max_backward_impl(dy, tap, factor, dx, C, H, W, N, KH, KW, SH, SW, OH, OW, has_factor);
}
