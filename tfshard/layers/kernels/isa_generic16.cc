// The decode kernels in plain C++ at 16 lanes ("generic16"): AVX-512's blocking and
// tails, run on any machine (the tests use it where the CPU has no AVX-512).
#define TFS_ISA_NS generic16
#define TFS_ISA_GENERIC 1
#define TFS_GENERIC_WIDTH 16
#define TFS_ISA_NAME "generic16"
#include "kernels_impl.h"

namespace tfshard {
const Kernels& kernels_generic16() { return generic16::table(); }
}  // namespace tfshard
