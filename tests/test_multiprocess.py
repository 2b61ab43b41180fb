"""Several real processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), 4 CPU devices
each, against one process with all 8 devices: the same losses and parameters, checkpoints that
restore onto another mesh and process count, stages 2 and 3 in the 2-process setting, and a dead
process that makes the other stop with an error instead of hanging.

Processes are started with launch/local.sh, the script users run for the same thing.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from anchoredit_jax.checkpoint import flat_params, load_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config.train.log_every=1", "--config.eval.pairs=0", "--config.train.ckpt_every=2"]
TWO_PROCESS_MESH = ["--config.mesh.dcn_data=2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
                    "--config.mesh.tensor=2"]  # (data=2, fsdp=2, tensor=2), data across processes


def uncached_env():
  """The environment without the tests' shared compilation cache: a one-process resume of a
  two-process run aborted (SIGABRT) in CI with it, suspected of loading a program cached for
  the gloo collectives of the two-process run."""
  return {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def one_process(config, workdir, *args, devices=8, timeout=600):
  env = dict(uncached_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "anchoredit_jax.train",
                        f"--config={config}", f"--workdir={workdir}", *SMOKE, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def local_sh(config, workdir, *args, processes=2, devices=4, wait=True, extra=()):
  """launch/local.sh: `processes` processes of the trainer with `devices` CPU devices each."""
  cmd = ["env", f"PYTHON={sys.executable}", "bash", "launch/local.sh", "--processes", str(processes), "--devices", str(devices),
         "--logdir", str(workdir) + "_logs", *extra, "--",
         f"--config={config}", f"--workdir={workdir}", *SMOKE, *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=uncached_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
  out = subprocess.run(cmd, cwd=ROOT, env=uncached_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  return out


def losses(workdir) -> dict:
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def params_at(workdir, step):
  return flat_params(load_params(workdir, step)[2])


def assert_close(a: dict, b: dict, tol=1e-6):
  assert a.keys() == b.keys()
  for k in a:
    x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
    assert np.linalg.norm(x - y) <= tol * max(np.linalg.norm(y), 1e-12), k


def wait_for_rows(proc, metrics, n, timeout=300):
  """Until `metrics` (metrics.jsonl) has n rows; fails if `proc` ends or time runs out first."""
  deadline = time.time() + timeout
  while not (metrics.exists() and metrics.read_text().count("\n") >= n):
    assert proc.poll() is None and time.time() < deadline, "training never started"
    time.sleep(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A: one process, 8 devices, 4 steps. B: two processes, 2 steps. C: B resumed by one process
  on another mesh (data=8) to step 4."""
  root = tmp_path_factory.mktemp("mp")
  cfg = "configs/pretrain.py:smoke"
  one_process(cfg, root / "A", "--config.train.steps=4", "--config.mesh.data=2",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
  local_sh(cfg, root / "B", "--config.train.steps=2", *TWO_PROCESS_MESH)
  os.system(f"cp -r {root / 'B'} {root / 'C'}")
  one_process(cfg, root / "C", "--config.train.steps=4", "--config.mesh.data=8")
  return root


def test_two_processes_compute_what_one_process_computes(runs):
  a, b = losses(runs / "A"), losses(runs / "B")
  assert sorted(b) == [1, 2]
  for step in b:
    assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
  assert_close(params_at(runs / "B", 2), params_at(runs / "A", 2))


def test_a_two_process_checkpoint_resumes_on_one_process_and_another_mesh(runs):
  a, c = losses(runs / "A"), losses(runs / "C")
  for step in (3, 4):
    assert abs(a[step] - c[step]) <= 1e-6 * abs(a[step]), (step, a[step], c[step])
  # another mesh sums in another order; Adam turns tiny gradient differences of near-zero biases
  # into relative ones, so the parameters are compared as one vector here
  c4, a4 = params_at(runs / "C", 4), params_at(runs / "A", 4)
  flat = lambda p: np.concatenate([np.ravel(np.asarray(p[k], np.float64)) for k in sorted(p)])
  assert np.linalg.norm(flat(c4) - flat(a4)) <= 1e-6 * np.linalg.norm(flat(a4))


def test_stages_2_and_3_run_a_step_on_two_processes(runs):
  causal = runs / "causal"
  local_sh("configs/causal.py:smoke", causal, f"--config.init_from={runs / 'A'}",
           "--config.train.steps=1", *TWO_PROCESS_MESH)
  local_sh("configs/distill.py:smoke", runs / "distill", f"--config.init_from={causal}",
           "--config.train.steps=1", *TWO_PROCESS_MESH)
  assert sorted(losses(causal)) == [1] and sorted(losses(runs / "distill")) == [1]
  logs = [(runs / "causal_logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert "initialised from" in logs[0] and "causal:" in logs[0]  # messages and bar: process 0 only
  assert "initialised from" not in logs[1] and "causal:" not in logs[1]
  assert np.isfinite(losses(runs / "distill")[1])


def test_a_dead_process_stops_the_other_with_an_error(tmp_path):
  workdir = tmp_path / "dead"
  proc = local_sh("configs/pretrain.py:smoke", workdir, "--config.train.steps=100000",
                  "--config.train.ckpt_every=100000", "--heartbeat_timeout=10",
                  *TWO_PROCESS_MESH, wait=False,
                  extra=("--keep-going", "--timeout", "400"))  # the survivor must stop by itself
  wait_for_rows(proc, workdir / "metrics.jsonl", 2)
  pids = (tmp_path / "dead_logs" / "pids").read_text().split()
  os.kill(int(pids[1]), signal.SIGKILL)  # process 1 dies mid-run
  start = time.time()
  try:
    out, _ = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the surviving process was still running 120 s after its peer died")
  assert proc.returncode != 0
  assert time.time() - start < 120
  log0 = (tmp_path / "dead_logs" / "process_0.log").read_text()
  assert "error" in (log0 + out).lower(), (log0 + out)[-2000:]


def test_an_invalid_config_stops_every_process_with_the_same_error(tmp_path):
  """Checked on every process before any collective: all fail fast with one identical line."""
  out = subprocess.run(
      ["env", f"PYTHON={sys.executable}", "bash", "launch/local.sh", "--processes", "2",
       "--devices", "4", "--keep-going", "--timeout", "300", "--logdir", str(tmp_path / "logs"),
       "--", "--config=configs/pretrain.py:smoke", f"--workdir={tmp_path / 'bad'}",
       "--config.train.batch_size=6", *TWO_PROCESS_MESH],
      cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert out.returncode != 0
  errors = [[l for l in (tmp_path / "logs" / f"process_{i}.log").read_text().splitlines()
             if l.startswith("error:")] for i in range(2)]
  assert errors[0] == errors[1] and len(errors[0]) == 1, errors
  assert "train.batch_size=6" in errors[0][0]


def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
  """A preemption notice reaches the processes of a run at different moments (here: only process
  1 gets SIGTERM). Both must stop after the same step, save it and exit 75; without agreeing,
  process 0 would wait in the next step's collectives until the heartbeat timeout."""
  workdir = tmp_path / "run"
  proc = local_sh("configs/pretrain.py:smoke", workdir, "--config.train.steps=100000",
                  "--config.train.ckpt_every=100000", *TWO_PROCESS_MESH, wait=False,
                  extra=("--keep-going", "--timeout", "400"))
  wait_for_rows(proc, workdir / "metrics.jsonl", 2)
  pids = (tmp_path / "run_logs" / "pids").read_text().split()
  os.kill(int(pids[1]), signal.SIGTERM)
  try:
    proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the processes were still running 120 s after one got SIGTERM")
  logs = [(tmp_path / "run_logs" / f"process_{i}.log").read_text() for i in range(2)]
  steps = []
  for i, log in enumerate(logs):
    found = [l for l in log.splitlines() if l.startswith("interrupted: ")]
    assert found, (i, log[-2000:])
    steps.append(int(found[-1].split(" at step ")[1].split(":")[0]))
  assert "interrupted: SIGTERM at step" in logs[1] and "interrupted: a signal to another process" in logs[0]
  assert steps[0] == steps[1] and (workdir / "checkpoints" / str(steps[0])).is_dir()
  again = one_process("configs/pretrain.py:smoke", workdir, f"--config.train.steps={steps[0] + 1}",
                      "--config.mesh.data=8")
  assert f"at step {steps[0]}" in again.stdout + again.stderr
