#!/usr/bin/env bash
# The life cycle of a training run on a Cloud TPU VM slice, with gcloud: request the slice as a
# queued resource, wait for it, copy this repository to every worker, install it, run a stage
# config on every worker at once (the same command everywhere: train.py finds the other hosts
# through jax.distributed), follow the log, stop, delete. Every gcloud/git command goes through
# run(), which under --dry-run prints it instead.
set -euo pipefail

prog=tpu_vm.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
usage() {
  cat <<EOF
usage: launch/$prog [options] COMMAND [-- <arguments for anchoredit_jax.train>]

commands:
  create    request the slice: a queued resource holding one TPU VM slice
  wait      poll until the queued resource is ACTIVE (fails if it ends FAILED/SUSPENDED)
  copy      pack this repository's tracked files (with uncommitted changes) and unpack them on
            every worker under --remote-dir (untracked files are not copied: git add them)
  install   on every worker: a Python venv (uv, Python --python-version) with the package and
            jax[tpu]
  run       start 'python -m anchoredit_jax.train <args>' on every worker in the background
            (nohup; log and pid in ~/anchoredit_logs/<name>.*), then follow worker 0's log
            (Ctrl-C stops following, not training)
  logs      follow a worker's log (--worker N, default 0) until its training process ends
  stop      send SIGINT to training on every worker (it saves a checkpoint and exits);
            --force sends SIGKILL
  delete    delete the queued resource and its TPU VMs
  status    describe the queued resource
  up        create, wait, copy, install
  all       up, then train in the foreground (output of all workers streamed), then delete
            (also on failure; --keep leaves the slice)

options (environment variable in brackets):
  --name NAME            queued resource and TPU name [TPU_NAME] (default anchoredit-\$USER)
  --project PROJECT      Google Cloud project [PROJECT or CLOUDSDK_CORE_PROJECT] (required)
  --zone ZONE            zone, e.g. us-east5-a [ZONE] (required)
  --type TYPE            accelerator type, e.g. v5litepod-16, v5p-128, v6e-64 [TPU_TYPE]
                         (default v5litepod-16)
  --runtime-version V    TPU software version [RUNTIME_VERSION] (default from the type:
                         v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base)
  --spot                 request Spot capacity [SPOT=1]
  --reserved             request reserved capacity [RESERVED=1]
  --valid-until D        give up waiting for capacity after duration D, e.g. 6h [VALID_UNTIL]
  --remote-dir DIR       code directory on the workers, relative to home [REMOTE_DIR]
                         (default anchoredit_jax)
  --python-version X     Python on the workers [PYTHON_VERSION] (default 3.11)
  --jax-spec SPEC        what to install for JAX [JAX_SPEC] (default 'jax[tpu]')
  --env KEY=VALUE        environment for training on every worker (repeatable)
  --worker N             logs: which worker (default 0)
  --poll S               wait: seconds between polls (default 30)
  --force                stop: SIGKILL instead of SIGINT
  --keep                 all: keep the slice at the end
  --dry-run              print every command instead of running it
  -h, --help             this message

example (compile for the target topology first: python -m anchoredit_jax.aot ...):
  launch/$prog --project my-proj --zone us-east5-a --type v5p-128 all -- \\
      --config=configs/wan/pretrain.py:wan1.3b,dir=/data/Wan2.1-T2V-1.3B-Diffusers \\
      --workdir=/mnt/shared/runs/wan1.3b/pretrain
EOF
}

dry_run=0

name=${TPU_NAME:-anchoredit-${USER:-user}}
project=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
zone=${ZONE:-}
tpu_type=${TPU_TYPE:-v5litepod-16}
runtime_version=${RUNTIME_VERSION:-}
spot=${SPOT:-0}
reserved=${RESERVED:-0}
valid_until=${VALID_UNTIL:-}
remote_dir=${REMOTE_DIR:-anchoredit_jax}
python_version=${PYTHON_VERSION:-3.11}
jax_spec=${JAX_SPEC:-jax[tpu]}
worker=0
poll=30
force=0
keep=0
train_env=()
command=""

while (($#)); do
  arg=$1
  case $arg in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --spot) spot=1; shift; continue ;;
    --reserved) reserved=1; shift; continue ;;
    --force) force=1; shift; continue ;;
    --keep) keep=1; shift; continue ;;
    --name|--project|--zone|--type|--runtime-version|--valid-until|--remote-dir|--python-version|--jax-spec|--env|--worker|--poll)
      (($# >= 2)) || die "$arg needs a value"
      val=$2; shift 2 ;;
    --*=*)
      val=${arg#*=}; arg=${arg%%=*}; shift ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [[ -z $command ]] || die "one command at a time (got '$command' and '$arg')"
      command=$arg; shift; continue ;;
  esac
  case $arg in
    --name) name=$val ;;
    --project) project=$val ;;
    --zone) zone=$val ;;
    --type) tpu_type=$val ;;
    --runtime-version) runtime_version=$val ;;
    --valid-until) valid_until=$val ;;
    --remote-dir) remote_dir=$val ;;
    --python-version) python_version=$val ;;
    --jax-spec) jax_spec=$val ;;
    --env) [[ $val == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$val'"; train_env+=("$val") ;;
    --worker) worker=$val ;;
    --poll) poll=$val ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
train_args=("$@")

case $command in
  create|wait|copy|install|run|logs|stop|delete|status|up|all) ;;
  "") die "no command given (create, wait, copy, install, run, logs, stop, delete, status, up, all; see --help)" ;;
  *) die "unknown command '$command' (see --help)" ;;
esac

[[ -n $project ]] || die "no project: give --project or set PROJECT"
[[ -n $zone ]] || die "no zone: give --zone or set ZONE"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lowercase letters, digits and hyphens, got '$name'"
[[ $tpu_type =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] || die "--type looks wrong: '$tpu_type' (e.g. v5litepod-16, v5p-128, v6e-64)"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$worker'"
[[ $poll =~ ^[1-9][0-9]*$ ]] || die "--poll must be a positive number of seconds, got '$poll'"
((spot && reserved)) && die "--spot and --reserved exclude each other"
if [[ -z $runtime_version ]]; then
  case $tpu_type in
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) runtime_version=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for '$tpu_type'; give --runtime-version" ;;
  esac
fi

needs_train_args() {
  local a have=0
  for a in ${train_args[@]+"${train_args[@]}"}; do
    case $a in
      --config|--config=*) have=1 ;;
      --coordinator_address*|--num_processes*|--process_id*)
        die "do not pass '${a%%=*}': on TPU VMs jax.distributed finds the workers itself" ;;
    esac
  done
  ((have)) || die "missing --config=... among the train arguments (after '--')"
}
case $command in run|all) needs_train_args ;; esac
if ((${#train_args[@]})) && [[ $command != run && $command != all ]]; then
  die "train arguments are only for 'run' and 'all'"
fi
if ((!dry_run)) && ! command -v gcloud >/dev/null; then
  die "gcloud not found (install the Google Cloud CLI, or use --dry-run)"
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
where=(--zone="$zone" --project="$project")
remote_venv="\$HOME/anchoredit_venv"  # expanded on the workers
remote_logs="\$HOME/anchoredit_logs"
log_file="$remote_logs/$name.log"
pid_file="$remote_logs/$name.pid"

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${where[@]}" --command="$1"; }

do_create() {
  local extra=()
  ((spot)) && extra+=(--spot)
  ((reserved)) && extra+=(--reserved)
  [[ -n $valid_until ]] && extra+=(--valid-until-duration="$valid_until")
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
    --accelerator-type="$tpu_type" --runtime-version="$runtime_version" "${where[@]}" ${extra[@]+"${extra[@]}"}
}

do_wait() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${where[@]}" --format='value(state.state)')
  if ((dry_run)); then
    run "${describe[@]}"
    echo "# (repeated every ${poll}s until the state is ACTIVE)"
    return 0
  fi
  local state
  while :; do
    state=$("${describe[@]}") || die "could not describe queued resource '$name'"
    case $state in
      ACTIVE) echo "$prog: $name is ACTIVE" >&2; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        echo "$prog: error: queued resource '$name' is $state; details:" >&2
        gcloud compute tpus queued-resources describe "$name" "${where[@]}" >&2 || true
        exit 1 ;;
      *) echo "$prog: $name is ${state:-not visible yet}; next look in ${poll}s" >&2; sleep "$poll" ;;
    esac
  done
}

do_copy() {
  local tarball=${TMPDIR:-/tmp}/anchoredit_jax-$name.tar.gz untracked
  git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 || die "$repo is not a git repository"
  untracked=$(git -C "$repo" ls-files --others --exclude-standard | wc -l)
  if ((untracked > 0)); then
    echo "$prog: note: $untracked untracked files are not copied (git add them to include them)" >&2
  fi
  # The working tree's tracked files, uncommitted changes included: 'git stash create' makes a
  # commit of them without touching any branch, the index or the stash (nothing when clean).
  # shellcheck disable=SC2016  # $1, $2, $rev belong to the inner bash
  run bash -c 'set -e; rev=$(git -C "$1" stash create) && git -C "$1" archive --format=tar.gz -o "$2" "${rev:-HEAD}"' \
    _ "$repo" "$tarball"
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:anchoredit_jax.tar.gz" --worker=all "${where[@]}"
  ssh_all "mkdir -p $(rquote "$remote_dir") && tar -xzf anchoredit_jax.tar.gz -C $(rquote "$remote_dir") && rm anchoredit_jax.tar.gz"
}

do_install() {
  # uv brings its own Python, so the image's python3 (3.10 on current TPU images) does not matter.
  local uv="\$HOME/.local/bin/uv"
  ssh_all "set -e; \
(python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh); \
[ -x $remote_venv/bin/python ] || $uv venv --python $(rquote "$python_version") $remote_venv; \
cd $(rquote "$remote_dir") && $uv pip install --python $remote_venv/bin/python -e \".[test]\" $(rquote "$jax_spec")"
}

train_command() {  # the command each worker runs, in its code directory
  local envs=""
  ((${#train_env[@]})) && envs="env $(rquote_all "${train_env[@]}") "
  printf '%s' "$envs$remote_venv/bin/python -m anchoredit_jax.train $(rquote_all "${train_args[@]}")"
}

do_run() {
  # nohup execs python, so $! is the training process; set -m keeps its SIGINT (a background
  # job of a shell without job control ignores it), which train.py turns into checkpoint-and-exit.
  ssh_all "cd $(rquote "$remote_dir") && mkdir -p $remote_logs || exit 1; \
if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then \
echo \"training already running on \$(hostname) (pid \$(cat $pid_file)); stop it first\"; exit 1; fi; \
set -m; nohup $(train_command) > $log_file 2>&1 < /dev/null & echo \$! > $pid_file; \
echo \"started pid \$(cat $pid_file) on \$(hostname), log $log_file\""
  do_logs
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "$name" --worker="$worker" "${where[@]}" \
    --command="tail -n +1 -F --pid=\"\$(cat $pid_file)\" $log_file"
}

do_train_foreground() {
  ssh_all "cd $(rquote "$remote_dir") && $(train_command)"
}

do_stop() {
  local sig=INT
  ((force)) && sig=KILL
  ssh_all "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then \
kill -$sig \"\$(cat $pid_file)\" && echo \"sent SIG$sig to \$(cat $pid_file) on \$(hostname)\"; \
else echo \"no training running on \$(hostname)\"; fi"
}

do_delete() {
  run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
}

do_status() {
  run gcloud compute tpus queued-resources describe "$name" "${where[@]}"
}

delete_at_exit() {
  local rc=$?
  trap - EXIT
  if ((keep)); then
    echo "$prog: --keep: the slice '$name' stays (delete it with: launch/$prog --project $project --zone $zone --name $name delete)" >&2
  else
    do_delete || echo "$prog: error: deleting '$name' failed; delete it by hand" >&2
  fi
  exit "$rc"
}

case $command in
  create) do_create ;;
  wait) do_wait ;;
  copy) do_copy ;;
  install) do_install ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  status) do_status ;;
  up) do_create; do_wait; do_copy; do_install ;;
  all)
    trap delete_at_exit EXIT
    do_create; do_wait; do_copy; do_install; do_train_foreground ;;
esac
