#!/usr/bin/env bash
# The prepared accelerator check (issue 5), for a machine with an NVIDIA GPU and JAX installed:
#
#   bash benchmark/gpu.sh [OUT_DIR]     # default: $OUT, else /tmp/gpu_bench
#   bash benchmark/gpu.sh --dry-run     # here, on the CPU: the same steps at the smoke preset
#
# 1. installs whichever of our dependencies does not import, from the wheels carried in .whl/
#    (python 3.12; nothing is fetched from the network) into a private folder on PYTHONPATH;
# 2. runs the cuDNN attention parity test, then benchmark/speed.py at a Wan2.1-1.3B-sized model
#    with random weights, 624x624 = 1521 tokens a turn (stage-1 step with its time per XLA op
#    kind, editing to turn 8; again with cuDNN attention), then at the `small` preset (every
#    stage, editing to turn 32), then the serving benchmark at the `small` preset (1, 16 and 64
#    clients, batched against one at a time); each prints the machine, the command and its
#    table, and writes JSON. About 12 minutes at most.
# Goals on one H100 (issue 5): a 4-step editing turn of the 1.3B model in <= 0.1 s, and training
# MFU >= 40% of the measured bf16 peak.
# .whl/ is not tracked by git (28 MB of python-3.12 wheels: flax, optax, orbax-checkpoint, grain,
# array_record, dm_tree, ml_collections, tensorboardX, portpicker, tensorstore); a lent machine
# gets it only when the call carries it (the device tool's carry: [".whl"]). Compile times on a
# GPU are long (a first toy stage-1 step took 20 s alone with autotuning off, 5.7 min with two
# processes compiling at once at highest matmul precision): run this one script as one call.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-/tmp/gpu_bench}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"

# A dependency counts as present only if it imports (a flax built for another jax does not).
missing=$("$PY" - <<'PYEOF'
import importlib
mods = ["flax.nnx", "optax", "orbax.checkpoint", "grain", "einops", "ml_collections",
        "safetensors", "tqdm", "tensorboardX", "PIL", "matplotlib", "absl", "array_record"]
bad = []
for m in mods:
  try:
    importlib.import_module(m)
  except Exception:
    bad.append(m)
print(" ".join(bad))
PYEOF
)
if [ -n "$missing" ]; then
  echo "gpu.sh: not importable: $missing; installing the carried wheels from .whl/"
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: error: no wheels in .whl/ to install $missing from" >&2; exit 2; }
  SITE=/tmp/anchoredit_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

# Each step has its own time limit (seconds; LIMIT_SCALE scales them all), so that one slow compile
# cannot use up a lent machine's time: the benchmark writes its JSON after every part and prints
# every row as it is measured, so a step stopped at its limit still leaves its numbers.
# XLA's flags are left at their defaults. Measured on an H200 (benchmark/RESULTS.md, 2026-11-27):
# --xla_gpu_autotune_level=0 alone made an 8192^3 bf16 matmul run at 10.5 TFLOP/s instead of
# 651 (Triton GEMMs at an untuned default tiling); adding --xla_gpu_enable_triton_gemm=false gave
# 626. With autotuning on, the wan1.3b step and editing compiled well inside their limits.
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUTDIR/NAME.txt
  local name=$1 secs=$2; shift 2
  secs=$(( secs * ${LIMIT_SCALE:-1} ))
  echo "== gpu.sh: $name (limit ${secs} s): $*"
  local t0=$SECONDS rc
  timeout "$secs" "$@" 2>&1 | tee "$OUTDIR/$name.txt"
  rc=${PIPESTATUS[0]}  # the command's status, not tee's
  echo "== gpu.sh: $name: exit $rc after $(( SECONDS - t0 )) s$([ "$rc" = 124 ] && echo ' (time limit)')"
}
set +e +o pipefail
if [ "$DRY" = 1 ]; then
  step dry 600 "$PY" -m benchmark.speed --presets smoke --stages pretrain,causal --turns 1,2 --reps 1 \
    --teacher-steps 2 --matmul 256 --profile --out "$OUTDIR/dry"
  step dry_serve 300 "$PY" -m benchmark.serve --preset smoke --clients 1,2 --turns 2 --out "$OUTDIR/dry_serve"
  exit 0
fi
step cudnn_parity 45 env JAX_PLATFORMS=cuda "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_speed_paths.py -k cudnn
step wan1.3b 180 "$PY" -m benchmark.speed --presets wan1.3b --stages pretrain --turns 1,2,8 \
  --reps 5 --profile --out "$OUTDIR/wan1.3b"
step wan1.3b_cudnn 100 "$PY" -m benchmark.speed --presets wan1.3b --stages pretrain --turns 1,2 \
  --reps 5 --teacher-steps 4 --attention cudnn --out "$OUTDIR/wan1.3b_cudnn"
step small 240 "$PY" -m benchmark.speed --presets small --turns 1,2,8,32 --reps 5 \
  --out "$OUTDIR/small"
step serve_small 180 "$PY" -m benchmark.serve --preset small --clients 1,16,64 --turns 8 \
  --out "$OUTDIR/serve_small"
echo "gpu.sh: logs and JSON under $OUTDIR (wan1.3b*, small*, serve_small)"
