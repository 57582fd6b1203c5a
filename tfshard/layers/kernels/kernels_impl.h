// The decode kernels, written once over simd.h's primitives; included by each
// instruction-set file after simd.h (see there). Everything here reads a weight in the
// layout Keras stores it and never makes a float copy of it: bfloat16 is widened and
// int4 unpacked in registers, a vector at a time.
//
// kn weights ([K, N], a Dense kernel) are streamed a row at a time: for a block of up to
// NB columns, the partial sums of up to MB input rows stay in a buffer (L1/L2) while rows
// of the weight go by, four at a time. nk weights ([N, K], an embedding table giving
// logits) are dot products, one output column per stored row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace tfshard {
namespace TFS_ISA_NS {

constexpr int64_t NB = 2048;  // columns per block (a multiple of every W): long runs of
                              // each weight row (fewer pages touched per row, TLB-friendly)
constexpr int MB = 8;        // input rows per pass over a block
constexpr int64_t PF_ROWS = 8;  // kn: rows ahead to prefetch (the hardware's prefetch
                                // falls behind on four short rows read at once)

// A thread's buffers, one per use (kernels that share a use never nest), kept between
// calls: each call fills what it reads, so none is cleared (a vector's zero-fill of a
// 128 KiB panel on every call cost as much as packing it), and none sits on the stack of
// every thread that may run a kernel.
enum Buffer : int {
  kSums,       // partial sums: the streaming kernels' MB x NB, a panel kernel's M x PW
  kGroupSums,  // int4: one group's partial sums, the same shape
  kPanel,      // a panel kernel's packed weights
  kInputs,     // int8 panels: the inputs widened to int16
  kFoldScale,  // fold_group: a group's scales in the sums' column order
  kFoldZero,   // fold_group: -(zero point + 8), likewise
};
template <typename T, Buffer kUse>
inline T* thread_buffer(size_t n) {
  static thread_local std::vector<T> b;
  if (b.size() < n) b.resize(n);
  return b.data();
}

template <Fmt F>
inline VF load_w(const uint8_t* row, int64_t j) {
  if constexpr (F == Fmt::F32) {
    return vload(reinterpret_cast<const float*>(row) + j);
  } else {
    return vload_bf16(reinterpret_cast<const uint16_t*>(row) + j);
  }
}

template <Fmt F>
inline float load_w1(const uint8_t* row, int64_t j) {
  if constexpr (F == Fmt::F32) {
    return reinterpret_cast<const float*>(row)[j];
  } else {
    return bf16_to_f(reinterpret_cast<const uint16_t*>(row)[j]);
  }
}

// Int4 value j of a packed row, unsigned: u = nibble ^ 8 (Keras's value is u - 8).
inline float load_u1(const uint8_t* row, int64_t j) {
  return static_cast<float>(((row[j / 2] >> ((j & 1) * 4)) & 0xF) ^ 8);
}

// acc[m * NB + j] += sum_{k in [ks, ke)} x[m * K + k] * w[k, nb + j], j < width.
template <Fmt F>
inline void kn_accumulate(const uint8_t* base, int64_t rb, const float* x, int64_t K, int mb,
                          int64_t ks, int64_t ke, int64_t nb, int64_t width, float* acc) {
  const int64_t vend = width / W * W;
  int64_t k = ks;
  for (; k + 4 <= ke; k += 4) {
    const uint8_t* r0 = base + k * rb;
    const uint8_t* r1 = r0 + rb;
    const uint8_t* r2 = r1 + rb;
    const uint8_t* r3 = r2 + rb;
    const bool prefetch = k + PF_ROWS + 4 <= ke;
    constexpr int64_t bytes = F == Fmt::F32 ? 4 : 2;  // of one weight
    for (int64_t j = 0; j < vend; j += W) {
      if (prefetch)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) __builtin_prefetch(r0 + (PF_ROWS + i) * rb + (nb + j) * bytes);
      const VF w0 = load_w<F>(r0, nb + j), w1 = load_w<F>(r1, nb + j);
      const VF w2 = load_w<F>(r2, nb + j), w3 = load_w<F>(r3, nb + j);
      for (int m = 0; m < mb; ++m) {
        const float* xm = x + m * K + k;
        float* a = acc + m * NB + j;
        VF s = vfma(vset1(xm[0]), w0, vload(a));
        VF t = vmul(vset1(xm[1]), w1);
        s = vfma(vset1(xm[2]), w2, s);
        t = vfma(vset1(xm[3]), w3, t);
        vstore(a, vadd(s, t));
      }
    }
    for (int64_t j = vend; j < width; ++j) {  // the vector lanes' arithmetic, one lane
      const float w0 = load_w1<F>(r0, nb + j), w1 = load_w1<F>(r1, nb + j);
      const float w2 = load_w1<F>(r2, nb + j), w3 = load_w1<F>(r3, nb + j);
      for (int m = 0; m < mb; ++m) {
        const float* xm = x + m * K + k;
        float* a = acc + m * NB + j;
        const float s = std::fma(xm[2], w2, std::fma(xm[0], w0, *a));
        const float t = std::fma(xm[3], w3, xm[1] * w1);
        *a = s + t;
      }
    }
  }
  for (; k < ke; ++k) {
    const uint8_t* r0 = base + k * rb;
    for (int64_t j = 0; j < vend; j += W) {
      const VF w0 = load_w<F>(r0, nb + j);
      for (int m = 0; m < mb; ++m) {
        float* a = acc + m * NB + j;
        vstore(a, vfma(vset1(x[m * K + k]), w0, vload(a)));
      }
    }
    for (int64_t j = vend; j < width; ++j) {
      const float w0 = load_w1<F>(r0, nb + j);
      for (int m = 0; m < mb; ++m) acc[m * NB + j] = std::fma(x[m * K + k], w0, acc[m * NB + j]);
    }
  }
}

template <Fmt F>
void kn_f(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
          int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), K = w.K;
  float* acc = thread_buffer<float, kSums>(MB * NB);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t width = std::min(NB, n1 - nb);
      for (int m = 0; m < mb; ++m) std::fill(acc + m * NB, acc + m * NB + width, 0.0f);
      kn_accumulate<F>(base, rb, x + m0 * K, K, mb, 0, K, nb, width, acc);
      for (int m = 0; m < mb; ++m) {
        float* out = y + (m0 + m) * ldy + nb;
        const float* a = acc + m * NB;
        for (int64_t j = 0; j < width; ++j) out[j] = w.bias ? a[j] + w.bias[nb + j] : a[j];
      }
    }
  }
}

// Runs of consecutive contracted rows in one int4 group (one run [0, K) without groups),
// and every input row's sum over each run (for the zero point and the -8 of u = q + 8).
struct Runs {
  std::vector<int64_t> start, stop;
  std::vector<int32_t> group;
  std::vector<float> xs;  // [M, runs]
};

inline Runs int4_runs(const Weight& w, const float* x, int64_t M, bool grouped) {
  Runs r;
  const int64_t K = w.K;
  int64_t ks = 0;
  while (ks < K) {
    int64_t ke = K;
    int32_t g = 0;
    if (grouped) {
      g = w.g_idx[ks];
      ke = ks + 1;
      while (ke < K && w.g_idx[ke] == g) ++ke;
    }
    r.start.push_back(ks);
    r.stop.push_back(ke);
    r.group.push_back(g);
    ks = ke;
  }
  const int64_t n = static_cast<int64_t>(r.start.size());
  r.xs.assign(M * n, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n; ++i) {
      float t = 0.0f;
      for (int64_t k = r.start[i]; k < r.stop[i]; ++k) t += x[m * K + k];
      r.xs[m * n + i] = t;
    }
  return r;
}

// int4, kn (packed along N): W bytes give W even and W odd columns, accumulated apart
// (no shuffle to interleave them) in a block laid out as chunks of [W even, W odd]; the
// sums are of x * u with u = q + 8 in [0, 15], corrected by 8 * sum(x) (and the zero
// point, per group) when folded.
inline int64_t i4_column(int64_t p, int64_t vend) {
  if (p >= vend) return p;
  const int64_t c = p / (2 * W), i = p % (2 * W);
  return c * 2 * W + (i < W ? 2 * i : 2 * (i - W) + 1);
}

// One int4 group's sums folded into the row sums, for `rows` rows:
//   acc[m, p] += s[c] * (g[m, p] - (z[c] + 8) * xs[m]),  c = i4_column(p, vend),
// as two fused multiply-adds a value (the sums are in the kernels' column order, so the
// group's scale and zero point are put in that order once, then read by every row).
inline void fold_group(float* acc, int64_t lda, const float* g, int64_t ldg, int rows,
                       const float* xs, int64_t xs_step, const float* s, const float* z,
                       int64_t width, int64_t vend) {
  const int64_t padded = (width + W - 1) / W * W;
  float* sp = thread_buffer<float, kFoldScale>(padded);
  float* zn = thread_buffer<float, kFoldZero>(padded);
  for (int64_t p = 0; p < padded; ++p) {
    const int64_t c = p < width ? i4_column(p, vend) : 0;
    sp[p] = p < width ? s[c] : 0.0f;
    zn[p] = p < width ? -(z[c] + 8.0f) : 0.0f;
  }
  alignas(64) float ta[W], tg[W];
  for (int m = 0; m < rows; ++m) {
    float* a = acc + m * lda;
    const float* gm = g + m * ldg;
    const VF x = vset1(xs[m * xs_step]);
    int64_t p = 0;
    for (; p + W <= width; p += W)
      vstore(a + p, vfma(vload(sp + p), vfma(vload(zn + p), x, vload(gm + p)), vload(a + p)));
    if (p < width) {  // the last part vector: the same arithmetic on a copy
      std::fill(ta, ta + W, 0.0f);
      std::fill(tg, tg + W, 0.0f);
      std::copy(a + p, a + width, ta);
      std::copy(gm + p, gm + width, tg);
      vstore(ta, vfma(vload(sp + p), vfma(vload(zn + p), x, vload(tg)), vload(ta)));
      std::copy(ta, ta + (width - p), a + p);
    }
  }
}

inline void kn_i4_accumulate(const uint8_t* base, int64_t rb, const float* x, int64_t K, int mb,
                             int64_t ks, int64_t ke, int64_t nb, int64_t width, int64_t vend,
                             float* acc) {
  int64_t k = ks;
  for (; k + 4 <= ke; k += 4) {  // four rows a pass: the partial sums move half as often
    const int8_t* r0 = reinterpret_cast<const int8_t*>(base + k * rb) + nb / 2;
    const int8_t* r1 = r0 + rb;
    const int8_t* r2 = r1 + rb;
    const int8_t* r3 = r2 + rb;
    const bool prefetch = k + PF_ROWS + 4 <= ke;
    for (int64_t p = 0; p < vend; p += 2 * W) {
      if (prefetch)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) __builtin_prefetch(r0 + (PF_ROWS + i) * rb + p / 2);
      VF e0, o0, e1, o1, e2, o2, e3, o3;
      vload_u4(r0 + p / 2, e0, o0);
      vload_u4(r1 + p / 2, e1, o1);
      vload_u4(r2 + p / 2, e2, o2);
      vload_u4(r3 + p / 2, e3, o3);
      for (int m = 0; m < mb; ++m) {
        const float* xm = x + m * K + k;
        const VF x0 = vset1(xm[0]), x1 = vset1(xm[1]), x2 = vset1(xm[2]), x3 = vset1(xm[3]);
        float* ae = acc + m * NB + p;
        float* ao = ae + W;
        vstore(ae, vfma(x3, e3, vfma(x2, e2, vfma(x1, e1, vfma(x0, e0, vload(ae))))));
        vstore(ao, vfma(x3, o3, vfma(x2, o2, vfma(x1, o1, vfma(x0, o0, vload(ao))))));
      }
    }
    for (int64_t p = vend; p < width; ++p) {
      for (int m = 0; m < mb; ++m) {
        float* a = acc + m * NB + p;
        for (int j = 0; j < 4; ++j)
          *a = std::fma(x[m * K + k + j], load_u1(base + (k + j) * rb, nb + p), *a);
      }
    }
  }
  for (; k + 2 <= ke; k += 2) {
    const int8_t* r0 = reinterpret_cast<const int8_t*>(base + k * rb) + nb / 2;
    const int8_t* r1 = r0 + rb;
    for (int64_t p = 0; p < vend; p += 2 * W) {
      VF e0, o0, e1, o1;
      vload_u4(r0 + p / 2, e0, o0);
      vload_u4(r1 + p / 2, e1, o1);
      for (int m = 0; m < mb; ++m) {
        const VF x0 = vset1(x[m * K + k]), x1 = vset1(x[m * K + k + 1]);
        float* ae = acc + m * NB + p;
        float* ao = ae + W;
        vstore(ae, vfma(x1, e1, vfma(x0, e0, vload(ae))));
        vstore(ao, vfma(x1, o1, vfma(x0, o0, vload(ao))));
      }
    }
    for (int64_t p = vend; p < width; ++p) {
      const float u0 = load_u1(base + k * rb, nb + p), u1 = load_u1(base + (k + 1) * rb, nb + p);
      for (int m = 0; m < mb; ++m) {
        float* a = acc + m * NB + p;
        *a = std::fma(x[m * K + k + 1], u1, std::fma(x[m * K + k], u0, *a));
      }
    }
  }
  for (; k < ke; ++k) {
    const int8_t* r0 = reinterpret_cast<const int8_t*>(base + k * rb) + nb / 2;
    for (int64_t p = 0; p < vend; p += 2 * W) {
      VF e0, o0;
      vload_u4(r0 + p / 2, e0, o0);
      for (int m = 0; m < mb; ++m) {
        const VF x0 = vset1(x[m * K + k]);
        float* ae = acc + m * NB + p;
        vstore(ae, vfma(x0, e0, vload(ae)));
        vstore(ae + W, vfma(x0, o0, vload(ae + W)));
      }
    }
    for (int64_t p = vend; p < width; ++p) {
      const float u0 = load_u1(base + k * rb, nb + p);
      for (int m = 0; m < mb; ++m) acc[m * NB + p] = std::fma(x[m * K + k], u0, acc[m * NB + p]);
    }
  }
}

template <bool kGrouped>
void kn_i4(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), K = w.K, N = w.N;
  const Runs runs = int4_runs(w, x, M, kGrouped);
  const int64_t nruns = static_cast<int64_t>(runs.start.size());
  float* acc = thread_buffer<float, kSums>(MB * NB);
  float* gacc = thread_buffer<float, kGroupSums>(MB * NB);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const float* xb = x + m0 * K;
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t width = std::min(NB, n1 - nb), vend = width / (2 * W) * (2 * W);
      for (int m = 0; m < mb; ++m) std::fill(acc + m * NB, acc + m * NB + width, 0.0f);
      if constexpr (kGrouped) {
        for (int64_t i = 0; i < nruns; ++i) {
          for (int m = 0; m < mb; ++m) std::fill(gacc + m * NB, gacc + m * NB + width, 0.0f);
          kn_i4_accumulate(base, rb, xb, K, mb, runs.start[i], runs.stop[i], nb, width, vend,
                           gacc);
          const float* s = w.scale + static_cast<int64_t>(runs.group[i]) * N + nb;
          const float* z = w.zero + static_cast<int64_t>(runs.group[i]) * N + nb;
          fold_group(acc, NB, gacc, NB, mb, runs.xs.data() + m0 * nruns + i, nruns, s, z,
                     width, vend);
        }
      } else {
        kn_i4_accumulate(base, rb, xb, K, mb, 0, K, nb, width, vend, acc);
      }
      for (int m = 0; m < mb; ++m) {
        float* out = y + (m0 + m) * ldy + nb;
        const float* a = acc + m * NB;
        for (int64_t p = 0; p < width; ++p) {
          const int64_t c = i4_column(p, vend);
          float v = a[p];
          if constexpr (!kGrouped) v = (v - 8.0f * runs.xs[m0 + m]) / w.scale[nb + c];
          if (w.bias) v = v + w.bias[nb + c];
          out[c] = v;
        }
      }
    }
  }
}

// int4 packed along K ("pk", an untied int4 reverse table [K, N]): each stored row of N
// bytes holds two rows of the weight, already in column order: the low nibbles row 2j,
// the high ones row 2j + 1.
inline void pk_i4_accumulate(const uint8_t* base, int64_t N, const float* x, int64_t K, int mb,
                             int64_t ks, int64_t ke, int64_t nb, int64_t width, float* acc) {
  const int64_t vend = width / W * W;
  auto one_row = [&](int64_t k) {  // row k alone: one nibble of packed row k / 2
    const int8_t* row = reinterpret_cast<const int8_t*>(base + (k / 2) * N) + nb;
    const bool high = k & 1;
    for (int64_t p = 0; p < vend; p += W) {
      VF lo, hi;
      vload_u4(row + p, lo, hi);
      const VF u = high ? hi : lo;
      for (int m = 0; m < mb; ++m) {
        float* a = acc + m * NB + p;
        vstore(a, vfma(vset1(x[m * K + k]), u, vload(a)));
      }
    }
    for (int64_t p = vend; p < width; ++p) {
      const float u = static_cast<float>(((static_cast<uint8_t>(row[p]) >> (high ? 4 : 0)) & 0xF) ^ 8);
      for (int m = 0; m < mb; ++m) acc[m * NB + p] += x[m * K + k] * u;
    }
  };
  int64_t k = ks;
  if (k < ke && (k & 1)) one_row(k++);
  for (; k + 2 <= ke; k += 2) {
    const int8_t* row = reinterpret_cast<const int8_t*>(base + (k / 2) * N) + nb;
    for (int64_t p = 0; p < vend; p += W) {
      VF lo, hi;
      vload_u4(row + p, lo, hi);
      for (int m = 0; m < mb; ++m) {
        float* a = acc + m * NB + p;
        vstore(a, vfma(vset1(x[m * K + k + 1]), hi, vfma(vset1(x[m * K + k]), lo, vload(a))));
      }
    }
    for (int64_t p = vend; p < width; ++p) {
      const int b = static_cast<uint8_t>(row[p]) ^ 0x88;
      const float lo = static_cast<float>(b & 0xF), hi = static_cast<float>(b >> 4);
      for (int m = 0; m < mb; ++m) acc[m * NB + p] += x[m * K + k] * lo + x[m * K + k + 1] * hi;
    }
  }
  if (k < ke) one_row(k);
}

template <bool kGrouped>
void pk_i4(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t K = w.K, N = w.N;
  const Runs runs = int4_runs(w, x, M, kGrouped);
  const int64_t nruns = static_cast<int64_t>(runs.start.size());
  float* acc = thread_buffer<float, kSums>(MB * NB);
  float* gacc = thread_buffer<float, kGroupSums>(MB * NB);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const float* xb = x + m0 * K;
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t width = std::min(NB, n1 - nb);
      for (int m = 0; m < mb; ++m) std::fill(acc + m * NB, acc + m * NB + width, 0.0f);
      if constexpr (kGrouped) {
        for (int64_t i = 0; i < nruns; ++i) {
          for (int m = 0; m < mb; ++m) std::fill(gacc + m * NB, gacc + m * NB + width, 0.0f);
          pk_i4_accumulate(base, N, xb, K, mb, runs.start[i], runs.stop[i], nb, width, gacc);
          const float* s = w.scale + static_cast<int64_t>(runs.group[i]) * N + nb;
          const float* z = w.zero + static_cast<int64_t>(runs.group[i]) * N + nb;
          for (int m = 0; m < mb; ++m) {
            const float xs = runs.xs[(m0 + m) * nruns + i];
            float* a = acc + m * NB;
            const float* ga = gacc + m * NB;
            for (int64_t p = 0; p < width; ++p) a[p] += s[p] * (ga[p] - (z[p] + 8.0f) * xs);
          }
        }
      } else {
        pk_i4_accumulate(base, N, xb, K, mb, 0, K, nb, width, acc);
      }
      for (int m = 0; m < mb; ++m) {
        float* out = y + (m0 + m) * ldy + nb;
        const float* a = acc + m * NB;
        for (int64_t p = 0; p < width; ++p) {
          float v = a[p];
          if constexpr (!kGrouped) v = (v - 8.0f * runs.xs[m0 + m]) / w.scale[nb + p];
          if (w.bias) v = v + w.bias[nb + p];
          out[p] = v;
        }
      }
    }
  }
}

// nk: y[m, n] = x[m, :] . w[n, :], one stored row per output column; four stored rows at a
// time share each load of x (and give four independent chains of FMAs).
constexpr int NR = 4;

template <Fmt F>
void nk_f(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
          int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), K = w.K, kend = K / W * W;
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
    const uint8_t* rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = base + (n + std::min(r, nr - 1)) * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      VF acc[NR] = {vzero(), vzero(), vzero(), vzero()};
      for (int64_t k = 0; k < kend; k += W) {
        const VF xv = vload(xm + k);
        for (int r = 0; r < NR; ++r) acc[r] = vfma(xv, load_w<F>(rows[r], k), acc[r]);
      }
      for (int r = 0; r < nr; ++r) {
        float v = vhsum(acc[r]);
        for (int64_t k = kend; k < K; ++k) v += xm[k] * load_w1<F>(rows[r], k);
        y[m * ldy + n + r] = w.bias ? v + w.bias[n + r] : v;
      }
    }
  }
}

// int4, nk (packed along K, an int4 embedding table): x split once into its even and odd
// entries, which meet the low and high nibbles of each stored row; four stored rows at a
// time share each load of x.
template <bool kGrouped>
void nk_i4(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), K = w.K, half = rb;
  std::vector<float> split(2 * M * half, 0.0f);  // per row m: [even | odd]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) split[(2 * m + (k & 1)) * half + k / 2] = x[m * K + k];
  const Runs runs = int4_runs(w, x, M, kGrouped);
  const int64_t nruns = static_cast<int64_t>(runs.start.size());
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
    const uint8_t* rows[NR];
    for (int r = 0; r < NR; ++r) rows[r] = base + (n + std::min(r, nr - 1)) * rb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      const float* xe = split.data() + 2 * m * half;
      float out[NR] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t i = 0; i < nruns; ++i) {
        const int64_t ke = runs.stop[i];
        VF acc[NR] = {vzero(), vzero(), vzero(), vzero()};
        float tail[NR] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t k = runs.start[i];
        if (k & 1) {
          for (int r = 0; r < nr; ++r) tail[r] += xm[k] * load_u1(rows[r], k);
          ++k;
        }
        for (; k + 2 * W <= ke; k += 2 * W) {
          const VF ev = vload(xe + k / 2), ov = vload(xe + half + k / 2);
          for (int r = 0; r < NR; ++r) {
            VF e, o;
            vload_u4(reinterpret_cast<const int8_t*>(rows[r]) + k / 2, e, o);
            acc[r] = vfma(ov, o, vfma(ev, e, acc[r]));
          }
        }
        for (; k < ke; ++k)
          for (int r = 0; r < nr; ++r) tail[r] += xm[k] * load_u1(rows[r], k);
        const float xs = runs.xs[m * nruns + i];
        for (int r = 0; r < nr; ++r) {
          const float dot = vhsum(acc[r]) + tail[r];
          if constexpr (kGrouped) {
            const int64_t at = (n + r) * w.groups + runs.group[i];
            out[r] += w.scale[at] * (dot - (w.zero[at] + 8.0f) * xs);
          } else {
            out[r] += dot - 8.0f * xs;
          }
        }
      }
      for (int r = 0; r < nr; ++r) {
        float v = out[r];
        if constexpr (!kGrouped) v = v / w.scale[n + r];
        if (w.bias) v = v + w.bias[n + r];
        y[m * ldy + n + r] = v;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Many rows (a prompt): kn weights as GEMM panels. A panel is KB contracted rows x PW
// columns of the weight as the float kernel would hold them (bfloat16 widened, int4
// unpacked and dequantized as Keras dequantizes: per group (q - zero) * scale, per
// channel q with the scale after the sum), packed once and read by every input row; a
// micro-tile keeps TR x (TV * W) outputs in registers. int8 packs int16 pairs of rows and
// sums exactly in int32. Below GEMM_ROWS rows the streaming kernels above read less.

// Full unrolling of a micro-tile's loops over its rows and vectors (compile-time counts):
// at -O2 GCC keeps them as loops, and the accumulators went to the stack.
#define TFS_UNROLL _Pragma("GCC unroll 16")

constexpr int64_t GEMM_ROWS = 8;  // more input rows than this: the panel kernels
constexpr int64_t KB = 256;       // contracted rows per panel
constexpr int TR = 4;             // input rows per micro-tile
constexpr int TV = 2;             // vectors per micro-tile
constexpr int64_t PW = 4 * TV * W;  // panel width: four micro-tiles of columns
// int4's micro-tiles (one FMA a row, no groups of four): as wide as the registers allow
// (4 x 4 accumulators of AVX-512's 32), two to a panel.
constexpr int TV4 = W >= 16 ? 4 : TV;

// A panel's columns padded to whole micro-tiles (which read `tile` columns at a time);
// the rest of its width is never read.
inline int64_t tile_pad(int64_t width, int64_t tile) { return (width + tile - 1) / tile * tile; }

template <Fmt F>
void pack_panel(const Weight& w, int64_t k0, int64_t kb, int64_t nb, int64_t width, float* P) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), pad = tile_pad(width, TV * W);
  for (int64_t k = 0; k < kb; ++k) {
    const uint8_t* row = base + (k0 + k) * rb;
    float* out = P + k * PW;
    int64_t j = 0;
    for (; j + W <= width; j += W) vstore(out + j, load_w<F>(row, nb + j));
    for (; j < width; ++j) out[j] = load_w1<F>(row, nb + j);
    for (; j < pad; ++j) out[j] = 0.0f;
  }
}

// int4: the panel holds u = q + 8 (0..15) of each value, in the streaming kernels' column
// order (chunks of W even columns then W odd ones: vload_u4's, no shuffle), as floats.
void pack_panel_u4(const Weight& w, int64_t k0, int64_t kb, int64_t nb, int64_t width,
                   float* P) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), vend = width / (2 * W) * (2 * W);
  const int64_t pad = tile_pad(width, TV4 * W);
  for (int64_t k = 0; k < kb; ++k) {
    const uint8_t* row = base + (k0 + k) * rb;
    const int8_t* bytes = reinterpret_cast<const int8_t*>(row) + nb / 2;
    float* out = P + k * PW;
    int64_t p = 0;
    for (; p < vend; p += 2 * W) {
      VF e, o;
      vload_u4(bytes + p / 2, e, o);
      vstore(out + p, e);
      vstore(out + p + W, o);
    }
    for (; p < width; ++p) out[p] = load_u1(row, nb + p);
    for (; p < pad; ++p) out[p] = 0.0f;
  }
}

// A micro-tile: y[r, :cols] carried through rows [0, kb) of the panel, each row's sum in
// the streaming kernels' order (so a row's bits do not depend on how many rows run with
// it): kFour, float32 and bfloat16's groups of four (two chains, joined), else one FMA
// a row (int4's).
template <int R, bool kFour, int TVN = TV>
inline void micro_f(const float* x, int64_t ldx, const float* P, int64_t kb, float* y,
                    int64_t ldy, int64_t cols) {
  alignas(64) float tmp[TVN * W];
  VF acc[R][TVN];
  TFS_UNROLL
  for (int r = 0; r < R; ++r) {
    std::fill(tmp, tmp + TVN * W, 0.0f);
    std::copy(y + r * ldy, y + r * ldy + cols, tmp);
    TFS_UNROLL
    for (int v = 0; v < TVN; ++v) acc[r][v] = vload(tmp + v * W);
  }
  int64_t k = 0;
  if constexpr (kFour) {
    for (; k + 4 <= kb; k += 4) {
      VF b0[TVN], b1[TVN], b2[TVN], b3[TVN];
      TFS_UNROLL
      for (int v = 0; v < TVN; ++v) {
        b0[v] = vload(P + k * PW + v * W);
        b1[v] = vload(P + (k + 1) * PW + v * W);
        b2[v] = vload(P + (k + 2) * PW + v * W);
        b3[v] = vload(P + (k + 3) * PW + v * W);
      }
      TFS_UNROLL
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * ldx + k;
        const VF a0 = vset1(xr[0]), a1 = vset1(xr[1]), a2 = vset1(xr[2]), a3 = vset1(xr[3]);
        TFS_UNROLL
        for (int v = 0; v < TVN; ++v) {
          VF s0 = vfma(a0, b0[v], acc[r][v]);
          VF t0 = vmul(a1, b1[v]);
          s0 = vfma(a2, b2[v], s0);
          t0 = vfma(a3, b3[v], t0);
          acc[r][v] = vadd(s0, t0);
        }
      }
    }
  }
  for (; k < kb; ++k) {
    VF b[TVN];
    TFS_UNROLL
    for (int v = 0; v < TVN; ++v) b[v] = vload(P + k * PW + v * W);
    TFS_UNROLL
    for (int r = 0; r < R; ++r) {
      const VF a = vset1(x[r * ldx + k]);
      TFS_UNROLL
      for (int v = 0; v < TVN; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  TFS_UNROLL
  for (int r = 0; r < R; ++r) {
    TFS_UNROLL
    for (int v = 0; v < TVN; ++v) vstore(tmp + v * W, acc[r][v]);
    std::copy(tmp, tmp + cols, y + r * ldy);
  }
}

template <Fmt F>
void kn_gemm_f(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  const int64_t K = w.K;
  float* panel = thread_buffer<float, kPanel>(KB * PW);
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0.0f);
  for (int64_t nb = n0; nb < n1; nb += PW) {
    const int64_t width = std::min(PW, n1 - nb);
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0);
      pack_panel<F>(w, k0, kb, nb, width, panel);
      for (int64_t j0 = 0; j0 < width; j0 += TV * W) {
        const int64_t cols = std::min<int64_t>(TV * W, width - j0);
        const float* P = panel + j0;
        int64_t m = 0;
        for (; m + TR <= M; m += TR)
          micro_f<TR, true>(x + m * K + k0, K, P, kb, y + m * ldy + nb + j0, ldy, cols);
        for (; m < M; ++m)
          micro_f<1, true>(x + m * K + k0, K, P, kb, y + m * ldy + nb + j0, ldy, cols);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float* out = y + m * ldy + nb;
      for (int64_t j = 0; j < width; ++j) {
        if (w.bias) out[j] += w.bias[nb + j];
      }
    }
  }
}

// int4: per group (a run of contracted rows; the whole of K per channel) the panels give
// sums of x * u; folded as the streaming kernel folds them: scale * (sum - (zero + 8) *
// sum(x)) per group, (sum - 8 * sum(x)) / scale per channel.
template <bool kGrouped>
void kn_gemm_i4(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
                int64_t n1) {
  const int64_t K = w.K, N = w.N;
  const Runs runs = int4_runs(w, x, M, kGrouped);
  const int64_t nruns = static_cast<int64_t>(runs.start.size());
  float* panel = thread_buffer<float, kPanel>(KB * PW);
  float* acc = thread_buffer<float, kSums>(M * PW);
  float* gacc = thread_buffer<float, kGroupSums>(M * PW);
  for (int64_t nb = n0; nb < n1; nb += PW) {
    const int64_t width = std::min(PW, n1 - nb), vend = width / (2 * W) * (2 * W);
    std::fill(acc, acc + M * PW, 0.0f);
    for (int64_t i = 0; i < nruns; ++i) {
      float* sums = kGrouped ? gacc : acc;
      if (kGrouped) std::fill(gacc, gacc + M * PW, 0.0f);
      for (int64_t k0 = runs.start[i]; k0 < runs.stop[i]; k0 += KB) {
        const int64_t kb = std::min(KB, runs.stop[i] - k0);
        pack_panel_u4(w, k0, kb, nb, width, panel);
        for (int64_t j0 = 0; j0 < width; j0 += TV4 * W) {
          const int64_t cols = std::min<int64_t>(TV4 * W, width - j0);
          const float* P = panel + j0;
          int64_t m = 0;
          for (; m + TR <= M; m += TR)
            micro_f<TR, false, TV4>(x + m * K + k0, K, P, kb, sums + m * PW + j0, PW, cols);
          for (; m < M; ++m)
            micro_f<1, false, TV4>(x + m * K + k0, K, P, kb, sums + m * PW + j0, PW, cols);
        }
      }
      if constexpr (kGrouped) {
        const float* sc = w.scale + static_cast<int64_t>(runs.group[i]) * N + nb;
        const float* z = w.zero + static_cast<int64_t>(runs.group[i]) * N + nb;
        fold_group(acc, PW, gacc, PW, static_cast<int>(M), runs.xs.data() + i, nruns, sc, z,
                   width, vend);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float* out = y + m * ldy + nb;
      for (int64_t p = 0; p < width; ++p) {
        const int64_t c = i4_column(p, vend);
        float v = acc[m * PW + p];
        if constexpr (!kGrouped) v = (v - 8.0f * runs.xs[m]) / w.scale[nb + c];
        if (w.bias) v = v + w.bias[nb + c];
        out[c] = v;
      }
    }
  }
}

// int8: the panel holds rows k, k+1 of each column as an int16 pair (vp_load's layout,
// read back by vp_loadp), so a micro-tile multiplies a row pair by two inputs in one madd.
// The inputs are widened to int16 once per call, so the micro-tile broadcasts each pair
// from memory; it is TVI vectors wide (as many accumulators as the
// registers hold: 4 x 4 of AVX-512's 32, 4 x 2 of AVX2's 16).
constexpr int TVI = W >= 16 ? 4 : 2;
constexpr int64_t PWI = 2 * TVI * W;  // int8 panel width: two micro-tiles of columns

void pack_panel_i8(const Weight& w, int64_t k0, int64_t kb, int64_t nb, int64_t width,
                   int16_t* P) {
  const int8_t* base = static_cast<const int8_t*>(w.data);
  const int64_t N = w.N, pairs = (kb + 1) / 2, vend = width / W * W;
  const int64_t pad = tile_pad(width, TVI * W);
  static const int8_t zeros[W] = {};  // the missing second row of an odd K
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t k = k0 + 2 * p;
    const int8_t* r0 = base + k * N + nb;
    const int8_t* r1 = 2 * p + 1 < kb ? r0 + N : nullptr;
    int16_t* out = P + p * 2 * PWI;
    int64_t j = 0;
    for (; j < vend; j += W) vp_store(out + 2 * j, vp_load(r0 + j, r1 ? r1 + j : zeros));
    for (; j < pad; ++j) {
      out[2 * j] = j < width ? r0[j] : 0;
      out[2 * j + 1] = j < width && r1 ? r1[j] : 0;
    }
  }
}

template <int R>
inline void micro_i8(const int16_t* x16, int64_t ldx, int64_t pairs, const int16_t* P,
                     int32_t* y, int64_t ldy, int64_t cols) {
  VI acc[R][TVI];
  TFS_UNROLL
  for (int r = 0; r < R; ++r)
    TFS_UNROLL
    for (int v = 0; v < TVI; ++v) acc[r][v] = vi_zero();
  for (int64_t p = 0; p < pairs; ++p) {
    VP b[TVI];
    TFS_UNROLL
    for (int v = 0; v < TVI; ++v) b[v] = vp_loadp(P + p * 2 * PWI + v * 2 * W);
    TFS_UNROLL
    for (int r = 0; r < R; ++r) {
      int32_t x01;
      std::memcpy(&x01, x16 + r * ldx + 2 * p, 4);
      TFS_UNROLL
      for (int v = 0; v < TVI; ++v) acc[r][v] = vp_madd(acc[r][v], b[v], x01);
    }
  }
  alignas(64) int32_t tmp[TVI * W];
  TFS_UNROLL
  for (int r = 0; r < R; ++r) {
    int32_t* out = y + r * ldy;
    if (cols == TVI * W) {
      TFS_UNROLL
      for (int v = 0; v < TVI; ++v) vi_store(out + v * W, vi_add(vi_load(out + v * W), acc[r][v]));
      continue;
    }
    TFS_UNROLL
    for (int v = 0; v < TVI; ++v) vi_store(tmp + v * W, acc[r][v]);
    for (int64_t j = 0; j < cols; ++j) out[j] += tmp[j];
  }
}

void kn_gemm_i8(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy,
                int64_t n0, int64_t n1) {
  const int64_t K = w.K, kpairs = (K + 1) / 2;
  int16_t* panel = thread_buffer<int16_t, kPanel>(((KB + 1) / 2) * 2 * PWI);
  // The inputs widened to int16, a row padded to whole pairs: the int32 at pair p is
  // pair16(x[2p], x[2p + 1]) (little-endian), as vp_madd takes it.
  int16_t* x16 = thread_buffer<int16_t, kInputs>(M * 2 * kpairs);
  for (int64_t m = 0; m < M; ++m) {
    int16_t* row = x16 + m * 2 * kpairs;
    for (int64_t k = 0; k < K; ++k) row[k] = x[m * K + k];
    if (K % 2) row[K] = 0;
  }
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + n0, y + m * ldy + n1, 0);
  for (int64_t nb = n0; nb < n1; nb += PWI) {
    const int64_t width = std::min(PWI, n1 - nb);
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0), pairs = (kb + 1) / 2;
      pack_panel_i8(w, k0, kb, nb, width, panel);
      for (int64_t j0 = 0; j0 < width; j0 += TVI * W) {
        const int64_t cols = std::min<int64_t>(TVI * W, width - j0);
        const int16_t* P = panel + 2 * j0;
        const int16_t* xb = x16 + k0;
        int64_t m = 0;
        for (; m + TR <= M; m += TR)
          micro_i8<TR>(xb + m * 2 * kpairs, 2 * kpairs, pairs, P, y + m * ldy + nb + j0, ldy, cols);
        for (; m < M; ++m)
          micro_i8<1>(xb + m * 2 * kpairs, 2 * kpairs, pairs, P, y + m * ldy + nb + j0, ldy, cols);
      }
    }
  }
}

void linear_f(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
              int64_t n1) {
  if (w.nk) {
    switch (w.fmt) {
      case Fmt::F32: return nk_f<Fmt::F32>(w, x, M, y, ldy, n0, n1);
      case Fmt::BF16: return nk_f<Fmt::BF16>(w, x, M, y, ldy, n0, n1);
      case Fmt::I4C: return nk_i4<false>(w, x, M, y, ldy, n0, n1);
      case Fmt::I4G: return nk_i4<true>(w, x, M, y, ldy, n0, n1);
      default: return;
    }
  }
  if (w.pk) {
    if (w.fmt == Fmt::I4C) return pk_i4<false>(w, x, M, y, ldy, n0, n1);
    if (w.fmt == Fmt::I4G) return pk_i4<true>(w, x, M, y, ldy, n0, n1);
    return;
  }
  if (M > GEMM_ROWS) {
    switch (w.fmt) {
      case Fmt::F32: return kn_gemm_f<Fmt::F32>(w, x, M, y, ldy, n0, n1);
      case Fmt::BF16: return kn_gemm_f<Fmt::BF16>(w, x, M, y, ldy, n0, n1);
      case Fmt::I4C: return kn_gemm_i4<false>(w, x, M, y, ldy, n0, n1);
      case Fmt::I4G: return kn_gemm_i4<true>(w, x, M, y, ldy, n0, n1);
      default: return;
    }
  }
  switch (w.fmt) {
    case Fmt::F32: return kn_f<Fmt::F32>(w, x, M, y, ldy, n0, n1);
    case Fmt::BF16: return kn_f<Fmt::BF16>(w, x, M, y, ldy, n0, n1);
    case Fmt::I4C: return kn_i4<false>(w, x, M, y, ldy, n0, n1);
    case Fmt::I4G: return kn_i4<true>(w, x, M, y, ldy, n0, n1);
    default: return;
  }
}

// int8 x int8 -> int32, exact for every int8 input (-128 too). kn: pairs of weight rows
// interleaved into int16 pairs and multiplied by the pair of inputs (one madd gives
// x0 * w0[n] + x1 * w1[n]).
void kn_i8_pairs(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  const int8_t* base = static_cast<const int8_t*>(w.data);
  const int64_t N = w.N, K = w.K;
  static thread_local std::vector<int32_t> buffer(MB * NB);
  int32_t* acc = buffer.data();
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const int8_t* xb = x + m0 * K;
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t width = std::min(NB, n1 - nb), vend = width / W * W;
      for (int m = 0; m < mb; ++m) std::fill(acc + m * NB, acc + m * NB + width, 0);
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        const int8_t* r0 = base + k * N + nb;
        int32_t x01[MB], x23[MB];
        for (int m = 0; m < mb; ++m) {
          x01[m] = pair16(xb[m * K + k], xb[m * K + k + 1]);
          x23[m] = pair16(xb[m * K + k + 2], xb[m * K + k + 3]);
        }
        for (int64_t j = 0; j < vend; j += W) {
          const VP p01 = vp_load(r0 + j, r0 + N + j);
          const VP p23 = vp_load(r0 + 2 * N + j, r0 + 3 * N + j);
          for (int m = 0; m < mb; ++m) {
            int32_t* a = acc + m * NB + j;
            vi_store(a, vp_madd(vp_madd(vi_load(a), p01, x01[m]), p23, x23[m]));
          }
        }
        for (int64_t j = vend; j < width; ++j)
          for (int m = 0; m < mb; ++m) {
            const int8_t* xm = xb + m * K + k;
            acc[m * NB + j] += xm[0] * r0[j] + xm[1] * r0[N + j] + xm[2] * r0[2 * N + j] +
                               xm[3] * r0[3 * N + j];
          }
      }
      for (; k < K; ++k) {
        const int8_t* r0 = base + k * N + nb;
        for (int64_t j = 0; j < width; ++j)
          for (int m = 0; m < mb; ++m) acc[m * NB + j] += xb[m * K + k] * r0[j];
      }
      for (int m = 0; m < mb; ++m)
        std::copy(acc + m * NB, acc + m * NB + width, y + (m0 + m) * ldy + nb);
    }
  }
}

// int8 x int8 -> int32, exact for inputs in [-127, 127]. kn: four weight rows at a time
// interleaved into quads (vq_load4: one column's four rows in each 32-bit lane) and
// multiplied by the four inputs in one unsigned-by-signed multiply-add (vq_dot), the rows
// PF_ROWS ahead prefetched. Full chunks of 4W columns keep their partial sums in quad
// order (quad_column), put back in column order when written out; R input rows (a
// compile-time count) share each quad.
template <int R>
void kn_i8_rows(const Weight& w, const int8_t* xb, int32_t* acc, int64_t nb, int64_t width) {
  const int8_t* base = static_cast<const int8_t*>(w.data);
  const int64_t N = w.N, K = w.K;
  constexpr int64_t QW = 4 * W;
  static const std::vector<int8_t> zeros(NB + QW, 0);  // rows past K
  const int64_t cend = width / QW * QW;
  for (int m = 0; m < R; ++m) std::fill(acc + m * NB, acc + m * NB + width, 0);
  for (int64_t k = 0; k < K; k += 4) {
    const int8_t* r[4];
    for (int j = 0; j < 4; ++j) r[j] = k + j < K ? base + (k + j) * N + nb : zeros.data();
    VQ xv[R];
    for (int m = 0; m < R; ++m) {
      int8_t q[4] = {0, 0, 0, 0};
      for (int j = 0; j < 4 && k + j < K; ++j) q[j] = xb[m * K + k + j];
      xv[m] = vq_set1(quad8(q));
    }
    const bool prefetch = k + PF_ROWS + 4 <= K;
    for (int64_t c = 0; c < cend; c += QW) {
      if (prefetch)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) __builtin_prefetch(r[j] + PF_ROWS * N + c);
      VQ q[4];
      vq_load4(r[0] + c, r[1] + c, r[2] + c, r[3] + c, q);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const VQ a = vq_abs(q[j]);
#pragma GCC unroll 8
        for (int m = 0; m < R; ++m) {
          int32_t* am = acc + m * NB + c + j * W;
          vi_store(am, vq_dot(vi_load(am), a, q[j], xv[m]));
        }
      }
    }
    for (int64_t j = cend; j < width; ++j)
      for (int m = 0; m < R; ++m)
        for (int i = 0; i < 4 && k + i < K; ++i) acc[m * NB + j] += xb[m * K + k + i] * r[i][j];
  }
}

void kn_i8(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  const int64_t K = w.K;
  constexpr int64_t QW = 4 * W;
  // vq_dot takes inputs in [-127, 127] (Keras's quantizer gives no other); -128, which a
  // general int8 matmul may be given, goes to the int16 kernel.
  if (std::find(x, x + M * K, static_cast<int8_t>(-128)) != x + M * K)
    return kn_i8_pairs(w, x, M, y, ldy, n0, n1);
  static thread_local std::vector<int32_t> buffer(MB * NB);
  int32_t* acc = buffer.data();
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const int8_t* xb = x + m0 * K;
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t width = std::min(NB, n1 - nb), cend = width / QW * QW;
      switch (mb) {  // MB = 8
        case 1: kn_i8_rows<1>(w, xb, acc, nb, width); break;
        case 2: kn_i8_rows<2>(w, xb, acc, nb, width); break;
        case 3: kn_i8_rows<3>(w, xb, acc, nb, width); break;
        case 4: kn_i8_rows<4>(w, xb, acc, nb, width); break;
        case 5: kn_i8_rows<5>(w, xb, acc, nb, width); break;
        case 6: kn_i8_rows<6>(w, xb, acc, nb, width); break;
        case 7: kn_i8_rows<7>(w, xb, acc, nb, width); break;
        default: kn_i8_rows<8>(w, xb, acc, nb, width); break;
      }
      for (int m = 0; m < mb; ++m) {
        const int32_t* a = acc + m * NB;
        int32_t* out = y + (m0 + m) * ldy + nb;
        for (int64_t c = 0; c < cend; c += QW)
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < W; ++i) out[c + quad_column(j, i)] = a[c + j * W + i];
        std::copy(a + cend, a + width, out + cend);
      }
    }
  }
}

void nk_i8(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  const int8_t* base = static_cast<const int8_t*>(w.data);
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = base + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = x + m * K;
      VI acc = vi_zero();
      int64_t k = 0;
      for (; k + 4 * W <= K; k += 4 * W) acc = vi_dot4(acc, xm + k, row + k);
      int32_t s = vi_hsum(acc);
      for (; k < K; ++k) s += xm[k] * row[k];
      y[m * ldy + n] = s;
    }
  }
}

void linear_i8(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy,
               int64_t n0, int64_t n1) {
  if (w.nk) nk_i8(w, x, M, y, ldy, n0, n1);
  else if (M > GEMM_ROWS) kn_gemm_i8(w, x, M, y, ldy, n0, n1);
  else kn_i8(w, x, M, y, ldy, n0, n1);
}

float dot(const float* a, const float* b, int64_t n) {
  VF s0 = vzero(), s1 = vzero();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = vfma(vload(a + i), vload(b + i), s0);
    s1 = vfma(vload(a + i + W), vload(b + i + W), s1);
  }
  for (; i + W <= n; i += W) s0 = vfma(vload(a + i), vload(b + i), s0);
  float s = vhsum(vadd(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_bf16(const float* a, const uint16_t* b, int64_t n) {
  VF s0 = vzero();
  int64_t i = 0;
  for (; i + W <= n; i += W) s0 = vfma(vload(a + i), vload_bf16(b + i), s0);
  float s = vhsum(s0);
  for (; i < n; ++i) s += a[i] * bf16_to_f(b[i]);
  return s;
}

void axpy(float a, const float* x, float* y, int64_t n) {
  const VF av = vset1(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void axpy_bf16(float a, const uint16_t* x, float* y, int64_t n) {
  const VF av = vset1(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(y + i, vfma(av, vload_bf16(x + i), vload(y + i)));
  for (; i < n; ++i) y[i] += a * bf16_to_f(x[i]);
}

float sumsq(const float* x, int64_t n) {
  VF s = vzero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const VF v = vload(x + i);
    s = vfma(v, v, s);
  }
  float r = vhsum(s);
  for (; i < n; ++i) r += x[i] * x[i];
  return r;
}

float absmax(const float* x, int64_t n) {
  float r = 0.0f;
  for (int64_t i = 0; i < n; ++i) r = std::max(r, x[i] < 0 ? -x[i] : x[i]);
  return r;
}

const Kernels& table() {
  static const Kernels k = {TFS_ISA_NAME, W, linear_f, linear_i8, dot, dot_bf16,
                            axpy, axpy_bf16, sumsq, absmax};
  return k;
}

}  // namespace TFS_ISA_NS
}  // namespace tfshard
