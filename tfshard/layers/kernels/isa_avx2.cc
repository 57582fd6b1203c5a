// The decode kernels for AVX2 with FMA. Compiled with -mavx2 -mfma (see
// scripts/build_mpi_ops.sh); only called when the CPU has both.
#define TFS_ISA_NS avx2
#define TFS_ISA_AVX2 1
#define TFS_ISA_NAME "avx2"
#include "kernels_impl.h"

namespace tfshard {
const Kernels& kernels_avx2() { return avx2::table(); }
}  // namespace tfshard
