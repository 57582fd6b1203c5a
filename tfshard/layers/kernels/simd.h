// The vector primitives the decode kernels are written in, for one instruction set.
//
// Each instruction-set file (isa_avx512.cc, isa_avx2.cc, isa_generic.cc) defines
// TFS_ISA_NS (its namespace) and one of TFS_ISA_AVX512 / TFS_ISA_AVX2 / TFS_ISA_GENERIC
// (with TFS_GENERIC_WIDTH 8 or 16), then includes this header and kernels_impl.h, so the
// kernels are written once and compiled once per instruction set, with that set's
// compiler flags, in a namespace of their own (no inline function of one set can be
// picked by the linker for another). `dispatch.cc` chooses a set at run time.
//
// VF: W float lanes.  VI: W int32 lanes.
//   vzero, vset1, vload, vstore, vfma(a, b, c) = a * b + c, vadd, vsub, vmul, vmax, vhsum
//   vload_bf16(p):  W bfloat16 values widened to float (exact)
//   vload_i8f(p):   W int8 values as float (exact)
//   vload_u4(p, even, odd): the W bytes at p as 2W int4 values, unsigned (u = nibble ^ 8,
//                   so u - 8 is Keras's signed value): even = low nibbles (values 2j),
//                   odd = high nibbles (values 2j + 1), as float
//   vi_zero, vi_add, vi_tof
//   vp_load(w0, w1): W pairs (w0[n], w1[n]) of int8 values from two rows, as int16
//   vp_loadp(p):    W pairs already laid out as int16 (w0[n], w1[n]) at p (a packed panel)
//   vp_store(p, w): the W pairs to p, as vp_loadp reads them
//   vp_madd(acc, p, x01): acc[n] += x0 * w0[n] + x1 * w1[n], x01 the pair (x0, x1) as two
//                   int16 in an int32 (pair16); exact (int16 products summed in int32)
//   vi_dot4(acc, a, b): acc[i] += sum_j a[4i + j] * b[4i + j] for int8 a, b, W*4 bytes each
//   VQ: W columns x 4 contracted rows of int8 weights, each 32-bit lane one column's 4 rows
//   vq_load4(r0, r1, r2, r3, q): 4W columns of 4 weight rows as the quads q[0..3], by the
//                   in-lane unpacks: lane i of q[j] holds column quad_column(j, i)
//   vq_abs(w):      |w| bytewise (as unsigned: |-128| = 128)
//   vq_set1(x4):    four int8 inputs (one int32, x[0] low, each in [-127, 127]) in every lane
//   vq_dot(acc, aw, w, xv): acc[i] += sum_j x[j] * w[j][i], exact; aw = vq_abs(w),
//                   xv = vq_set1(x4)
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tfshard {
namespace TFS_ISA_NS {

#if defined(TFS_ISA_AVX512)

constexpr int W = 16;
struct VF { __m512 v; };
struct VI { __m512i v; };
inline VF vzero() { return {_mm512_setzero_ps()}; }
inline VF vset1(float a) { return {_mm512_set1_ps(a)}; }
inline VF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline VF vfma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vadd(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF vsub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF vmul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF vdiv(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VF vmax(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float vhsum(VF a) { return _mm512_reduce_add_ps(a.v); }
inline float vhmax(VF a) { return _mm512_reduce_max_ps(a.v); }
inline VF vload_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline VF vload_i8f(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// W bytes at p -> the W low nibbles (even) and W high nibbles (odd) as unsigned values
// u = nibble ^ 8 in [0, 15] (u - 8 is Keras's signed int4 value), as float.
inline void vload_u4(const int8_t* p, VF& even, VF& odd) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm512_xor_si512(b, _mm512_set1_epi32(0x88));
  even.v = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
  odd.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
inline VI vi_zero() { return {_mm512_setzero_si512()}; }
inline VI vi_add(VI a, VI b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline VF vi_tof(VI a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline VI vi_load(const int32_t* p) { return {_mm512_loadu_si512(p)}; }
inline void vi_store(int32_t* p, VI a) { _mm512_storeu_si512(p, a.v); }
struct VP { __m512i v; };
inline VP vp_load(const int8_t* w0, const int8_t* w1) {
  __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w0));
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w1));
  __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
  return {_mm512_cvtepi8_epi16(pairs)};  // (w0[n], w1[n]) as int16 pairs
}
inline VP vp_loadp(const int16_t* p) { return {_mm512_loadu_si512(p)}; }
inline void vp_store(int16_t* p, VP w) { _mm512_storeu_si512(p, w.v); }
inline VI vp_madd(VI acc, VP w, int32_t x01) {
#if defined(__AVX512VNNI__)
  return {_mm512_dpwssd_epi32(acc.v, w.v, _mm512_set1_epi32(x01))};
#else
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(w.v, _mm512_set1_epi32(x01)))};
#endif
}
// acc[i] += sum_j a[4i+j] * b[4i+j], int8 a and b (a dot product of 4W bytes in W lanes).
inline VI vi_dot4(VI acc, const int8_t* a, const int8_t* b) {
  __m512i a16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  __m512i b16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  __m512i lo = _mm512_madd_epi16(a16, b16);  // 16 lanes: pairs of the first 32 bytes
  __m512i a16h = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32)));
  __m512i b16h = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
  __m512i hi = _mm512_madd_epi16(a16h, b16h);
  // lanes 2i, 2i+1 of (lo ++ hi) hold the pairs of group i: add neighbours.
  __m512i even = _mm512_permutex2var_epi32(lo, _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0), hi);
  __m512i odd = _mm512_permutex2var_epi32(lo, _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1), hi);
  return {_mm512_add_epi32(acc.v, _mm512_add_epi32(even, odd))};
}
inline int32_t vi_hsum(VI a) { return _mm512_reduce_add_epi32(a.v); }
struct VQ { __m512i v; };
inline void vq_load4(const int8_t* r0, const int8_t* r1, const int8_t* r2, const int8_t* r3,
                     VQ q[4]) {
  const __m512i a = _mm512_loadu_si512(r0), b = _mm512_loadu_si512(r1);
  const __m512i c = _mm512_loadu_si512(r2), d = _mm512_loadu_si512(r3);
  const __m512i ab0 = _mm512_unpacklo_epi8(a, b), ab1 = _mm512_unpackhi_epi8(a, b);
  const __m512i cd0 = _mm512_unpacklo_epi8(c, d), cd1 = _mm512_unpackhi_epi8(c, d);
  q[0].v = _mm512_unpacklo_epi16(ab0, cd0);
  q[1].v = _mm512_unpackhi_epi16(ab0, cd0);
  q[2].v = _mm512_unpacklo_epi16(ab1, cd1);
  q[3].v = _mm512_unpackhi_epi16(ab1, cd1);
}
inline VQ vq_abs(VQ w) { return {_mm512_abs_epi8(w.v)}; }
inline VQ vq_set1(int32_t x4) { return {_mm512_set1_epi32(x4)}; }
inline VI vq_dot(VI acc, VQ aw, VQ w, VQ xv) {
  const __m512i x = xv.v;
  const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w.v), _mm512_setzero_si512(), x);
#if defined(__AVX512VNNI__)
  return {_mm512_dpbusd_epi32(acc.v, aw.v, sx)};
#else
  const __m512i p = _mm512_maddubs_epi16(aw.v, sx);
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(p, _mm512_set1_epi16(1)))};
#endif
}

#elif defined(TFS_ISA_AVX2)

constexpr int W = 8;
struct VF { __m256 v; };
struct VI { __m256i v; };
inline VF vzero() { return {_mm256_setzero_ps()}; }
inline VF vset1(float a) { return {_mm256_set1_ps(a)}; }
inline VF vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
inline VF vfma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VF vadd(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VF vsub(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF vmul(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF vdiv(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VF vmax(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float vhsum(VF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(VF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VF vload_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline VF vload_i8f(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
inline void vload_u4(const int8_t* p, VF& even, VF& odd) {
  // Each byte zero-extended into its own lane (one load), then split: the low nibble
  // masked, the high one shifted down; xor 0x88 makes both u = nibble ^ 8.
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_xor_si256(b, _mm256_set1_epi32(0x88));
  even.v = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0F)));
  odd.v = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
inline VI vi_zero() { return {_mm256_setzero_si256()}; }
inline VI vi_add(VI a, VI b) { return {_mm256_add_epi32(a.v, b.v)}; }
inline VF vi_tof(VI a) { return {_mm256_cvtepi32_ps(a.v)}; }
inline VI vi_load(const int32_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
inline void vi_store(int32_t* p, VI a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a.v); }
struct VP { __m256i v; };
inline VP vp_load(const int8_t* w0, const int8_t* w1) {
  __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w0));
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w1));
  return {_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b))};  // (w0[n], w1[n]) pairs
}
inline VP vp_loadp(const int16_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
inline void vp_store(int16_t* p, VP w) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), w.v); }
inline VI vp_madd(VI acc, VP w, int32_t x01) {
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(w.v, _mm256_set1_epi32(x01)))};
}
inline VI vi_dot4(VI acc, const int8_t* a, const int8_t* b) {
  __m256i a16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  __m256i b16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  __m256i lo = _mm256_madd_epi16(a16, b16);  // 8 lanes: pairs of bytes 0..15
  __m256i a16h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16)));
  __m256i b16h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
  __m256i hi = _mm256_madd_epi16(a16h, b16h);  // pairs of bytes 16..31
  // hadd adds neighbours within 128-bit halves: [lo0+lo1, lo2+lo3, hi0+hi1, hi2+hi3 | ...]
  __m256i s = _mm256_hadd_epi32(lo, hi);
  s = _mm256_permute4x64_epi64(s, 0xD8);  // groups back in order
  return {_mm256_add_epi32(acc.v, s)};
}
inline int32_t vi_hsum(VI a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a.v), _mm256_extracti128_si256(a.v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
struct VQ { __m256i v; };
inline void vq_load4(const int8_t* r0, const int8_t* r1, const int8_t* r2, const int8_t* r3,
                     VQ q[4]) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1));
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r2));
  const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r3));
  const __m256i ab0 = _mm256_unpacklo_epi8(a, b), ab1 = _mm256_unpackhi_epi8(a, b);
  const __m256i cd0 = _mm256_unpacklo_epi8(c, d), cd1 = _mm256_unpackhi_epi8(c, d);
  q[0].v = _mm256_unpacklo_epi16(ab0, cd0);
  q[1].v = _mm256_unpackhi_epi16(ab0, cd0);
  q[2].v = _mm256_unpacklo_epi16(ab1, cd1);
  q[3].v = _mm256_unpackhi_epi16(ab1, cd1);
}
inline VQ vq_abs(VQ w) { return {_mm256_sign_epi8(w.v, w.v)}; }
inline VQ vq_set1(int32_t x4) { return {_mm256_set1_epi32(x4)}; }
inline VI vq_dot(VI acc, VQ aw, VQ w, VQ xv) {
  // x * sign(w) times |w|: maddubs's unsigned x signed pairs (at most 2 * 128 * 127, no
  // saturation), then the pairs summed into int32.
  const __m256i sx = _mm256_sign_epi8(xv.v, w.v);
  const __m256i p = _mm256_maddubs_epi16(aw.v, sx);
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))};
}

#elif defined(TFS_ISA_GENERIC)

// Plain C++ arrays: what any x86-64 (or other) CPU runs; the compiler vectorises what
// it can for the base instruction set. TFS_GENERIC_WIDTH 16 runs the kernels' blocking
// with AVX-512's width on any machine (tests).
constexpr int W = TFS_GENERIC_WIDTH;
struct VF { float v[W]; };
struct VI { int32_t v[W]; };
inline VF vzero() { VF r; for (int i = 0; i < W; ++i) r.v[i] = 0.0f; return r; }
inline VF vset1(float a) { VF r; for (int i = 0; i < W; ++i) r.v[i] = a; return r; }
inline VF vload(const float* p) { VF r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline void vstore(float* p, VF a) { std::memcpy(p, a.v, sizeof a.v); }
inline VF vfma(VF a, VF b, VF c) { for (int i = 0; i < W; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return c; }
inline VF vadd(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
inline VF vsub(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] -= b.v[i]; return a; }
inline VF vmul(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
inline VF vdiv(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] /= b.v[i]; return a; }
inline VF vmax(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
inline float vhsum(VF a) { float s = 0.0f; for (int i = 0; i < W; ++i) s += a.v[i]; return s; }
inline float vhmax(VF a) { float s = a.v[0]; for (int i = 1; i < W; ++i) s = a.v[i] > s ? a.v[i] : s; return s; }
inline VF vload_bf16(const uint16_t* p) {
  VF r;
  for (int i = 0; i < W; ++i) { uint32_t u = static_cast<uint32_t>(p[i]) << 16; std::memcpy(&r.v[i], &u, 4); }
  return r;
}
inline VF vload_i8f(const int8_t* p) { VF r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
inline void vload_u4(const int8_t* p, VF& even, VF& odd) {
  for (int i = 0; i < W; ++i) {
    const int b = static_cast<uint8_t>(p[i]) ^ 0x88;
    even.v[i] = static_cast<float>(b & 0xF);
    odd.v[i] = static_cast<float>(b >> 4);
  }
}
inline VI vi_zero() { VI r; for (int i = 0; i < W; ++i) r.v[i] = 0; return r; }
inline VI vi_add(VI a, VI b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
inline VF vi_tof(VI a) { VF r; for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(a.v[i]); return r; }
inline VI vi_load(const int32_t* p) { VI r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline void vi_store(int32_t* p, VI a) { std::memcpy(p, a.v, sizeof a.v); }
struct VP { int16_t v[2 * W]; };
inline VP vp_load(const int8_t* w0, const int8_t* w1) {
  VP r;
  for (int i = 0; i < W; ++i) { r.v[2 * i] = w0[i]; r.v[2 * i + 1] = w1[i]; }
  return r;
}
inline VP vp_loadp(const int16_t* p) { VP r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline void vp_store(int16_t* p, VP w) { std::memcpy(p, w.v, sizeof w.v); }
inline VI vp_madd(VI acc, VP w, int32_t x01) {
  const int32_t x0 = static_cast<int16_t>(x01 & 0xFFFF), x1 = static_cast<int16_t>(x01 >> 16);
  for (int i = 0; i < W; ++i) acc.v[i] += x0 * w.v[2 * i] + x1 * w.v[2 * i + 1];
  return acc;
}
inline VI vi_dot4(VI acc, const int8_t* a, const int8_t* b) {
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < 4; ++j) acc.v[i] += a[4 * i + j] * b[4 * i + j];
  return acc;
}
inline int32_t vi_hsum(VI a) { int32_t s = 0; for (int i = 0; i < W; ++i) s += a.v[i]; return s; }
struct VQ { int8_t v[4 * W]; };  // lane i: bytes 4i .. 4i + 3
inline int quad_column(int j, int i);
inline void vq_load4(const int8_t* r0, const int8_t* r1, const int8_t* r2, const int8_t* r3,
                     VQ q[4]) {
  const int8_t* rows[4] = {r0, r1, r2, r3};
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < W; ++i)
      for (int r = 0; r < 4; ++r) q[j].v[4 * i + r] = rows[r][quad_column(j, i)];
}
inline VQ vq_abs(VQ w) { return w; }  // vq_dot multiplies the signed values directly
inline VQ vq_set1(int32_t x4) {
  VQ r;
  for (int i = 0; i < W; ++i) std::memcpy(r.v + 4 * i, &x4, 4);
  return r;
}
inline VI vq_dot(VI acc, VQ, VQ w, VQ xv) {
  for (int i = 0; i < W; ++i)
    for (int r = 0; r < 4; ++r) acc.v[i] += xv.v[4 * i + r] * w.v[4 * i + r];
  return acc;
}

#else
#error "define one of TFS_ISA_AVX512, TFS_ISA_AVX2, TFS_ISA_GENERIC"
#endif

// Column (of the 4W a vq_load4 reads) in lane i of quad j: the unpacks work within 128-bit
// lanes of 16 columns, giving quad j columns 4j .. 4j + 3 of each.
inline int quad_column(int j, int i) { return 16 * (i / 4) + 4 * j + i % 4; }

// Four int8 values as one int32 (x[0] in the low byte), for vq_dot.
inline int32_t quad8(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return v;
}

// The pair (x0, x1) of int8 values as two int16 in one int32 (low half x0), for vp_madd.
inline int32_t pair16(int8_t x0, int8_t x1) {
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(x0))) |
                              (static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(x1))) << 16));
}

}  // namespace TFS_ISA_NS
}  // namespace tfshard
