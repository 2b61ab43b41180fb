#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own fake CPU devices, joined through
# jax.distributed (gloo collectives): the multi-host code path without a pod. Tests use it.
#
#   launch/local.sh [--processes N] [--devices D] [--port P] [--logdir DIR] [--timeout S]
#                   [--grace S] [--keep-going] [--dry-run] -- <arguments for anchoredit_jax.train>
#
# Process i runs
#   python -m anchoredit_jax.train <args> --coordinator_address=127.0.0.1:P \
#       --num_processes=N --process_id=i
# with JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D and
# JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo, its output going to <logdir>/process_i.log (and the
# pids, one line per process, to <logdir>/pids). If one fails, the others are stopped.
set -euo pipefail

prog=local.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
usage() {
  cat <<EOF
usage: launch/$prog [options] -- <arguments for anchoredit_jax.train>

Start N processes of 'python -m anchoredit_jax.train' on this machine, joined by
jax.distributed over 127.0.0.1, each with D fake CPU devices and gloo collectives.
Waits for all of them; if one fails, stops the others and shows the end of its log.

options:
  --processes N   number of processes (default 2)
  --devices D     fake CPU devices per process (default 4)
  --port P        coordinator port (default: a free port)
  --logdir DIR    where process_<i>.log and pids (one line per process) go (default: the
                  --workdir given to train, else /tmp/anchoredit_local_<port>)
  --timeout S     stop everything and fail (exit 124) after S seconds (default 0: none)
  --grace S       seconds between SIGTERM and SIGKILL when stopping processes (default 10)
  --keep-going    when a process fails, do not stop the others but wait for them (to test
                  that they notice a dead peer themselves; --timeout still applies)
  --dry-run       print the command of each process, one per line, and exit
  -h, --help      this message

environment:
  PYTHON          interpreter (default .venv/bin/python of this repository, else python3)

example:
  launch/$prog --processes 2 --devices 4 -- \\
      --config=configs/pretrain.py:smoke --workdir=/tmp/mp_smoke
EOF
}

processes=2
devices=4
port=""
logdir=""
timeout_s=0
grace_s=10
dry_run=0
keep_going=0

# Options take "--flag value" or "--flag=value".
while (($#)); do
  arg=$1
  case $arg in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --keep-going) keep_going=1; shift; continue ;;
    --processes|--devices|--port|--logdir|--timeout|--grace)
      (($# >= 2)) || die "$arg needs a value"
      val=$2; shift 2 ;;
    --processes=*|--devices=*|--port=*|--logdir=*|--timeout=*|--grace=*)
      val=${arg#*=}; arg=${arg%%=*}; shift ;;
    *) die "unknown option '$arg' (train arguments go after '--'; see --help)" ;;
  esac
  case $arg in
    --processes) processes=$val ;;
    --devices) devices=$val ;;
    --port) port=$val ;;
    --logdir) logdir=$val ;;
    --timeout) timeout_s=$val ;;
    --grace) grace_s=$val ;;
  esac
done
train_args=("$@")

is_pos "$processes" || die "--processes must be a positive integer, got '$processes'"
is_pos "$devices" || die "--devices must be a positive integer, got '$devices'"
is_uint "$timeout_s" || die "--timeout must be a whole number of seconds, got '$timeout_s'"
is_uint "$grace_s" || die "--grace must be a whole number of seconds, got '$grace_s'"
if [[ -n $port ]] && ! { is_pos "$port" && ((port <= 65535)); }; then
  die "--port must be in 1..65535, got '$port'"
fi

# The train arguments: a config is required; the distributed flags are ours to set; the
# workdir (if any) is where the logs go by default.
have_config=0
workdir=""
for ((k = 0; k < ${#train_args[@]}; k++)); do
  a=${train_args[k]}
  case $a in
    --config=*) have_config=1 ;;
    --config) have_config=1 ;;
    --workdir=*) workdir=${a#--workdir=} ;;
    --workdir) workdir=${train_args[k + 1]:-} ;;
    --coordinator_address|--coordinator_address=*|--num_processes|--num_processes=*|--process_id|--process_id=*)
      die "'${a%%=*}' is set by $prog itself; do not pass it" ;;
  esac
done
((${#train_args[@]})) || die "no train arguments; give them after '--', e.g. -- --config=configs/pretrain.py:smoke"
((have_config)) || die "missing --config=... among the train arguments (after '--')"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
  python=$repo/.venv/bin/python
else
  python=python3
fi

if [[ -z $port ]]; then
  port=$("$python" -S -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || die "could not pick a free port with $python; give --port"
fi
if [[ -z $logdir ]]; then
  if [[ -n $workdir ]]; then logdir=$workdir; else logdir=/tmp/anchoredit_local_$port; fi
fi

# Each process gets exactly D devices: drop a device count inherited from the caller's
# XLA_FLAGS (tests set one), keep any other XLA flags.
xla_flags=""
for f in ${XLA_FLAGS:-}; do
  [[ $f == --xla_force_host_platform_device_count=* ]] || xla_flags+="$f "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

env_of_process=(
  JAX_PLATFORMS=cpu
  "XLA_FLAGS=$xla_flags"
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
)
command_of() {  # command_of I: fills cmd with process I's argv (after 'env')
  cmd=("${env_of_process[@]}" "$python" -m anchoredit_jax.train "${train_args[@]}"
    "--coordinator_address=127.0.0.1:$port" "--num_processes=$processes" "--process_id=$1")
}

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    command_of "$i"
    line="env"
    for w in "${cmd[@]}" ">" "$logdir/process_$i.log" "2>&1"; do
      case $w in ">"|"2>&1") line+=" $w" ;; *) line+=" $(quote "$w")" ;; esac
    done
    echo "$line"
  done
  exit 0
fi

mkdir -p "$logdir"
pids=()
alive=()

signal_process() { kill "-$1" "${pids[$2]}" 2>/dev/null || true; }  # signal_process SIG I

# Stop every process still running: SIGNAL first, SIGKILL after the grace period.
stop_all() {
  local sig=$1 i t
  for i in "${!pids[@]}"; do
    ((alive[i])) && signal_process "$sig" "$i"
  done
  for ((t = 0; t < grace_s * 10; t++)); do
    local any=0
    for i in "${!pids[@]}"; do
      if ((alive[i])) && kill -0 "${pids[i]}" 2>/dev/null; then any=1; fi
    done
    ((any)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if ((alive[i])); then
      signal_process KILL "$i"
      wait "${pids[i]}" 2>/dev/null || true
      alive[i]=0
    fi
  done
}

show_tail() {  # show_tail I
  local log=$logdir/process_$1.log
  echo "---- last 30 lines of $log ----" >&2
  tail -n 30 "$log" >&2 || true
  echo "---- end of $log ----" >&2
}

on_signal() {
  echo "$prog: interrupted; stopping all processes (logs in $logdir)" >&2
  stop_all "$1"
  if [[ $1 == INT ]]; then exit 130; else exit 143; fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

echo "$prog: $processes processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs $logdir/process_<i>.log" >&2
# The processes stay in this script's process group, so killing the group (a terminal's Ctrl-C,
# a test harness) reaches them too. 'env' execs python: $! is the python process.
for ((i = 0; i < processes; i++)); do
  command_of "$i"
  env "${cmd[@]}" </dev/null >"$logdir/process_$i.log" 2>&1 &
  pids[i]=$!
  alive[i]=1
done
printf '%s\n' "${pids[@]}" >"$logdir/pids"

# Milliseconds since the epoch (EPOCHREALTIME: bash >= 5; else whole seconds).
now_ms() {
  if [[ -n ${EPOCHREALTIME:-} ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((t / 1000))
  else
    echo $(($(date +%s) * 1000))
  fi
}
deadline=0
((timeout_s > 0)) && deadline=$(($(now_ms) + timeout_s * 1000))
remaining=$processes
failed=-1
failed_rc=0
while ((remaining > 0)); do
  for ((i = 0; i < processes; i++)); do
    ((alive[i])) || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    alive[i]=0
    remaining=$((remaining - 1))
    if ((rc != 0 && failed < 0)); then
      failed=$i
      failed_rc=$rc
    fi
  done
  if ((failed >= 0 && !keep_going)); then
    echo "$prog: error: process $failed of $processes failed (exit code $failed_rc); stopping the others" >&2
    stop_all TERM
    show_tail "$failed"
    exit "$failed_rc"
  fi
  if ((deadline > 0)) && (($(now_ms) >= deadline)); then
    echo "$prog: error: timed out after ${timeout_s}s; stopping all processes" >&2
    stop_all TERM
    for ((i = 0; i < processes; i++)); do show_tail "$i"; done
    exit 124
  fi
  ((remaining > 0)) && sleep 0.2
done
if ((failed >= 0)); then
  echo "$prog: error: process $failed of $processes failed first (exit code $failed_rc)" >&2
  for ((i = 0; i < processes; i++)); do show_tail "$i"; done
  exit "$failed_rc"
fi
echo "$prog: all $processes processes finished (logs in $logdir)" >&2
