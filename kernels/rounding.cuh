// Operand rounding of the precision modes (gpucnn/precision.py), on the bits of
// a float32, in one place: used by precision.cu (the element-wise rounding
// kernel) and gemm_tc.cu (the tensor-core GEMMs round while they stage their
// operands).  Device code only, integer arithmetic only, so the CPU emulator
// (tests/cudasim) runs the very same code as the GPU.
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

#endif  // GPUCNN_ROUNDING_CUH
