#!/usr/bin/env bash
# Launches N ranks with local defaults; runs set-up first (a no-op once done).
#
#   ./horovodrun.sh -np 2 tfshard predict gpt2          # MPI job (the default, fast path)
#   ./horovodrun.sh -np 3 python my_script.py
#   ./horovodrun.sh -np 2 --gloo python my_script.py    # horovodrun over Gloo instead
#
# Default: an MPI job started by the MPICH `mpiexec` (Hydra) that set-up installs in
# .venv. tfshard.init() then uses tfshard's own MPI collectives (no negotiation, ~15 us a
# small all-reduce); Horovod, built with its MPI controller, works in the same job for
# code that calls hvd.init(). Local runs keep MPI's transports on loopback; the rank
# prefix "[r] " marks each output line, whatever the program's buffering (each rank runs
# through scripts/rank_prefix.sh); a rank that dies or exits non-zero ends the job.
# Local runs listen on loopback only (tfshard/_loopback.so); given hosts, on all interfaces.
# Options before the command: -np N; -H/--hosts h1:n1,h2:n2 or --hostfile FILE (several
# hosts: MPICH starts the other hosts' ranks over ssh; the network interface is the one
# this host reaches the other hosts through, or --iface NAME, the same name on every
# host); --gloo (horovodrun with Gloo, its loopback interface, Gloo timeout, stall check
# and 0.1 ms cycle time; any horovodrun option you pass wins); --mpi (the default).
# Each rank takes its host's cores divided by the ranks on that host (tfshard.init()).
# Other options before the command go to mpiexec (or to horovodrun with --gloo).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$ROOT/scripts/setup.sh"
export PATH="$ROOT/.venv/bin:$PATH"
export VIRTUAL_ENV="$ROOT/.venv"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

np="" ; hosts="" ; hostfile="" ; mode=mpi ; iface=${TFSHARD_IFACE:-}
have_timeout=0 ; have_cycle=0 ; have_stall=0 ; have_nic=0
opts=() ; cmd=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[$i]}
  case "$a" in
    -np|--num-proc|-n) np=${args[$((i + 1))]:-}; i=$((i + 1)); continue ;;
    -np=*|--num-proc=*) np=${a#*=}; continue ;;
    -H|--hosts) hosts=${args[$((i + 1))]:-}; i=$((i + 1)); continue ;;
    -H=*|--hosts=*) hosts=${a#*=}; continue ;;
    --hostfile) hostfile=${args[$((i + 1))]:-}; i=$((i + 1)); continue ;;
    --hostfile=*) hostfile=${a#*=}; continue ;;
    --iface) iface=${args[$((i + 1))]:-}; i=$((i + 1)); continue ;;
    --iface=*) iface=${a#*=}; continue ;;
    --gloo) mode=gloo; continue ;;
    --mpi) mode=mpi; continue ;;
    --gloo-timeout-seconds*) have_timeout=1 ;;
    --cycle-time-ms*) have_cycle=1 ;;
    --stall-check-shutdown-time-seconds*) have_stall=1 ;;
    --network-interface*|--network-interfaces*) have_nic=1 ;;
  esac
  if [[ "$a" == -* ]]; then
    opts+=("$a")
    # An option's value follows it unless it is written OPT=VALUE or the next word is an option.
    if [[ "$a" != *=* ]] && [[ $((i + 1)) -lt ${#args[@]} ]] && [[ "${args[$((i + 1))]}" != -* ]] \
       && [[ $((i + 2)) -lt ${#args[@]} ]]; then
      opts+=("${args[$((i + 1))]}"); i=$((i + 1))
    fi
    continue
  fi
  cmd=("${args[@]:$i}")
  break
done
if [ -z "$np" ] || [ ${#cmd[@]} -eq 0 ]; then
  echo "usage: ./horovodrun.sh -np N [-H host:n,...|--hostfile F [--iface NAME]] [--gloo] COMMAND [ARGS...]" >&2
  exit 2
fi

# Several hosts: the interface this host reaches the first other host through (the
# route the kernel would take), unless --iface names one. MPI's TCP transport, Hydra's
# control connections and Gloo then all use it.
host_names() {
  if [ -n "$hosts" ]; then tr ',' '\n' <<<"$hosts"; else grep -v '^[[:space:]]*#' "$hostfile"; fi \
    | awk '{print $1}' | sed 's/:[0-9]*$//' | grep -v '^$' || true
}
route_iface() {
  local h addr dev
  for h in $(host_names); do
    addr=$(getent ahostsv4 "$h" 2>/dev/null | awk 'NR == 1 {print $1}')
    [ -n "$addr" ] || continue
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    if [ -n "$dev" ] && [ "$dev" != lo ]; then echo "$dev"; return; fi
  done
}
if [ -n "$hosts$hostfile" ] && [ -z "$iface" ] && command -v ip >/dev/null; then
  iface=$(route_iface)
fi

# Local runs: mpiexec's control port and horovodrun's rendezvous server bind the wildcard
# address with no option to choose; tfshard's bind() shim turns that into loopback.
loopback_only() {
  if [ -f "$ROOT/tfshard/_loopback.so" ]; then
    export LD_PRELOAD="$ROOT/tfshard/_loopback.so${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
}

if [ "$mode" = gloo ]; then
  extra=(--gloo)
  if [ -n "$hosts" ]; then extra+=(-H "$hosts"); elif [ -n "$hostfile" ]; then
    extra+=(--hostfile "$hostfile"); else extra+=(-H "localhost:$np"); fi
  if [ -n "$hosts$hostfile" ] && [ -n "$iface" ]; then
    [ $have_nic -eq 1 ] || extra+=(--network-interface "$iface")
    export HOROVOD_GLOO_IFACE=${HOROVOD_GLOO_IFACE:-$iface}
  fi
  if [ -z "$hosts$hostfile" ]; then
    [ $have_nic -eq 1 ] || extra+=(--network-interface lo)
    export HOROVOD_GLOO_IFACE=${HOROVOD_GLOO_IFACE:-lo}
    loopback_only
  fi
  [ $have_timeout -eq 1 ] || extra+=(--gloo-timeout-seconds "${TFSHARD_GLOO_TIMEOUT:-120}")
  [ $have_cycle -eq 1 ] || extra+=(--cycle-time-ms "${TFSHARD_CYCLE_TIME_MS:-0.1}")
  # Horovod ignores a shutdown time below the warning time: keep warning <= shutdown.
  stall=${TFSHARD_STALL_SHUTDOWN:-120}
  warn=$(( stall / 2 < 30 ? stall / 2 : 30 )); [ "$warn" -ge 1 ] || warn=1
  [ $have_stall -eq 1 ] || extra+=(--stall-check-warning-time-seconds "$warn" \
                                   --stall-check-shutdown-time-seconds "$stall")
  exec horovodrun "${extra[@]}" ${opts[@]+"${opts[@]}"} -np "$np" "${cmd[@]}"
fi

# MPI (MPICH Hydra).
extra=(-n "$np")
if [ -n "$hosts$hostfile" ]; then
  if [ -n "$hosts" ]; then extra+=(-hosts "$hosts"); else extra+=(-f "$hostfile"); fi
  # The ranks of one host talk through shared memory; between hosts, OFI's TCP provider
  # on the chosen interface (the environment reaches every host's ranks).
  export MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi} FI_PROVIDER=${FI_PROVIDER:-tcp}
  if [ -n "$iface" ]; then
    extra+=(-iface "$iface")
    export FI_TCP_IFACE=${FI_TCP_IFACE:-$iface}
  fi
  # ssh with keepalives (scripts/hydra_ssh.sh): a host that dies or drops off the network
  # ends the job within seconds instead of leaving mpiexec waiting on its connection.
  if [[ " ${opts[*]-} " != *" -launcher"* ]] && [[ " ${opts[*]-} " != *" -bootstrap"* ]]; then
    extra+=(-launcher ssh -launcher-exec "$ROOT/scripts/hydra_ssh.sh")
  fi
else
  # One host: the ranks talk through shared memory; keep MPI's network transport (used
  # only between hosts) on loopback so no rank listens on an outside interface.
  extra+=(-hosts "localhost:$np" -launcher fork)
  export MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi}
  export FI_PROVIDER=${FI_PROVIDER:-tcp} FI_TCP_IFACE=${FI_TCP_IFACE:-lo}
  loopback_only
fi
# For code that also uses Horovod in the job (its MPI controller): low latency, and a
# stuck Horovod collective ends the job instead of hanging it.
export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-${TFSHARD_CYCLE_TIME_MS:-0.1}}
export HOROVOD_STALL_CHECK_TIME_SECONDS=${HOROVOD_STALL_CHECK_TIME_SECONDS:-30}
export HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=${HOROVOD_STALL_SHUTDOWN_TIME_SECONDS:-${TFSHARD_STALL_SHUTDOWN:-120}}
export TFSHARD_MPIEXEC_PID=$$  # exec keeps the PID: scripts/hydra_ssh.sh may stop it
# Each rank's command runs through scripts/rank_prefix.sh: "[rank] " before every line (Hydra's
# -prepend-rank prefixes each write instead, which splits and joins lines).
exec mpiexec "${extra[@]}" ${opts[@]+"${opts[@]}"} "$ROOT/scripts/rank_prefix.sh" "${cmd[@]}"
