// tfshard's decode step as a few TensorFlow ops: one per half transformer block.
//
// A decode step of a keras-hub decoder in TensorFlow's own ops is hundreds of small ops
// (norms, projections, rotary embedding, cache update, masked attention), and on a CPU
// their fixed cost, not the bytes of weights they read, set the time per token. Here a
// block is two ops, cut where tensor parallelism needs a collective anyway:
//
//   TfshardDecodeAttention: h = x + delta; the norm; q, k, v (one pass over their weights);
//     rotary embedding; k and v written into the KV cache at each row's own slot and
//     position; attention over that row's positions 0..p; the output projection of the
//     rank's heads (a partial sum, all-reduced by the caller).
//   TfshardDecodeMlp: h = x + delta; the norm; gate and up (one pass); the activation;
//     the down projection (a partial sum).
//   TfshardDecodeEmbed / TfshardDecodeHead: the token lookup of the rank's vocabulary
//     slice; the final norm and the logits of the rank's slice.
//   TfshardDecodeLinear: one projection on its own (an int8 row-parallel layer, whose
//     input must first be quantized with the maximum over every rank's slice).
//   TfshardKVCache: the cache, [layers][slots][2][K/V heads][length][head_dim], float32
//     or bfloat16, a resource the attention ops share.
//
// Every row (token) carries its own slot and position, so one step can hold sequences at
// different positions: keras-hub's generate and a server's continuous batching both run
// it. Weights are read as Keras stores them (kernels.h: float32, bfloat16, int8, int4)
// through the instruction set `kernels()` picks. With rounding="bfloat16" the ops round
// where a bfloat16 Keras model rounds (each projection's output, the norm's, the rotary
// embedding's, the attention probabilities, the residual sums), so they follow the
// unsharded bfloat16 model within its own envelope.
//
// The `isa` attr picks an instruction set's kernels (avx512, avx2, generic, generic16);
// empty: TFSHARD_KERNELS_ISA's, else the best the CPU runs.
//
// A weight is described by a format string "fmt:layout:K:N[:b]" (fmt f32, bf16, i8, i4c,
// i4g; layout kn, nk, or pk: int4 [K, N] packed along K; b: a bias follows) and takes 1 (f32, bf16), 2 (i8, i4c: + scale)
// or 4 (i4g: + scale, zero, group index) tensors of the op's weight list, then its bias.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_op_kernel.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfshard {
namespace {

using tensorflow::DataType;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace errors = tensorflow::errors;

// ---------------------------------------------------------------------------------------
// The KV cache.

class KVCache : public tensorflow::ResourceBase {
 public:
  KVCache(int64_t layers, int64_t slots, int64_t heads, int64_t length, int64_t head_dim,
          bool bf16)
      : layers(layers), slots(slots), heads(heads), length(length), head_dim(head_dim),
        bf16(bf16) {
    const size_t bytes = static_cast<size_t>(elements()) * (bf16 ? 2 : 4);
    data_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64)));
    if (data_) std::memset(data_.get(), 0, bytes);
  }
  bool ok() const { return data_ != nullptr; }
  int64_t elements() const { return layers * slots * 2 * heads * length * head_dim; }
  // Offset (in elements) of [layer][slot][kv][head][pos][0].
  int64_t at(int64_t layer, int64_t slot, int kv, int64_t head, int64_t pos) const {
    return ((((layer * slots + slot) * 2 + kv) * heads + head) * length + pos) * head_dim;
  }
  float* f32() { return reinterpret_cast<float*>(data_.get()); }
  uint16_t* b16() { return reinterpret_cast<uint16_t*>(data_.get()); }
  std::string DebugString() const override {
    return "TfshardKVCache[" + std::to_string(layers) + " layers, " + std::to_string(slots) +
           " slots, " + std::to_string(heads) + " K/V heads, " + std::to_string(length) +
           " positions, head_dim " + std::to_string(head_dim) + (bf16 ? ", bfloat16]" : ", float32]");
  }
  const int64_t layers, slots, heads, length, head_dim;
  const bool bf16;

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
};

class KVCacheOp : public tensorflow::ResourceOpKernel<KVCache> {
 public:
  explicit KVCacheOp(OpKernelConstruction* ctx) : ResourceOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("layers", &layers_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("slots", &slots_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("heads", &heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("length", &length_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("head_dim", &head_dim_));
    DataType dtype;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dtype", &dtype));
    bf16_ = dtype == tensorflow::DT_BFLOAT16;
  }

 private:
  Status CreateResource(KVCache** out) override TF_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    *out = new KVCache(layers_, slots_, heads_, length_, head_dim_, bf16_);
    if (!(*out)->ok()) {
      return errors::ResourceExhausted(
          "TfshardKVCache: cannot allocate ", (*out)->elements() * (bf16_ ? 2 : 4),
          " bytes for ", (*out)->DebugString(), "; use fewer slots or a shorter length");
    }
    return tensorflow::OkStatus();
  }
  int64_t layers_, slots_, heads_, length_, head_dim_;
  bool bf16_ = false;
};

// ---------------------------------------------------------------------------------------
// Weights from an op's inputs.

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

// A small tensor's values as float (scales, zero points, biases, norm parameters); false
// for another dtype (the caller names the tensor: no message is built on the way).
bool to_floats(const Tensor& t, std::vector<float>* out) {
  const int64_t n = t.NumElements();
  out->resize(n);
  switch (t.dtype()) {
    case tensorflow::DT_FLOAT:
      std::memcpy(out->data(), t.flat<float>().data(), n * 4);
      return true;
    case tensorflow::DT_BFLOAT16: {
      auto v = t.flat<Eigen::bfloat16>();
      for (int64_t i = 0; i < n; ++i) (*out)[i] = static_cast<float>(v(i));
      return true;
    }
    case tensorflow::DT_HALF: {
      auto v = t.flat<Eigen::half>();
      for (int64_t i = 0; i < n; ++i) (*out)[i] = static_cast<float>(v(i));
      return true;
    }
    case tensorflow::DT_UINT8: {
      auto v = t.flat<uint8_t>();
      for (int64_t i = 0; i < n; ++i) (*out)[i] = v(i);
      return true;
    }
    case tensorflow::DT_INT8: {
      auto v = t.flat<int8_t>();
      for (int64_t i = 0; i < n; ++i) (*out)[i] = v(i);
      return true;
    }
    case tensorflow::DT_INT32: {
      auto v = t.flat<int32_t>();
      for (int64_t i = 0; i < n; ++i) (*out)[i] = static_cast<float>(v(i));
      return true;
    }
    default:
      return false;
  }
}

// The error for a small tensor of a dtype `to_floats` does not read.
Status not_floats(const Tensor& t, const std::string& what) {
  return errors::InvalidArgument(what, ": dtype ", tensorflow::DataTypeString(t.dtype()),
                                 " is not a float or small integer type");
}

struct Weights {
  std::vector<Tensor> values;  // the variables' buffers, held while the op runs
  std::vector<Weight> w;
  std::vector<const std::string*> names;  // the parsed formats' (the op's) layer names
  std::vector<std::unique_ptr<std::vector<float>>> floats;  // converted small tensors
  std::vector<std::unique_ptr<std::vector<int32_t>>> ints;

  const float* keep(std::vector<float> v) {
    floats.push_back(std::make_unique<std::vector<float>>(std::move(v)));
    return floats.back()->data();
  }
  // A small tensor's values as float into *out: float32 read in place (the tensor is
  // one of `values`, held while the op runs), another dtype converted into a kept copy;
  // false for a dtype `to_floats` does not read (an empty tensor's pointer may be null).
  bool view(const Tensor& t, const float** out) {
    if (t.dtype() == tensorflow::DT_FLOAT) {
      *out = t.flat<float>().data();
      return true;
    }
    std::vector<float> v;
    if (!to_floats(t, &v)) return false;
    *out = keep(std::move(v));
    return true;
  }
};

// One weight's format string, parsed once when the op is built: the Weight's format
// fields (its data and small tensors are bound on every call), how many tensors it takes
// and the dtype its data must have.
struct Spec {
  Weight w;            // fmt, nk, pk, K, N
  int tensors = 1;     // data (+ scale, + zero point and group index)
  bool bias = false;   // a bias follows
  DataType want = tensorflow::DT_FLOAT;
  std::string name, format;
};

Status parse_specs(const std::vector<std::string>& formats,
                   const std::vector<std::string>& names, const std::string& op,
                   std::vector<Spec>* out) {
  out->clear();
  for (size_t f = 0; f < formats.size(); ++f) {
    Spec spec;
    spec.name = f < names.size() ? names[f] : ("weight " + std::to_string(f));
    spec.format = formats[f];
    const std::string& name = spec.name;
    const auto parts = split(formats[f], ':');
    if (parts.size() < 4) {
      return errors::InvalidArgument(op, ": format '", formats[f], "' of ", name,
                                     " is not fmt:layout:K:N[:b]");
    }
    Weight& w = spec.w;
    const std::string& fmt = parts[0];
    if (fmt == "f32") {
      w.fmt = Fmt::F32;
    } else if (fmt == "bf16") {
      w.fmt = Fmt::BF16;
      spec.want = tensorflow::DT_BFLOAT16;
    } else if (fmt == "i8") {
      w.fmt = Fmt::I8;
      spec.tensors = 2;
      spec.want = tensorflow::DT_INT8;
    } else if (fmt == "i4c") {
      w.fmt = Fmt::I4C;
      spec.tensors = 2;
      spec.want = tensorflow::DT_INT8;
    } else if (fmt == "i4g") {
      w.fmt = Fmt::I4G;
      spec.tensors = 4;
      spec.want = tensorflow::DT_INT8;
    } else {
      return errors::InvalidArgument(op, ": format '", fmt, "' of ", name,
                                     " is not one of f32, bf16, i8, i4c, i4g");
    }
    w.nk = parts[1] == "nk";
    w.pk = parts[1] == "pk";
    if (parts[1] != "kn" && !w.nk && !(w.pk && (w.fmt == Fmt::I4C || w.fmt == Fmt::I4G))) {
      return errors::InvalidArgument(op, ": layout '", parts[1], "' of ", name,
                                     " is not kn, nk or (int4) pk");
    }
    w.K = std::strtoll(parts[2].c_str(), nullptr, 10);
    w.N = std::strtoll(parts[3].c_str(), nullptr, 10);
    spec.bias = parts.size() > 4 && parts[4] == "b";
    out->push_back(std::move(spec));
  }
  return tensorflow::OkStatus();
}

// Binds this call's tensors (the variables' current values, in the formats' order) to
// the parsed formats. Messages are built only when something is wrong: this runs for
// every weight of every block at every decode step.
Status bind_weights(const std::vector<Tensor>& list, const std::vector<Spec>& specs,
                     const std::string& op, Weights* out) {
  int i = 0;
  out->w.reserve(specs.size());
  for (const Spec& spec : specs) {
    const std::string& name = spec.name;
    Weight w = spec.w;
    const int tensors = spec.tensors;
    const bool bias = spec.bias;
    if (i + tensors + (bias ? 1 : 0) > static_cast<int>(list.size())) {
      return errors::InvalidArgument(op, ": ", name, " (", spec.format, ") needs ",
                                     tensors + (bias ? 1 : 0), " tensors; the list has ",
                                     list.size() - i, " left");
    }
    const Tensor& data = list[i];
    if (data.dtype() != spec.want) {
      return errors::InvalidArgument(op, ": ", name, " (", spec.format, ") must be ",
                                     tensorflow::DataTypeString(spec.want), ", got ",
                                     tensorflow::DataTypeString(data.dtype()));
    }
    w.data = data.tensor_data().data();
    if (static_cast<int64_t>(data.tensor_data().size()) != w.bytes()) {
      return errors::InvalidArgument(op, ": ", name, " (", spec.format, ") holds ",
                                     data.tensor_data().size(), " bytes (shape ",
                                     data.shape().DebugString(), "); its format needs ",
                                     w.bytes());
    }
    if (tensors >= 2) {
      const Tensor& scale = list[i + 1];
      if (!out->view(scale, &w.scale)) return not_floats(scale, op + ": " + name + " scale");
      const int64_t count = scale.NumElements();
      if (tensors == 4) {
        w.groups = w.N > 0 ? count / w.N : 0;
        if (w.groups < 1 || w.groups * w.N != count) {
          return errors::InvalidArgument(op, ": ", name, " scale has ", count,
                                         " values; grouped int4 needs groups x ", w.N);
        }
      } else if (count != w.N) {
        return errors::InvalidArgument(op, ": ", name, " scale has ", count, " values; ",
                                       spec.format, " needs one per output (", w.N, ")");
      }
    }
    if (tensors == 4) {
      const Tensor& zero = list[i + 2];
      const Tensor& gidx = list[i + 3];
      if (!out->view(zero, &w.zero)) return not_floats(zero, op + ": " + name + " zero point");
      if (zero.NumElements() != w.groups * w.N) {
        return errors::InvalidArgument(op, ": ", name, " zero point has ", zero.NumElements(),
                                       " values; the scale has ", w.groups * w.N);
      }
      if (gidx.NumElements() != w.K) {
        return errors::InvalidArgument(op, ": ", name, " group index has ", gidx.NumElements(),
                                       " entries; the kernel contracts ", w.K);
      }
      const int32_t* g = nullptr;
      if (gidx.dtype() == tensorflow::DT_INT32) {
        g = gidx.flat<int32_t>().data();  // read in place
      } else {
        std::vector<float> f;
        if (!to_floats(gidx, &f)) return not_floats(gidx, op + ": " + name + " group index");
        auto copy = std::make_unique<std::vector<int32_t>>(f.size());
        for (size_t j = 0; j < f.size(); ++j) (*copy)[j] = static_cast<int32_t>(f[j]);
        g = copy->data();
        out->ints.push_back(std::move(copy));
      }
      for (int64_t j = 0; j < w.K; ++j) {
        if (g[j] < 0 || g[j] >= w.groups) {
          return errors::InvalidArgument(op, ": ", name, " group index ", g[j], " at row ",
                                         j, " is outside [0, ", w.groups, ")");
        }
      }
      w.g_idx = g;
    }
    i += tensors;
    if (bias) {
      const Tensor& b = list[i];
      if (!out->view(b, &w.bias)) return not_floats(b, op + ": " + name + " bias");
      if (b.NumElements() != w.N) {
        return errors::InvalidArgument(op, ": ", name, " bias has ", b.NumElements(),
                                       " values; the output has ", w.N);
      }
      ++i;
    }
    out->w.push_back(w);
    out->names.push_back(&spec.name);
  }
  if (i != static_cast<int>(list.size())) {
    return errors::InvalidArgument(op, ": ", list.size(), " weight tensors for formats using ",
                                   i);
  }
  return tensorflow::OkStatus();
}

// The current value of the variable behind resource input `index` (a reference to its
// buffer, not a copy: the op reads Keras's variables in place).
// `what` names the variable in an error; it is called only then.
template <typename What>
Status read_variable(OpKernelContext* ctx, int index, const What& what, Tensor* out) {
  tensorflow::Var* var = nullptr;
  TF_RETURN_IF_ERROR(tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, index), &var));
  tensorflow::core::ScopedUnref unref(var);
  tensorflow::tf_shared_lock lock(*var->mu());
  if (!var->is_initialized) {
    return errors::FailedPrecondition(what(), ": the variable is not initialized");
  }
  *out = *var->tensor();
  return tensorflow::OkStatus();
}

// The values of the variables of list input `name`.
Status read_variables(OpKernelContext* ctx, const char* name, const std::string& op,
                      std::vector<Tensor>* out) {
  int start = 0, stop = 0;
  TF_RETURN_IF_ERROR(ctx->op_kernel().InputRange(name, &start, &stop));
  out->resize(stop - start);
  for (int i = start; i < stop; ++i)
    TF_RETURN_IF_ERROR(read_variable(
        ctx, i, [&] { return op + ": " + name + "[" + std::to_string(i - start) + "]"; },
        &(*out)[i - start]));
  return tensorflow::OkStatus();
}

// ---------------------------------------------------------------------------------------
// Shared pieces of the decode ops.

enum class Round { F32, BF16 };
inline float rnd(Round r, float v) { return r == Round::BF16 ? round_bf16(v) : v; }

// Keras's AbsMax input quantizer for one row: scale = 127 / (max|x| + epsilon), q =
// clip(round(x * scale)) (round half to even, as TensorFlow's round).
inline float quantize_row(const float* x, int64_t n, float amax, int8_t* q) {
  const float scale = 127.0f / (amax + 1e-7f);
  for (int64_t i = 0; i < n; ++i) {
    float v = std::nearbyint(x[i] * scale);
    v = std::min(127.0f, std::max(-127.0f, v));
    q[i] = static_cast<int8_t>(v);
  }
  return scale;
}

// One projection of a list run together: y = x @ w (float out).
struct Job {
  const Weight* w;
  const float* x;         // float input [M, K]
  const int8_t* xq;       // int8 input for I8 weights
  const float* xscale;    // [M] int8 input scales
  float* y;               // [M, N]
  int32_t* acc;           // [M, N] int32 scratch for I8
};

// Runs every job's columns in one parallel region of the CPU device's threads.
void run_jobs(OpKernelContext* ctx, const Kernels& k, std::vector<Job>& jobs, int64_t M,
              Round round) {
  constexpr int64_t kUnit = 64;  // columns per work unit
  std::vector<int64_t> first(jobs.size() + 1, 0);
  int64_t bytes = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    first[j + 1] = first[j] + (jobs[j].w->N + kUnit - 1) / kUnit;
    bytes += jobs[j].w->bytes();
  }
  const int64_t units = first.back();
  if (units == 0 || M == 0) return;
  auto work = [&](int64_t a, int64_t b) {
    while (a < b) {
      const size_t j = std::upper_bound(first.begin(), first.end(), a) - first.begin() - 1;
      const int64_t stop = std::min(b, first[j + 1]);
      const Job& job = jobs[j];
      const int64_t n0 = (a - first[j]) * kUnit, n1 = std::min(job.w->N, (stop - first[j]) * kUnit);
      const int64_t N = job.w->N;
      if (job.w->fmt == Fmt::I8) {
        k.linear_i8(*job.w, job.xq, M, job.acc, N, n0, n1);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            // Keras: cast(acc) / (inputs_scale * kernel_scale), in the compute dtype.
            const float s = job.xscale[m] * job.w->scale[n];
            job.y[m * N + n] = rnd(round, static_cast<float>(job.acc[m * N + n]) / s);
          }
      } else {
        Weight w = *job.w;
        w.bias = nullptr;  // added below, after the product is rounded
        k.linear_f(w, job.x, M, job.y, N, n0, n1);
        if (round == Round::BF16)
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = n0; n < n1; ++n) job.y[m * N + n] = rnd(round, job.y[m * N + n]);
      }
      if (job.w->bias)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n)
            job.y[m * N + n] = rnd(round, job.y[m * N + n] + job.w->bias[n]);
      a = stop;
    }
  };
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t cost = std::max<int64_t>(1, bytes / std::max<int64_t>(1, units)) * std::max<int64_t>(1, M);
  tensorflow::Shard(pool->num_threads, pool->workers, units, cost, work);
}

// Norm of each row of h [M, H] into n: "rms" (keras-hub's LlamaLayerNorm: x * rsqrt(mean
// x^2 + eps) * scale), "rms1p" (Gemma: * (1 + scale)) or "layer" (LayerNormalization:
// (x - mean) * rsqrt(var + eps) * scale + bias). The result is rounded once.
void norm_rows(const Kernels& k, const std::string& kind, float eps, const float* h,
               int64_t M, int64_t H, const std::vector<float>& scale,
               const std::vector<float>& bias, Round round, float* n) {
  for (int64_t m = 0; m < M; ++m) {
    const float* x = h + m * H;
    float* o = n + m * H;
    if (kind == "layer") {
      float mean = 0.0f;
      for (int64_t i = 0; i < H; ++i) mean += x[i];
      mean /= static_cast<float>(H);
      float var = 0.0f;
      for (int64_t i = 0; i < H; ++i) var += (x[i] - mean) * (x[i] - mean);
      var /= static_cast<float>(H);
      const float r = 1.0f / std::sqrt(var + eps);
      for (int64_t i = 0; i < H; ++i)
        o[i] = rnd(round, (x[i] - mean) * r * scale[i] + (bias.empty() ? 0.0f : bias[i]));
    } else {
      const float var = k.sumsq(x, H) / static_cast<float>(H);
      const float r = 1.0f / std::sqrt(var + eps);
      for (int64_t i = 0; i < H; ++i) {
        const float s = kind == "rms1p" ? 1.0f + scale[i] : scale[i];
        o[i] = rnd(round, (x[i] * r) * s);
      }
    }
  }
}

// h = x + delta (+ delta_bias), rounded as a model in the compute dtype rounds: the row
// layer's output (its bias added after the all-reduce), then the residual sum.
void residual(const float* x, const float* delta, const float* bias, int64_t M, int64_t H,
              Round round, float* h) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < H; ++i) {
      float d = rnd(round, delta[m * H + i]);
      if (bias) d = rnd(round, d + bias[i]);
      h[m * H + i] = rnd(round, x[m * H + i] + d);
    }
}

Status get_small(OpKernelContext* ctx, const char* name, std::vector<std::vector<float>>* out,
                 const std::string& op) {
  std::vector<Tensor> values;
  TF_RETURN_IF_ERROR(read_variables(ctx, name, op, &values));
  out->clear();
  for (const Tensor& t : values) {
    out->emplace_back();
    if (!to_floats(t, &out->back())) return not_floats(t, op + ": " + name);
  }
  return tensorflow::OkStatus();
}

// Shared construction of the decode ops: the kernels, formats, names, rounding.
class DecodeOp : public OpKernel {
 public:
  explicit DecodeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("formats", &formats_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("names", &names_));
    // A bad format is reported when the op runs, as a call's InvalidArgument.
    specs_status_ = parse_specs(formats_, names_, name(), &specs_);
    std::string rounding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rounding", &rounding));
    OP_REQUIRES(ctx, rounding == "float32" || rounding == "bfloat16",
                errors::InvalidArgument(name(), ": rounding must be float32 or bfloat16, got ",
                                        rounding));
    round_ = rounding == "bfloat16" ? Round::BF16 : Round::F32;
    std::string isa, error;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("isa", &isa));
    kernels_ = isa.empty() ? tfshard::kernels(&error) : tfshard::kernels_named(isa, &error);
    OP_REQUIRES(ctx, kernels_ != nullptr, errors::FailedPrecondition(name(), ": ", error));
  }
  bool IsExpensive() override { return false; }  // run inline; the work is sharded inside

 protected:
  Status weights(OpKernelContext* ctx, Weights* w) {
    TF_RETURN_IF_ERROR(specs_status_);
    TF_RETURN_IF_ERROR(read_variables(ctx, "weights", name(), &w->values));
    return bind_weights(w->values, specs_, name(), w);
  }
  Status check_rows(const Tensor& t, const char* what, int64_t H) {
    if (t.dims() != 2 || t.dim_size(1) != H) {
      return errors::InvalidArgument(name(), ": ", what, " must be [rows, ", H, "], got ",
                                     t.shape().DebugString());
    }
    return tensorflow::OkStatus();
  }
  std::vector<std::string> formats_, names_;
  std::vector<Spec> specs_;
  Status specs_status_;
  Round round_ = Round::F32;
  const Kernels* kernels_ = nullptr;
};

// Quantizes rows of x [M, K] for the I8 jobs (Keras's AbsMax, per row), with the row
// maxima in `amax` ([M, G]: the maxima of every rank's slice of the row, for a row
// layer) or, when empty, of x itself.
void quantize_for(const float* x, int64_t M, int64_t K, const Tensor* amax,
                  std::vector<int8_t>* xq, std::vector<float>* xscale) {
  xq->resize(M * K);
  xscale->resize(M);
  for (int64_t m = 0; m < M; ++m) {
    float mx = 0.0f;
    if (amax && amax->NumElements() > 0) {
      const int64_t G = amax->NumElements() / M;
      const float* a = amax->flat<float>().data() + m * G;
      for (int64_t g = 0; g < G; ++g) mx = std::max(mx, a[g]);
    } else {
      for (int64_t i = 0; i < K; ++i) mx = std::max(mx, std::fabs(x[m * K + i]));
    }
    (*xscale)[m] = quantize_row(x + m * K, K, mx, xq->data() + m * K);
  }
}

// Runs projections of one input x [M, K] into outputs (allocated by the caller).
void project(OpKernelContext* ctx, const Kernels& k, const std::vector<const Weight*>& ws,
             const float* x, int64_t M, const Tensor* amax, const std::vector<float*>& outs,
             Round round) {
  std::vector<Job> jobs;
  std::vector<int8_t> xq;
  std::vector<float> xscale;
  std::vector<std::vector<int32_t>> accs(ws.size());
  bool quantized = false;
  for (size_t j = 0; j < ws.size(); ++j) {
    Job job{ws[j], x, nullptr, nullptr, outs[j], nullptr};
    if (ws[j]->fmt == Fmt::I8) {
      if (!quantized) {
        quantize_for(x, M, ws[j]->K, amax, &xq, &xscale);
        quantized = true;
      }
      accs[j].resize(M * ws[j]->N);
      job.xq = xq.data();
      job.xscale = xscale.data();
      job.acc = accs[j].data();
    }
    jobs.push_back(job);
  }
  run_jobs(ctx, k, jobs, M, round);
}

// ---------------------------------------------------------------------------------------

// What the block ops share: x and delta [rows, H], the delta bias, the norm's parameters,
// the weights; h = x + delta (rounded as the model rounds) and its norm.
class BlockOp : public DecodeOp {
 public:
  explicit BlockOp(OpKernelConstruction* ctx) : DecodeOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("norm_kind", &norm_kind_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("eps", &eps_));
  }

 protected:
  struct In {
    const Tensor* x = nullptr;
    const Tensor* delta = nullptr;
    int64_t M = 0, H = 0;
    std::vector<std::vector<float>> dbias, norm;
    Weights ws;
  };

  Status read(OpKernelContext* ctx, In* in) {
    in->x = &ctx->input(0);
    in->delta = &ctx->input(1);
    const Tensor& x = *in->x;
    in->H = x.dims() == 2 ? x.dim_size(1) : 0;
    in->M = x.dims() == 2 ? x.dim_size(0) : 0;
    TF_RETURN_IF_ERROR(check_rows(x, "x", in->H));
    if (in->delta->shape() != x.shape()) {
      return errors::InvalidArgument(name(), ": delta ", in->delta->shape().DebugString(),
                                     " must match x ", x.shape().DebugString());
    }
    TF_RETURN_IF_ERROR(get_small(ctx, "delta_bias", &in->dbias, name()));
    TF_RETURN_IF_ERROR(get_small(ctx, "norm", &in->norm, name()));
    return weights(ctx, &in->ws);
  }

  // h = x + delta (+ bias) for `rows` rows of x and delta, and n = norm(h).
  void residual_norm(const In& in, const float* x, const float* delta, int64_t rows, float* h,
                     float* n) const {
    residual(x, delta, in.dbias.empty() ? nullptr : in.dbias[0].data(), rows, in.H, round_, h);
    norm_rows(*kernels_, norm_kind_, eps_, h, rows, in.H, in.norm[0],
              in.norm.size() > 1 ? in.norm[1] : std::vector<float>(), round_, n);
  }

  std::string norm_kind_;
  float eps_ = 1e-6f;
};

class AttentionOp : public BlockOp {
 public:
  explicit AttentionOp(OpKernelConstruction* ctx) : BlockOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("layer", &layer_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("heads", &heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kv_heads", &kv_heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("head_dim", &head_dim_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("score_scale", &score_scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("window", &window_));
    OP_REQUIRES(ctx, heads_ > 0 && kv_heads_ > 0 && heads_ % kv_heads_ == 0,
                errors::InvalidArgument(name(), ": ", heads_, " query heads cannot share ",
                                        kv_heads_, " K/V heads evenly"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Kernels& k = *kernels_;
    In in;
    OP_REQUIRES_OK(ctx, read(ctx, &in));
    const Tensor& x = *in.x;
    const int64_t H = in.H, M = in.M;
    Weights& ws = in.ws;
    const int64_t D = head_dim_, nq = heads_ * D, nkv = kv_heads_ * D;
    OP_REQUIRES(ctx, ws.w.size() == 3 || ws.w.size() == 4,
                errors::InvalidArgument(name(), ": weights are q, k, v[, o]; got ", ws.w.size()));
    OP_REQUIRES(ctx, ws.w[0].N == nq && ws.w[1].N == nkv && ws.w[2].N == nkv &&
                     ws.w[0].K == H && ws.w[1].K == H && ws.w[2].K == H,
                errors::InvalidArgument(name(), ": q/k/v are ", ws.w[0].K, "x", ws.w[0].N, ", ",
                                        ws.w[1].K, "x", ws.w[1].N, ", ", ws.w[2].K, "x",
                                        ws.w[2].N, "; expected ", H, "x", nq, " and ", H, "x",
                                        nkv, " (", heads_, " heads, ", kv_heads_,
                                        " K/V heads, head_dim ", D, ")"));
    const bool fused_out = ws.w.size() == 4;
    if (fused_out) {
      OP_REQUIRES(ctx, ws.w[3].K == nq,
                  errors::InvalidArgument(name(), ": the output projection contracts ",
                                          ws.w[3].K, "; the heads give ", nq));
    }
    std::vector<Tensor> ropes;
    OP_REQUIRES_OK(ctx, read_variables(ctx, "rope", name(), &ropes));
    const bool has_rope = !ropes.empty();
    const Tensor rope = has_rope ? ropes[0] : Tensor(tensorflow::DT_FLOAT, TensorShape({0, 0}));
    if (has_rope)
      OP_REQUIRES(ctx, rope.dtype() == tensorflow::DT_FLOAT,
                  errors::InvalidArgument(name(), ": the rotary table must be float32"));
    KVCache* cache_raw = nullptr;
    int cache_at = 0, cache_end = 0;
    OP_REQUIRES_OK(ctx, ctx->op_kernel().InputRange("cache", &cache_at, &cache_end));
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, cache_at), &cache_raw));
    tensorflow::core::ScopedUnref unref(cache_raw);
    KVCache* cache = cache_raw;
    const Tensor& slots_t = ctx->input(cache_end);
    const Tensor& pos_t = ctx->input(cache_end + 1);
    OP_REQUIRES(ctx, slots_t.NumElements() == M && pos_t.NumElements() == M,
                errors::InvalidArgument(name(), ": slots ", slots_t.shape().DebugString(),
                                        " and positions ", pos_t.shape().DebugString(),
                                        " must have one entry per row (", M, ")"));
    OP_REQUIRES(ctx, layer_ < cache->layers && kv_heads_ == cache->heads && D == cache->head_dim,
                errors::InvalidArgument(name(), ": layer ", layer_, " with ", kv_heads_,
                                        " K/V heads of ", D, " does not fit ",
                                        cache->DebugString()));
    const int32_t* slots = slots_t.flat<int32_t>().data();
    const int32_t* pos = pos_t.flat<int32_t>().data();
    for (int64_t m = 0; m < M; ++m) {
      OP_REQUIRES(ctx, slots[m] >= 0 && slots[m] < cache->slots,
                  errors::InvalidArgument(name(), ": row ", m, " has slot ", slots[m], "; ",
                                          cache->DebugString(), " has slots [0, ",
                                          cache->slots, ")"));
      OP_REQUIRES(ctx, pos[m] >= 0 && pos[m] < cache->length,
                  errors::InvalidArgument(name(), ": row ", m, " is at position ", pos[m], "; ",
                                          cache->DebugString(), " holds positions [0, ",
                                          cache->length, ")"));
      if (has_rope) {
        OP_REQUIRES(ctx, pos[m] < rope.dim_size(0),
                    errors::InvalidArgument(name(), ": row ", m, " is at position ", pos[m],
                                            " past the rotary table's ", rope.dim_size(0)));
      }
    }
    if (has_rope) {
      OP_REQUIRES(ctx, rope.dims() == 2 && rope.dim_size(1) == D,
                  errors::InvalidArgument(name(), ": rope must be [positions, ", D,
                                          "] (cos | sin), got ", rope.shape().DebugString()));
    }

    Tensor *h_t = nullptr, *out_t = nullptr, *amax_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &h_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({M, fused_out ? ws.w[3].N : nq}), &out_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({M}), &amax_t));
    if (M == 0) return;
    float* h = h_t->flat<float>().data();
    std::vector<float> n(M * H);
    residual_norm(in, x.flat<float>().data(), in.delta->flat<float>().data(), M, h, n.data());
    std::vector<float> q(M * nq), kk(M * nkv), v(M * nkv);
    project(ctx, k, {&ws.w[0], &ws.w[1], &ws.w[2]}, n.data(), M, nullptr,
            {q.data(), kk.data(), v.data()}, round_);

    // Rotary embedding (keras-hub: x * cos + rotate_half(x) * sin, halves of head_dim).
    const int64_t half = D / 2;
    auto rotate = [&](float* vec, int32_t p) {
      const float* c = rope.flat<float>().data() + static_cast<int64_t>(p) * D;
      const float* s = c + half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = vec[i], b = vec[i + half];
        vec[i] = rnd(round_, rnd(round_, a * c[i]) + rnd(round_, -b * s[i]));
        vec[i + half] = rnd(round_, rnd(round_, b * c[i]) + rnd(round_, a * s[i]));
      }
    };
    if (has_rope) {
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t hh = 0; hh < heads_; ++hh) rotate(q.data() + m * nq + hh * D, pos[m]);
        for (int64_t hh = 0; hh < kv_heads_; ++hh) rotate(kk.data() + m * nkv + hh * D, pos[m]);
      }
    }
    // Into the cache, every row first (a prompt's rows read each other's). Each layer's
    // op owns its layer's part; the step's ops run one after another on a resource.
    {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < kv_heads_; ++g)
          for (int kv = 0; kv < 2; ++kv) {
            const float* src = (kv ? v.data() : kk.data()) + m * nkv + g * D;
            const int64_t at = cache->at(layer_, slots[m], kv, g, pos[m]);
            if (cache->bf16) {
              for (int64_t i = 0; i < D; ++i) cache->b16()[at + i] = f_to_bf16(src[i]);
            } else {
              std::memcpy(cache->f32() + at, src, D * 4);
            }
          }
    }
    // Attention of each (row, head) over positions 0..pos, or, with a sliding window of W
    // positions (Mistral's), over the last W of them: pos-W+1..pos.
    std::vector<float> att(M * nq);
    const int64_t groups = heads_ / kv_heads_;
    const float scale = rnd(round_, score_scale_);
    auto attend = [&](int64_t a, int64_t b) {
      std::vector<float> scores;
      std::vector<float> acc(D);
      for (int64_t u = a; u < b; ++u) {
        const int64_t m = u / heads_, hh = u % heads_, g = hh / groups;
        const int64_t first = window_ > 0 ? std::max<int64_t>(0, pos[m] - window_ + 1) : 0;
        const int64_t len = pos[m] + 1 - first;
        const float* qv = q.data() + m * nq + hh * D;
        scores.resize(len);
        const int64_t kat = cache->at(layer_, slots[m], 0, g, first);
        const int64_t vat = cache->at(layer_, slots[m], 1, g, first);
        float mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          const float d = cache->bf16 ? k.dot_bf16(qv, cache->b16() + kat + t * D, D)
                                      : k.dot(qv, cache->f32() + kat + t * D, D);
          scores[t] = rnd(round_, rnd(round_, d) * scale);
          mx = std::max(mx, scores[t]);
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
          scores[t] = std::exp(scores[t] - mx);
          sum += scores[t];
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t t = 0; t < len; ++t) {
          const float p = rnd(round_, scores[t] / sum);
          if (cache->bf16) k.axpy_bf16(p, cache->b16() + vat + t * D, acc.data(), D);
          else k.axpy(p, cache->f32() + vat + t * D, acc.data(), D);
        }
        float* o = att.data() + m * nq + hh * D;
        for (int64_t i = 0; i < D; ++i) o[i] = rnd(round_, acc[i]);
      }
    };
    {
      auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
      int64_t longest = 1;
      for (int64_t m = 0; m < M; ++m) longest = std::max<int64_t>(longest, pos[m] + 1);
      tensorflow::Shard(pool->num_threads, pool->workers, M * heads_, longest * D * 8, attend);
    }
    float* amax = amax_t->flat<float>().data();
    for (int64_t m = 0; m < M; ++m) amax[m] = k.absmax(att.data() + m * nq, nq);
    if (fused_out) {
      project(ctx, k, {&ws.w[3]}, att.data(), M, nullptr, {out_t->flat<float>().data()},
              Round::F32);  // a partial sum: rounded after the all-reduce
    } else {
      std::memcpy(out_t->flat<float>().data(), att.data(), M * nq * 4);
    }
  }

 private:
  int64_t layer_, heads_, kv_heads_, head_dim_, window_ = 0;
  float score_scale_ = 1.0f;
};

class MlpOp : public BlockOp {
 public:
  explicit MlpOp(OpKernelConstruction* ctx) : BlockOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("gated", &gated_));
    OP_REQUIRES(ctx, activation_ == "silu" || activation_ == "gelu" || activation_ == "gelu_tanh" ||
                     activation_ == "relu",
                errors::InvalidArgument(name(), ": activation ", activation_,
                                        " is not one of silu, gelu, gelu_tanh, relu"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Kernels& k = *kernels_;
    In in;
    OP_REQUIRES_OK(ctx, read(ctx, &in));
    const Tensor& x = *in.x;
    const int64_t H = in.H, M = in.M;
    Weights& ws = in.ws;
    const size_t ins = gated_ ? 2 : 1;
    OP_REQUIRES(ctx, ws.w.size() == ins || ws.w.size() == ins + 1,
                errors::InvalidArgument(name(), ": weights are ", gated_ ? "gate, up" : "up",
                                        "[, down]; got ", ws.w.size()));
    const int64_t F = ws.w[0].N;
    for (size_t j = 0; j < ins; ++j)
      OP_REQUIRES(ctx, ws.w[j].K == H && ws.w[j].N == F,
                  errors::InvalidArgument(name(), ": ", *ws.names[j], " is ", ws.w[j].K, "x",
                                          ws.w[j].N, "; expected ", H, "x", F));
    const bool fused_out = ws.w.size() == ins + 1;
    if (fused_out)
      OP_REQUIRES(ctx, ws.w[ins].K == F,
                  errors::InvalidArgument(name(), ": ", *ws.names[ins], " contracts ",
                                          ws.w[ins].K, "; the hidden layer has ", F));
    Tensor *h_t = nullptr, *out_t = nullptr, *amax_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &h_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({M, fused_out ? ws.w[ins].N : F}), &out_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({M}), &amax_t));
    if (M == 0) return;
    float* h = h_t->flat<float>().data();
    std::vector<float> n(M * H);
    residual_norm(in, x.flat<float>().data(), in.delta->flat<float>().data(), M, h, n.data());
    std::vector<float> a(M * F), u(gated_ ? M * F : 0);
    if (gated_) project(ctx, k, {&ws.w[0], &ws.w[1]}, n.data(), M, nullptr, {a.data(), u.data()}, round_);
    else project(ctx, k, {&ws.w[0]}, n.data(), M, nullptr, {a.data()}, round_);
    for (int64_t i = 0; i < M * F; ++i) {
      const float g = a[i];
      float act;
      if (activation_ == "silu") act = g / (1.0f + std::exp(-g));
      else if (activation_ == "relu") act = g > 0.0f ? g : 0.0f;
      else if (activation_ == "gelu") act = 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));
      else act = 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
      // keras-hub runs a gated activation in float32 and rounds its result, then the product.
      a[i] = gated_ ? rnd(round_, rnd(round_, act) * u[i]) : rnd(round_, act);
    }
    float* amax = amax_t->flat<float>().data();
    for (int64_t m = 0; m < M; ++m) amax[m] = k.absmax(a.data() + m * F, F);
    if (fused_out) {
      project(ctx, k, {&ws.w[ins]}, a.data(), M, nullptr, {out_t->flat<float>().data()}, Round::F32);
    } else {
      std::memcpy(out_t->flat<float>().data(), a.data(), M * F * 4);
    }
  }

 private:
  std::string activation_;
  bool gated_ = true;
};

// One projection: y = x @ w; an I8 weight quantizes x with `amax` (every rank's row
// maxima, [M, G]) or, when amax is empty, with x's own. Rounded only when `round_output`.
class LinearOp : public DecodeOp {
 public:
  explicit LinearOp(OpKernelConstruction* ctx) : DecodeOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("round_output", &round_output_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& amax = ctx->input(1);
    Weights ws;
    OP_REQUIRES_OK(ctx, weights(ctx, &ws));
    OP_REQUIRES(ctx, ws.w.size() == 1,
                errors::InvalidArgument(name(), ": takes one weight, got ", ws.w.size()));
    const Weight& w = ws.w[0];
    OP_REQUIRES_OK(ctx, check_rows(x, "x", w.K));
    const int64_t M = x.dim_size(0);
    if (amax.NumElements() > 0)
      OP_REQUIRES(ctx, amax.dims() == 2 && amax.dim_size(0) == M,
                  errors::InvalidArgument(name(), ": amax must be [", M, ", ranks], got ",
                                          amax.shape().DebugString()));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, w.N}), &y));
    if (M == 0) return;
    project(ctx, *kernels_, {&w}, x.flat<float>().data(), M, &amax, {y->flat<float>().data()},
            round_output_ ? round_ : Round::F32);
  }

 private:
  bool round_output_ = false;
};

// Token rows of the rank's vocabulary slice [start, start + rows); zeros for other ids.
class EmbedOp : public DecodeOp {
 public:
  explicit EmbedOp(OpKernelConstruction* ctx) : DecodeOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("start", &start_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& ids_t = ctx->input(0);
    Weights ws;
    OP_REQUIRES_OK(ctx, weights(ctx, &ws));
    OP_REQUIRES(ctx, ws.w.size() == 1 && ws.w[0].nk,
                errors::InvalidArgument(name(), ": takes one table in nk layout [rows, dim]"));
    const Weight& w = ws.w[0];
    const int64_t M = ids_t.NumElements(), H = w.K, V = w.N;
    Tensor* y_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, H}), &y_t));
    float* y = y_t->flat<float>().data();
    const int32_t* ids = ids_t.flat<int32_t>().data();
    const uint8_t* base = static_cast<const uint8_t*>(w.data);
    const int64_t rb = w.row_bytes();
    for (int64_t m = 0; m < M; ++m) {
      float* o = y + m * H;
      const int64_t r = static_cast<int64_t>(ids[m]) - start_;
      if (r < 0 || r >= V) {
        std::fill(o, o + H, 0.0f);
        continue;
      }
      const uint8_t* row = base + r * rb;
      for (int64_t i = 0; i < H; ++i) {
        float v;
        switch (w.fmt) {
          case Fmt::F32: v = reinterpret_cast<const float*>(row)[i]; break;
          case Fmt::BF16: v = bf16_to_f(reinterpret_cast<const uint16_t*>(row)[i]); break;
          case Fmt::I8: v = static_cast<float>(reinterpret_cast<const int8_t*>(row)[i]) / w.scale[r]; break;
          default: {
            const int nib = (row[i / 2] >> ((i & 1) * 4)) & 0xF;
            const float q = static_cast<float>((nib ^ 8) - 8);
            if (w.fmt == Fmt::I4C) {
              v = q / w.scale[r];
            } else {
              const int64_t at = r * w.groups + w.g_idx[i];
              v = (q - w.zero[at]) * w.scale[at];
            }
          }
        }
        o[i] = rnd(round_, v);
      }
    }
  }

 private:
  int64_t start_ = 0;
};

// Final norm and the logits of the rank's vocabulary slice, for the rows `rows` picks.
class HeadOp : public BlockOp {
 public:
  explicit HeadOp(OpKernelConstruction* ctx) : BlockOp(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    In in;
    OP_REQUIRES_OK(ctx, read(ctx, &in));
    const Tensor& x = *in.x;
    const int64_t H = in.H, M = in.M;
    Weights& ws = in.ws;
    OP_REQUIRES(ctx, ws.w.size() == 1 && ws.w[0].K == H,
                errors::InvalidArgument(name(), ": takes one weight contracting ", H));
    int rows_at = 0, rows_end = 0;
    OP_REQUIRES_OK(ctx, ctx->op_kernel().InputRange("rows", &rows_at, &rows_end));
    const Tensor& rows_t = ctx->input(rows_at);
    const int64_t R = rows_t.NumElements();
    const int32_t* rows = rows_t.flat<int32_t>().data();
    for (int64_t r = 0; r < R; ++r)
      OP_REQUIRES(ctx, rows[r] >= 0 && rows[r] < M,
                  errors::InvalidArgument(name(), ": row ", rows[r], " is outside [0, ", M, ")"));
    std::vector<float> xs(R * H), ds(R * H), h(R * H), n(R * H);
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(xs.data() + r * H, x.flat<float>().data() + rows[r] * H, H * 4);
      std::memcpy(ds.data() + r * H, in.delta->flat<float>().data() + rows[r] * H, H * 4);
    }
    residual_norm(in, xs.data(), ds.data(), R, h.data(), n.data());
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({R, ws.w[0].N}), &y));
    if (R == 0) return;
    project(ctx, *kernels_, {&ws.w[0]}, n.data(), R, nullptr, {y->flat<float>().data()}, round_);
  }
};

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("TfshardKVCache")
    .Output("handle: resource")
    .Attr("layers: int >= 1")
    .Attr("slots: int >= 1")
    .Attr("heads: int >= 1")
    .Attr("length: int >= 1")
    .Attr("head_dim: int >= 1")
    .Attr("dtype: {float, bfloat16}")
    .Attr("container: string = ''")
    .Attr("shared_name: string = ''")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

REGISTER_OP("TfshardDecodeAttention")
    .Input("x: float")
    .Input("delta: float")
    .Input("delta_bias: Nb * resource")
    .Input("norm: Nn * resource")
    .Input("weights: Nw * resource")
    .Input("rope: Nr * resource")
    .Input("cache: resource")
    .Input("slots: int32")
    .Input("positions: int32")
    .Output("h: float")
    .Output("out: float")
    .Output("row_amax: float")
    .Attr("Nb: int >= 0")
    .Attr("Nn: int >= 1")
    .Attr("Nw: int >= 1")
    .Attr("Nr: int >= 0")
    .Attr("formats: list(string)")
    .Attr("names: list(string) = []")
    .Attr("rounding: string = 'float32'")
    .Attr("isa: string = ''")
    .Attr("layer: int >= 0")
    .Attr("heads: int >= 1")
    .Attr("kv_heads: int >= 1")
    .Attr("head_dim: int >= 1")
    .Attr("norm_kind: string = 'rms'")
    .Attr("eps: float = 1e-6")
    .Attr("score_scale: float = 1.0")
    .Attr("window: int >= 0 = 0")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->Matrix(c->Dim(c->input(0), 0), c->UnknownDim()));
      c->set_output(2, c->Vector(c->Dim(c->input(0), 0)));
      return tensorflow::OkStatus();
    });

REGISTER_OP("TfshardDecodeMlp")
    .Input("x: float")
    .Input("delta: float")
    .Input("delta_bias: Nb * resource")
    .Input("norm: Nn * resource")
    .Input("weights: Nw * resource")
    .Output("h: float")
    .Output("out: float")
    .Output("row_amax: float")
    .Attr("Nb: int >= 0")
    .Attr("Nn: int >= 1")
    .Attr("Nw: int >= 1")
    .Attr("formats: list(string)")
    .Attr("names: list(string) = []")
    .Attr("rounding: string = 'float32'")
    .Attr("isa: string = ''")
    .Attr("norm_kind: string = 'rms'")
    .Attr("eps: float = 1e-6")
    .Attr("activation: string = 'silu'")
    .Attr("gated: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->Matrix(c->Dim(c->input(0), 0), c->UnknownDim()));
      c->set_output(2, c->Vector(c->Dim(c->input(0), 0)));
      return tensorflow::OkStatus();
    });

REGISTER_OP("TfshardDecodeLinear")
    .Input("x: float")
    .Input("amax: float")
    .Input("weights: Nw * resource")
    .Output("y: float")
    .Attr("Nw: int >= 1")
    .Attr("formats: list(string)")
    .Attr("names: list(string) = []")
    .Attr("rounding: string = 'float32'")
    .Attr("isa: string = ''")
    .Attr("round_output: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Matrix(c->Dim(c->input(0), 0), c->UnknownDim()));
      return tensorflow::OkStatus();
    });

REGISTER_OP("TfshardDecodeEmbed")
    .Input("ids: int32")
    .Input("weights: Nw * resource")
    .Output("y: float")
    .Attr("Nw: int >= 1")
    .Attr("formats: list(string)")
    .Attr("names: list(string) = []")
    .Attr("rounding: string = 'float32'")
    .Attr("isa: string = ''")
    .Attr("start: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Matrix(c->NumElements(c->input(0)), c->UnknownDim()));
      return tensorflow::OkStatus();
    });

REGISTER_OP("TfshardDecodeHead")
    .Input("x: float")
    .Input("delta: float")
    .Input("delta_bias: Nb * resource")
    .Input("norm: Nn * resource")
    .Input("weights: Nw * resource")
    .Input("rows: int32")
    .Output("logits: float")
    .Attr("Nb: int >= 0")
    .Attr("Nn: int >= 1")
    .Attr("Nw: int >= 1")
    .Attr("formats: list(string)")
    .Attr("names: list(string) = []")
    .Attr("rounding: string = 'float32'")
    .Attr("isa: string = ''")
    .Attr("norm_kind: string = 'rms'")
    .Attr("eps: float = 1e-6")
    .SetShapeFn([](InferenceContext* c) {
      std::vector<ShapeHandle> rows;
      TF_RETURN_IF_ERROR(c->input("rows", &rows));
      c->set_output(0, c->Matrix(c->NumElements(rows[0]), c->UnknownDim()));
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfshardKVCache").Device(tensorflow::DEVICE_CPU), KVCacheOp);
REGISTER_KERNEL_BUILDER(Name("TfshardDecodeAttention").Device(tensorflow::DEVICE_CPU), AttentionOp);
REGISTER_KERNEL_BUILDER(Name("TfshardDecodeMlp").Device(tensorflow::DEVICE_CPU), MlpOp);
REGISTER_KERNEL_BUILDER(Name("TfshardDecodeLinear").Device(tensorflow::DEVICE_CPU), LinearOp);
REGISTER_KERNEL_BUILDER(Name("TfshardDecodeEmbed").Device(tensorflow::DEVICE_CPU), EmbedOp);
REGISTER_KERNEL_BUILDER(Name("TfshardDecodeHead").Device(tensorflow::DEVICE_CPU), HeadOp);

}  // namespace
}  // namespace tfshard

extern "C" {
// The instruction set the kernels run on this CPU now ("avx512", "avx2", "generic",
// "generic16"), or an error message starting with "error: ".
const char* tfshard_kernels_isa() {
  static thread_local std::string out;
  std::string error;
  const tfshard::Kernels* k = tfshard::kernels(&error);
  out = k ? k->name : "error: " + error;
  return out.c_str();
}
}
