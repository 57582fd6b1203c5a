// tfshard's MPI collectives as TensorFlow ops: no negotiation, a deadline on every wait.
//
// Tensor-parallel inference issues its collectives in the same order on every rank (the
// ops are stateful, so tf.function's automatic control dependencies run them in program
// order), so none of Horovod's background negotiation is needed: each op starts a
// non-blocking MPI collective on the communicator it is given and polls it to completion
// on the calling thread. Polling spins briefly, then yields, then sleeps with a growing
// back-off, so a rank waiting for a slower one gives its core back (ranks may outnumber
// cores). Every wait has a deadline; when it passes, the op fails with an error that names
// the collective, this rank, and the ranks that never arrived with where they were last
// seen (read from a small shared-memory "board" on which each rank of the host notes the
// collective it is in). A rank found dead or stopped ends the wait early. After a failure
// the communicator state is unknown, so every later op fails at once with the first error.
//
// Ops (T: float32, float64, bfloat16, float16, int32, int64, uint8):
//   TfshardMpiAllreduce   sum over ranks (bfloat16/float16 summed in float32); with
//                         wire16, a 16-bit float is sent in its own 16 bits and each
//                         reduction step adds two partials in float32, rounding once
//   TfshardMpiAllgather   concatenation on axis 0, lengths may differ per rank
//   TfshardMpiBroadcast   the root's tensor on every rank
//   TfshardMpiSend / TfshardMpiRecv   point to point (pipeline stages)
// Attributes common to all: comm (the communicator's Fortran handle, MPI_Comm_c2f), group
// (an id the ranks agree on, for the board and messages), timeout (seconds), what (label).
//
// Built by scripts/build_mpi_ops.sh against TensorFlow's headers and the venv's MPICH.

#include <mpi.h>

#include <sched.h>
#include <sys/prctl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tfshard {

using tensorflow::DataType;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// ---------------------------------------------------------------------------------------
// The board: one slot per rank of this host in memory the ranks share (an MPI shared
// window set up from Python, see tfshard/comm/mpi.py), written on entering and leaving
// every collective and read only to explain a timeout.

struct Slot {
  int64_t world_rank;
  int64_t pid;
  int64_t group;
  int64_t seq;      // per-group collective number, the same on every rank of the group
  int64_t inside;   // 1 while waiting in the collective
  double t_enter;   // CLOCK_REALTIME seconds
  double t_exit;
  char what[72];
};
static_assert(sizeof(Slot) == 128, "board slots are 128 bytes");

struct Board {
  Slot* slots = nullptr;
  int count = 0;
  int mine = -1;  // this rank's slot
};

static Board g_board;
static std::mutex g_mu;               // guards g_error and per-group sequence numbers
static std::atomic<bool> g_broken{false};
static std::string g_error;
static std::vector<std::pair<int64_t, int64_t>> g_seq;  // (group, next seq)

static double now_wall() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int64_t next_seq(int64_t group) {
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto& p : g_seq) {
    if (p.first == group) return p.second++;
  }
  g_seq.emplace_back(group, 1);
  return 0;
}

static void note_enter(int64_t group, int64_t seq, const std::string& what) {
  if (!g_board.slots || g_board.mine < 0) return;
  Slot* s = &g_board.slots[g_board.mine];
  s->group = group;
  s->seq = seq;
  s->t_enter = now_wall();
  std::snprintf(s->what, sizeof(s->what), "%s", what.c_str());
  std::atomic_thread_fence(std::memory_order_release);
  s->inside = 1;
}

static void note_exit() {
  if (!g_board.slots || g_board.mine < 0) return;
  Slot* s = &g_board.slots[g_board.mine];
  s->t_exit = now_wall();
  std::atomic_thread_fence(std::memory_order_release);
  s->inside = 0;
}

// 'R' running, 'S' sleeping, 'T' stopped, 'Z' zombie, 'X' gone.
static char process_state(int64_t pid) {
  if (pid <= 0) return '?';
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return 'X';
  std::string line;
  std::getline(f, line);
  auto close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return '?';
  return line[close + 2];
}

static const Slot* slot_of(int world_rank) {
  for (int i = 0; i < g_board.count; ++i) {
    if (g_board.slots[i].world_rank == world_rank) return &g_board.slots[i];
  }
  return nullptr;
}

static std::vector<int> world_ranks_of(MPI_Comm comm) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  MPI_Group group, world;
  MPI_Comm_group(comm, &group);
  MPI_Comm_group(MPI_COMM_WORLD, &world);
  std::vector<int> mine(size), out(size);
  for (int i = 0; i < size; ++i) mine[i] = i;
  MPI_Group_translate_ranks(group, size, mine.data(), world, out.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world);
  return out;
}

struct Peer {
  int rank;        // rank within the group
  int world_rank;
  bool arrived;    // inside this very collective, or already past it
  char state;      // process state, '?' when not on this host
  std::string seen;
};

// What every member of `comm` is doing, as far as the board shows.
static std::vector<Peer> survey(const std::vector<int>& world, int64_t group, int64_t seq) {
  std::vector<Peer> peers;
  double now = now_wall();
  for (size_t r = 0; r < world.size(); ++r) {
    Peer p{static_cast<int>(r), world[r], false, '?', ""};
    const Slot* s = slot_of(world[r]);
    if (s == nullptr) {
      p.seen = "on another host (no shared board)";
      p.arrived = true;  // unknown: do not accuse it
      peers.push_back(p);
      continue;
    }
    Slot copy = *s;
    std::atomic_thread_fence(std::memory_order_acquire);
    p.state = process_state(copy.pid);
    p.arrived = copy.group == group && copy.seq >= seq;
    std::ostringstream o;
    o << "pid " << copy.pid;
    if (p.state == 'T' || p.state == 't') o << ", stopped";
    if (p.state == 'X' || p.state == 'Z') o << ", dead";
    if (copy.t_enter <= 0) {
      o << "; no collective seen yet";
    } else {
      o << "; last seen " << (copy.inside ? "inside " : "after ") << copy.what << " (group "
        << copy.group << " #" << copy.seq << ") entered " << std::fixed;
      o.precision(1);
      o << (now - copy.t_enter) << " s ago";
      if (!copy.inside) o << ", left " << (now - copy.t_exit) << " s ago";
    }
    p.seen = o.str();
    peers.push_back(p);
  }
  return peers;
}

// ---------------------------------------------------------------------------------------
// Waiting with a deadline.

struct Call {
  MPI_Comm comm;
  int64_t group;
  int64_t seq;
  double timeout;
  std::string what;  // e.g. "all-reduce 'layer/x' [1,576] float32"
  int64_t sig;       // what every rank must agree on (kind, dtype, shape, name); 0: unchecked
  const std::vector<int>* members;  // world rank of each rank of `comm`
};

// Whether every member of the call's group shows, on the board, that it reached this
// collective (or passed it). Members on other hosts count as arrived (unknown here).
static bool all_arrived(const Call& c) {
  if (!g_board.slots || !c.members) return false;
  for (int w : *c.members) {
    const Slot* s = slot_of(w);
    if (s && !(s->group == c.group && s->seq >= c.seq)) return false;
  }
  return true;
}

// FNV-1a, folded so that a signature is never 0 (0 means "not checked").
static int64_t signature(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char ch : text) {
    h ^= ch;
    h *= 1099511628211ULL;
  }
  return static_cast<int64_t>(h | 1);
}

enum class Failure { kTimeout, kPeerGone, kMismatch, kMpi };

static std::string describe_failure(const Call& c, const std::string& why,
                                    Failure kind = Failure::kTimeout) {
  int rank = 0, size = 1;
  MPI_Comm_rank(c.comm, &rank);
  MPI_Comm_size(c.comm, &size);
  std::ostringstream o;
  o << "tfshard MPI " << c.what << " (group " << c.group << " #" << c.seq << ") " << why
    << " on rank " << rank << " of " << size << " (pid " << getpid() << ").";
  std::vector<Peer> peers = survey(*c.members, c.group, c.seq);
  std::vector<std::string> missing, waiting, halted;
  for (const Peer& p : peers) {
    if (p.rank == rank) continue;
    if (p.arrived && (p.state == 'T' || p.state == 't')) {
      std::ostringstream m;
      m << "rank " << p.rank;
      if (p.world_rank != p.rank) m << " (world rank " << p.world_rank << ")";
      m << " [" << p.seen << "]";
      halted.push_back(m.str());
    } else if (p.arrived) {
      waiting.push_back(std::to_string(p.rank));
    } else {
      std::ostringstream m;
      m << "rank " << p.rank;
      if (p.world_rank != p.rank) m << " (world rank " << p.world_rank << ")";
      m << " [" << p.seen << "]";
      missing.push_back(m.str());
    }
  }
  if (!missing.empty()) {
    o << " Missing: ";
    for (size_t i = 0; i < missing.size(); ++i) o << (i ? "; " : "") << missing[i];
    o << ".";
  }
  if (!halted.empty()) {
    o << " Stopped inside it: ";
    for (size_t i = 0; i < halted.size(); ++i) o << (i ? "; " : "") << halted[i];
    o << ".";
  }
  if (!waiting.empty()) {
    o << " Arrived: rank(s) ";
    for (size_t i = 0; i < waiting.size(); ++i) o << (i ? ", " : "") << waiting[i];
    o << ".";
  }
  if (kind == Failure::kMismatch) {
    o << " Every rank must call the same collectives in the same order, with the same dtype,"
         " shape and name: ranks that run different code or different inputs part here.";
  } else if (kind == Failure::kTimeout) {
    o << " Every rank must call the same collectives in the same order; a rank that is busy"
         " elsewhere, stopped or hung leaves the others waiting. Set"
         " TFSHARD_COLLECTIVE_TIMEOUT_SECONDS if a rank legitimately needs longer.";
  } else if (kind == Failure::kPeerGone) {
    o << " The job cannot go on without it; its own output says why it ended.";
  }
  return o.str();
}

// Records the first failure (every later op refuses to run) and returns it as a status
// whose TensorFlow error class says what happened.
static Status fail(const std::string& message, Failure kind = Failure::kTimeout) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_broken.load()) g_error = message;
  }
  g_broken.store(true);
  switch (kind) {
    case Failure::kTimeout: return tensorflow::errors::DeadlineExceeded(message);
    case Failure::kPeerGone: return tensorflow::errors::Unavailable(message);
    case Failure::kMismatch: return tensorflow::errors::FailedPrecondition(message);
    default: return tensorflow::errors::Internal(message);
  }
}

static Status check_usable(const Call& c) {
  if (g_broken.load()) {
    std::lock_guard<std::mutex> lock(g_mu);
    return tensorflow::errors::Aborted(
        "tfshard MPI " + c.what + " refused: an earlier collective failed and the ranks are "
        "no longer in step. The first failure: " + g_error);
  }
  return tensorflow::OkStatus();
}

// How a rank waits. With a core of its own, it spins on MPI_Test for up to `spin_ns`
// (most collectives between ranks in step end within microseconds, and a sleep costs a
// wake-up). When ranks outnumber cores, a spinning rank would steal the core the
// slowest rank computes on, so it spins briefly and then sleeps in short steps that grow
// with the wait (a twentieth of it, 10 us to 1 ms): a wait overshoots by at most ~5 %.
// It sleeps only while the board shows a member missing: once all have arrived the data
// is moving, and MPI moves it only while the ranks poll (a large message goes through
// shared memory in chunks, each handed over at a poll), so it keeps polling and yields.
static std::atomic<int64_t> g_spin_ns{1000000};

static Status mpi_ok(int code, const Call& c, const char* call);

// Nanoseconds this process spent waiting for collectives to complete (all threads).
static std::atomic<long long> g_wait_ns{0};

static Status wait_for(int count, MPI_Request* req, const Call& c, MPI_Status* statuses);

// Polls `count` requests until all complete, the deadline passes, or a peer is found
// dead or stopped; the time it took counts in g_wait_ns.
static Status wait(int count, MPI_Request* req, const Call& c, MPI_Status* statuses) {
  auto start = std::chrono::steady_clock::now();
  Status s = wait_for(count, req, c, statuses);
  g_wait_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now() - start).count();
  return s;
}

static Status wait_for(int count, MPI_Request* req, const Call& c, MPI_Status* statuses) {
  int done = 0;
  auto start = std::chrono::steady_clock::now();
  const int64_t spin_ns = g_spin_ns.load();
  for (int i = 0;; ++i) {
    int code = MPI_Testall(count, req, &done, statuses);
    if (code != MPI_SUCCESS) return mpi_ok(code, c, "MPI_Testall");
    if (done) return tensorflow::OkStatus();
    if ((i & 63) == 63 &&
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                             start).count() >= spin_ns) {
      break;
    }
  }
  static thread_local bool slack_set = false;
  if (!slack_set) {  // sleeps of tens of microseconds need a timer slack below the default 50 us
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    slack_set = true;
  }
  auto next_survey = start + std::chrono::seconds(2);
  int stopped_checks = 0;
  while (true) {
    int code = MPI_Testall(count, req, &done, statuses);
    if (code != MPI_SUCCESS) return mpi_ok(code, c, "MPI_Testall");
    if (done) return tensorflow::OkStatus();
    auto now = std::chrono::steady_clock::now();
    double waited = std::chrono::duration<double>(now - start).count();
    if (waited > c.timeout) {
      std::ostringstream why;
      why << "did not complete within " << c.timeout << " s";
      return fail(describe_failure(c, why.str()));
    }
    if (now >= next_survey) {
      next_survey = now + std::chrono::seconds(1);
      // A missing peer that is dead or stopped will not come: fail now, not at the deadline.
      // A stopped rank cannot move MPI's data, even one that arrived before it stopped.
      bool gone = false, stopped = false;
      for (const Peer& p : survey(*c.members, c.group, c.seq)) {
        if (p.state == 'T' || p.state == 't') stopped = true;
        if (p.arrived) continue;
        if (p.state == 'X' || p.state == 'Z') gone = true;
      }
      stopped_checks = stopped ? stopped_checks + 1 : 0;
      if (gone) {
        return fail(describe_failure(c, "cannot complete: a rank it needs has died",
                                     Failure::kPeerGone), Failure::kPeerGone);
      }
      if (stopped_checks >= 3) {
        return fail(describe_failure(c, "cannot complete: a rank it needs is stopped",
                                     Failure::kPeerGone), Failure::kPeerGone);
      }
    }
    if (all_arrived(c)) {
      sched_yield();
      continue;
    }
    long pause = static_cast<long>(waited * 1e9 / 20);
    pause = std::max(10000L, std::min(pause, 1000000L));
    struct timespec ts{0, pause};
    nanosleep(&ts, nullptr);
  }
}

static Status mpi_ok(int code, const Call& c, const char* call) {
  if (code == MPI_SUCCESS) return tensorflow::OkStatus();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return fail("tfshard MPI " + c.what + ": " + call + " failed: " + std::string(text, len),
              Failure::kMpi);
}

static MPI_Datatype mpi_type(DataType t) {
  switch (t) {
    case tensorflow::DT_FLOAT: return MPI_FLOAT;
    case tensorflow::DT_DOUBLE: return MPI_DOUBLE;
    case tensorflow::DT_INT32: return MPI_INT32_T;
    case tensorflow::DT_INT64: return MPI_INT64_T;
    case tensorflow::DT_UINT8: return MPI_UINT8_T;
    default: return MPI_DATATYPE_NULL;
  }
}

static std::string shape_text(const TensorShape& s) {
  std::ostringstream o;
  o << "[";
  for (int i = 0; i < s.dims(); ++i) o << (i ? "," : "") << s.dim_size(i);
  o << "]";
  return o.str();
}

static Status mismatch(const Call& c) {
  return fail(describe_failure(
      c, "does not match what the other ranks called (kind, dtype, shape or name differ)",
      Failure::kMismatch), Failure::kMismatch);
}

// Runs one collective: board bookkeeping, the start call, the wait. With `c.sig` set, a
// 2-element MAX all-reduce of [sig, ~sig] runs beside it (started first, in the same order
// on every rank): max(sig) == ~max(~sig) == min(sig) exactly when every rank's signature
// is the same, so ranks that reached different collectives fail instead of pairing them.
template <typename Start>
static Status run(Call& c, const char* call, Start start, MPI_Status* last = nullptr) {
  Status ok = check_usable(c);
  if (!ok.ok()) return ok;
  c.seq = next_seq(c.group);
  note_enter(c.group, c.seq, c.what);
  MPI_Request req[2];
  int count = 0;
  int64_t sig[2] = {c.sig, ~c.sig};
  Status s = tensorflow::OkStatus();
  if (c.sig) {
    s = mpi_ok(MPI_Iallreduce(MPI_IN_PLACE, sig, 2, MPI_INT64_T, MPI_MAX, c.comm, &req[count++]),
               c, "MPI_Iallreduce (signature)");
  }
  if (s.ok()) s = mpi_ok(start(&req[count++]), c, call);
  MPI_Status statuses[2];
  if (s.ok()) s = wait(count, req, c, statuses);
  if (s.ok() && last) *last = statuses[count - 1];
  if (s.ok() && c.sig && (sig[0] != c.sig || sig[1] != ~c.sig)) s = mismatch(c);
  note_exit();
  return s;
}

class CollectiveOp : public OpKernel {
 public:
  explicit CollectiveOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    int64_t handle = 0;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("comm", &handle));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("group", &group_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("timeout", &timeout_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("what", &what_));
    comm_ = MPI_Comm_f2c(static_cast<MPI_Fint>(handle));
    members_ = world_ranks_of(comm_);
  }

 protected:
  // `agreed` is the part of the call every rank must share (for a gather, the shape
  // without its first axis).
  Call call(const std::string& kind, const Tensor& t, const std::string& agreed = "") const {
    std::string label = kind;
    if (!what_.empty()) label += " '" + what_ + "'";
    label += " " + shape_text(t.shape()) + " " + tensorflow::DataTypeString(t.dtype());
    std::string key = kind + "|" + what_ + "|" + tensorflow::DataTypeString(t.dtype()) + "|" +
                      (agreed.empty() ? shape_text(t.shape()) : agreed);
    return Call{comm_, group_, 0, static_cast<double>(timeout_), label, signature(key),
                &members_};
  }

  MPI_Comm comm_;
  int64_t group_;
  float timeout_;
  std::string what_;
  std::vector<int> members_;
};

// MPI reduction functions for 16-bit floats sent as 16 bits: each step widens both
// partials to float32, adds, and rounds the sum back (one rounding per step; with two
// ranks that is the float32 sum rounded once). Addition of two operands is commutative
// bit for bit, so every rank of a reduction gets the same result.
template <typename T>
static void sum16(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i)
    b[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

static MPI_Op sum16_op(DataType t) {
  static std::once_flag once;
  static MPI_Op ops[2];
  std::call_once(once, [] {
    MPI_Op_create(&sum16<Eigen::bfloat16>, 1, &ops[0]);
    MPI_Op_create(&sum16<Eigen::half>, 1, &ops[1]);
  });
  return t == tensorflow::DT_BFLOAT16 ? ops[0] : ops[1];
}

class AllreduceOp : public CollectiveOp {
 public:
  explicit AllreduceOp(OpKernelConstruction* ctx) : CollectiveOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("wire16", &wire16_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, in.shape(), &out));
    DataType t = in.dtype();
    const bool half = t == tensorflow::DT_BFLOAT16 || t == tensorflow::DT_HALF;
    Call c = call(wire16_ ? "all-reduce (16-bit wire)" : "all-reduce", in);
    const int64_t n = in.NumElements();
    OP_REQUIRES(ctx, n <= INT32_MAX,
                tensorflow::errors::InvalidArgument(c.what, ": more than 2^31 elements"));
    OP_REQUIRES(ctx, half || !wire16_,
                tensorflow::errors::InvalidArgument(
                    c.what, ": wire16 takes bfloat16 or float16; cast to one first"));
    if (wire16_) {
      const void* send = out->data() == in.data() ? MPI_IN_PLACE : in.data();
      MPI_Op op = sum16_op(t);
      OP_REQUIRES_OK(ctx, run(c, "MPI_Iallreduce", [&](MPI_Request* r) {
        return MPI_Iallreduce(send, out->data(), static_cast<int>(n), MPI_UINT16_T, op, comm_,
                              r);
      }));
      return;
    }
    if (half) {
      // Sum in float32 (as DeepSpeed's CPU all-reduce does), round once at the end.
      std::vector<float> buf(n);
      if (t == tensorflow::DT_BFLOAT16) {
        auto src = in.flat<Eigen::bfloat16>();
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src(i));
      } else {
        auto src = in.flat<Eigen::half>();
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src(i));
      }
      OP_REQUIRES_OK(ctx, run(c, "MPI_Iallreduce", [&](MPI_Request* r) {
        return MPI_Iallreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM,
                              comm_, r);
      }));
      if (t == tensorflow::DT_BFLOAT16) {
        auto dst = out->flat<Eigen::bfloat16>();
        for (int64_t i = 0; i < n; ++i) dst(i) = static_cast<Eigen::bfloat16>(buf[i]);
      } else {
        auto dst = out->flat<Eigen::half>();
        for (int64_t i = 0; i < n; ++i) dst(i) = static_cast<Eigen::half>(buf[i]);
      }
      return;
    }
    MPI_Datatype mt = mpi_type(t);
    OP_REQUIRES(ctx, mt != MPI_DATATYPE_NULL,
                tensorflow::errors::InvalidArgument(c.what, ": dtype not supported"));
    // Reduce in place when TensorFlow can hand over the input's buffer, else straight from
    // input to output: no copy either way.
    const void* send = out->data() == in.data() ? MPI_IN_PLACE : in.data();
    OP_REQUIRES_OK(ctx, run(c, "MPI_Iallreduce", [&](MPI_Request* r) {
      return MPI_Iallreduce(send, out->data(), static_cast<int>(n), mt, MPI_SUM, comm_, r);
    }));
  }

 private:
  bool wire16_ = false;
};

class AllgatherOp : public CollectiveOp {
 public:
  explicit AllgatherOp(OpKernelConstruction* ctx) : CollectiveOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sizes", &sizes_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    OP_REQUIRES(ctx, in.dims() >= 1,
                tensorflow::errors::InvalidArgument("all-gather needs a tensor of rank >= 1"));
    int size = 1, rank = 0;
    MPI_Comm_size(comm_, &size);
    MPI_Comm_rank(comm_, &rank);
    TensorShape rest = in.shape();
    rest.RemoveDim(0);
    Call c = call("all-gather", in, "[*," + shape_text(rest).substr(1));
    std::vector<int64_t> lengths(sizes_.begin(), sizes_.end());
    if (lengths.empty()) {
      // Exchange lengths and signatures together; the data gather then needs no check.
      std::vector<int64_t> table(2 * size);
      int64_t mine[2] = {in.dim_size(0), c.sig};
      Call sc = c;
      sc.what += " (lengths)";
      sc.sig = 0;
      OP_REQUIRES_OK(ctx, run(sc, "MPI_Iallgather", [&](MPI_Request* r) {
        return MPI_Iallgather(mine, 2, MPI_INT64_T, table.data(), 2, MPI_INT64_T, comm_, r);
      }));
      for (int r = 0; r < size; ++r) {
        if (table[2 * r + 1] != c.sig) OP_REQUIRES_OK(ctx, mismatch(c));
        lengths.push_back(table[2 * r]);
      }
      c.sig = 0;
    }
    OP_REQUIRES(ctx, static_cast<int>(lengths.size()) == size,
                tensorflow::errors::InvalidArgument(c.what, ": sizes has ", lengths.size(),
                                                    " entries for ", size, " ranks"));
    OP_REQUIRES(ctx, lengths[rank] == in.dim_size(0),
                tensorflow::errors::InvalidArgument(c.what, ": this rank's length ",
                                                    in.dim_size(0), " but sizes[", rank,
                                                    "] = ", lengths[rank]));
    int64_t row_elems = 1;
    for (int i = 1; i < in.dims(); ++i) row_elems *= in.dim_size(i);
    const int64_t elem = tensorflow::DataTypeSize(in.dtype());
    TensorShape shape = in.shape();
    int64_t total = 0;
    std::vector<int> counts(size), displs(size);
    for (int r = 0; r < size; ++r) {
      int64_t bytes = lengths[r] * row_elems * elem;
      OP_REQUIRES(ctx, bytes <= INT32_MAX && total <= INT32_MAX,
                  tensorflow::errors::InvalidArgument(c.what, ": over 2 GiB per rank"));
      counts[r] = static_cast<int>(bytes);
      displs[r] = static_cast<int>(total * row_elems * elem);
      total += lengths[r];
    }
    shape.set_dim(0, total);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    OP_REQUIRES_OK(ctx, run(c, "MPI_Iallgatherv", [&](MPI_Request* r) {
      return MPI_Iallgatherv(in.data(), counts[rank], MPI_BYTE, out->data(), counts.data(),
                             displs.data(), MPI_BYTE, comm_, r);
    }));
  }

 private:
  std::vector<int64_t> sizes_;
};

class BroadcastOp : public CollectiveOp {
 public:
  explicit BroadcastOp(OpKernelConstruction* ctx) : CollectiveOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("root", &root_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.shape(), &out));
    Call c = call("broadcast from rank " + std::to_string(root_), in);
    OP_REQUIRES(ctx, in.TotalBytes() <= INT32_MAX,
                tensorflow::errors::InvalidArgument(c.what, ": over 2 GiB"));
    if (in.TotalBytes()) std::memcpy(out->data(), in.data(), in.TotalBytes());
    OP_REQUIRES_OK(ctx, run(c, "MPI_Ibcast", [&](MPI_Request* r) {
      return MPI_Ibcast(out->data(), static_cast<int>(in.TotalBytes()), MPI_BYTE, root_, comm_,
                        r);
    }));
  }

 private:
  int root_;
};

class SendOp : public CollectiveOp {
 public:
  explicit SendOp(OpKernelConstruction* ctx) : CollectiveOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("peer", &peer_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tag", &tag_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("header", &header_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    Call c = call("send to rank " + std::to_string(peer_), in);
    c.sig = 0;  // point to point: the receiver checks the size it got
    OP_REQUIRES(ctx, in.TotalBytes() <= INT32_MAX,
                tensorflow::errors::InvalidArgument(c.what, ": over 2 GiB"));
    if (header_) {
      // The shape first, so the receiver can allocate a tensor of dims it did not know.
      std::vector<int64_t> dims(in.dims());
      for (int i = 0; i < in.dims(); ++i) dims[i] = in.dim_size(i);
      OP_REQUIRES_OK(ctx, run(c, "MPI_Isend", [&](MPI_Request* r) {
        return MPI_Isend(dims.data(), static_cast<int>(dims.size()), MPI_INT64_T, peer_, tag_,
                         comm_, r);
      }));
    }
    OP_REQUIRES_OK(ctx, run(c, "MPI_Isend", [&](MPI_Request* r) {
      return MPI_Isend(in.data(), static_cast<int>(in.TotalBytes()), MPI_BYTE, peer_, tag_,
                       comm_, r);
    }));
  }

 private:
  int peer_, tag_;
  bool header_;
};

class RecvOp : public CollectiveOp {
 public:
  explicit RecvOp(OpKernelConstruction* ctx) : CollectiveOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("peer", &peer_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tag", &tag_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shape", &shape_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dtype", &dtype_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("header", &header_));
    OP_REQUIRES(ctx, header_ || shape_.IsFullyDefined(),
                tensorflow::errors::InvalidArgument(
                    "tfshard MPI receive: shape ", shape_.DebugString(),
                    " has unknown dims; the sender must send a header (header=True)"));
  }
  void Compute(OpKernelContext* ctx) override {
    TensorShape shape;
    std::string from = "receive from rank " + std::to_string(peer_);
    if (header_) {
      std::vector<int64_t> dims(shape_.dims());
      Tensor probe(dtype_, TensorShape({}));
      Call h = call(from + " (shape)", probe);
      h.sig = 0;
      MPI_Status status;
      OP_REQUIRES_OK(ctx, run(h, "MPI_Irecv", [&](MPI_Request* r) {
        return MPI_Irecv(dims.data(), static_cast<int>(dims.size()), MPI_INT64_T, peer_, tag_,
                         comm_, r);
      }, &status));
      int got = 0;
      MPI_Get_count(&status, MPI_INT64_T, &got);
      OP_REQUIRES(ctx, got == shape_.dims(),
                  tensorflow::errors::InvalidArgument(
                      "tfshard MPI ", from, ": rank ", peer_, " sent a tensor of rank ", got,
                      ", expected ", shape_.DebugString()));
      for (int i = 0; i < shape_.dims(); ++i) {
        OP_REQUIRES(ctx, shape_.dim_size(i) < 0 || shape_.dim_size(i) == dims[i],
                    tensorflow::errors::InvalidArgument(
                        "tfshard MPI ", from, ": rank ", peer_, " sends dim ", i, " = ",
                        dims[i], ", expected ", shape_.DebugString()));
        shape.AddDim(dims[i]);
      }
    } else {
      OP_REQUIRES(ctx, shape_.AsTensorShape(&shape),
                  tensorflow::errors::InvalidArgument("bad shape ", shape_.DebugString()));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    Call c = call(from, *out);
    c.sig = 0;
    OP_REQUIRES(ctx, out->TotalBytes() <= INT32_MAX,
                tensorflow::errors::InvalidArgument(c.what, ": over 2 GiB"));
    int count = static_cast<int>(out->TotalBytes());
    // A larger message fails as truncated; a smaller one is caught by its count.
    MPI_Status status;
    OP_REQUIRES_OK(ctx, run(c, "MPI_Irecv", [&](MPI_Request* r) {
      return MPI_Irecv(out->data(), count, MPI_BYTE, peer_, tag_, comm_, r);
    }, &status));
    int got = 0;
    MPI_Get_count(&status, MPI_BYTE, &got);
    OP_REQUIRES(ctx, got == count,
                tensorflow::errors::InvalidArgument(
                    "tfshard MPI ", c.what, ": rank ", peer_, " sent ", got, " bytes, expected ",
                    count, " (the sender's shape or dtype differs)"));
  }

 private:
  int peer_, tag_;
  tensorflow::PartialTensorShape shape_;
  DataType dtype_;
  bool header_;
};

#define TFSHARD_COMMON_ATTRS                                                         \
  Attr("comm: int").Attr("group: int = 0").Attr("timeout: float = 30.0")              \
      .Attr("what: string = ''")

#define TFSHARD_TYPES "T: {float, double, bfloat16, half, int32, int64, uint8}"

REGISTER_OP("TfshardMpiAllreduce")
    .Input("input: T")
    .Output("output: T")
    .Attr(TFSHARD_TYPES)
    .Attr("wire16: bool = false")
    .TFSHARD_COMMON_ATTRS
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("TfshardMpiAllgather")
    .Input("input: T")
    .Output("output: T")
    .Attr(TFSHARD_TYPES)
    .Attr("sizes: list(int) = []")
    .TFSHARD_COMMON_ATTRS
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      std::vector<int64_t> sizes;
      TF_RETURN_IF_ERROR(c->GetAttr("sizes", &sizes));
      tensorflow::shape_inference::ShapeHandle in = c->input(0), out;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(in, 1, &in));
      int64_t total = 0;
      for (int64_t s : sizes) total += s;
      auto first = sizes.empty() ? c->UnknownDim() : c->MakeDim(total);
      TF_RETURN_IF_ERROR(c->ReplaceDim(in, 0, first, &out));
      c->set_output(0, out);
      return tensorflow::OkStatus();
    });

REGISTER_OP("TfshardMpiBroadcast")
    .Input("input: T")
    .Output("output: T")
    .Attr(TFSHARD_TYPES)
    .Attr("root: int = 0")
    .TFSHARD_COMMON_ATTRS
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("TfshardMpiSend")
    .Input("input: T")
    .Attr(TFSHARD_TYPES)
    .Attr("peer: int")
    .Attr("tag: int = 0")
    .Attr("header: bool = false")
    .TFSHARD_COMMON_ATTRS
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs);

REGISTER_OP("TfshardMpiRecv")
    .Output("output: dtype")
    .Attr("dtype: {float, double, bfloat16, half, int32, int64, uint8}")
    .Attr("shape: shape")
    .Attr("peer: int")
    .Attr("tag: int = 0")
    .Attr("header: bool = false")
    .TFSHARD_COMMON_ATTRS
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::PartialTensorShape shape;
      TF_RETURN_IF_ERROR(c->GetAttr("shape", &shape));
      tensorflow::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromPartialTensorShape(shape, &out));
      c->set_output(0, out);
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfshardMpiAllreduce").Device(tensorflow::DEVICE_CPU), AllreduceOp);
REGISTER_KERNEL_BUILDER(Name("TfshardMpiAllgather").Device(tensorflow::DEVICE_CPU), AllgatherOp);
REGISTER_KERNEL_BUILDER(Name("TfshardMpiBroadcast").Device(tensorflow::DEVICE_CPU), BroadcastOp);
REGISTER_KERNEL_BUILDER(Name("TfshardMpiSend").Device(tensorflow::DEVICE_CPU), SendOp);
REGISTER_KERNEL_BUILDER(Name("TfshardMpiRecv").Device(tensorflow::DEVICE_CPU), RecvOp);

}  // namespace tfshard

namespace tfshard {

// What a rank says when the launcher stops it (SIGTERM: mpiexec forwards it when the job
// is stopped, e.g. after a host was lost). Written from the handler: write(2) only.
char g_term_message[1024];
size_t g_term_length = 0;

void OnTerm(int) {
  if (g_term_length > 0) {
    ssize_t written = write(2, g_term_message, g_term_length);
    (void)written;
  }
  _exit(128 + SIGTERM);
}

}  // namespace tfshard

// Plain C entry points for tfshard/comm/mpi.py (ctypes).
extern "C" {

// On SIGTERM, print `message` and exit with status 143, unless something else already
// handles SIGTERM. Returns 1 when installed.
int tfshard_mpi_on_term(const char* message) {
  struct sigaction old;
  if (sigaction(SIGTERM, nullptr, &old) != 0 || old.sa_handler != SIG_DFL) return 0;
  size_t n = std::strlen(message);
  if (n >= sizeof(tfshard::g_term_message)) n = sizeof(tfshard::g_term_message) - 1;
  std::memcpy(tfshard::g_term_message, message, n);
  tfshard::g_term_length = n;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = tfshard::OnTerm;
  sigemptyset(&sa.sa_mask);
  return sigaction(SIGTERM, &sa, nullptr) == 0 ? 1 : 0;
}

// The board: `slots` points at `count` 128-byte slots shared by the ranks of this host;
// `mine` is this rank's slot. Called once per process after the shared window exists.
int tfshard_mpi_set_board(void* slots, int count, int mine, int world_rank) {
  tfshard::g_board.slots = static_cast<tfshard::Slot*>(slots);
  tfshard::g_board.count = count;
  tfshard::g_board.mine = mine;
  tfshard::Slot* s = &tfshard::g_board.slots[mine];
  std::memset(s, 0, sizeof(*s));
  s->world_rank = world_rank;
  s->pid = getpid();
  s->group = -1;  // no collective yet: matches no group's "arrived" test
  s->seq = -1;
  return static_cast<int>(sizeof(tfshard::Slot));
}

// How long a waiting rank spins before it sleeps (nanoseconds; 0: sleep at once).
void tfshard_mpi_set_spin(long long spin_ns) { tfshard::g_spin_ns.store(spin_ns); }

// 1 once a collective failed (the process must not wait in MPI_Finalize).
int tfshard_mpi_broken() { return tfshard::g_broken.load() ? 1 : 0; }

// Nanoseconds spent waiting for collectives to complete so far (the server's metric).
long long tfshard_mpi_wait_ns() { return tfshard::g_wait_ns.load(); }

}
