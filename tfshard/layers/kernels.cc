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
// Any number of rows works; tfshard uses it for at most a few (`tfshard.layers.matvec`).
// AVX-512 when the CPU has it (checked at run time), else plain C++ loops the compiler
// vectorises for the base instruction set. Built by scripts/build_mpi_ops.sh.

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
  static const bool yes = __builtin_cpu_supports("avx512f");
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

class Bf16MatmulOp : public OpKernel {
 public:
  explicit Bf16MatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_b", &transpose_b_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xt = ctx->input(0);
    const Tensor& wt = ctx->input(1);
    OP_REQUIRES(ctx, xt.dims() >= 1 && wt.dims() == 2,
                tensorflow::errors::InvalidArgument(
                    "TfshardBf16Matmul takes x [..., K] and a 2-D w; got x ",
                    xt.shape().DebugString(), ", w ", wt.shape().DebugString()));
    const int64_t K = xt.dim_size(xt.dims() - 1);
    const int64_t wk = wt.dim_size(transpose_b_ ? 1 : 0);
    const int64_t N = wt.dim_size(transpose_b_ ? 0 : 1);
    OP_REQUIRES(ctx, K == wk,
                tensorflow::errors::InvalidArgument(
                    "TfshardBf16Matmul: x ", xt.shape().DebugString(), " contracts ", K,
                    " but w ", wt.shape().DebugString(), (transpose_b_ ? " (transposed)" : ""),
                    " has ", wk));
    TensorShape out_shape = xt.shape();
    out_shape.set_dim(out_shape.dims() - 1, N);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    const int64_t M = K ? xt.NumElements() / K : 0;
    if (M == 0 || N == 0) return;
    std::vector<float> x(M * K), y(M * N, 0.0f);
    auto xs = xt.flat<Eigen::bfloat16>();
    for (int64_t i = 0; i < M * K; ++i) x[i] = static_cast<float>(xs(i));
    const uint16_t* w = reinterpret_cast<const uint16_t*>(wt.flat<Eigen::bfloat16>().data());
    const bool fast = has_avx512();
    // Work units: 256 columns of w (row-major [K, N]) or one row of w^T.
    const int64_t block = transpose_b_ ? 1 : 256;
    auto work = [&](int64_t a, int64_t b) {
      const int64_t n0 = a * block, n1 = std::min(b * block, N);
      if (transpose_b_)
        (fast ? nt_avx512 : nt_plain)(x.data(), M, K, w, N, y.data(), n0, n1);
      else
        (fast ? nn_avx512 : nn_plain)(x.data(), M, K, w, N, y.data(), n0, n1);
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(pool->num_threads, pool->workers, (N + block - 1) / block,
                      K * block * M * 2, work);
    auto ys = out->flat<Eigen::bfloat16>();
    for (int64_t i = 0; i < M * N; ++i) ys(i) = static_cast<Eigen::bfloat16>(y[i]);
  }

 private:
  bool transpose_b_ = false;
};

REGISTER_OP("TfshardBf16Matmul")
    .Input("x: bfloat16")
    .Input("w: bfloat16")
    .Output("y: bfloat16")
    .Attr("transpose_b: bool = false")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      bool transpose_b = false;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_b", &transpose_b));
      tensorflow::shape_inference::ShapeHandle w, out;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
      TF_RETURN_IF_ERROR(
          c->ReplaceDim(c->input(0), -1, c->Dim(w, transpose_b ? 0 : 1), &out));
      c->set_output(0, out);
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfshardBf16Matmul").Device(tensorflow::DEVICE_CPU),
                        Bf16MatmulOp);

}  // namespace
}  // namespace tfshard

extern "C" {
// 1 when the op runs its AVX-512 loops on this CPU.
int tfshard_kernels_avx512() { return tfshard::has_avx512() ? 1 : 0; }
}
