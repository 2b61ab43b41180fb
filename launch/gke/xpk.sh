#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster through XPK (github.com/AI-Hypercomputer/xpk), which writes
# the JobSet itself and also handles several slices over the data-centre network (multislice).
# Every xpk command goes through run(), which under --dry-run prints it instead.
set -euo pipefail

prog=xpk.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
usage() {
  cat <<EOF
usage: launch/gke/$prog [options] COMMAND [-- <arguments for anchoredit_jax.train>]

commands:
  create    submit the workload: 'python -m anchoredit_jax.train <args>' on every host
  wait      wait until the workload finishes (exit 0 only if it succeeded)
  list      list the cluster's workloads
  delete    delete the workload

options (environment variable in brackets):
  --cluster NAME       GKE cluster made by 'xpk cluster create' [CLUSTER] (required)
  --workload NAME      workload name [WORKLOAD] (default anchoredit-\$USER)
  --image IMAGE        container image with the package and jax[tpu] [IMAGE] (create;
                       build it from launch/gke/Dockerfile)
  --type TYPE          TPU type, e.g. v5p-128, v5litepod-16, v6e-64 [TPU_TYPE] (default v5p-128)
  --num-slices N       slices joined over DCN [NUM_SLICES] (default 1)
  --max-restarts N     restarts after a failure [MAX_RESTARTS] (default 0)
  --project PROJECT    [PROJECT] (default: gcloud's)
  --zone ZONE          [ZONE] (default: gcloud's)
  --env KEY=VALUE      environment variable for training (repeatable)
  --dry-run            print the commands instead of running them
  -h, --help           this message

example (compile for the target topology first: python -m anchoredit_jax.aot ...):
  launch/gke/$prog --cluster my-cluster --image us-docker.pkg.dev/my-proj/repo/anchoredit:latest \\
      --type v5p-128 --num-slices 2 create -- \\
      --config=configs/wan/pretrain.py:wan1.3b,dir=/runs/Wan2.1-T2V-1.3B-Diffusers \\
      --workdir=/runs/wan1.3b/pretrain --config.mesh.dcn_data=2
EOF
}

dry_run=0

cluster=${CLUSTER:-}
workload=${WORKLOAD:-anchoredit-${USER:-user}}
image=${IMAGE:-}
tpu_type=${TPU_TYPE:-v5p-128}
num_slices=${NUM_SLICES:-1}
max_restarts=${MAX_RESTARTS:-0}
project=${PROJECT:-}
zone=${ZONE:-}
envs=()
command=""

while (($#)); do
  arg=$1
  case $arg in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --cluster|--workload|--image|--type|--num-slices|--max-restarts|--project|--zone|--env)
      (($# >= 2)) || die "$arg needs a value"
      val=$2; shift 2 ;;
    --*=*) val=${arg#*=}; arg=${arg%%=*}; shift ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [[ -z $command ]] || die "one command at a time (got '$command' and '$arg')"
      command=$arg; shift; continue ;;
  esac
  case $arg in
    --cluster) cluster=$val ;;
    --workload) workload=$val ;;
    --image) image=$val ;;
    --type) tpu_type=$val ;;
    --num-slices) num_slices=$val ;;
    --max-restarts) max_restarts=$val ;;
    --project) project=$val ;;
    --zone) zone=$val ;;
    --env) [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$val'"; envs+=("$val") ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
train_args=("$@")

case $command in
  create|wait|list|delete) ;;
  "") die "no command given (create, wait, list, delete; see --help)" ;;
  *) die "unknown command '$command' (see --help)" ;;
esac
[[ -n $cluster ]] || die "no cluster: give --cluster or set CLUSTER"
[[ $workload =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--workload must be lowercase letters, digits and hyphens, got '$workload'"
[[ $tpu_type =~ ^v[0-9][a-z0-9]*-[1-9][0-9]*$ ]] || die "--type looks wrong: '$tpu_type' (e.g. v5p-128, v5litepod-16)"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$num_slices'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number, got '$max_restarts'"
if ((${#train_args[@]})) && [[ $command != create ]]; then
  die "train arguments are only for 'create'"
fi
if ((!dry_run)) && ! command -v xpk >/dev/null; then
  die "xpk not found (pip install xpk; or use --dry-run)"
fi

where=(--cluster="$cluster")
[[ -n $project ]] && where+=(--project="$project")
[[ -n $zone ]] && where+=(--zone="$zone")

do_create() {
  [[ -n $image ]] || die "no image: give --image or set IMAGE (build it from launch/gke/Dockerfile)"
  local a have_config=0
  for a in ${train_args[@]+"${train_args[@]}"}; do
    case $a in
      --config|--config=*) have_config=1 ;;
      --coordinator_address*|--num_processes*|--process_id*)
        die "do not pass '${a%%=*}': on GKE TPU pods jax.distributed finds its peers itself" ;;
    esac
  done
  ((have_config)) || die "missing --config=... among the train arguments (after '--')"
  # The command runs in a shell inside the container (workdir /app, see the Dockerfile).
  local cmd
  cmd="python -m anchoredit_jax.train $(rquote_all "${train_args[@]}")"
  ((${#envs[@]} == 0)) || cmd="env $(rquote_all "${envs[@]}") $cmd"
  run xpk workload create "${where[@]}" --workload="$workload" --docker-image="$image" \
    --tpu-type="$tpu_type" --num-slices="$num_slices" --max-restarts="$max_restarts" \
    --command="$cmd"
}

case $command in
  create) do_create ;;
  wait) run xpk workload list "${where[@]}" --wait-for-job-completion="$workload" ;;
  list) run xpk workload list "${where[@]}" ;;
  delete) run xpk workload delete "${where[@]}" --workload="$workload" ;;
esac
