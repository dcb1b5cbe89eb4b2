// conv2d forward pass (cross-correlation with zero padding).
//
// Entry points: conv2d_forward (float32) and conv2d_forward_f64 (float64), the
// same template instantiated twice; T below is float or double.
//
// Compiled at run time by gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and,
// in the tests, run unchanged on the CPU by tests/cudasim.  No #includes: the
// file must compile with NVRTC alone.

// ---------------------------------------------------------------------------
// conv2d_forward / conv2d_forward_f64
//
// Computes, for every output element,
//
//   y[n,o,i,j] = b[o] + sum_{c,u,v} x[n, c, i*SH + u - PH, j*SW + v - PW] * w[o,c,u,v]
//
// where x is read as zero outside 0 <= h < H, 0 <= w < W (zero padding), and
// the b[o] term is present only when has_bias != 0.  This is a
// cross-correlation (the kernel is not flipped), like every DL framework.
//
// Thread mapping: ONE THREAD PER OUTPUT ELEMENT.  The flat thread index
//   t = blockIdx.x * blockDim.x + threadIdx.x
// is the C-order flat index of y[n,o,i,j]; threads with t >= N*O*OH*OW exit.
// The sum runs over c, then u, then v in increasing order, so the result is
// deterministic (the same bits on every run).
//
// Launch shape: 1-D; block = (B,1,1) for any B >= 1 (the loader uses 256),
//   grid = (ceil(N*O*OH*OW / B), 1, 1).  No shared memory.  grid.x * B must
//   fit int32 (the launcher checks it) so the flat thread index cannot wrap.
//
// Layouts (all C-contiguous):
//   x : (N, C, H, W)      NCHW activations
//   w : (O, C, KH, KW)    OIHW weights
//   b : (O,)              read only when has_bias != 0 (any valid pointer otherwise)
//   y : (N, O, OH, OW)    written, every element exactly once
//
// Preconditions (checked on the host by gpucnn.cuda.ops / the launcher):
//   * OH = (H + 2*PH - KH) / SH + 1 >= 1 and OW likewise; SH, SW >= 1; PH, PW >= 0
//   * every array has fewer than 2^31 elements, so all flat indices fit int32
//   * y does not alias x, w or b
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void conv2d_forward_impl(
    const T* __restrict__ x,
    const T* __restrict__ w,
    const T* __restrict__ b,
    T* __restrict__ y,
    int N, int C, int H, int W,
    int O, int KH, int KW,
    int OH, int OW,
    int SH, int SW, int PH, int PW,
    int has_bias)
{
    const int total = N * O * OH * OW;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;

    // Unflatten t = ((n*O + o)*OH + i)*OW + j.
    const int j = t % OW;
    const int i = (t / OW) % OH;
    const int o = (t / (OW * OH)) % O;
    const int n = t / (OW * OH * O);

    // Top-left corner of the receptive field in (unpadded) input coordinates.
    const int h0 = i * SH - PH;
    const int w0 = j * SW - PW;

    // Kernel offsets that land inside the input: h0 + u in [0, H) and
    // w0 + v in [0, W).  Restricting the loops replaces a per-tap bounds test.
    const int u_lo = h0 < 0 ? -h0 : 0;
    const int u_hi = (H - h0) < KH ? (H - h0) : KH;   // exclusive
    const int v_lo = w0 < 0 ? -w0 : 0;
    const int v_hi = (W - w0) < KW ? (W - w0) : KW;   // exclusive

    T acc = 0;
    for (int c = 0; c < C; ++c) {
        const int x_plane = (n * C + c) * H;      // row index of x[n,c,0,:]
        const int w_plane = (o * C + c) * KH;     // row index of w[o,c,0,:]
        for (int u = u_lo; u < u_hi; ++u) {
            const int x_row = (x_plane + h0 + u) * W + w0;   // + v -> x[n,c,h0+u,w0+v]
            const int w_row = (w_plane + u) * KW;            // + v -> w[o,c,u,v]
            for (int v = v_lo; v < v_hi; ++v) {
                acc += x[x_row + v] * w[w_row + v];
            }
        }
    }
    if (has_bias != 0) acc += b[o];
    y[t] = acc;
}

extern "C" __global__ void conv2d_forward(
    const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ b, float* __restrict__ y,
    int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int has_bias)
{
    conv2d_forward_impl(x, w, b, y, N, C, H, W, O, KH, KW, OH, OW,
                        SH, SW, PH, PW, has_bias);
}

extern "C" __global__ void conv2d_forward_f64(
    const double* __restrict__ x, const double* __restrict__ w,
    const double* __restrict__ b, double* __restrict__ y,
    int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW, int has_bias)
{
    conv2d_forward_impl(x, w, b, y, N, C, H, W, O, KH, KW, OH, OW,
                        SH, SW, PH, PW, has_bias);
}
