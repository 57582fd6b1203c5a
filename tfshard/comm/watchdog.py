"""A deadline for the backends whose collectives have none that names a rank.

tfshard's MPI ops wait under a deadline in C++ and read a shared-memory board
of where every rank is. Horovod over Gloo and tf.distribute's collectives do
not: Horovod's stall check never fired on Gloo in our runs, the Gloo timeout
is minutes, tf.distribute's timeout names no rank, and none of them notices a
SIGSTOPped peer. This module gives those backends the same guarantee at the
level of tfshard's own steps (a `predict` round, a `generate` call, a
cross-rank check, a save):

* Every rank on this host has a 128-byte slot in a file under /dev/shm keyed
  by the job: its pid, the number of the step it is in, whether it is inside
  it, since when, and what it is.
* While a rank is inside step k, a thread looks at its peers every POLL_SECONDS (0.5 s). A
  peer whose process is gone, or stopped (SIGSTOP, three looks in a row), ends
  this rank at once; a peer that is neither inside step k nor past it ("busy
  elsewhere") ends it after the deadline (TFSHARD_COLLECTIVE_TIMEOUT_SECONDS,
  30 s by default). A step that takes long while every rank is inside it is
  not a stall and is never cut.
* Ending a rank prints the named error (which rank, its pid, where it was
  last seen) and exits the process with status 1: the thread cannot raise
  into a main thread blocked inside a collective, and the launcher then stops
  the job.

Ranks on other hosts have no slot here; they are not watched (issue: multi-host).
"""

import atexit
import contextlib
import hashlib
import mmap
import os
import struct
import sys
import threading
import time

SLOT = struct.Struct("<qqqd96s")  # pid, step, inside, since (monotonic), what
ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
POLL_SECONDS = 0.5
STOP_LOOKS = 3


def job_key(environ=None):
    """A key every rank of one job computes alike, or None outside a known launcher."""
    env = os.environ if environ is None else environ
    parts = [env.get(k, "") for k in ("HOROVOD_GLOO_RENDEZVOUS_ADDR", "HOROVOD_GLOO_RENDEZVOUS_PORT",
                                      "PMI_PORT", "PMI_KVSNAME", "OMPI_MCA_orte_hnp_uri")]
    tf_config = env.get("TF_CONFIG", "")
    if tf_config:
        import json

        try:
            parts.append(json.dumps(json.loads(tf_config).get("cluster"), sort_keys=True))
        except ValueError:
            parts.append(tf_config)
    if not any(parts):
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _state(pid):
    """"R", "S", ... from /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    state = data[data.rfind(b")") + 2:data.rfind(b")") + 3].decode()
    return None if state in ("Z", "X") else state


class Watchdog:
    """Watches this host's ranks of a job while this rank is inside a step.

    Args:
        key: the job key (`job_key()`).
        rank: this process's world rank.
        size: the number of ranks.
        timeout: seconds a peer may be absent from a step this rank waits in.
        backend: the backend's name, for messages.
        exit: called with the message instead of printing it and exiting (tests).
    """

    def __init__(self, key, rank, size, timeout, backend, exit=None):
        self.rank, self.size, self.timeout, self.backend = rank, size, timeout, backend
        self.folder = os.path.join(ROOT, f"tfshard-{key}")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self._exit = exit
        self._step = 0
        self._depth = 0
        self._path = self._slot_path(rank)
        with open(self._path, "wb") as f:
            f.write(bytes(SLOT.size))
        self._fd = os.open(self._path, os.O_RDWR)
        self._own = mmap.mmap(self._fd, SLOT.size)
        self._write(0, 0, "started")
        self._peers = {}
        self._stopped = {}
        self._absent_since = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tfshard-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _slot_path(self, rank):
        return os.path.join(self.folder, f"rank-{rank:05d}")

    def _write(self, step, inside, what):
        SLOT.pack_into(self._own, 0, os.getpid(), step, inside, time.monotonic(),
                       what.encode()[:96])

    def _read(self, rank):
        m = self._peers.get(rank)
        if m is None:
            try:
                fd = os.open(self._slot_path(rank), os.O_RDONLY)
            except OSError:
                return None
            try:
                if os.fstat(fd).st_size < SLOT.size:
                    return None
                m = self._peers[rank] = mmap.mmap(fd, SLOT.size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        pid, step, inside, since, what = SLOT.unpack_from(m, 0)
        return pid, step, inside, since, what.rstrip(b"\0").decode(errors="replace")

    @contextlib.contextmanager
    def section(self, what):
        """Marks a step every rank takes in the same order; peers are watched meanwhile.

        Steps nest (a check inside a predict): only the outermost one counts.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        self._step += 1
        self._what = what
        self._entered = time.monotonic()
        self._absent_since.clear()
        self._write(self._step, 1, what)
        try:
            yield
        finally:
            self._depth = 0
            self._write(self._step, 0, what)

    def _where(self, info):
        if info is None:
            return "has not started tfshard on this host yet"
        pid, step, inside, since, what = info
        ago = time.monotonic() - since
        return (f"[pid {pid}] last seen {'in' if inside else 'after'} step {step} ({what}) "
                f"{ago:.1f} s ago")

    def _check(self):
        pid, step, inside, _, _ = SLOT.unpack_from(self._own, 0)
        if not inside:
            self._stopped.clear()
            return None
        now = time.monotonic()
        head = (f"{self._what} (step {step}) on rank {self.rank} of {self.size} "
                f"({self.backend})")
        for r in range(self.size):
            if r == self.rank:
                continue
            info = self._read(r)
            if info is not None:
                state = _state(info[0])
                if state is None:
                    return (f"UnavailableError: {head} cannot complete: rank {r} has died "
                            f"({self._where(info)}).")
                if state in ("T", "t"):
                    self._stopped[r] = self._stopped.get(r, 0) + 1
                    if self._stopped[r] >= STOP_LOOKS:
                        return (f"UnavailableError: {head} cannot complete: rank {r} is stopped "
                                f"(SIGSTOP or a debugger; {self._where(info)}).")
                else:
                    self._stopped.pop(r, None)
                present = info[1] > step or (info[1] == step and info[2])
            else:
                present = False
            if present:
                self._absent_since.pop(r, None)
                continue
            first = self._absent_since.setdefault(r, now)
            if now - first >= self.timeout:
                return (f"DeadlineExceededError: {head} did not complete within "
                        f"{self.timeout:g} s: rank {r} never joined it ({self._where(info)}). "
                        f"Every rank must make the same tfshard calls in the same order; raise "
                        f"TFSHARD_COLLECTIVE_TIMEOUT_SECONDS if a rank is legitimately slower.")
        return None

    def _run(self):
        while not self._closed:
            time.sleep(POLL_SECONDS)
            try:
                problem = self._check()
            except Exception:  # noqa: BLE001 - the watchdog must never kill a healthy rank
                problem = None
            if problem:
                message = f"[tfshard watchdog] {problem}"
                if self._exit is not None:
                    self._exit(message)
                    return
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
                os._exit(1)

    def close(self):
        """Stops watching and removes this rank's slot (and the folder when empty)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._own.close()
            os.close(self._fd)
            os.remove(self._path)
            os.rmdir(self.folder)
        except OSError:
            pass  # peers' slots are still there; the last rank removes the folder


def start(rank, size, timeout, backend):
    """A `Watchdog` for this job, or None when there is no peer or no job key."""
    key = job_key()
    if size < 2 or key is None:
        return None
    return Watchdog(key, rank, size, timeout, backend)
