// Elementwise activation backward: dz = dy * act'(saved), for a convolution
// followed by an activation without a fused pool (any layout: flat arrays).
//
// Entry points: act_backward (float32) and act_backward_f64 (float64), one
// template body instantiated twice; T below is float or double.  No
// #includes.  Host wrapper: gpucnn/cuda/elementwise.py.
//
// Activation codes (int act): 0 none, 1 relu, 2 sigmoid, 3 tanh.
//   relu:    saved = z (the pre-activation): act'(z) = 1 (z > 0), 1/2 (z == 0
//            exactly), 0 (z < 0), NaN (z NaN)
//   sigmoid: saved = y (the output): act' = y (1 - y)
//   tanh:    saved = y (the output): act' = 1 - y^2
//   none:    dz = dy (a copy)
//
// Thread mapping: ONE THREAD PER ELEMENT; the flat thread index
// t = blockIdx.x * blockDim.x + threadIdx.x is the element index; threads
// with t >= n exit.  Coalesced.
//
// Launch shape: 1-D, block (B,1,1) for any B (the wrapper uses 256), grid
//   (ceil(n / B), 1, 1).  No shared memory.  No reductions, no atomics; each
//   dz element written exactly once.
// Layouts: dy, saved, dz: n elements each, C-contiguous, same shape.
// Preconditions: 0 < n < 2^31; dz may alias dy (each thread reads dy[t]
//   before writing dz[t]) but not saved.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void act_backward_impl(const T* dy, const T* __restrict__ saved, T* dz, int n, int act)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const T g = dy[t];
    const T s = saved[t];
    T out;
    if (act == 1) {
        const T d = s > (T)0 ? (T)1 : (s == (T)0 ? (T)0.5 : (s < (T)0 ? (T)0 : s));
        out = g * d;
    } else if (act == 2) {
        out = g * (s * ((T)1 - s));
    } else if (act == 3) {
        out = g * ((T)1 - s * s);
    } else {
        out = g;
    }
    dz[t] = out;
}

extern "C" __global__ void act_backward(const float* dy, const float* __restrict__ saved, float* dz, int n, int act)
{
    act_backward_impl(dy, saved, dz, n, act);
}

extern "C" __global__ void act_backward_f64(const double* dy, const double* __restrict__ saved, double* dz, int n,
                                            int act)
{
    act_backward_impl(dy, saved, dz, n, act);
}
