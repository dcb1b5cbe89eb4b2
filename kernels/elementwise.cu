// Elementwise activation backward: dz = dy * act'(saved), for a convolution
// followed by an activation without a fused pool (any layout: flat arrays).
//
// Entry points: act_backward (float32) and act_backward_f64 (float64), one
// template body instantiated twice; T below is float or double.  Host
// wrapper: gpucnn/cuda/elementwise.py.  Includes activation.cuh
// (gpucnn/cuda/sources.py expands it in place).
//
// Activation codes (int act): 0 none, 1 relu, 2 sigmoid, 3 tanh; dz =
// activation_backward(dy, saved, act) of kernels/activation.cuh:
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

#include "activation.cuh"   // activation_backward

template <typename T>
__device__ __forceinline__ void act_backward_impl(const T* dy, const T* __restrict__ saved, T* dz, int n, int act)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const T g = dy[t];
    const T s = saved[t];
    dz[t] = activation_backward(g, s, act);
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
