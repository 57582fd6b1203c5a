// Which instruction set's kernels run: the best this CPU has, or TFSHARD_KERNELS_ISA's.
#include <cstdlib>
#include <string>

#include "kernels.h"

namespace tfshard {

bool cpu_has_avx512() {
  // isa_avx512.cc is compiled with VNNI (its int8 dot products): a CPU without it
  // (Skylake-SP) runs the AVX2 set.
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return yes;
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

const Kernels* kernels_named(const std::string& want, std::string* error) {
  if (want.empty() || want == "auto") {
    if (cpu_has_avx512()) return &kernels_avx512();
    if (cpu_has_avx2()) return &kernels_avx2();
    return &kernels_generic();
  }
  if (want == "avx512") {
    if (cpu_has_avx512()) return &kernels_avx512();
    *error = "avx512 kernels asked for, but this CPU has no AVX-512 (F, BW, VL and VNNI); use avx2, "
             "generic or generic16";
    return nullptr;
  }
  if (want == "avx2") {
    if (cpu_has_avx2()) return &kernels_avx2();
    *error = "avx2 kernels asked for, but this CPU has no AVX2 with FMA; use generic or generic16";
    return nullptr;
  }
  if (want == "generic") return &kernels_generic();
  if (want == "generic16") return &kernels_generic16();
  *error = "kernels '" + want + "' asked for: not one of avx512, avx2, generic, generic16, auto";
  return nullptr;
}

const Kernels* kernels(std::string* error) {
  const char* forced = std::getenv("TFSHARD_KERNELS_ISA");
  const Kernels* k = kernels_named(forced ? forced : "", error);
  if (k == nullptr) *error = "TFSHARD_KERNELS_ISA: " + *error + " (or unset it)";
  return k;
}

}  // namespace tfshard

// For tests (through ctypes, on numpy buffers): one instruction set's linear kernel on one
// weight, every column. fmt: 0 f32, 1 bf16, 2 i8, 3 i4c, 4 i4g (kernels.h's Fmt order);
// layout: 0 kn, 1 nk, 2 pk (int4 [K, N] packed along K).
// Float weights read x and write y; I8 reads xq and writes yi. Returns 0, or -1 when the
// instruction set is unknown or this CPU cannot run it.
extern "C" int tfshard_kernels_linear(const char* isa, int fmt, int layout, int64_t K, int64_t N,
                                      const void* data, const float* scale, const float* zero,
                                      const int32_t* g_idx, int64_t groups, const float* bias,
                                      const float* x, const int8_t* xq, int64_t M, float* y,
                                      int32_t* yi) {
  std::string error;
  const tfshard::Kernels* k = tfshard::kernels_named(isa, &error);
  if (k == nullptr || fmt < 0 || fmt > 4) return -1;
  tfshard::Weight w;
  w.fmt = static_cast<tfshard::Fmt>(fmt);
  w.nk = layout == 1;
  w.pk = layout == 2;
  if (w.pk && fmt != 3 && fmt != 4) return -1;
  w.K = K;
  w.N = N;
  w.data = data;
  w.scale = scale;
  w.zero = zero;
  w.g_idx = g_idx;
  w.groups = groups;
  w.bias = bias;
  if (w.fmt == tfshard::Fmt::I8) k->linear_i8(w, xq, M, yi, N, 0, N);
  else k->linear_f(w, x, M, y, N, 0, N);
  return 0;
}
