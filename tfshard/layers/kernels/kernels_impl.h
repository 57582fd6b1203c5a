// The decode kernels, written once over simd.h's primitives; included by each
// instruction-set file after simd.h (see there). Everything here reads a weight in the
// layout Keras stores it and never makes a float copy of it: bfloat16 is widened and
// int4 unpacked in registers, a vector at a time.
//
// kn weights ([K, N], a Dense kernel) are streamed a row at a time: for a block of up to
// NB columns, the partial sums of up to MB input rows stay in a small buffer (L1) while
// rows of the weight go by, four at a time. nk weights ([N, K], an embedding table giving
// logits) are dot products, one output column per stored row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace tfshard {
namespace TFS_ISA_NS {

constexpr int64_t NB = 256;  // columns per block (a multiple of every W)
constexpr int MB = 8;        // input rows per pass over a block

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
    for (int64_t j = 0; j < vend; j += W) {
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
    for (int64_t j = vend; j < width; ++j) {
      const float w0 = load_w1<F>(r0, nb + j), w1 = load_w1<F>(r1, nb + j);
      const float w2 = load_w1<F>(r2, nb + j), w3 = load_w1<F>(r3, nb + j);
      for (int m = 0; m < mb; ++m) {
        const float* xm = x + m * K + k;
        acc[m * NB + j] += xm[0] * w0 + xm[1] * w1 + xm[2] * w2 + xm[3] * w3;
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
      for (int m = 0; m < mb; ++m) acc[m * NB + j] += x[m * K + k] * w0;
    }
  }
}

template <Fmt F>
void kn_f(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
          int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), K = w.K;
  alignas(64) float acc[MB * NB];
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

inline void kn_i4_accumulate(const uint8_t* base, int64_t rb, const float* x, int64_t K, int mb,
                             int64_t ks, int64_t ke, int64_t nb, int64_t width, int64_t vend,
                             float* acc) {
  int64_t k = ks;
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
      for (int m = 0; m < mb; ++m) acc[m * NB + p] += x[m * K + k] * u0 + x[m * K + k + 1] * u1;
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
      for (int m = 0; m < mb; ++m) acc[m * NB + p] += x[m * K + k] * u0;
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
  alignas(64) float acc[MB * NB];
  alignas(64) float gacc[MB * NB];
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
          for (int m = 0; m < mb; ++m) {
            const float xs = runs.xs[(m0 + m) * nruns + i];
            float* a = acc + m * NB;
            const float* ga = gacc + m * NB;
            for (int64_t p = 0; p < width; ++p) {
              const int64_t c = i4_column(p, vend);
              a[p] += s[c] * (ga[p] - (z[c] + 8.0f) * xs);
            }
          }
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
  alignas(64) float acc[MB * NB];
  alignas(64) float gacc[MB * NB];
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

// nk: y[m, n] = x[m, :] . w[n, :], one stored row per output column.
template <Fmt F>
void nk_f(const Weight& w, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0,
          int64_t n1) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const int64_t rb = w.row_bytes(), K = w.K;
  constexpr int R = 4;  // input rows per pass over a stored row
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = base + n * rb;
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int mb = static_cast<int>(std::min<int64_t>(R, M - m0));
      VF acc[R] = {vzero(), vzero(), vzero(), vzero()};
      VF acc2[R] = {vzero(), vzero(), vzero(), vzero()};  // a second chain of FMAs
      float tail[R] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t k = 0;
      for (; k + 2 * W <= K; k += 2 * W) {
        const VF wv = load_w<F>(row, k), wv2 = load_w<F>(row, k + W);
        for (int m = 0; m < mb; ++m) {
          const float* xm = x + (m0 + m) * K + k;
          acc[m] = vfma(vload(xm), wv, acc[m]);
          acc2[m] = vfma(vload(xm + W), wv2, acc2[m]);
        }
      }
      for (; k + W <= K; k += W) {
        const VF wv = load_w<F>(row, k);
        for (int m = 0; m < mb; ++m) acc[m] = vfma(vload(x + (m0 + m) * K + k), wv, acc[m]);
      }
      for (; k < K; ++k) {
        const float wv = load_w1<F>(row, k);
        for (int m = 0; m < mb; ++m) tail[m] += x[(m0 + m) * K + k] * wv;
      }
      for (int m = 0; m < mb; ++m) {
        const float v = vhsum(vadd(acc[m], acc2[m])) + tail[m];
        y[(m0 + m) * ldy + n] = w.bias ? v + w.bias[n] : v;
      }
    }
  }
}

// int4, nk (packed along K, an int4 embedding table): x split once into its even and odd
// entries, which meet the low and high nibbles of each stored row.
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
  constexpr int R = 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = base + n * rb;
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int mb = static_cast<int>(std::min<int64_t>(R, M - m0));
      float out[R] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t i = 0; i < nruns; ++i) {
        const int64_t ke = runs.stop[i];
        VF acc[R] = {vzero(), vzero(), vzero(), vzero()};
        float tail[R] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t k = runs.start[i];
        if (k & 1) {
          const float u = load_u1(row, k);
          for (int m = 0; m < mb; ++m) tail[m] += x[(m0 + m) * K + k] * u;
          ++k;
        }
        for (; k + 2 * W <= ke; k += 2 * W) {
          VF e, o;
          vload_u4(reinterpret_cast<const int8_t*>(row) + k / 2, e, o);
          for (int m = 0; m < mb; ++m) {
            const float* xe = split.data() + 2 * (m0 + m) * half + k / 2;
            acc[m] = vfma(vload(xe + half), o, vfma(vload(xe), e, acc[m]));
          }
        }
        for (; k < ke; ++k) {
          const float u = load_u1(row, k);
          for (int m = 0; m < mb; ++m) tail[m] += x[(m0 + m) * K + k] * u;
        }
        for (int m = 0; m < mb; ++m) {
          const float xs = runs.xs[(m0 + m) * nruns + i];
          const float dot = vhsum(acc[m]) + tail[m];
          if constexpr (kGrouped) {
            const int64_t at = n * w.groups + runs.group[i];
            out[m] += w.scale[at] * (dot - (w.zero[at] + 8.0f) * xs);
          } else {
            out[m] += dot - 8.0f * xs;
          }
        }
      }
      for (int m = 0; m < mb; ++m) {
        float v = out[m];
        if constexpr (!kGrouped) v = v / w.scale[n];
        if (w.bias) v = v + w.bias[n];
        y[(m0 + m) * ldy + n] = v;
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
  switch (w.fmt) {
    case Fmt::F32: return kn_f<Fmt::F32>(w, x, M, y, ldy, n0, n1);
    case Fmt::BF16: return kn_f<Fmt::BF16>(w, x, M, y, ldy, n0, n1);
    case Fmt::I4C: return kn_i4<false>(w, x, M, y, ldy, n0, n1);
    case Fmt::I4G: return kn_i4<true>(w, x, M, y, ldy, n0, n1);
    default: return;
  }
}

// int8 x int8 -> int32, exact. kn: pairs of weight rows interleaved into int16 pairs and
// multiplied by the pair of inputs (one madd gives x0 * w0[n] + x1 * w1[n]).
void kn_i8(const Weight& w, const int8_t* x, int64_t M, int32_t* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  const int8_t* base = static_cast<const int8_t*>(w.data);
  const int64_t N = w.N, K = w.K;
  alignas(64) int32_t acc[MB * NB];
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
