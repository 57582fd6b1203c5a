// The decode kernels in plain C++ for any CPU, 8 lanes ("generic"): the compiler
// vectorises what it can for the base instruction set.
#define TFS_ISA_NS generic
#define TFS_ISA_GENERIC 1
#define TFS_GENERIC_WIDTH 8
#define TFS_ISA_NAME "generic"
#include "kernels_impl.h"

namespace tfshard {
const Kernels& kernels_generic() { return generic::table(); }
}  // namespace tfshard
