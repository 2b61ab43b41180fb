"""Faults a long run meets: damaged checkpoints, NaN losses, steps replayed after a resume.

One real smoke run (20 steps, a checkpoint every 5, three kept) is made once; each damage kind is
applied to a copy of it and the copy resumed."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from anchoredit_jax import checkpoint, integrity, sharding as sh
from anchoredit_jax.stages import pretrain
from anchoredit_jax.train import Trainer, make_data
from tests.helpers import ROOT, one_device_mesh, smoke_config, train_cli

RUN = ["--config.train.ckpt_every=5", "--config.train.keep_checkpoints=3", "--config.eval.pairs=0",
       "--config.train.log_every=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("faults") / "run"
  done = train_cli(wd, "--config.train.steps=20", *RUN)
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(os.listdir(wd / "checkpoints")) == ["10", "15", "20"]
  return wd


def _copy(run, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(run, wd)
  os.remove(wd / "summary.json")
  return wd


def _largest_file(d):
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_bits(path, n=16, every=1013):
  """Flip n bits, `every` bytes apart from a third of the way into the file (wrapping around)."""
  data = bytearray(open(path, "rb").read())
  for i in range(n):
    data[(len(data) // 3 + every * i) % len(data)] ^= 1 << (i % 8)
  open(path, "wb").write(bytes(data))


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {  # what is done to checkpoints/<step>
    "bit flips in a data file": lambda d: _flip_bits(_largest_file(d / "state")),
    "a data file truncated": lambda d: _truncate(_largest_file(d / "state")),
    "a data file deleted": lambda d: os.remove(_largest_file(d / "state")),
    "state/ deleted": lambda d: shutil.rmtree(d / "state"),
    "state metadata deleted": lambda d: os.remove(d / "state" / "_METADATA"),
    "extra/ deleted": lambda d: shutil.rmtree(d / "extra"),
}


def _restore(wd):
  """checkpoint.restore_newest on `wd` as the trainer calls it: (step, printed line)."""
  tr = Trainer(smoke_config(), one_device_mesh())
  mngr = ocp.CheckpointManager(wd / "checkpoints", item_handlers={
      "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      found = checkpoint.restore_newest(mngr, str(wd), sh.placed(tr.abstract_state, tr.state_sh))
  finally:
    mngr.close()
  return found[0], out.getvalue()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_used(run, tmp_path, kind):
  wd = _copy(run, tmp_path)
  DAMAGE[kind](wd / "checkpoints" / "20")
  step, said = _restore(wd)
  assert step == 15, said
  lines = said.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("checkpoint 20 of ") and "damaged" in lines[0], said
  assert sorted(os.listdir(wd / "checkpoints")) == ["10", "15"]
  assert os.listdir(wd / "damaged") == ["20"]  # kept for a look, out of the run's way


def test_no_intact_checkpoint_is_one_line_and_nothing_moves(run, tmp_path):
  wd = _copy(run, tmp_path)
  for step in ("10", "15", "20"):
    _flip_bits(_largest_file(wd / "checkpoints" / step / "state"))
  with pytest.raises(ValueError, match=r"no intact checkpoint in .*step 20: .*2 older ones are damaged"):
    _restore(wd)
  assert sorted(os.listdir(wd / "checkpoints")) == ["10", "15", "20"] and not (wd / "damaged").exists()
  cli = train_cli(wd, "--config.train.steps=25", *RUN)
  assert cli.returncode == 2 and cli.stderr.strip().splitlines()[-1].startswith("error: no intact checkpoint")


def test_resume_past_a_bit_flip_continues_and_keeps_one_metrics_row_per_step(run, tmp_path):
  """The CLI falls back from the flipped step 20 to 15, replays 16-20 and goes on to 25; the rows
  16-20 the first attempt wrote are replaced, not repeated; the export refuses the damaged step."""
  wd = _copy(run, tmp_path)
  _flip_bits(_largest_file(wd / "checkpoints" / "20" / "state"))
  bad = shutil.copytree(wd, tmp_path / "every_file_flipped")
  for root, _, files in os.walk(bad / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d"):
    for f in files:  # load_params reads only the parameters: make sure some of theirs are hit
      _flip_bits(os.path.join(root, f), n=os.path.getsize(os.path.join(root, f)) // 4096 + 1, every=4096)
  with pytest.raises(ValueError, match="checkpoint 20 of .*(differ from their saved checksums|cannot be read)"):
    checkpoint.load_params(str(bad))
  again = train_cli(wd, "--config.train.steps=25", *RUN)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "checkpoint 20 of" in again.stdout and "resumed from step 15" in again.stdout
  steps = [json.loads(l)["step"] for l in open(wd / "metrics.jsonl") if json.loads(l)["kind"] == "train"]
  assert steps == list(range(1, 26))
  assert checkpoint.load_params(str(wd))[3] == 25


def test_checksums_see_a_single_flipped_bit_and_swapped_words():
  x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  tree = {"a": x, "b": {"c": jnp.ones(5, jnp.bfloat16)}, "n": jnp.int32(7)}
  saved = integrity.tree_checksums(tree)
  assert integrity.mismatches(tree, saved) == []
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32).at[1, 2].add(1 << 20)  # one bit, one word
  assert integrity.mismatches({**tree, "a": jax.lax.bitcast_convert_type(bits, jnp.float32)}, saved) == ["a"]
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # the plain sum does not change
  assert integrity.mismatches({**tree, "a": swapped}, saved) == ["a"]
  assert integrity.nonfinite({"a": x.at[0, 0].set(jnp.nan), "n": jnp.int32(1)}) == ["a"]


class NaNForMarkedBatches:
  """Stage 1's loss, times NaN for a batch whose first op is -1 (so its gradient is NaN too)."""

  @staticmethod
  def loss_fn(params, graphdef, batch, rng, cfg, *, store=None):
    loss, metrics = pretrain.loss_fn(params, graphdef, batch, rng, cfg, store=store)
    loss = loss * jnp.where(batch["ops"][0, 0] < 0, jnp.nan, 1.0)
    return loss, {**metrics, "loss": loss}


def test_a_nonfinite_step_is_skipped_counted_and_then_forgotten():
  """An injected NaN batch leaves parameters and optimizer state as they were and is counted;
  the next good step updates them and resets the streak."""
  cfg = smoke_config(batch_size=8)
  tr = Trainer(cfg, one_device_mesh())
  tr.stage = NaNForMarkedBatches  # read when the step is first traced, below
  state, it = tr.init_state(jax.random.key(0)), iter(make_data(cfg))
  state, _ = tr.step(state, next(it), jax.random.key(0))
  before = jax.device_get(state)
  batch = next(it)
  batch["ops"] = np.full_like(batch["ops"], -1)
  state, m = tr.step(state, batch, jax.random.key(0))
  after = jax.device_get(state)
  assert not np.isfinite(float(m["loss"])) and int(m["nonfinite_steps"]) == 1 and int(m["nonfinite_streak"]) == 1
  same = jax.tree.map(lambda a, b: np.array_equal(a, b), before["params"], after["params"])
  assert all(jax.tree.leaves(same)) and int(after["step"]) == 2
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before["opt_state"], after["opt_state"])))
  state, m = tr.step(state, next(it), jax.random.key(0))
  assert np.isfinite(float(m["loss"])) and int(m["nonfinite_streak"]) == 0 and int(m["nonfinite_steps"]) == 1
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after["params"], jax.device_get(state["params"]))
  assert any(jax.tree.leaves(moved))


def test_a_diverging_run_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path):
  wd = tmp_path / "run"
  out = train_cli(wd, "--config.optim.lr=1e6", "--config.optim.warmup_steps=0", "--config.train.steps=60",
                  "--config.train.max_nonfinite=3", *RUN, "--config.train.ckpt_every=1")
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the loss or gradient norm was NaN/Inf at steps ") and "optim.lr" in last, last
  assert not (wd / "summary.json").exists()
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert rows[-1]["nonfinite_streak"] == 3 and rows[-1]["step"] < 60
  saved = sorted(int(s) for s in os.listdir(wd / "checkpoints"))
  assert saved and saved[-1] < rows[-1]["step"]  # the step it stopped at is not saved
  for step in saved:
    assert integrity.nonfinite(checkpoint.load_params(str(wd), step=step)[2]) == []


def _one_error_line(out):
  """The run's stderr holds one line, `error: ...`, and nothing traceback-like."""
  lines = [l for l in out.stderr.strip().splitlines() if l.strip() and "it/s" not in l and "s/it" not in l]
  assert out.returncode == 2 and lines and lines[-1].startswith("error: "), out.stderr[-3000:]
  assert "Traceback" not in out.stderr and len(lines) <= 2, out.stderr[-3000:]
  return lines[-1]


@pytest.mark.parametrize("args, says", [
    (["--config.train.stepz=3"], 'no field \'stepz\' in this config; Did you mean "steps"'),
    (["--config.train.steps=abc"], "--config.train.steps=abc: invalid literal"),
    (["--config=configs/pretrain.py:smok"], "unknown preset 'smok'"),
    (["--config=configs/pretrain.py:smoke,stepz=4"], "unknown option stepz=4 after the preset"),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
], ids=["field", "value", "preset", "option", "file", "flag"])
def test_train_command_mistakes_are_one_line(tmp_path, args, says):
  wd = tmp_path / "run"
  out = train_cli(wd, *args)
  assert says in _one_error_line(out)
  assert not wd.exists()


def test_train_help_exits_0_with_its_flags():
  out = train_cli("unused", "--help")
  assert out.returncode == 0 and "--workdir" in out.stdout and "Training entry point" in out.stdout


def test_a_refused_init_from_leaves_nothing_and_names_the_reference(tmp_path):
  wd = tmp_path / "run"
  out = train_cli(wd, "--config.init_from=" + str(tmp_path / "missing"), config="configs/causal.py")
  line = _one_error_line(out)
  assert "has no checkpoint" in line and "--config.init_from=checkpoints/toy/pretrain" in line
  assert not wd.exists()


@pytest.fixture
def mounts(tmp_path):
  """A read-only and a 300 KiB tmpfs (as root, which CI is; a mount that fails fails the test)."""
  made = []

  def mount(name, options):
    path = tmp_path / name
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    made.append(path)
    return path

  yield mount
  for path in made:
    subprocess.run(["umount", str(path)], check=False)


def test_read_only_and_full_disks_are_one_line(mounts):
  ro = mounts("ro", "ro,size=1m")
  line = _one_error_line(train_cli(ro / "run", *RUN))
  assert "Read-only file system" in line and "--workdir" in line
  full = mounts("full", "size=300k")
  line = _one_error_line(train_cli(full / "run", "--config.train.steps=20", *RUN))
  assert line.startswith("error: no space left on the device of") and "rerun the same command" in line
  assert os.listdir(full / "run" / "checkpoints") == []  # nothing half-written


def test_a_grace_period_that_runs_out_exits_75_at_once_and_the_run_resumes(tmp_path):
  """With a grace period shorter than a step, SIGTERM makes the process say so and exit 75 before
  its step is saved; the rerun resumes from the newest complete checkpoint."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "anchoredit_jax.train", "--config=configs/pretrain.py:smoke",
         f"--workdir={wd}", "--config.train.steps=100000", "--config.train.ckpt_every=2",
         "--config.train.preempt_grace=0.001", *RUN[1:]]
  p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  saved = lambda: (wd / "checkpoints").is_dir() and any(n.isdigit() for n in os.listdir(wd / "checkpoints"))
  deadline = time.time() + 240
  while not saved():
    assert time.time() < deadline and p.poll() is None, "no checkpoint was ever written"
    time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=60)[0]
  assert p.returncode == 75, out[-2000:]
  assert "grace period (train.preempt_grace) ran out before step" in out, out[-2000:]
  again = train_cli(wd, "--config.train.steps=1", *RUN)  # steps=1: nothing left to train
  assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]


def test_a_checkpoint_older_than_a_state_key_restores_without_it(tmp_path):
  """A run saved before `nonfinite` existed (and without checksums) still resumes: the key named
  optional is left out of the restored state for the trainer to fill in."""
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers={
      "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})
  old = {"params": {"w": jnp.arange(4.0)}, "step": jnp.int32(3)}
  mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(old), extra=ocp.args.JsonSave({"x": 1})))
  mngr.wait_until_finished()
  target = {**jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), old),
            "nonfinite": {"total": jax.ShapeDtypeStruct((), jnp.int32)}}
  step, state, extra = checkpoint.restore_newest(mngr, str(tmp_path), target, optional=("nonfinite",))
  mngr.close()
  assert step == 3 and sorted(state) == ["params", "step"] and extra == {"x": 1}
  np.testing.assert_array_equal(state["params"]["w"], np.arange(4.0))
