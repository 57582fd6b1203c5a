// What the decode kernels compute, independent of the instruction set.
//
// A `Weight` is one linear layer's weight as Keras stores it, read in place (never
// converted into a float copy): float32, bfloat16, int8 with a per-channel scale, int4
// packed two a byte with a per-channel scale ("i4c") or per-group scales and zero points
// ("i4g"), either as [K, N] (a Dense kernel: "kn") or as [N, K] (an embedding table used
// for logits: "nk"). `Kernels` is one instruction set's implementation of everything a
// decode step computes; `kernels()` picks the best the CPU runs (or the one
// TFSHARD_KERNELS_ISA forces: "avx512", "avx2", "generic", "generic16").
#pragma once

#include <cstdint>
#include <string>

namespace tfshard {

enum class Fmt { F32, BF16, I8, I4C, I4G };

struct Weight {
  Fmt fmt = Fmt::F32;
  bool nk = false;          // stored [N, K] (rows are outputs), else [K, N]
  bool pk = false;          // int4 [K, N] packed along K (an untied int4 reverse table):
                            // byte (j, n) holds rows 2j (low nibble) and 2j + 1 of column n
  int64_t K = 0, N = 0;     // logical shape: y[M, N] = x[M, K] @ w
  const void* data = nullptr;
  // I8, I4C: scale[N] (y = acc / scale for I4C; acc / (scale * x_scale) for I8).
  // I4G: scale and zero [G, N] for kn, [N, G] for nk; g_idx[K] the group of row k.
  const float* scale = nullptr;
  const float* zero = nullptr;
  const int32_t* g_idx = nullptr;
  int64_t groups = 0;
  const float* bias = nullptr;  // [N] or null, added to the float output

  // Bytes of one stored row (kn: a row of K; nk: a row of N; pk: a pair of rows of K).
  int64_t row_bytes() const {
    if (pk) return N;
    const int64_t len = nk ? K : N;
    switch (fmt) {
      case Fmt::F32: return 4 * len;
      case Fmt::BF16: return 2 * len;
      case Fmt::I8: return len;
      default: return (len + 1) / 2;
    }
  }
  int64_t bytes() const { return row_bytes() * (pk ? (K + 1) / 2 : (nk ? N : K)); }
};

// One instruction set's kernels. Column ranges [n0, n1) must start at a multiple of 64
// (the callers' work units), so packed int4 columns start on a byte.
struct Kernels {
  const char* name;
  int width;  // float lanes per vector
  // y[m, n] for m < M, n in [n0, n1) = x[m, :] @ w[:, n] (+ bias), dequantized for i4c/i4g;
  // x float [M, K] (row stride K), y row stride ldy. Not for I8 (see linear_i8).
  void (*linear_f)(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy,
                   int64_t n0, int64_t n1);
  // The same for I8 weights and int8 inputs, exact int32 sums (no scale, no bias).
  void (*linear_i8)(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy,
                    int64_t n0, int64_t n1);
  float (*dot)(const float* a, const float* b, int64_t n);
  float (*dot_bf16)(const float* a, const uint16_t* b, int64_t n);
  void (*axpy)(float a, const float* x, float* y, int64_t n);            // y += a x
  void (*axpy_bf16)(float a, const uint16_t* x, float* y, int64_t n);
  float (*sumsq)(const float* x, int64_t n);
  float (*absmax)(const float* x, int64_t n);
};

const Kernels& kernels_avx512();
const Kernels& kernels_avx2();
const Kernels& kernels_generic();
const Kernels& kernels_generic16();
bool cpu_has_avx512();
bool cpu_has_avx2();
// The set named (avx512, avx2, generic, generic16; "" or auto: the best the CPU runs), or
// nullptr with a message in *error when the CPU cannot run it or the name is unknown.
const Kernels* kernels_named(const std::string& name, std::string* error);
// The set to use: TFSHARD_KERNELS_ISA's if set, else the best the CPU runs.
const Kernels* kernels(std::string* error);

// bfloat16 <-> float, round to nearest even (as TensorFlow and Eigen round).
inline float bf16_to_f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float round_bf16(float f) { return bf16_to_f(f_to_bf16(f)); }

}  // namespace tfshard
