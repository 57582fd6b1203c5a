#!/bin/sh
# The ssh that MPICH's mpiexec (Hydra) starts other hosts' ranks through, given hosts:
#   ./horovodrun.sh -np 4 -H hostA:2,hostB:2 ...  (passes -launcher-exec scripts/hydra_ssh.sh)
#
# Hydra waits for each host's ssh to end. Plain ssh over a dead link (a host powered
# off, a cable pulled) waits for TCP to give up, which takes many minutes, so the job
# would hang. Here ssh sends keepalives: a host that does not answer for
# TFSHARD_SSH_ALIVE_SECONDS (default 5) x 3 ends its ssh with status 255, this script
# names the host and stops mpiexec (TFSHARD_MPIEXEC_PID, set by ./horovodrun.sh; Hydra
# itself would go on waiting for the lost host), whose ranks on the other hosts then end.
# TFSHARD_SSH names another ssh (the tests' namespace stand-in).
host=""
for a in "$@"; do
  case "$a" in -*) ;; *) host=$a; break ;; esac
done
alive=${TFSHARD_SSH_ALIVE_SECONDS:-5}
"${TFSHARD_SSH:-ssh}" -o ServerAliveInterval="$alive" -o ServerAliveCountMax=3 \
  -o BatchMode=yes "$@"
code=$?
if [ "$code" -eq 255 ]; then
  echo "[tfshard] lost the connection to host $host (no answer for $((alive * 3)) s, or ssh" \
       "failed): stopping the job on every host." >&2
  if [ -n "${TFSHARD_MPIEXEC_PID:-}" ] && [ "$TFSHARD_MPIEXEC_PID" = "$PPID" ]; then
    kill -TERM "$PPID" 2>/dev/null
    sleep 5
    kill -KILL "$PPID" 2>/dev/null
  fi
fi
exit "$code"
