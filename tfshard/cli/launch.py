"""`tfshard launch`: N local processes of a tf.distribute multi-worker job.

    tfshard launch -n 2 script.py [ARGS...]        # or: python -m tfshard.cli.launch -n 2 ...
    tfshard launch -n 2 tfshard predict gpt2-tiny  # any command

    # Several hosts: the same command on every host, each with its own --host-index.
    tfshard launch --hosts hostA:2,hostB:2 --host-index 0 tfshard predict gpt2  # on hostA
    tfshard launch --hosts hostA:2,hostB:2 --host-index 1 tfshard predict gpt2  # on hostB

Each process gets a `TF_CONFIG` naming all N workers on free loopback ports and
its own index, so `tfshard.init()` joins a `MultiWorkerMirroredStrategy` with
one replica per process. Output lines are prefixed with `[rank]`. When a
process fails, the others are stopped (SIGTERM, then SIGKILL) and the launcher
exits with the failed process's code; a wall-clock `--timeout` ends the whole
job the same way (exit 124).

With `--hosts`, every host runs this launcher for its own processes; the
workers are numbered host by host (hostA's first, so a tensor-parallel group of
consecutive ranks stays inside a host), worker i of a host listens on
`--port` + i on every interface. A host's launcher stops only its own
processes; the other hosts' ranks fail at their next collective (a named
error, within the collective deadline) and their launchers stop the rest.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

# How long stopped ranks get between SIGTERM and SIGKILL.
GRACE_SECONDS = 5.0


def free_ports(n, host="127.0.0.1"):
    """`n` distinct free TCP ports on `host` (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_library():
    """The bind() shim that keeps a local job's listeners on loopback
    (tfshard/loopback.c, built by set-up into tfshard/_loopback.so), or None when it
    is not built."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(package, "_loopback.so")
    return path if os.path.exists(path) else None


def tf_config(workers, index):
    """The `TF_CONFIG` JSON for worker `index` of `workers` ("host:port" strings)."""
    return json.dumps({"cluster": {"worker": list(workers)},
                       "task": {"type": "worker", "index": index}})


def command_for(script, args):
    """The argv to run: `python SCRIPT ARGS` for a .py file, else the command itself."""
    if script == "-m":
        return [sys.executable, "-m", *args]
    if script.endswith(".py") or (os.path.isfile(script) and not os.access(script, os.X_OK)):
        return [sys.executable, script, *args]
    # A console script of this environment (e.g. `tfshard`) even when its bin/ is not on PATH.
    beside = os.path.join(os.path.dirname(sys.executable), script)
    if shutil.which(script) is None and os.sep not in script and os.access(beside, os.X_OK):
        return [beside, *args]
    return [script, *args]


class _Rank:
    def __init__(self, index, proc):
        self.index = index
        self.proc = proc
        self.reader = None


def _pump(rank, out, lock):
    """Copies a rank's output to ours, line by line, prefixed with its rank."""
    for line in iter(rank.proc.stdout.readline, b""):
        with lock:
            out.write(f"[{rank.index}] ".encode() + line)
            out.flush()
    rank.proc.stdout.close()


def _describe(code):
    """How a finished process ended, from its return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop(ranks, say):
    """SIGTERM every running rank's process group, SIGKILL what is left after the grace."""
    alive = [r for r in ranks if r.proc.poll() is None]
    for r in alive:
        try:
            os.killpg(r.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_SECONDS
    for r in alive:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for r in ranks:
        # The group may hold children of a rank that itself already exited.
        try:
            os.killpg(r.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if r.proc.poll() is None:
            r.proc.wait()
    if alive:
        say(f"stopped rank(s) {[r.index for r in alive]}")


def parse_hosts(text):
    """`[(host, processes)]` from "hostA:2,hostB:2" (a host without ":n" runs one).

    Raises:
        ValueError: an empty list, or a count that is not a positive int.
    """
    hosts = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        host, _, count = item.rpartition(":") if ":" in item else (item, "", "1")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--hosts {text!r}: {item!r} is not HOST or HOST:N with N >= 1.")
        hosts.append((host, int(count)))
    if not hosts:
        raise ValueError(f"--hosts {text!r} names no host; e.g. hostA:2,hostB:2.")
    return hosts


def cluster(hosts, port):
    """The workers ("host:port") of a job on `hosts` (`parse_hosts`): host by host,
    worker i of a host on `port + i`."""
    return [f"{h}:{port + i}" for h, n in hosts for i in range(n)]


def run(n, argv, timeout=None, env=None, out=None, workers=None, first=0):
    """Runs `argv` as `n` workers of one multi-worker job and waits for them.

    Args:
        n: number of processes (>= 1) this launcher starts.
        argv: the command for every worker.
        timeout: seconds before the whole job is stopped (None: no limit).
        env: extra environment variables for every worker.
        out: binary stream for the prefixed output (default: stdout).
        workers: every worker of the job ("host:port"), when the job spans hosts;
            None: `n` workers on free loopback ports.
        first: the index of this launcher's first worker in `workers`.

    Returns:
        0 when every worker exited 0; else the first failure's exit code
        (128 + signal for a killed worker, 124 on timeout).
    """
    out = out or sys.stdout.buffer
    lock = threading.Lock()

    def say(message):
        with lock:
            out.write(f"[tfshard launch] {message}\n".encode())
            out.flush()

    local = workers is None
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)] if local else list(workers)
    ranks = []
    cores = os.cpu_count() or 1
    for i in range(first, first + n):
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": tf_config(workers, i),
                      "TFSHARD_LOCAL_SIZE": str(n), "PYTHONUNBUFFERED": "1"}
        worker_env.setdefault("TFSHARD_THREADS", str(max(1, cores // n)))
        shim = loopback_library() if local else None
        if shim:  # TensorFlow's gRPC server binds 0.0.0.0 whatever TF_CONFIG says
            worker_env["LD_PRELOAD"] = ":".join(
                p for p in (shim, worker_env.get("LD_PRELOAD")) if p)
        try:
            proc = subprocess.Popen(argv, env=worker_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as err:
            say(f"cannot start rank {i}: {err}")
            _stop(ranks, say)
            return 127
        rank = _Rank(i, proc)
        rank.reader = threading.Thread(target=_pump, args=(rank, out, lock), daemon=True)
        rank.reader.start()
        ranks.append(rank)

    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    interrupted = []
    previous = {s: signal.signal(s, lambda signum, _: interrupted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [r.proc.poll() for r in ranks]
            failed = [r for r, c in zip(ranks, codes) if c not in (None, 0)]
            if failed:
                first = failed[0]
                code = first.proc.returncode
                code = 128 - code if code < 0 else code
                say(f"rank {first.index} {_describe(first.proc.returncode)}; stopping the others")
                break
            if all(c == 0 for c in codes):
                break
            if interrupted:
                say(f"got {signal.Signals(interrupted[0]).name}; stopping all ranks")
                code = 128 + interrupted[0]
                break
            if deadline is not None and time.monotonic() > deadline:
                say(f"timed out after {timeout:g} s; stopping all ranks")
                code = 124
                break
            time.sleep(0.1)
    finally:
        _stop(ranks, say)
        for r in ranks:
            r.reader.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


_OPTIONS_WITH_VALUE = ("-n", "--num-processes", "--timeout", "--hosts", "--host-index",
                       "--port")


def split_argv(argv):
    """Splits `[launcher options] COMMAND...` at the command's first word.

    The command may itself start with an option (`-m module`), which argparse
    alone would take for one of ours.
    """
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _OPTIONS_WITH_VALUE:
            i += 2
        elif word in ("-h", "--help") or word.startswith(tuple(
                o + "=" for o in _OPTIONS_WITH_VALUE[1:])) or (
                word.startswith("-n") and word[2:].isdigit()):
            i += 1
        else:
            break
    return argv[:i], argv[i:]


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(
        prog="tfshard launch", description=__doc__.split("\n")[0],
        usage="tfshard launch -n N | --hosts H:N,... --host-index I [--port P] "
              "[--timeout S] SCRIPT.py|-m MODULE|COMMAND [ARGS...]")
    parser.add_argument("-n", "--num-processes", type=int, default=None,
                        help="number of worker processes (ranks) on this host")
    parser.add_argument("--hosts", default=None,
                        help="every host of the job and its processes, e.g. hostA:2,hostB:2 "
                        "(the same on every host); run the launcher on each host")
    parser.add_argument("--host-index", type=int, default=None,
                        help="which of --hosts this one is (0 = the first)")
    parser.add_argument("--port", type=int, default=23456,
                        help="with --hosts: worker i of each host listens on PORT + i "
                        "(default 23456)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop the whole job after this many seconds (exit 124)")
    parser.add_argument("command", nargs="*",
                        help="a .py file, '-m module', or a command such as tfshard, and its "
                        "arguments (the same for every worker)")
    return parser


def main(argv=None):
    """Entry point of `tfshard launch` and `python -m tfshard.cli.launch`.

    Returns:
        The exit code (see `run`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    options, command = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(options)
    if not command:
        parser.error("no command to launch")
    argv = command_for(command[0], command[1:])
    if args.hosts is None:
        if args.num_processes is None or args.num_processes < 1:
            parser.error(f"-n must be >= 1; got {args.num_processes}")
        if args.host_index is not None:
            parser.error("--host-index needs --hosts")
        return run(args.num_processes, argv, timeout=args.timeout)
    try:
        hosts = parse_hosts(args.hosts)
    except ValueError as err:
        parser.error(str(err))
    i = args.host_index
    if i is None or not 0 <= i < len(hosts):
        parser.error(f"--hosts names {len(hosts)} host(s); give --host-index 0 to "
                     f"{len(hosts) - 1} (this host's place in the list); got {i}.")
    if args.num_processes not in (None, hosts[i][1]):
        parser.error(f"-n {args.num_processes} but --hosts gives host {i} ({hosts[i][0]}) "
                     f"{hosts[i][1]} process(es); leave -n out with --hosts.")
    if not 1 <= args.port <= 65535 - max(n for _, n in hosts):
        parser.error(f"--port {args.port} leaves no room for the workers' ports.")
    return run(hosts[i][1], argv, timeout=args.timeout,
               workers=cluster(hosts, args.port), first=sum(n for _, n in hosts[:i]))


if __name__ == "__main__":
    raise SystemExit(main())
