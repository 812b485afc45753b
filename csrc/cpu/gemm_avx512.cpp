// The GEMM of csrc/cpu/gemm.h with AVX-512 (this file alone is compiled with -mavx512f -mfma; it runs only where
// the CPU has them: csrc/cpu/gemm.cpp asks). Micro-tile 8 x 32: 16 accumulators of 16 floats.
#include "cpu/gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GEMM_ISA avx512
#define GEMM_NAME "avx512"
#define V __m512
#define VW 16
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VSET1 _mm512_set1_ps
#define VZERO _mm512_setzero_ps
#define VFMA _mm512_fmadd_ps
#define VADD _mm512_add_ps
#define VSUB _mm512_sub_ps
#define VMUL _mm512_mul_ps
#define VMAX _mm512_max_ps
#define GEMM_MR 8
#define GEMM_NV 2
#define GEMM_DOT_MR 4
#define GEMM_DOT_NR 4
#include "cpu/gemm_blocked.inc"

const convnet_cpu::Isa* convnet_cpu::isa_avx512() { return &avx512::kIsa; }
#else
const convnet_cpu::Isa* convnet_cpu::isa_avx512() { return nullptr; }
#endif
