// The warp-level tensor-core instructions gpucnn uses, one function each
// (sm_80 and later):
//
//   mma_tf32_m16n8k8(d, a, b)   -- mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
//   mma_bf16_m16n8k16(d, a, b)  -- mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//   mma_f16_m16n8k16(d, a, b)   -- mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
//
// Each computes D = A B + D for one warp, A (16 x K) row-major, B (K x 8), D
// (16 x 8) FP32, with every operand spread over the 32 lanes in registers as
// the PTX ISA fixes it ("Matrix Fragments for mma.m16n8k8 / m16n8k16"):
//   g = lane >> 2 (groupID), t = lane & 3 (threadID_in_group)
//   d[i] (all shapes): row g + 8*(i >= 2), column 2t + (i & 1)
//   tf32, K = 8 (one element per register):
//     a[i]: row g + 8*(i & 1), column t + 4*(i >= 2)     b[i]: row t + 4*i, column g
//   bf16 / f16, K = 16 (two elements per register, the lower k in bits 0-15):
//     a[i]: row g + 8*(i & 1), columns 2t + 8*(i >= 2) + {0, 1}
//     b[i]: rows 2t + 8*i + {0, 1}, column g
// A tf32 operand register holds float32 bits whose low 13 bits the hardware
// ignores: round them first (rounding.cuh, tf32_bits) or they are truncated.
// Every lane of the warp must execute the call (converged, .aligned).
//
// Under the CPU emulator (tests/cudasim, __CUDASIM__) each call goes to the
// emulator's model of the same instruction instead of the inline PTX: it
// gathers the 32 lanes' registers into A, B and D by exactly the layouts
// above, checks that all 32 lanes arrived, and computes every D element as
// fmaf over k in increasing order (the GPU's order of the K products inside
// one instruction is not specified; tests compare with a tolerance).
#ifndef GPUCNN_MMA_CUH
#define GPUCNN_MMA_CUH

__device__ __forceinline__ void mma_tf32_m16n8k8(float d[4], const unsigned int a[4], const unsigned int b[2])
{
#if defined(__CUDASIM__)
    cudasim::mma_sync_m16n8k8_tf32(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void mma_bf16_m16n8k16(float d[4], const unsigned int a[4], const unsigned int b[2])
{
#if defined(__CUDASIM__)
    cudasim::mma_sync_m16n8k16_bf16(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void mma_f16_m16n8k16(float d[4], const unsigned int a[4], const unsigned int b[2])
{
#if defined(__CUDASIM__)
    cudasim::mma_sync_m16n8k16_f16(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

#endif  // GPUCNN_MMA_CUH
