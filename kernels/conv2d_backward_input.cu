// conv2d backward pass with respect to the input.
//
// Entry points: conv2d_backward_input (float32) and conv2d_backward_input_f64
// (float64), the same template instantiated twice; T below is float or double.
//
// Compiled at run time by gpucnn/cuda/loader.py (CuPy RawModule / NVRTC) and,
// in the tests, run unchanged on the CPU by tests/cudasim.  No #includes.

// ---------------------------------------------------------------------------
// conv2d_backward_input / conv2d_backward_input_f64
//
// Given dy = dL/dy of the forward pass
//   y[n,o,i,j] = b[o] + sum_{c,u,v} x[n,c,i*SH+u-PH, j*SW+v-PW] * w[o,c,u,v],
// computes dx = dL/dx.  Input element x[n,c,h,w] is read by output (i,j)
// through tap (u,v) exactly when h = i*SH + u - PH and w = j*SW + v - PW, so
//
//   dx[n,c,h,w] = sum_{o,u,v} dy[n, o, (h+PH-u)/SH, (w+PW-v)/SW] * w[o,c,u,v]
//
// over the taps (u,v) for which (h+PH-u) is divisible by SH with quotient in
// [0, OH), and (w+PW-v) is divisible by SW with quotient in [0, OW).
//
// Why this is "full-padded dy convolved with the 180-degree-rotated kernel":
// substitute the rotated kernel r[o,c,u',v'] = w[o,c,KH-1-u', KW-1-v'].  Take
// dy, insert SH-1 zero rows between its rows and SW-1 zero columns between its
// columns (the "dilated" dy, nonzero only at multiples of the stride), and pad
// it with KH-1-PH zero rows on top and KW-1-PW zero columns on the left (the
// "full" padding minus the forward padding; a negative amount crops), plus
// enough zeros at the bottom/right to make it H+KH-1 by W+KW-1.  Then
//   dx[n,c,h,w] = sum_{o,u',v'} dyfull[n,o,h+u',w+v'] * r[o,c,u',v'],
// a stride-1 cross-correlation of the full-padded, dilated dy with the rotated
// kernel.  Writing u = KH-1-u', the dyfull tap h+u' is dilated-dy row
// h+PH-u, which is a real (nonzero) dy row exactly when SH divides h+PH-u and
// the quotient is in range: the taps this kernel visits.  The zeros of the
// dilation and of the padding contribute nothing, so they are skipped.
//
// Thread mapping: ONE THREAD PER INPUT ELEMENT (a GATHER).  The flat thread
// index t = blockIdx.x * blockDim.x + threadIdx.x is the C-order flat index of
// dx[n,c,h,w]; threads with t >= N*C*H*W exit.  Each dx element is written by
// exactly one thread, with no atomics; the sum runs over o, then u, then v in
// increasing order, so the result is deterministic.
//
// Launch shape: 1-D; block = (B,1,1) for any B >= 1 (the loader uses 256),
//   grid = (ceil(N*C*H*W / B), 1, 1); grid.x * B fits int32.  No shared memory.
//
// Layouts (all C-contiguous):
//   dy : (N, O, OH, OW)
//   w  : (O, C, KH, KW)   OIHW weights
//   dx : (N, C, H, W)     written, every element exactly once
//
// Preconditions (checked on the host): OH = (H + 2*PH - KH)/SH + 1 >= 1 and
// OW likewise, SH, SW >= 1, PH, PW >= 0, every array has fewer than 2^31
// elements, dx aliases nothing.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void conv2d_backward_input_impl(
    const T* __restrict__ dy,
    const T* __restrict__ w,
    T* __restrict__ dx,
    int N, int C, int H, int W,
    int O, int KH, int KW,
    int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    const int total = N * C * H * W;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;

    // Unflatten t = ((n*C + c)*H + h)*W + w_.
    const int w_ = t % W;
    const int h = (t / W) % H;
    const int c = (t / (W * H)) % C;
    const int n = t / (W * H * C);

    // Padded coordinates of this input element.
    const int hp = h + PH;
    const int wp = w_ + PW;

    // Taps u with i = (hp - u)/SH an integer in [0, OH):
    //   hp - u >= 0            ->  u <= hp
    //   hp - u <= (OH-1)*SH    ->  u >= hp - (OH-1)*SH
    //   hp - u = 0 (mod SH)    ->  u = hp (mod SH)
    // Start at the smallest u >= max(0, hp-(OH-1)*SH) congruent to hp, step SH.
    int u_lo = hp - (OH - 1) * SH;
    if (u_lo < 0) u_lo = 0;
    u_lo += (hp - u_lo) % SH;                 // hp - u_lo >= 0 here
    const int u_hi = hp < KH - 1 ? hp : KH - 1;   // inclusive

    int v_lo = wp - (OW - 1) * SW;
    if (v_lo < 0) v_lo = 0;
    v_lo += (wp - v_lo) % SW;
    const int v_hi = wp < KW - 1 ? wp : KW - 1;   // inclusive

    T acc = 0;
    for (int o = 0; o < O; ++o) {
        const int dy_plane = (n * O + o) * OH;    // row index of dy[n,o,0,:]
        const int w_plane = (o * C + c) * KH;     // row index of w[o,c,0,:]
        for (int u = u_lo; u <= u_hi; u += SH) {
            const int i = (hp - u) / SH;
            const int dy_row = (dy_plane + i) * OW;
            const int w_row = (w_plane + u) * KW;
            for (int v = v_lo; v <= v_hi; v += SW) {
                const int j = (wp - v) / SW;
                acc += dy[dy_row + j] * w[w_row + v];
            }
        }
    }
    dx[t] = acc;
}

extern "C" __global__ void conv2d_backward_input(
    const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
    int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    conv2d_backward_input_impl(dy, w, dx, N, C, H, W, O, KH, KW, OH, OW,
                               SH, SW, PH, PW);
}

extern "C" __global__ void conv2d_backward_input_f64(
    const double* __restrict__ dy, const double* __restrict__ w, double* __restrict__ dx,
    int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
    int SH, int SW, int PH, int PW)
{
    conv2d_backward_input_impl(dy, w, dx, N, C, H, W, O, KH, KW, OH, OW,
                               SH, SW, PH, PW);
}
