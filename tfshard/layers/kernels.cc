// tfshard's bfloat16 matrix-vector product as a TensorFlow op, for decode steps.
//
// A decode step multiplies a few rows (one per sequence) by every weight matrix, so it is
// bound by the bytes of weights read: bfloat16 weights should take half the time of
// float32 ones. TensorFlow's CPU kernels do not get there for so few rows (oneDNN's
// bfloat16 GEMM reads about 7 GiB/s on this project's machine against 13-18 GiB/s for
// float32), so the bfloat16 model decoded at 0.82x of float32's time per token instead of
// ~0.5x. This op streams the weight once, widening each bfloat16 to float32 (a 16-bit
// shift) and accumulating in float32 with FMAs, then rounds the output to bfloat16 once:
//
//   TfshardBf16Matmul(x[..., K], w[K, N])                 -> y[..., N] = x @ w
//   TfshardBf16Matmul(x[..., K], w[N, K], transpose_b)    -> y[..., N] = x @ w^T
//
// Keras's int8 layers quantize each input row to int8 and multiply int8 by int8 into
// int32, which TensorFlow's CPU kernels do slower still (an int8 SmolLM2 decoded at 1.3x
// of float32's time with a quarter of its bytes). Integer sums are exact in any order, so
// the same streaming gives the bits TensorFlow gives:
//
//   TfshardInt8Matmul(x[..., K] int8, w[K, N] int8)              -> y[..., N] int32
//   TfshardInt8Matmul(x[..., K] int8, w[N, K] int8, transpose_b) -> y[..., N] int32
//
// Any number of rows works; tfshard uses them for at most a few (`tfshard.layers.matvec`).
// AVX-512 when the CPU has it (checked at run time), else plain C++ loops the compiler
// vectorises for the base instruction set (AVX-512 here means F and BW). Built by scripts/build_mpi_ops.sh.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfshard {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

inline float widen(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return yes;
}

// y[m, n0:n1] = x[m] @ w[:, n0:n1], w row-major [K, N]: rows of w streamed (eight at a time
// in the AVX-512 loop), y's partial sums kept in float32 (a decode width fits in L1/L2).
void nn_plain(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y,
              int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0.0f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < M; ++m) {
      const float a = x[m * K + k];
      const uint16_t* row = w + k * N;
      float* ym = y + m * N;
      for (int64_t n = n0; n < n1; ++n) ym[n] += a * widen(row[n]);
    }
}

__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx512f")))
void nn_avx512(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y,
               int64_t n0, int64_t n1) {
  const int64_t vec_end = n0 + (n1 - n0) / 16 * 16;
  int64_t k = 0;
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0.0f);
  for (; k + 8 <= K; k += 8) {
    const uint16_t* w0 = w + k * N;
    for (int64_t m = 0; m < M; ++m) {
      const float* a = x + m * K + k;
      __m512 av[8];
      for (int j = 0; j < 8; ++j) av[j] = _mm512_set1_ps(a[j]);
      float* ym = y + m * N;
      int64_t n = n0;
      for (; n < vec_end; n += 16) {
        __m512 acc0 = _mm512_loadu_ps(ym + n);
        __m512 acc1 = _mm512_mul_ps(av[1], load16(w0 + N + n));
        acc0 = _mm512_fmadd_ps(av[0], load16(w0 + n), acc0);
        acc1 = _mm512_fmadd_ps(av[3], load16(w0 + 3 * N + n), acc1);
        acc0 = _mm512_fmadd_ps(av[2], load16(w0 + 2 * N + n), acc0);
        acc1 = _mm512_fmadd_ps(av[5], load16(w0 + 5 * N + n), acc1);
        acc0 = _mm512_fmadd_ps(av[4], load16(w0 + 4 * N + n), acc0);
        acc1 = _mm512_fmadd_ps(av[7], load16(w0 + 7 * N + n), acc1);
        acc0 = _mm512_fmadd_ps(av[6], load16(w0 + 6 * N + n), acc0);
        _mm512_storeu_ps(ym + n, _mm512_add_ps(acc0, acc1));
      }
      for (; n < n1; ++n) {
        float s = 0.0f;
        for (int j = 0; j < 8; ++j) s += a[j] * widen(w0[j * N + n]);
        ym[n] += s;
      }
    }
  }
  for (; k < K; ++k)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] += x[m * K + k] * widen(w[k * N + n]);
}

// y[m, n] = x[m] . w[n] for n in [n0, n1), w row-major [N, K] (a tied head's table).
void nt_plain(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y,
              int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * widen(w[n * K + k]);
      y[m * N + n] = s;
    }
}

__attribute__((target("avx512f")))
void nt_avx512(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y,
               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* a = x + m * K;
      __m512 acc = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), load16(row + k), acc);
      float s = _mm512_reduce_add_ps(acc);
      for (; k < K; ++k) s += a[k] * widen(row[k]);
      y[m * N + n] = s;
    }
  }
}

// int8 x int8 -> int32. In the AVX-512 loops each int8 of w is sign-extended to a 32-bit
// lane and multiplied by x's value held in the lane's low 16 bits (high 16 bits zero) with
// _mm512_madd_epi16: low * x + high * 0, exact, one instruction.
void i8_nn_plain(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                 int32_t* y, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < M; ++m) {
      const int32_t a = x[m * K + k];
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] += a * w[k * N + n];
    }
}

__attribute__((target("avx512f,avx512bw"))) inline __m512i load16_i8(const int8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx512f,avx512bw"))) inline __m512i low16(int8_t v) {
  return _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(v))));
}

__attribute__((target("avx512f,avx512bw")))
void i8_nn_avx512(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                  int32_t* y, int64_t n0, int64_t n1) {
  const int64_t vec_end = n0 + (n1 - n0) / 16 * 16;
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n1, 0);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const int8_t* w0 = w + k * N;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* a = x + m * K + k;
      const __m512i a0 = low16(a[0]), a1 = low16(a[1]), a2 = low16(a[2]), a3 = low16(a[3]);
      int32_t* ym = y + m * N;
      int64_t n = n0;
      for (; n < vec_end; n += 16) {
        __m512i acc = _mm512_loadu_si512(ym + n);
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(load16_i8(w0 + n), a0));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(load16_i8(w0 + N + n), a1));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(load16_i8(w0 + 2 * N + n), a2));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(load16_i8(w0 + 3 * N + n), a3));
        _mm512_storeu_si512(ym + n, acc);
      }
      for (; n < n1; ++n)
        ym[n] += a[0] * w0[n] + a[1] * w0[N + n] + a[2] * w0[2 * N + n] + a[3] * w0[3 * N + n];
    }
  }
  for (; k < K; ++k)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] += x[m * K + k] * w[k * N + n];
}

void i8_nt_plain(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                 int32_t* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
      y[m * N + n] = s;
    }
}

__attribute__((target("avx512f,avx512bw")))
void i8_nt_avx512(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                  int32_t* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* a = x + m * K;
      __m512i acc = _mm512_setzero_si512();
      int64_t k = 0;
      // Both sign-extended: the high halves of a lane are 0 or -1 for both operands, so
      // madd would add their product; keep x's high half zero instead.
      for (; k + 16 <= K; k += 16) {
        __m512i xa = _mm512_and_si512(load16_i8(a + k), _mm512_set1_epi32(0xFFFF));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(load16_i8(row + k), xa));
      }
      int32_t s = _mm512_reduce_add_epi32(acc);
      for (; k < K; ++k) s += a[k] * row[k];
      y[m * N + n] = s;
    }
  }
}

// What the two ops differ in: the operand types, how x is read, the accumulator, the loops.
struct Bf16 {
  using In = Eigen::bfloat16;  // x and w
  using W = uint16_t;          // w's bits
  using X = float;             // x widened
  using Acc = float;
  static constexpr const char* kName = "TfshardBf16Matmul";
  static constexpr auto nn_fast = nn_avx512, nn_slow = nn_plain;
  static constexpr auto nt_fast = nt_avx512, nt_slow = nt_plain;
  static void out(const std::vector<Acc>& y, Tensor* t) {
    auto o = t->flat<Eigen::bfloat16>();
    for (int64_t i = 0; i < static_cast<int64_t>(y.size()); ++i)
      o(i) = static_cast<Eigen::bfloat16>(y[i]);
  }
};

struct Int8 {
  using In = int8_t;
  using W = int8_t;
  using X = int8_t;
  using Acc = int32_t;
  static constexpr const char* kName = "TfshardInt8Matmul";
  static constexpr auto nn_fast = i8_nn_avx512, nn_slow = i8_nn_plain;
  static constexpr auto nt_fast = i8_nt_avx512, nt_slow = i8_nt_plain;
  static void out(const std::vector<Acc>& y, Tensor* t) {
    std::memcpy(t->flat<int32_t>().data(), y.data(), y.size() * sizeof(Acc));
  }
};

template <typename T>
class MatmulOp : public OpKernel {
 public:
  explicit MatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_b", &transpose_b_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xt = ctx->input(0);
    const Tensor& wt = ctx->input(1);
    OP_REQUIRES(ctx, xt.dims() >= 1 && wt.dims() == 2,
                tensorflow::errors::InvalidArgument(
                    T::kName, " takes x [..., K] and a 2-D w; got x ", xt.shape().DebugString(),
                    ", w ", wt.shape().DebugString()));
    const int64_t K = xt.dim_size(xt.dims() - 1);
    const int64_t wk = wt.dim_size(transpose_b_ ? 1 : 0);
    const int64_t N = wt.dim_size(transpose_b_ ? 0 : 1);
    OP_REQUIRES(ctx, K == wk,
                tensorflow::errors::InvalidArgument(
                    T::kName, ": x ", xt.shape().DebugString(), " contracts ", K, " but w ",
                    wt.shape().DebugString(), (transpose_b_ ? " (transposed)" : ""), " has ",
                    wk));
    TensorShape out_shape = xt.shape();
    out_shape.set_dim(out_shape.dims() - 1, N);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    const int64_t M = K ? xt.NumElements() / K : 0;
    if (M == 0 || N == 0) return;  // an empty output
    std::vector<typename T::X> x(M * K);
    auto xs = xt.flat<typename T::In>();
    for (int64_t i = 0; i < M * K; ++i) x[i] = static_cast<typename T::X>(xs(i));
    std::vector<typename T::Acc> y(M * N);
    const auto* w = reinterpret_cast<const typename T::W*>(wt.flat<typename T::In>().data());
    const bool fast = has_avx512();
    // Work units: 256 columns of w (row-major [K, N]) or one row of w^T.
    const int64_t block = transpose_b_ ? 1 : 256;
    auto work = [&](int64_t a, int64_t b) {
      const int64_t n0 = a * block, n1 = std::min(b * block, N);
      if (transpose_b_)
        (fast ? T::nt_fast : T::nt_slow)(x.data(), M, K, w, N, y.data(), n0, n1);
      else
        (fast ? T::nn_fast : T::nn_slow)(x.data(), M, K, w, N, y.data(), n0, n1);
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(pool->num_threads, pool->workers, (N + block - 1) / block,
                      K * block * M * 2, work);
    T::out(y, out);
  }

 private:
  bool transpose_b_ = false;
};

tensorflow::Status matmul_shape(tensorflow::shape_inference::InferenceContext* c) {
  bool transpose_b = false;
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_b", &transpose_b));
  tensorflow::shape_inference::ShapeHandle w, out;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
  TF_RETURN_IF_ERROR(c->ReplaceDim(c->input(0), -1, c->Dim(w, transpose_b ? 0 : 1), &out));
  c->set_output(0, out);
  return tensorflow::OkStatus();
}

REGISTER_OP("TfshardBf16Matmul")
    .Input("x: bfloat16")
    .Input("w: bfloat16")
    .Output("y: bfloat16")
    .Attr("transpose_b: bool = false")
    .SetShapeFn(matmul_shape);

REGISTER_OP("TfshardInt8Matmul")
    .Input("x: int8")
    .Input("w: int8")
    .Output("y: int32")
    .Attr("transpose_b: bool = false")
    .SetShapeFn(matmul_shape);

REGISTER_KERNEL_BUILDER(Name("TfshardBf16Matmul").Device(tensorflow::DEVICE_CPU),
                        MatmulOp<Bf16>);
REGISTER_KERNEL_BUILDER(Name("TfshardInt8Matmul").Device(tensorflow::DEVICE_CPU),
                        MatmulOp<Int8>);

}  // namespace
}  // namespace tfshard

extern "C" {
// 1 when the op runs its AVX-512 loops on this CPU.
int tfshard_kernels_avx512() { return tfshard::has_avx512() ? 1 : 0; }
}
