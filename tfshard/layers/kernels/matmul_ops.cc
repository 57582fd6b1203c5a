// tfshard's bfloat16 and int8 matmuls for a few rows, as TensorFlow ops (the sharded
// layers' decode steps on keras-hub's own generation loop, and prefill's small matmuls):
//
//   TfshardBf16Matmul(x[..., K] bf16, w[K, N] bf16)               -> y[..., N] bf16 = x @ w
//   TfshardBf16Matmul(x[..., K] bf16, w[N, K] bf16, transpose_b)  -> y[..., N] = x @ w^T
//   TfshardInt8Matmul(x[..., K] int8, w[K, N] int8)               -> y[..., N] int32
//   TfshardInt8Matmul(x[..., K] int8, w[N, K] int8, transpose_b)  -> y[..., N] int32
//
// TensorFlow's CPU kernels read bfloat16 no faster than float32 for so few rows (oneDNN's
// bfloat16 GEMM read ~7 GiB/s where float32 read 13-18 GiB/s), and its int8 x int8 ->
// int32 matmul is slower still. These stream the weight once through kernels.h's
// kernels (AVX-512, AVX2 or plain C++, chosen at run time): bfloat16 is widened to
// float32 and summed in float32, the output rounded to bfloat16 once (TensorFlow's
// bfloat16 matmul in another order of summation); int8 products are summed in int32,
// exactly, so the bits are TensorFlow's.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"
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

template <bool kInt8>
class MatmulOp : public OpKernel {
 public:
  explicit MatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_b", &transpose_b_));
    std::string error;
    kernels_ = tfshard::kernels(&error);
    OP_REQUIRES(ctx, kernels_ != nullptr, tensorflow::errors::FailedPrecondition(name(), ": ", error));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xt = ctx->input(0);
    const Tensor& wt = ctx->input(1);
    const char* op = kInt8 ? "TfshardInt8Matmul" : "TfshardBf16Matmul";
    OP_REQUIRES(ctx, xt.dims() >= 1 && wt.dims() == 2,
                tensorflow::errors::InvalidArgument(
                    op, " takes x [..., K] and a 2-D w; got x ", xt.shape().DebugString(),
                    ", w ", wt.shape().DebugString()));
    const int64_t K = xt.dim_size(xt.dims() - 1);
    const int64_t wk = wt.dim_size(transpose_b_ ? 1 : 0);
    const int64_t N = wt.dim_size(transpose_b_ ? 0 : 1);
    OP_REQUIRES(ctx, K == wk,
                tensorflow::errors::InvalidArgument(
                    op, ": x ", xt.shape().DebugString(), " contracts ", K, " but w ",
                    wt.shape().DebugString(), (transpose_b_ ? " (transposed)" : ""), " has ", wk));
    TensorShape out_shape = xt.shape();
    out_shape.set_dim(out_shape.dims() - 1, N);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    const int64_t M = K ? xt.NumElements() / K : 0;
    if (M == 0 || N == 0) return;
    Weight w;
    w.fmt = kInt8 ? Fmt::I8 : Fmt::BF16;
    w.nk = transpose_b_;
    w.K = K;
    w.N = N;
    w.data = wt.tensor_data().data();
    std::vector<float> x;
    std::vector<float> y;
    std::vector<int32_t> yi;
    if (!kInt8) {
      x.resize(M * K);
      const auto* xs = reinterpret_cast<const uint16_t*>(xt.tensor_data().data());
      for (int64_t i = 0; i < M * K; ++i) x[i] = bf16_to_f(xs[i]);
      y.resize(M * N);
    }
    const Kernels& k = *kernels_;
    constexpr int64_t kUnit = 64;
    auto work = [&](int64_t a, int64_t b) {
      const int64_t n0 = a * kUnit, n1 = std::min(N, b * kUnit);
      if (kInt8) {
        k.linear_i8(w, reinterpret_cast<const int8_t*>(xt.tensor_data().data()), M,
                    out->flat<int32_t>().data(), N, n0, n1);
      } else {
        k.linear_f(w, x.data(), M, y.data(), N, n0, n1);
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(pool->num_threads, pool->workers, (N + kUnit - 1) / kUnit,
                      K * kUnit * M * 2, work);
    if (!kInt8) {
      auto* o = reinterpret_cast<uint16_t*>(const_cast<char*>(out->tensor_data().data()));
      for (int64_t i = 0; i < M * N; ++i) o[i] = f_to_bf16(y[i]);
    }
  }
  bool IsExpensive() override { return false; }

 private:
  bool transpose_b_ = false;
  const Kernels* kernels_ = nullptr;
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

REGISTER_KERNEL_BUILDER(Name("TfshardBf16Matmul").Device(tensorflow::DEVICE_CPU), MatmulOp<false>);
REGISTER_KERNEL_BUILDER(Name("TfshardInt8Matmul").Device(tensorflow::DEVICE_CPU), MatmulOp<true>);

}  // namespace
}  // namespace tfshard
