#!/usr/bin/env bash
# Train on one TPU slice of a GKE cluster with the JobSet in launch/gke/jobset.yaml: render it
# for a TPU type and a train command, apply it with kubectl, follow the log, delete it.
# Every kubectl command goes through run(), which under --dry-run prints it instead.
set -euo pipefail

prog=jobset.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
usage() {
  cat <<EOF
usage: launch/gke/$prog [options] COMMAND [-- <arguments for anchoredit_jax.train>]

commands:
  render    print the JobSet manifest
  apply     render and 'kubectl apply' it
  logs      follow the log of host 0 of the slice
  status    show the JobSet and its pods
  delete    delete the JobSet (and its pods)

options (environment variable in brackets):
  --name NAME          JobSet name [JOB_NAME] (default anchoredit-\$USER)
  --image IMAGE        container image with the package and jax[tpu] [IMAGE] (render/apply;
                       build it from launch/gke/Dockerfile)
  --type TYPE          TPU type [TPU_TYPE] (default v5p-128): v5p-N, v4-N (N TensorCores),
                       v5litepod-N / v5e-N, v6e-N (N chips)
  --topology AxB[xC]   override the topology derived from --type [TOPOLOGY]
  --max-restarts N     JobSet restarts after a failure [MAX_RESTARTS] (default 0)
  --env KEY=VALUE      environment variable for the container (repeatable)
  --namespace NS       Kubernetes namespace [NAMESPACE] (default: kubectl's)
  --dry-run            print the commands instead of running them ('apply' prints a
                       'kubectl apply -f - <<EOF' block with the manifest)
  -h, --help           this message

example (compile for the target topology first: python -m anchoredit_jax.aot ...):
  launch/gke/$prog --image us-docker.pkg.dev/my-proj/repo/anchoredit:latest --type v5p-128 \\
      apply -- --config=configs/wan/pretrain.py:wan1.3b,dir=/runs/Wan2.1-T2V-1.3B-Diffusers \\
      --workdir=/runs/wan1.3b/pretrain
EOF
}

dry_run=0

json_string() {  # a JSON (so also YAML) double-quoted string
  local s=$1
  [[ $s != *[[:cntrl:]]* ]] || die "control characters in '$s'"
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

name=${JOB_NAME:-anchoredit-${USER:-user}}
image=${IMAGE:-}
tpu_type=${TPU_TYPE:-v5p-128}
topology=${TOPOLOGY:-}
max_restarts=${MAX_RESTARTS:-0}
namespace=${NAMESPACE:-}
envs=()
command=""

while (($#)); do
  arg=$1
  case $arg in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --name|--image|--type|--topology|--max-restarts|--env|--namespace)
      (($# >= 2)) || die "$arg needs a value"
      val=$2; shift 2 ;;
    --*=*) val=${arg#*=}; arg=${arg%%=*}; shift ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [[ -z $command ]] || die "one command at a time (got '$command' and '$arg')"
      command=$arg; shift; continue ;;
  esac
  case $arg in
    --name) name=$val ;;
    --image) image=$val ;;
    --type) tpu_type=$val ;;
    --topology) topology=$val ;;
    --max-restarts) max_restarts=$val ;;
    --env) [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$val'"; envs+=("$val") ;;
    --namespace) namespace=$val ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
train_args=("$@")

case $command in
  render|apply|logs|status|delete) ;;
  "") die "no command given (render, apply, logs, status, delete; see --help)" ;;
  *) die "unknown command '$command' (see --help)" ;;
esac
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lowercase letters, digits and hyphens, got '$name'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number, got '$max_restarts'"
if ((!dry_run)) && ! command -v kubectl >/dev/null; then
  die "kubectl not found (or use --dry-run)"
fi
kube=(kubectl)
[[ -n $namespace ]] && kube+=(--namespace="$namespace")

# TPU type -> GKE accelerator label, topology, hosts, chips per host. v4/v5p sizes count
# TensorCores (2 per chip, 3D torus); v5e/v6e sizes count chips (2D). Multi-host slices have
# 4 chips per host; v5e/v6e slices of up to 8 chips are one host.
slice_shape() {
  local family=${tpu_type%-*} n=${tpu_type##*-} chips dims
  [[ $tpu_type =~ ^v[0-9][a-z0-9]*-[1-9][0-9]*$ ]] || die "--type looks wrong: '$tpu_type' (e.g. v5p-128, v5litepod-16, v6e-64)"
  case $family in
    v5p) accelerator=tpu-v5p-slice; dims=3; chips=$((n / 2)) ;;
    v4) accelerator=tpu-v4-podslice; dims=3; chips=$((n / 2)) ;;
    v5litepod|v5e) accelerator=tpu-v5-lite-podslice; dims=2; chips=$n ;;
    v6e) accelerator=tpu-v6e-slice; dims=2; chips=$n ;;
    *) die "no GKE accelerator known for '$tpu_type' (v4, v5p, v5litepod/v5e, v6e)" ;;
  esac
  if [[ -n $topology ]]; then
    [[ $topology =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]] || die "--topology looks wrong: '$topology' (e.g. 4x4x4, 4x8)"
    local IFS=x d
    chips=1
    for d in $topology; do chips=$((chips * d)); done
  elif ((dims == 3)); then
    case $chips in
      4) topology=2x2x1 ;; 8) topology=2x2x2 ;; 16) topology=2x2x4 ;; 32) topology=2x4x4 ;;
      64) topology=4x4x4 ;; 128) topology=4x4x8 ;; 256) topology=4x8x8 ;; 512) topology=8x8x8 ;;
      1024) topology=8x8x16 ;; 2048) topology=8x16x16 ;;
      *) die "no default topology for '$tpu_type'; give --topology" ;;
    esac
  else
    case $chips in
      1) topology=1x1 ;; 4) topology=2x2 ;; 8) topology=2x4 ;; 16) topology=4x4 ;; 32) topology=4x8 ;;
      64) topology=8x8 ;; 128) topology=8x16 ;; 256) topology=16x16 ;;
      *) die "no default topology for '$tpu_type'; give --topology" ;;
    esac
  fi
  if ((dims == 2 && chips <= 8)); then
    hosts=1; chips_per_host=$chips
  else
    ((chips % 4 == 0)) || die "$chips chips do not split into hosts of 4"
    hosts=$((chips / 4)); chips_per_host=4
  fi
}

fill() {  # fill KEY VALUE: replace ${KEY} in $text (the quotes keep '&' in VALUE literal)
  local field="\${$1}"
  text=${text//"$field"/"$2"}
}

render() {
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
  slice_shape
  local args_json="" env_json='{"name": "PYTHONUNBUFFERED", "value": "1"}' kv
  for a in "${train_args[@]}"; do args_json+="${args_json:+, }$(json_string "$a")"; done
  for kv in ${envs[@]+"${envs[@]}"}; do
    env_json+=", {\"name\": $(json_string "${kv%%=*}"), \"value\": $(json_string "${kv#*=}")}"
  done
  local template text
  template=$(dirname "${BASH_SOURCE[0]}")/jobset.yaml
  text=$(<"$template")
  fill NAME "$name"
  fill IMAGE "$image"
  fill ACCELERATOR "$accelerator"
  fill TOPOLOGY "$topology"
  fill HOSTS "$hosts"
  fill CHIPS_PER_HOST "$chips_per_host"
  fill MAX_RESTARTS "$max_restarts"
  fill TRAIN_ARGS "[$args_json]"
  fill ENV "[$env_json]"
  if [[ $text =~ \$\{[A-Z_]+\} ]]; then die "field ${BASH_REMATCH[0]} left unfilled in $template"; fi
  printf '%s\n' "$text"
}

case $command in
  render) render ;;
  apply)
    manifest=$(render)
    if ((dry_run)); then
      run "${kube[@]}" apply -f - | sed 's/$/ <<'"'"'EOF'"'"'/'
      printf '%s\nEOF\n' "$manifest"
    else
      printf '%s\n' "$manifest" | run "${kube[@]}" apply -f -
      echo "$prog: submitted; follow it with: launch/gke/$prog --name $name logs" >&2
    fi ;;
  logs) run "${kube[@]}" logs -f --tail=-1 "job/$name-slice-0" ;;
  status)
    run "${kube[@]}" get jobset "$name"
    run "${kube[@]}" get pods -l "jobset.sigs.k8s.io/jobset-name=$name" -o wide ;;
  delete) run "${kube[@]}" delete jobset "$name" ;;
esac
