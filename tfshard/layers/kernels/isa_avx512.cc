// The decode kernels for AVX-512 (F, BW, VL and VNNI's dpwssd / dpbusd). Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma (see scripts/build_mpi_ops.sh); only
// called when the CPU has all four (dispatch.cc).
#define TFS_ISA_NS avx512
#define TFS_ISA_AVX512 1
#define TFS_ISA_NAME "avx512"
#include "kernels_impl.h"

namespace tfshard {
const Kernels& kernels_avx512() { return avx512::table(); }
}  // namespace tfshard
