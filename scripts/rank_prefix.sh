#!/usr/bin/env bash
# One rank of ./horovodrun.sh's MPI job: runs the rank's command with "[RANK] " before every
# line it writes, on stdout and on stderr, whatever its buffering.
#
#   scripts/rank_prefix.sh COMMAND [ARGS...]      (mpiexec runs it once per rank)
#
# mpiexec's own -prepend-rank prefixes each write the rank makes, not each line: with
# PYTHONUNBUFFERED=1, print("alpha", "beta") came out as "[0] alpha[0]  [0] beta[0] ". Here
# the command replaces this shell (exec), so mpiexec sees its own process: its exit code,
# the signal that killed it, its PID. Its stdout and stderr are pipes into two prefixers
# that copy whole lines (an unterminated last line gets its newline, so another rank's
# output never joins it). The prefixers run in a session of their own and ignore INT, TERM
# and HUP: when mpiexec ends the job (it kills each rank's process group), they still copy
# what the rank wrote, and end when its last writer closes the pipe. They close every other
# descriptor they inherit: holding the rank's PMI socket would hide the rank's death from
# mpiexec, which ends the job when that socket closes without MPI_Finalize.
rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-?}}}
prefixer='
import os, sys
os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # leave the MPI and PMI sockets to the rank
prefix, out = sys.argv[1].encode(), sys.stdout.buffer
for line in iter(sys.stdin.buffer.readline, b""):
    out.write(prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
    out.flush()
'
own_session=()
command -v setsid >/dev/null && own_session=(setsid)
prefix() {
  trap '' INT TERM HUP
  exec ${own_session[@]+"${own_session[@]}"} python3 -S -c "$prefixer" "[$rank] "
}
exec 3>&1 4>&2
exec "$@" > >(prefix >&3 3>&- 4>&-) 2> >(prefix >&4 3>&- 4>&-) 3>&- 4>&-
