// The activation rules of gpucnn's kernels, in one place: the forward
// activation a fused epilogue applies and the backward factor dz = dy * act'.
//
// Included (#include "activation.cuh") by conv_forward.cu (the epilogue),
// dense.cu (dense_forward's epilogue, dense_backward_act), elementwise.cu
// (act_backward) and pool.cu (the relu factor of the fused pool).
// gpucnn/cuda/sources.py expands the #include in place, with #line
// directives, before a source reaches NVRTC / CuPy or the CPU emulator
// (tests/cudasim): the compiled text and CuPy's cache key then hold this file,
// and nvcc run on a .cu file directly finds it beside the file.  Device code
// only: no __global__ entry points, no shared memory, no synchronisation.
//
// Activation codes (int act), the same in every kernel and in the host
// wrappers (gpucnn/cuda/*.py): 0 none, 1 relu, 2 sigmoid, 3 tanh; any other
// code acts as none.
//
//   activation(z, act) -- the forward value y:
//     none:    y = z
//     relu:    y = z > 0 ? z : (z == z ? 0 : z)          (+0 for z <= 0; NaN in, NaN out)
//     sigmoid: e = exp(-|z|); y = z >= 0 ? 1/(1+e) : e/(1+e)   (no overflow for any z)
//     tanh:    y = tanh(z)
//
//   relu_grad(z) -- relu'(z) alone (the fused max pool + relu of pool.cu
//   takes it of a window's first tap).
//
//   activation_backward(dy, s, act) -- dz = dy * act', from the saved value s:
//     none:    dz = dy
//     relu:    s = z (the pre-activation): act' = 1 (z > 0), 1/2 (z == 0
//              exactly: the seeds' rule), 0 (z < 0), NaN (z NaN); dz = dy * act'
//     sigmoid: s = y (the output): dz = dy * (y (1 - y))
//     tanh:    s = y (the output): dz = dy * (1 - y^2)
//
// T is float or double: the float overloads below call expf/fabsf/tanhf, the
// double ones exp/fabs/tanh, so a float kernel never computes in double.  The
// expressions and their order are the numerical contract: the NumPy
// activations (gpucnn/functional) and the parity tests match them, so change
// them only together.
#ifndef GPUCNN_ACTIVATION_CUH
#define GPUCNN_ACTIVATION_CUH

__device__ __forceinline__ float act_exp(float v) { return expf(v); }
__device__ __forceinline__ double act_exp(double v) { return exp(v); }
__device__ __forceinline__ float act_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double act_abs(double v) { return fabs(v); }
__device__ __forceinline__ float act_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double act_tanh(double v) { return tanh(v); }

// y = act(z) (the table above).
template <typename T>
__device__ __forceinline__ T activation(T z, int act)
{
    if (act == 1) return z > (T)0 ? z : (z == z ? (T)0 : z);
    if (act == 2) {
        const T e = act_exp(-act_abs(z));
        return z >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
    }
    if (act == 3) return act_tanh(z);
    return z;
}

// relu'(z): 1 (z > 0), 1/2 (z == 0 exactly), 0 (z < 0), NaN (z NaN).
template <typename T>
__device__ __forceinline__ T relu_grad(T z)
{
    return z > (T)0 ? (T)1 : (z == (T)0 ? (T)0.5 : (z < (T)0 ? (T)0 : z));
}

// dz = dy * act'(s); s is z for relu, y for sigmoid and tanh (the table above).
template <typename T>
__device__ __forceinline__ T activation_backward(T dy, T s, int act)
{
    T out;
    if (act == 1) {
        out = dy * relu_grad(s);
    } else if (act == 2) {
        out = dy * (s * ((T)1 - s));
    } else if (act == 3) {
        out = dy * ((T)1 - s * s);
    } else {
        out = dy;
    }
    return out;
}

#endif  // GPUCNN_ACTIVATION_CUH
