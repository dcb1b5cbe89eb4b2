// Optimizer steps over FLAT parameter buffers: SGD (momentum, Nesterov, weight
// decay) and Adam (bias-corrected, L2 weight decay), one launch per step per
// buffer (one buffer per dtype), one thread per element.
//
// Entry points: sgd_update / adam_update (float32) and sgd_update_f64 /
// adam_update_f64 (float64); one template body each, instantiated twice; T
// below is float or double.  sgd_update_skip / adam_update_skip (float32: the
// fp16 mode's loss scaling, kernels/amp.cu) take one more argument, the
// device flag `skip`: when skip[0] != 0 (the step's gradients overflowed)
// every thread returns before reading anything else, so the parameters and
// slots stay as they were, bit for bit.  No #includes.  Host wrappers:
// gpucnn/cuda/optim.py.
//
// The arithmetic is EXACTLY that of gpucnn/optim.py on NumPy arrays, operation
// by operation and in the same order, each operation rounded to T: every
// multiply, add, divide and square root goes through the _rn intrinsics
// (__fmul_rn, __dadd_rn, ...), which the compiler never contracts into FMAs,
// so a step gives the same bits as the NumPy step (float64 always; float32
// too, except that CuPy compiles with -ftz=true, so float32 results that pass
// through a denormal are flushed to zero where NumPy keeps the denormal).
//
// Hyper-parameters that change between steps live in DEVICE memory, in the
// small array `hyper` written by the host before the step (so a captured CUDA
// graph can replay the step with a new learning rate); everything else is a
// kernel scalar (rounded to T by the launcher, as NumPy's t(...) does).
//
// Thread mapping: ONE THREAD PER ELEMENT, t = blockIdx.x * blockDim.x +
// threadIdx.x; threads with t >= n exit.  No shared memory, no reductions, no
// atomics; every written element written exactly once by its own thread.
// Launch shape: 1-D, block (B,1,1) for any B (the wrapper uses 256), grid
//   (ceil(n / B), 1, 1).
// Layouts: p, g, v, m: n elements each, C-contiguous (flat buffers).
// Preconditions: 0 < n < 2^31; p, g, m, v pairwise distinct, except that a
//   slot the kernel does not touch (v of SGD with mu == 0) may be any T array
//   (e.g. p itself); skip (the _skip entries) holds at least one int, and no
//   kernel of the same step writes it while this one runs.

#if defined(__CUDASIM__)
// The CPU emulator (g++, ISO C++ mode: no FMA contraction) has plain IEEE ops.
#define OM_FMUL(a, b) ((a) * (b))
#define OM_FADD(a, b) ((a) + (b))
#define OM_FDIV(a, b) ((a) / (b))
#define OM_FSQRT(a) sqrtf(a)
#define OM_DMUL(a, b) ((a) * (b))
#define OM_DADD(a, b) ((a) + (b))
#define OM_DDIV(a, b) ((a) / (b))
#define OM_DSQRT(a) sqrt(a)
#else
#define OM_FMUL(a, b) __fmul_rn(a, b)
#define OM_FADD(a, b) __fadd_rn(a, b)
#define OM_FDIV(a, b) __fdiv_rn(a, b)
#define OM_FSQRT(a) __fsqrt_rn(a)
#define OM_DMUL(a, b) __dmul_rn(a, b)
#define OM_DADD(a, b) __dadd_rn(a, b)
#define OM_DDIV(a, b) __ddiv_rn(a, b)
#define OM_DSQRT(a) __dsqrt_rn(a)
#endif

// One correctly rounded IEEE operation each, never fused with another.
template <typename T> struct Om;
template <> struct Om<float> {
    static __device__ __forceinline__ float mul(float a, float b) { return OM_FMUL(a, b); }
    static __device__ __forceinline__ float add(float a, float b) { return OM_FADD(a, b); }
    static __device__ __forceinline__ float sub(float a, float b) { return OM_FADD(a, -b); }
    static __device__ __forceinline__ float div(float a, float b) { return OM_FDIV(a, b); }
    static __device__ __forceinline__ float sqrt_(float a) { return OM_FSQRT(a); }
};
template <> struct Om<double> {
    static __device__ __forceinline__ double mul(double a, double b) { return OM_DMUL(a, b); }
    static __device__ __forceinline__ double add(double a, double b) { return OM_DADD(a, b); }
    static __device__ __forceinline__ double sub(double a, double b) { return OM_DADD(a, -b); }
    static __device__ __forceinline__ double div(double a, double b) { return OM_DDIV(a, b); }
    static __device__ __forceinline__ double sqrt_(double a) { return OM_DSQRT(a); }
};

// ---------------------------------------------------------------------------
// sgd_update / sgd_update_f64
//
//   hyper[0] = lr (rounded to T)
//   g' = g + wd * p                    (only when wd != 0)
//   v  = v * mu + g'                   (only when mu != 0; v written back)
//   s  = nesterov ? g' + mu * v : (mu != 0 ? v : g')
//   p  = p - lr * s
// (gpucnn/optim.py SGD._update: g = g + t(wd)*p; v *= t(mu); v += g;
//  g = g + t(mu)*v if nesterov else v; p -= t(lr)*g.)
// v is neither read nor written when mu == 0.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void sgd_update_impl(T* __restrict__ p, const T* __restrict__ g, T* v,
                                                const T* __restrict__ hyper, int n, T mu, T wd, int nesterov,
                                                const int* __restrict__ skip)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    if (skip != nullptr && skip[0] != 0) return;
    const T lr = hyper[0];
    const T pp = p[t];
    T gg = g[t];
    if (wd != (T)0) gg = Om<T>::add(gg, Om<T>::mul(wd, pp));
    if (mu != (T)0) {
        const T vv = Om<T>::add(Om<T>::mul(v[t], mu), gg);
        v[t] = vv;
        gg = nesterov ? Om<T>::add(gg, Om<T>::mul(mu, vv)) : vv;
    }
    p[t] = Om<T>::sub(pp, Om<T>::mul(lr, gg));
}

extern "C" __global__ void sgd_update(float* __restrict__ p, const float* __restrict__ g, float* v,
                                      const float* __restrict__ hyper, int n, float mu, float wd, int nesterov)
{
    sgd_update_impl(p, g, v, hyper, n, mu, wd, nesterov, nullptr);
}

extern "C" __global__ void sgd_update_f64(double* __restrict__ p, const double* __restrict__ g, double* v,
                                          const double* __restrict__ hyper, int n, double mu, double wd,
                                          int nesterov)
{
    sgd_update_impl(p, g, v, hyper, n, mu, wd, nesterov, nullptr);
}

extern "C" __global__ void sgd_update_skip(float* __restrict__ p, const float* __restrict__ g, float* v,
                                           const float* __restrict__ hyper, int n, float mu, float wd,
                                           int nesterov, const int* __restrict__ skip)
{
    sgd_update_impl(p, g, v, hyper, n, mu, wd, nesterov, skip);
}

// ---------------------------------------------------------------------------
// adam_update / adam_update_f64
//
//   hyper[0] = step_t = lr / (1 - b1^t),  hyper[1] = c2 = 1 / (1 - b2^t)
//     (computed by the host in double at step t >= 1, rounded to T)
//   g' = g + wd * p                      (only when wd != 0)
//   m  = m * b1 + omb1 * g'              (omb1 = T(1 - b1), host-rounded)
//   v  = v * b2 + omb2 * (g' * g')       (omb2 = T(1 - b2))
//   p  = p - (step_t * m) / (sqrt(v * c2) + eps)
// (gpucnn/optim.py Adam._update: m *= t(b1); m += t(1-b1)*g; v *= t(b2);
//  v += t(1-b2)*(g*g); denom = (v * t(c2)) ** 0.5 + t(eps);
//  p -= t(step) * m / denom.)
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void adam_update_impl(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                                 T* __restrict__ v, const T* __restrict__ hyper, int n,
                                                 T b1, T omb1, T b2, T omb2, T eps, T wd,
                                                 const int* __restrict__ skip)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    if (skip != nullptr && skip[0] != 0) return;
    const T step = hyper[0];
    const T c2 = hyper[1];
    const T pp = p[t];
    T gg = g[t];
    if (wd != (T)0) gg = Om<T>::add(gg, Om<T>::mul(wd, pp));
    const T mm = Om<T>::add(Om<T>::mul(m[t], b1), Om<T>::mul(omb1, gg));
    const T vv = Om<T>::add(Om<T>::mul(v[t], b2), Om<T>::mul(omb2, Om<T>::mul(gg, gg)));
    m[t] = mm;
    v[t] = vv;
    const T denom = Om<T>::add(Om<T>::sqrt_(Om<T>::mul(vv, c2)), eps);
    p[t] = Om<T>::sub(pp, Om<T>::div(Om<T>::mul(step, mm), denom));
}

extern "C" __global__ void adam_update(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                       float* __restrict__ v, const float* __restrict__ hyper, int n,
                                       float b1, float omb1, float b2, float omb2, float eps, float wd)
{
    adam_update_impl(p, g, m, v, hyper, n, b1, omb1, b2, omb2, eps, wd, nullptr);
}

extern "C" __global__ void adam_update_f64(double* __restrict__ p, const double* __restrict__ g,
                                           double* __restrict__ m, double* __restrict__ v,
                                           const double* __restrict__ hyper, int n,
                                           double b1, double omb1, double b2, double omb2, double eps, double wd)
{
    adam_update_impl(p, g, m, v, hyper, n, b1, omb1, b2, omb2, eps, wd, nullptr);
}

extern "C" __global__ void adam_update_skip(float* __restrict__ p, const float* __restrict__ g,
                                            float* __restrict__ m, float* __restrict__ v,
                                            const float* __restrict__ hyper, int n,
                                            float b1, float omb1, float b2, float omb2, float eps, float wd,
                                            const int* __restrict__ skip)
{
    adam_update_impl(p, g, m, v, hyper, n, b1, omb1, b2, omb2, eps, wd, skip);
}
