// Dynamic loss scaling for --precision fp16, on the device: what
// gpucnn/train/scaler.py's LossScaler does on the host for NumPy arrays, bit
// for bit, so that a train step needs no host read of the scale and can be
// captured as a CUDA graph.  Host wrappers: gpucnn/cuda/amp.py.
//
// State (two small device arrays, owned by the LossScaler):
//   scale[0] = S      the loss scale, a power of two in [min_scale, max_scale]
//   scale[1] = 1 / S  (exact: S is a power of two)
//   steps[0] = found  1 when this step's gradients hold an Inf or NaN, else 0
//   steps[1] = good   consecutive finite steps since the scale last changed
//   steps[2] = skipped  steps skipped so far (the run's total)
//
// One step, in stream order (4 launches with one flat gradient buffer):
//   amp_scale          dy *= S           on the loss's gradient, before backward
//   amp_unscale_check  g *= 1/S; found   on every flat gradient buffer, after backward
//   sgd_update_skip / adam_update_skip   (kernels/optim.cu) return at once when found
//   amp_update         the scale's rule, and found = 0 for the next step
//
// The rule (torch.cuda.amp.GradScaler's, with a floor and a ceiling):
//   found:     S = max(S / 2, min_scale), good = 0, skipped += 1
//   otherwise: good += 1; if good == growth_interval: S = min(2 S, max_scale), good = 0
//
// Every product is by a power of two (S, 1/S; ldexpf for the halving and the
// doubling), hence exact, except where the result is an FP32 subnormal: CuPy
// compiles with -ftz=true, which flushes it to zero, where NumPy (and the CPU
// emulator) keep it.  No FMA can be formed (no additions); __fmul_rn says so
// anyway.
//
// Entry points (float32 only: fp16 mode trains float32 master weights):
//   amp_scale, amp_unscale_check: ONE THREAD PER ELEMENT, t = blockIdx.x *
//     blockDim.x + threadIdx.x, threads with t >= n exit; 1-D launch, block
//     (B,1,1) for any B (the wrappers use 256), grid (ceil(n / B), 1, 1).
//   amp_update: ONE THREAD, grid (1,1,1), block (1,1,1).
// No shared memory.  amp_unscale_check's threads may all store found = 1 at
// once: a plain store of the same value, never a read-modify-write, so the
// result (0 or 1) does not depend on their order and no atomic is needed
// (the flag is 0 when the step starts: amp_update clears it).
// Layouts: g, dy: n floats, C-contiguous (flat buffers); scale: 2 floats;
//   steps: 3 ints.
// Preconditions: 0 < n < 2^31; scale[0] a power of two with 1/scale[0]
//   normal; growth_interval >= 1; min_scale <= scale[0] <= max_scale, both
//   powers of two.

#if defined(__CUDASIM__)
#define AMP_MUL(a, b) ((a) * (b))
#define AMP_RCP(a) (1.0f / (a))
#else
#define AMP_MUL(a, b) __fmul_rn(a, b)
#define AMP_RCP(a) __frcp_rn(a)
#endif

// Inf or NaN: every exponent bit set.
__device__ __forceinline__ bool amp_nonfinite(float v)
{
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// dy[t] = dy[t] * S: the loss's gradient scaled before the backward pass.
extern "C" __global__ void amp_scale(float* dy, const float* __restrict__ scale, int n)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    dy[t] = AMP_MUL(dy[t], scale[0]);
}

// g[t] = g[t] * (1/S), and found = 1 when the result is Inf or NaN.
extern "C" __global__ void amp_unscale_check(float* g, const float* __restrict__ scale, int* steps, int n)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const float v = AMP_MUL(g[t], scale[1]);
    g[t] = v;
    if (amp_nonfinite(v)) steps[0] = 1;
}

// The scale's rule after the step (one thread).
extern "C" __global__ void amp_update(float* scale, int* steps, int growth_interval, float min_scale,
                                      float max_scale)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float s = scale[0];
    if (steps[0] != 0) {
        s = fmaxf(ldexpf(s, -1), min_scale);                    // s / 2, exactly
        steps[1] = 0;
        steps[2] = steps[2] + 1;
    } else {
        int good = steps[1] + 1;
        if (good >= growth_interval) {
            s = fminf(ldexpf(s, 1), max_scale);                  // 2 s, exactly
            good = 0;
        }
        steps[1] = good;
    }
    scale[0] = s;
    scale[1] = AMP_RCP(s);
    steps[0] = 0;
}
