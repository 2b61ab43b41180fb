"""Stage 1: the trainer learns, the CLI resumes, full-size configs have the right shapes."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.eval import evaluators
from anchoredit_jax.models.dit import CausalDiT
from anchoredit_jax.train import Trainer, eval_pairs, make_data
from configs import common
from tests.helpers import ROOT, one_device_mesh, smoke_config, train_cli

def test_smoke_model_beats_copying_the_source_on_edited_region():
  """A few hundred steps are enough to beat returning the source on held-out edits."""
  cfg = smoke_config(steps=600, batch_size=16)
  cfg.optim.update(lr=2e-3, warmup_steps=50, end_lr=2e-4)
  cfg.eval.update(pairs=32, batch_size=32, steps=8)
  tr = Trainer(cfg, one_device_mesh())
  state, it = tr.init_state(jax.random.key(0)), iter(make_data(cfg))
  losses = []
  for _ in range(cfg.train.steps):
    state, m = tr.step(state, next(it), jax.random.key(0))
    losses.append(float(m["loss"]))
  assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
  res = evaluators.single_turn(state["params"], tr.graphdef, cfg, eval_pairs(cfg), jax.random.key(1))
  assert res["edit_mae"] < res["copy_edit_mae"], res
  assert res["edit_psnr"] > res["copy_edit_psnr"], res


def test_cli_trains_then_resumes(tmp_path):
  wd = tmp_path / "run"
  first = train_cli(wd, "--config.train.steps=10")
  assert first.returncode == 0, first.stderr[-2000:]
  second = train_cli(wd, "--config.train.steps=20")
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resuming" in second.stdout + second.stderr and "at step 10" in second.stdout + second.stderr
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  train_steps = [r["step"] for r in rows if r["kind"] == "train"]
  assert train_steps == sorted(train_steps) and train_steps[-1] == 20 and min(train_steps) == 5
  assert json.load(open(wd / "summary.json"))["step"] == 20
  assert any(f.startswith("events") for f in os.listdir(wd / "tb"))
  third = train_cli(wd, "--config.train.steps=20")  # nothing left: no retraining, no re-evaluation
  assert third.returncode == 0 and "already finished at step 20" in third.stdout, third.stderr[-2000:]
  assert json.loads(third.stdout.strip().splitlines()[-1]) == json.load(open(wd / "summary.json"))
  starts = [json.loads(l) for l in open(wd / "provenance.jsonl")]
  assert [p["start_step"] for p in starts] == [0, 10]
  assert all("--config=configs/pretrain.py:smoke" in p["command"] for p in starts)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_stops_without_evaluating(tmp_path, sig):
  """SIGINT (Ctrl-C) and SIGTERM (a preemption) finish the step in flight, save it and exit at
  once with status 75 (no final evaluation, no summary); the same command resumes from there."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "anchoredit_jax.train", "--config=configs/pretrain.py:smoke",
         f"--workdir={wd}", "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.eval_every=100000"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  def logged_steps():
    path = wd / "metrics.jsonl"
    return [json.loads(l)["step"] for l in open(path)] if path.exists() else []

  deadline = time.time() + 240
  while time.time() < deadline and max(logged_steps(), default=0) < 3:
    time.sleep(1)
  p.send_signal(sig)
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 75, out[-2000:]
  step = int(re.search(rf"interrupted: {sig.name} at step (\d+): saved a checkpoint", out).group(1))
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert step >= 3 and not [r for r in rows if r["kind"] == "eval"]
  assert not (wd / "summary.json").exists()
  again = train_cli(wd, f"--config.train.steps={step + 2}", "--config.eval.pairs=0")
  assert again.returncode == 0 and f"at step {step}" in again.stdout + again.stderr, again.stderr[-2000:]


# Runs train.main with save_step wrapped so that the process sends itself SIGTERM just as the
# save of the last step begins: the moment a preemption notice can arrive after the loop ended.
SIGNAL_DURING_FINAL_SAVE = """
import os, signal, sys
from anchoredit_jax import train
real, last = train.save_step, int(sys.argv.pop())
def save_step(mngr, step, *args):
  if step == last:
    os.kill(os.getpid(), signal.SIGTERM)
  return real(mngr, step, *args)
train.save_step = save_step
train.main()
"""


def test_a_signal_during_the_final_save_does_not_lose_the_last_step(tmp_path):
  """A SIGTERM that arrives while the last step is being saved waits for the save to finish
  (exit 75, the checkpoint of the last step complete), instead of killing the process with the
  default handler and losing every step since the previous checkpoint."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-c", SIGNAL_DURING_FINAL_SAVE, "--config=configs/pretrain.py:smoke",
         f"--workdir={wd}", "--config.train.steps=7", "--config.train.ckpt_every=5",
         "--config.eval.pairs=0", "7"]
  p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 75, (p.returncode, p.stderr[-2000:])
  assert "interrupted: SIGTERM at step 7: saved a checkpoint" in p.stderr, p.stderr[-2000:]
  assert sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())[-1] == 7
  again = train_cli(wd, "--config.train.steps=7", "--config.eval.pairs=0")
  assert again.returncode == 0 and "at step 7" in again.stdout + again.stderr, again.stderr[-2000:]


def test_cli_refuses_workdir_of_another_config(tmp_path):
  wd = tmp_path / "run"
  assert train_cli(wd, "--config.train.steps=2", "--config.eval.pairs=0").returncode == 0
  other = train_cli(wd, "--config.model.dim=48", "--config.eval.pairs=0")
  assert other.returncode != 0
  err = other.stderr.strip().splitlines()
  assert err and err[-1].startswith("error:") and "holds a run made with model.dim=" in err[-1]
  assert "resume it with --config.model.dim=" in err[-1]  # the field and the flag, by name
  # how the model computes may change on resume (the parameters are the same): remat, kernel, dtype
  same = train_cli(wd, "--config.train.steps=3", "--config.model.remat=dots", "--config.eval.pairs=0")
  assert same.returncode == 0 and "resuming" in same.stdout + same.stderr, same.stderr[-2000:]


def test_config_mistakes_are_named():
  cfg = smoke_config()
  cfg.data.res = 34  # not a multiple of patch 4
  with pytest.raises(ValueError, match="data.res=34"):
    Trainer(cfg, one_device_mesh())
  cfg = smoke_config()
  cfg.model.heads = 5
  with pytest.raises(ValueError, match="model.heads=5"):
    Trainer(cfg, one_device_mesh())


def test_wan_sized_dit_shapes_without_memory():
  cfg = common.model_config("wan1.3b")
  model = nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=16, rngs=nnx.Rngs(0)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 1.3e9 < n < 1.5e9, n  # Wan2.1-T2V-1.3B
  fc1 = nnx.state(model, nnx.Param)["blocks"]["ffn"]["fc1"]["kernel"]
  assert fc1.shape == (30, 1536, 8960)
  graphdef, abstract = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, 2, 60, 104, 16), jnp.float32)  # 480x832 at VAE stride 8
  out = jax.eval_shape(
      lambda p, x: nnx.merge(graphdef, p)(x, jnp.zeros((1, 2)), jnp.zeros((1, 2, 512, 4096)),
                                          jnp.ones((1, 2, 512), bool), jnp.zeros((1, 2), jnp.int32),
                                          cond=jnp.zeros((1, 2, 60, 104, 17))), abstract, x)
  v, (k, _) = out
  assert v.shape == (1, 2, 60, 104, 16)
  assert k.shape == (30, 1, 2 * 1560, 12, 128)  # 1560 tokens per turn, as in the brief


def test_flow_endpoints_and_euler_on_a_known_field():
  x0, noise = jnp.ones((2, 4)), jnp.zeros((2, 4))
  np.testing.assert_allclose(flow.add_noise(x0, noise, jnp.array([0.0, 1.0])), [[1] * 4, [0] * 4])
  # the exact velocity of a straight path integrates back to x0 from any start
  v = flow.velocity_target(x0, noise)
  out = flow.euler_sample(lambda x, t, g: v, noise, steps=3, shift=3.0)
  np.testing.assert_allclose(out, x0, atol=1e-6)
  t = flow.sample_time(jax.random.key(0), (1000,), shift=3.0)
  assert 0 < float(t.min()) and float(t.max()) < 1 and float(t.mean()) > 0.5


@pytest.mark.parametrize("source_context,concat_prev", [(True, True), (True, False), (False, True)])
def test_both_conditioning_paths_give_a_finite_loss_and_gradient(source_context, concat_prev):
  cfg = smoke_config(batch_size=4)
  cfg.model.update(source_context=source_context, concat_prev=concat_prev)
  tr = Trainer(cfg, one_device_mesh())
  state = tr.init_state(jax.random.key(0))
  head = lambda s: np.asarray(jax.device_get(s["params"]["dit"]["head"]["kernel"]))
  before, it = head(state), iter(make_data(cfg))
  for _ in range(2):  # the warm-up schedule starts at lr 0
    state, m = tr.step(state, next(it), jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  assert not np.allclose(before, head(state))
