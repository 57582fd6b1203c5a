#!/usr/bin/env bash
# horovodrun with sane local defaults; everything else is forwarded.
#
#   ./horovodrun.sh -np 2 tfshard predict gpt2
#   ./horovodrun.sh -np 3 python my_script.py
#
# Adds, unless given: -H localhost:N, --gloo, the loopback interface, a Gloo
# timeout and stall-check shutdown (a stuck collective fails instead of
# hanging), and a 0.1 ms cycle time (per-collective latency). Runs
# scripts/setup.sh first (a no-op once set up) and puts .venv/bin on PATH.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$ROOT/scripts/setup.sh"
export PATH="$ROOT/.venv/bin:$PATH"
export VIRTUAL_ENV="$ROOT/.venv"

np="" ; have_hosts=0 ; have_timeout=0 ; have_cycle=0 ; have_stall=0 ; have_nic=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[$i]}
  case "$a" in
    -np|--num-proc) np=${args[$((i + 1))]:-} ;;
    -np=*|--num-proc=*) np=${a#*=} ;;
    -H|--hosts|-H=*|--hosts=*|--hostfile|--hostfile=*) have_hosts=1 ;;
    --gloo-timeout-seconds*) have_timeout=1 ;;
    --cycle-time-ms*) have_cycle=1 ;;
    --stall-check-shutdown-time-seconds*) have_stall=1 ;;
    --network-interface*|--network-interfaces*) have_nic=1 ;;
  esac
  # Stop at the command: options after it belong to the command.
  if [[ "$a" != -* ]] && [[ $i -gt 0 ]] && [[ "${args[$((i - 1))]}" != -* || "${args[$((i - 1))]}" == --gloo ]]; then
    break
  fi
done
if [ -z "$np" ]; then
  echo "usage: ./horovodrun.sh -np N COMMAND [ARGS...]" >&2
  exit 2
fi

extra=(--gloo)
[ $have_hosts -eq 1 ] || extra+=(-H "localhost:$np")
[ $have_nic -eq 1 ] || extra+=(--network-interface lo)
[ $have_timeout -eq 1 ] || extra+=(--gloo-timeout-seconds "${TFSHARD_GLOO_TIMEOUT:-120}")
[ $have_cycle -eq 1 ] || extra+=(--cycle-time-ms "${TFSHARD_CYCLE_TIME_MS:-0.1}")
# Horovod ignores a shutdown time below the warning time: keep warning <= shutdown.
stall=${TFSHARD_STALL_SHUTDOWN:-120}
warn=$(( stall / 2 < 30 ? stall / 2 : 30 )); [ "$warn" -ge 1 ] || warn=1
[ $have_stall -eq 1 ] || extra+=(--stall-check-warning-time-seconds "$warn" \
                                 --stall-check-shutdown-time-seconds "$stall")
export HOROVOD_GLOO_IFACE=${HOROVOD_GLOO_IFACE:-lo}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec horovodrun "${extra[@]}" "$@"
