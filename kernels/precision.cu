// Operand rounding for the precision modes of gpucnn/precision.py (tf32, bf16):
//
//   y[t] = x[t] rounded to (23 - drop) explicit mantissa bits, round to nearest,
//          ties to even: drop = 13 gives TF32, drop = 16 bfloat16.
//
// On the bits u of x[t]: u + (2^(drop-1) - 1) + (the kept lsb), then the low
// drop bits cleared -- a carry out of the mantissa moves into the exponent (the
// largest finites round to Inf), subnormals round on the same grid, +-Inf is
// unchanged; a NaN gets its quiet bit set and its low bits cleared, so it stays
// a NaN of the same sign.  Bit for bit what gpucnn.precision.round_tf32 /
// round_bf16 compute on the host.
//
// Entry point: round_mantissa (float32 only: the modes round float32 operands).
// Host wrapper: gpucnn/cuda/rounding.py.
//
// Thread mapping: ONE THREAD PER ELEMENT, t = blockIdx.x * blockDim.x +
// threadIdx.x; threads with t >= n exit.  Coalesced.
// Launch shape: 1-D, block (B,1,1) for any B (the wrapper uses 256), grid
//   (ceil(n / B), 1, 1).  No shared memory.
// Preconditions: 0 < n < 2^31, 1 <= drop <= 22; y may alias x (each thread
//   reads x[t] before writing y[t]).
// ---------------------------------------------------------------------------

extern "C" __global__ void round_mantissa(const float* x, float* y, int n, int drop)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    unsigned int u = __float_as_uint(x[t]);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        u |= 0x00400000u;                                       // NaN: quiet, never Inf
    } else {
        u += ((1u << (drop - 1)) - 1u) + ((u >> drop) & 1u);    // nearest, ties to even
    }
    y[t] = __uint_as_float(u & ~((1u << drop) - 1u));
}
