// Operand rounding of the precision modes (gpucnn/precision.py), on the bits of
// a float32, in one place: the tensor-core GEMMs (gemm_tc.cuh) round while they
// stage their operands.  Device code; the functions below are integer
// arithmetic, the reference the CPU emulator (tests/cudasim) runs, except the
// two packed conversions at the end, which the GPU does in one instruction.
//
//   round_mantissa_bits(u, drop) -- the float32 bits u rounded to (23 - drop)
//     explicit mantissa bits, round to nearest, ties to even: add
//     2^(drop-1) - 1 + (the kept lsb) and clear the low drop bits.  A carry out
//     of the mantissa moves into the exponent (the largest finites round to
//     Inf), subnormals round on the same grid, +-Inf is unchanged; a NaN gets
//     its quiet bit set and its low bits cleared (a NaN of the same sign).
//     drop = 13: TF32 (the bits an mma.sync .tf32 operand register carries);
//     drop = 16: bfloat16 (its bits are the high half of the result).
//   tf32_bits(x)  -- round_mantissa_bits(bits(x), 13).  NOT cvt.rna.tf32.f32
//     (ties away from zero) and not the tensor core's own truncation of the
//     low 13 bits: gpucnn.precision.round_tf32 is the reference.
//   bf16_bits(x)  -- the 16-bit bfloat16 nearest x, ties to even.
//   f16_bits(x)   -- the 16-bit IEEE binary16 nearest x, ties to even (what
//     cvt.rn.f16.f32 gives): |x| >= 65520 -> Inf, below 2^-14 on the binary16
//     subnormal grid (multiples of 2^-24, 2^-25 itself rounds to 0), NaN ->
//     a quiet NaN of the same sign carrying the high payload bits.
//   pack2(lo, hi) -- two 16-bit values in one 32-bit register, lo in bits
//     0-15: the element with the smaller k index of an mma.sync fragment pair.
//   bf16x2_bits(lo, hi), f16x2_bits(lo, hi) -- pack2 of bf16_bits / f16_bits of
//     the two.  On the GPU one cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 (sm_80+),
//     the same round to nearest, ties to even, with the same overflow to Inf
//     and subnormal grid (no .ftz: -ftz=true does not reach inline PTX; a
//     float32 subnormal is far below half of binary16's smallest subnormal and
//     rounds to 0 either way); a NaN becomes a quiet NaN of which the payload
//     may differ (the product is NaN either way).  That is 1 instruction where
//     the integer code takes ~14 (bf16) and ~30 (f16) per pair, in the
//     tensor-core kernels' staging, which limits them.  Under the emulator
//     (__CUDASIM__) the integer code above; tests/test_precision.py checks the
//     two bit for bit on edge values wherever it runs (the GPU included).
#ifndef GPUCNN_ROUNDING_CUH
#define GPUCNN_ROUNDING_CUH

__device__ __forceinline__ unsigned int round_mantissa_bits(unsigned int u, int drop)
{
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        u |= 0x00400000u;                                       // NaN: quiet, never Inf
    } else {
        u += ((1u << (drop - 1)) - 1u) + ((u >> drop) & 1u);    // nearest, ties to even
    }
    return u & ~((1u << drop) - 1u);
}

__device__ __forceinline__ unsigned int tf32_bits(float x)
{
    return round_mantissa_bits(__float_as_uint(x), 13);
}

__device__ __forceinline__ unsigned int bf16_bits(float x)
{
    return round_mantissa_bits(__float_as_uint(x), 16) >> 16;
}

__device__ __forceinline__ unsigned int f16_bits(float x)
{
    const unsigned int u = __float_as_uint(x);
    const unsigned int sign = (u >> 16) & 0x8000u;
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | ((a >> 13) & 0x03ffu);   // NaN, quiet
    if (a >= 0x477ff000u) return sign | 0x7c00u;                         // >= 65520 (and Inf): Inf
    if (a >= 0x38800000u) {                                              // normal in binary16
        unsigned int r = a - 0x38000000u;                                // exponent bias 127 -> 15
        r += 0x0fffu + ((r >> 13) & 1u);
        return sign | (r >> 13);
    }
    if (a <= 0x33000000u) return sign;                                   // <= 2^-25: +-0
    const unsigned int e = a >> 23;                                      // 102..112
    const unsigned int m = (a & 0x007fffffu) | 0x00800000u;
    const unsigned int shift = 126u - e;                                 // 14..24: units of 2^-24
    unsigned int r = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;                    // may carry to 2^-14: right
    return sign | r;
}

__device__ __forceinline__ unsigned int pack2(unsigned int lo, unsigned int hi)
{
    return (lo & 0xffffu) | (hi << 16);
}

__device__ __forceinline__ unsigned int bf16x2_bits(float lo, float hi)
{
#if defined(__CUDASIM__)
    return pack2(bf16_bits(lo), bf16_bits(hi));
#else
    unsigned int d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));   // hi -> bits 16-31
    return d;
#endif
}

__device__ __forceinline__ unsigned int f16x2_bits(float lo, float hi)
{
#if defined(__CUDASIM__)
    return pack2(f16_bits(lo), f16_bits(hi));
#else
    unsigned int d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));    // hi -> bits 16-31
    return d;
#endif
}

#endif  // GPUCNN_ROUNDING_CUH
