// 2-D max pooling, forward (with int32 argmax) and backward.
//
// Entry points: maxpool2d_forward / maxpool2d_backward (float32) and
// maxpool2d_forward_f64 / maxpool2d_backward_f64 (float64), each the same
// template instantiated twice; T below is float or double.
//
// Compiled at run time by gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and,
// in the tests, run unchanged on the CPU by tests/cudasim.  No #includes.
//
// Pooling has kernel (KH, KW), stride (SH, SW) and no padding:
//   OH = (H - KH) / SH + 1,  OW = (W - KW) / SW + 1   (floor division),
// so every window lies entirely inside the input.  Windows may overlap
// (stride < kernel) or leave gaps (stride > kernel).

// ---------------------------------------------------------------------------
// maxpool2d_forward / maxpool2d_forward_f64
//
// For every output element:
//   y[n,c,i,j]      = max over u < KH, v < KW of x[n, c, i*SH + u, j*SW + v]
//   argmax[n,c,i,j] = h*W + w, the position WITHIN THE (n,c) INPUT PLANE of
//                     the FIRST maximum in row-major window order (u, then v).
// The scan starts from tap (0,0) and replaces the running maximum only on a
// strict "value > best", so among tied maxima the first one wins.
//
// NaN: a NaN in the window wins and propagates: y is NaN and argmax is the
// position of the FIRST NaN in window order (a NaN replaces a non-NaN best;
// nothing replaces a NaN best).  This equals numpy.argmax over the window
// flattened row-major, which also returns the first NaN.  (PyTorch also
// propagates NaN, but its CUDA kernel reports the LAST NaN's index.)
//
// Thread mapping: ONE THREAD PER OUTPUT ELEMENT; the flat thread index
// t = blockIdx.x * blockDim.x + threadIdx.x is the C-order flat index of
// y[n,c,i,j]; threads with t >= N*C*OH*OW exit.
//
// Launch shape: 1-D; block = (B,1,1) for any B >= 1 (the loader uses 256),
//   grid = (ceil(N*C*OH*OW / B), 1, 1); grid.x * B fits int32.  No shared memory.
//
// Layouts (all C-contiguous):
//   x      : (N, C, H, W)     T
//   y      : (N, C, OH, OW)   T, written once per element
//   argmax : (N, C, OH, OW)   int32,   written once per element
//
// Preconditions (checked on the host): 1 <= KH <= H, 1 <= KW <= W, SH, SW >= 1,
// OH, OW as above, every array has fewer than 2^31 elements, no aliasing.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void maxpool2d_forward_impl(
    const T* __restrict__ x,
    T* __restrict__ y,
    int* __restrict__ argmax,
    int N, int C, int H, int W,
    int KH, int KW, int SH, int SW,
    int OH, int OW)
{
    const int total = N * C * OH * OW;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;

    // Unflatten t = (p*OH + i)*OW + j, with p = n*C + c the plane index.
    const int j = t % OW;
    const int i = (t / OW) % OH;
    const int p = t / (OW * OH);

    const int plane = p * H * W;      // flat index of x[n,c,0,0]
    const int h0 = i * SH;
    const int w0 = j * SW;

    int best_pos = h0 * W + w0;       // tap (0,0)
    T best = x[plane + best_pos];
    for (int u = 0; u < KH; ++u) {
        for (int v = 0; v < KW; ++v) {
            const int pos = (h0 + u) * W + (w0 + v);
            const T value = x[plane + pos];
            // value != value  <=>  value is NaN.  Strict '>' keeps the first
            // of tied maxima; a NaN replaces a non-NaN best, never a NaN best.
            const bool value_nan = value != value;
            const bool best_nan = best != best;
            if (value > best || (value_nan && !best_nan)) {
                best = value;
                best_pos = pos;
            }
        }
    }
    y[t] = best;
    argmax[t] = best_pos;
}

extern "C" __global__ void maxpool2d_forward(
    const float* __restrict__ x, float* __restrict__ y, int* __restrict__ argmax,
    int N, int C, int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool2d_forward_impl(x, y, argmax, N, C, H, W, KH, KW, SH, SW, OH, OW);
}

extern "C" __global__ void maxpool2d_forward_f64(
    const double* __restrict__ x, double* __restrict__ y, int* __restrict__ argmax,
    int N, int C, int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool2d_forward_impl(x, y, argmax, N, C, H, W, KH, KW, SH, SW, OH, OW);
}

// ---------------------------------------------------------------------------
// maxpool2d_backward / maxpool2d_backward_f64
//
// Routes each output gradient to its window's argmax:
//   dx[n,c,h,w] = sum over windows (i,j) containing (h,w)
//                 with argmax[n,c,i,j] == h*W + w   of   dy[n,c,i,j].
//
// Thread mapping: ONE THREAD PER INPUT ELEMENT (a GATHER, no atomics).  The
// flat thread index is the C-order flat index of dx[n,c,h,w].  The thread
// visits every window that contains (h,w),
//   i in [ceil((h-KH+1)/SH), floor(h/SH)] intersected with [0, OH),
//   j in [ceil((w-KW+1)/SW), floor(w/SW)] intersected with [0, OW),
// in increasing i then j, and adds dy of those whose argmax is this element.
// Overlapping windows (stride < kernel) that share one argmax therefore all
// contribute, in a fixed order: deterministic.  Elements that are no
// window's argmax (or lie in no window) get exactly 0.
//
// Launch shape: 1-D; block = (B,1,1) for any B >= 1 (the loader uses 256),
//   grid = (ceil(N*C*H*W / B), 1, 1); grid.x * B fits int32.  No shared memory.
//
// Layouts (all C-contiguous):
//   dy     : (N, C, OH, OW)   T
//   argmax : (N, C, OH, OW)   int32, as written by maxpool2d_forward
//   dx     : (N, C, H, W)     T, written once per element
//
// Preconditions: the same sizes as the forward pass; argmax entries are
// positions inside their window (any other value just routes nothing).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void maxpool2d_backward_impl(
    const T* __restrict__ dy,
    const int* __restrict__ argmax,
    T* __restrict__ dx,
    int N, int C, int H, int W,
    int KH, int KW, int SH, int SW,
    int OH, int OW)
{
    const int total = N * C * H * W;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;

    const int pos = t % (H * W);      // h*W + w within the plane
    const int p = t / (H * W);        // plane index n*C + c
    const int h = pos / W;
    const int w_ = pos % W;

    // Windows i with i*SH <= h <= i*SH + KH - 1.
    const int i_lo = h - KH + 1 > 0 ? (h - KH + 1 + SH - 1) / SH : 0;
    const int i_hi = h / SH < OH - 1 ? h / SH : OH - 1;     // inclusive
    const int j_lo = w_ - KW + 1 > 0 ? (w_ - KW + 1 + SW - 1) / SW : 0;
    const int j_hi = w_ / SW < OW - 1 ? w_ / SW : OW - 1;   // inclusive

    const int out_plane = p * OH * OW;
    T acc = 0;
    for (int i = i_lo; i <= i_hi; ++i) {
        for (int j = j_lo; j <= j_hi; ++j) {
            const int o = out_plane + i * OW + j;
            if (argmax[o] == pos) acc += dy[o];
        }
    }
    dx[t] = acc;
}

extern "C" __global__ void maxpool2d_backward(
    const float* __restrict__ dy, const int* __restrict__ argmax, float* __restrict__ dx,
    int N, int C, int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool2d_backward_impl(dy, argmax, dx, N, C, H, W, KH, KW, SH, SW, OH, OW);
}

extern "C" __global__ void maxpool2d_backward_f64(
    const double* __restrict__ dy, const int* __restrict__ argmax, double* __restrict__ dx,
    int N, int C, int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool2d_backward_impl(dy, argmax, dx, N, C, H, W, KH, KW, SH, SW, OH, OW);
}
