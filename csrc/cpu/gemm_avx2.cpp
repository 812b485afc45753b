// The GEMM of csrc/cpu/gemm.h with AVX2 and FMA (this file alone is compiled with -mavx2 -mfma; it runs only where
// the CPU has them: csrc/cpu/gemm.cpp asks). Micro-tile 6 x 16: 12 accumulators of 8 floats. The dot form's tile:
// 3 x 2 (12 accumulators of 8; conv1's filter gradient 1.35 ms, against 1.9-2.0 ms with 2 x 2, 2 x 3 or 1 x 6).
#include "cpu/gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GEMM_ISA avx2
#define GEMM_NAME "avx2"
#define V __m256
#define VW 8
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET1 _mm256_set1_ps
#define VZERO _mm256_setzero_ps
#define VFMA _mm256_fmadd_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#define VMAX _mm256_max_ps
#define GEMM_MR 6
#define GEMM_NV 2
#define GEMM_DOT_MR 3
#define GEMM_DOT_NR 2
#include "cpu/gemm_blocked.inc"

const convnet_cpu::Isa* convnet_cpu::isa_avx2() { return &avx2::kIsa; }
#else
const convnet_cpu::Isa* convnet_cpu::isa_avx2() { return nullptr; }
#endif
