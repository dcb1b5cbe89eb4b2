// opaque(p): p itself, as a value the compiler cannot take apart.  Device code,
// for the kernels that gather through a per-thread base pointer and a table of
// offsets (conv_forward.cu, conv_backward_input.cu, gemm_tc.cuh).
//
// Why: a gathered element is base[t] with base = p + off fixed per thread and t
// read from a shared-memory table.  Left alone, NVRTC folds p + off + t into one
// sum and rebuilds it from the parameter bank for every element (an LDC.64 of p,
// an IADD3 of off + t, an IMAD.WIDE: 3 instructions); behind opaque the base
// stays in two registers and an element's address is one IMAD.WIDE of t (or an
// LEA pair, the compiler's choice beside FFMA-bound loops).  The
// `mov` is an identity: the bits, and the emulator's result, are unchanged.
#ifndef GPUCNN_OPAQUE_CUH
#define GPUCNN_OPAQUE_CUH

template <typename T>
__device__ __forceinline__ const T* opaque(const T* p)
{
#ifndef __CUDASIM__
    asm("mov.b64 %0, %0;" : "+l"(p));
#endif
    return p;
}

#endif  // GPUCNN_OPAQUE_CUH
