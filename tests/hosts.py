"""Hosts on one machine: Linux network namespaces joined by a bridge, for multi-host tests.

Each "host" is a network namespace with its own address on one interface,
`tfs0`, named the same in every host (so one `--iface tfs0` fits all). The
hosts' veth links meet on a bridge inside a further namespace (the switch), so
nothing of it appears in the machine's own namespace and no traffic leaves
these namespaces. Each host may also get a private folder: inside the host, its
own directory is bind-mounted over one shared path (`ip netns exec` gives every
command its own mount namespace), as if the hosts had no shared file system.
Every host shares the machine's hostname, which resolves to a loopback address (as
Debian's default /etc/hosts has it): nothing may find a peer by that name.

Commands reach a host through a generated `ssh` stand-in (`Hosts.ssh`): `ssh
[OPTIONS] ADDRESS COMMAND` runs COMMAND with `sh -c` inside that host, which is
what MPICH's Hydra (`-launcher ssh -launcher-exec`) and horovodrun (`ssh` from
PATH) do on real machines.

    with Hosts(2) as hosts:
        subprocess.run(hosts.command(0, ["./horovodrun.sh", "-np", "4",
                                         "-H", hosts.hostlist(2), ...]),
                       env=hosts.env())

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip`; `Hosts.unavailable()` says why not.
"""

import os
import shlex
import shutil
import subprocess
import tempfile
import threading

INTERFACE = "tfs0"
_counter = iter(range(1, 10 ** 6))
_lock = threading.Lock()


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unavailable():
    """None when namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    name = f"tfsprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is refused here: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    """`n` hosts (network namespaces) on one bridge; a context manager.

    Args:
        n: the number of hosts (1 to 200).
        private: a path that each host sees as its own folder (a different
            directory bind-mounted there per host), or None.

    Attributes:
        names: the namespaces, host 0 first.
        addresses: each host's address on `INTERFACE`.
        ssh: the path of the `ssh` stand-in.
        bin: a folder holding it as `ssh`, to put first on PATH (horovodrun).
        private_dirs: each host's own directory behind `private`.
    """

    def __init__(self, n, private=None):
        with _lock:
            tag = f"{os.getpid() % 100000}{next(_counter)}"
        self.n = n
        self.prefix = f"tfs{tag}"
        self.subnet = 10 + (os.getpid() + int(tag)) % 200
        self.names = [f"{self.prefix}h{i}" for i in range(n)]
        self.switch = f"{self.prefix}sw"
        self.addresses = [f"10.{self.subnet}.77.{i + 1}" for i in range(n)]
        self.private = None if private is None else os.path.abspath(private)
        self.work = tempfile.mkdtemp(prefix="tfshard-hosts-")
        self.bin = os.path.join(self.work, "bin")
        self.ssh = os.path.join(self.bin, "ssh")
        # Beside `private` (a bind mount from another file system can be refused).
        self.private_dirs = [f"{self.private or os.path.join(self.work, 'private')}.host{i}"
                             for i in range(n)]

    # -- set-up and tear-down --------------------------------------------------

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.names, self.addresses)):
            _ip("netns", "add", ns)
            inside, outside = f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "netns", self.switch)
            _ip("-n", ns, "link", "set", inside, "name", INTERFACE)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", INTERFACE)
            _ip("-n", ns, "link", "set", INTERFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", outside, "master", "br0")
            _ip("-n", self.switch, "link", "set", outside, "up")
        os.makedirs(self.bin)
        for d in self.private_dirs:
            os.makedirs(d)
        if self.private:
            os.makedirs(self.private, exist_ok=True)
        self._write_ssh()

    def close(self):
        """Removes the namespaces (their links go with them) and the work folder."""
        import time

        for ns in self.names + [self.switch]:
            # A process left inside would keep the namespace (and its name) alive.
            deadline = time.monotonic() + 10
            while ns in _ip("netns", "list", check=False).stdout.split():
                pids = _ip("netns", "pids", ns, check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, ValueError):
                        pass
                if (not pids and _ip("netns", "del", ns, check=False).returncode == 0) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        shutil.rmtree(self.work, ignore_errors=True)
        for d in self.private_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _write_ssh(self):
        cases = "\n".join(
            f"  {address}|{ns}) ns={ns}; own={shlex.quote(d)} ;;"
            for address, ns, d in zip(self.addresses, self.names, self.private_dirs))
        mount = ""
        if self.private:
            mount = f'mount --bind "$1" {shlex.quote(self.private)} && '
        script = f"""#!/bin/sh
# ssh stand-in: ssh [OPTIONS] HOST [OPTIONS] COMMAND... runs COMMAND inside HOST's namespace.
# With -o ServerAliveInterval=S (and ServerAliveCountMax=N, default 3), it does what ssh
# does when the network between the hosts goes away: after N checks S seconds apart that
# find either end's link down, it prints ssh's message and exits 255.
alive=""; count=3
opt() {{
  case "$1" in
    ServerAliveInterval=*) alive=${{1#*=}} ;;
    ServerAliveCountMax=*) count=${{1#*=}} ;;
  esac
}}
while [ $# -gt 0 ]; do
  case "$1" in -o) opt "$2"; shift 2 ;; -p|-i|-l|-F) shift 2 ;; -*) shift ;; *) break ;; esac
done
host=$1; shift
while [ $# -gt 0 ]; do
  case "$1" in -o) opt "$2"; shift 2 ;; -p|-i|-l) shift 2 ;; -x|-q|-T|-t) shift ;; *) break ;; esac
done
case "$host" in
{cases}
  *) echo "ssh stand-in: no host $host" >&2; exit 255 ;;
esac
if [ -z "$alive" ]; then
  exec ip netns exec "$ns" sh -c '{mount}exec sh -c "$0"' "$*" "$own"
fi
ip netns exec "$ns" sh -c '{mount}exec sh -c "$0"' "$*" "$own" &
child=$!
trap 'kill $child 2>/dev/null' TERM INT HUP
down() {{  # either end's link is down (this end: the namespace this ssh runs in)
  ip -n "$ns" -o link show {INTERFACE} | grep -q "state DOWN" && return 0
  ip -o link show {INTERFACE} 2>/dev/null | grep -q "state DOWN"
}}
missed=0
while kill -0 $child 2>/dev/null; do
  if down; then missed=$((missed + 1)); else missed=0; fi
  if [ $missed -ge "$count" ]; then
    echo "Timeout, server $host not responding." >&2
    exit 255
  fi
  sleep "$alive"
done
wait $child
"""
        with open(self.ssh, "w") as f:
            f.write(script)
        os.chmod(self.ssh, 0o755)

    # -- using the hosts ---------------------------------------------------------

    def hostlist(self, per_host):
        """"A:n,B:n,...", the `-H` list with `per_host` ranks on every host."""
        return ",".join(f"{a}:{per_host}" for a in self.addresses)

    def command(self, i, argv):
        """`argv` as run inside host `i` (through the ssh stand-in, like a remote shell)."""
        return [self.ssh, self.addresses[i], " ".join(shlex.quote(str(a)) for a in argv)]

    def env(self, base=None):
        """An environment whose PATH starts with the ssh stand-in (for horovodrun), and
        whose TFSHARD_SSH names it (for ./horovodrun.sh's MPI launcher)."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "")
        env["TFSHARD_SSH"] = self.ssh
        return env

    def mpi_launcher(self):
        """mpiexec options that start remote ranks through the ssh stand-in directly
        (without it, ./horovodrun.sh starts them through scripts/hydra_ssh.sh, which
        calls TFSHARD_SSH: `env()` names the stand-in there)."""
        return ["-launcher", "ssh", "-launcher-exec", self.ssh]

    def link(self, i, up):
        """Brings host `i`'s link up or down (a cable pulled, as far as the others know)."""
        _ip("-n", self.names[i], "link", "set", INTERFACE, "up" if up else "down")

    def counters(self, i):
        """`(received, sent)` bytes on host `i`'s link so far."""
        out = _ip("-n", self.names[i], "-s", "-j", "link", "show", INTERFACE).stdout
        import json

        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def pids(self, i):
        """The processes running inside host `i`."""
        return [int(p) for p in _ip("netns", "pids", self.names[i], check=False).stdout.split()]
