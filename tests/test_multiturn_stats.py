"""The honest multi-turn metric: intervals (Wilson, bootstrap), conditional success, the oracle
context (the ground-truth turn becomes the context) and the report's cells and headline."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax import inference
from anchoredit_jax.eval import multiturn as mt, report, stats
from anchoredit_jax.models.model import build, make_autoencoder
from configs import distill as distill_config
from tests.helpers import random_model, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wilson_matches_known_intervals():
  np.testing.assert_allclose(stats.wilson(8, 10), [0.4902, 0.9433], atol=5e-4)
  np.testing.assert_allclose(stats.wilson(0, 10), [0.0, 0.2775], atol=5e-4)
  np.testing.assert_allclose(stats.wilson(10, 10), [0.7225, 1.0], atol=5e-4)
  np.testing.assert_allclose(stats.wilson(50, 100), [0.4038, 0.5962], atol=5e-4)
  lo, hi = stats.wilson(np.array([1, 16, 31]), np.array([32, 32, 32]))
  assert lo.shape == (3,) and np.all(lo < np.array([1, 16, 31]) / 32) and np.all(hi > np.array([1, 16, 31]) / 32)
  assert np.isnan(stats.wilson(0, 0)).all()


def test_bootstrap_contains_the_mean_narrows_with_n_and_is_reproducible():
  rng = np.random.default_rng(0)
  widths = []
  for n in (16, 256):
    x = rng.normal(25.0, 2.0, (n, 3))
    lo, hi = stats.bootstrap_mean(x)
    assert lo.shape == (3,) and np.all(lo < x.mean(0)) and np.all(x.mean(0) < hi)
    # the percentile interval is close to the normal one, mean +- 1.96 sd / sqrt(n)
    np.testing.assert_allclose(hi - lo, 2 * 1.96 * x.std(0) / np.sqrt(n), rtol=0.3)
    widths.append(float(np.mean(hi - lo)))
  assert widths[1] < widths[0] / 2.5
  again = stats.bootstrap_mean(x)
  np.testing.assert_array_equal(again, stats.bootstrap_mean(x, seed=0))
  assert not np.array_equal(again[0], stats.bootstrap_mean(x, seed=1)[0])
  y = np.array([1.0, 2.0, np.nan, 3.0])  # NaNs are left out of each mean
  lo, hi = stats.bootstrap_mean(y)
  assert 1.0 <= lo < 2.0 < hi <= 3.0


def test_conditional_success_and_all_correct_so_far():
  s = np.array([[1, 1, 0, 1],
                [1, 0, 1, 1],
                [1, 1, 1, 1],
                [0, 1, 1, 1]], float)
  k, n = stats.conditional_success(s)
  np.testing.assert_array_equal(n, [4, 3, 2, 1])      # all turns before t right
  np.testing.assert_array_equal(k, [3, 2, 1, 1])
  np.testing.assert_array_equal(stats.all_correct(s), [3, 2, 1, 1])
  summary = stats.summarize_turns(s, np.full((4, 4), 30.0))
  assert summary["sequences"] == 4
  np.testing.assert_allclose(summary["success"]["value"], [0.75, 0.75, 0.75, 1.0])
  np.testing.assert_allclose(summary["conditional_success"]["value"], [0.75, 2 / 3, 0.5, 1.0])
  np.testing.assert_allclose(summary["all_correct"]["value"], [0.75, 0.5, 0.25, 0.25])
  np.testing.assert_allclose(summary["conditional_success"]["ci"][3], stats.wilson(1, 1))
  flat = stats.turn_scalars(summary)
  assert flat["success_turn1"] == 0.75 and flat["conditional_success_n_turn3"] == 2
  assert flat["identity_psnr_lo_turn2"] == flat["identity_psnr_hi_turn2"] == 30.0
  json.dumps(flat)


def _fake_result(success, identity, seed=0):
  m = {"success": success, "identity_psnr": identity, "preserved_psnr": identity + 1.0}
  return {"label": "fake", "state_bytes": 10, "seconds_per_turn": 0.1, "wall_seconds": 3.0,
          "context": "own", **mt.describe(m, seed)}


def test_report_cells_carry_intervals_and_the_headline_follows_the_numbers():
  rng = np.random.default_rng(0)
  N, T = 64, 4
  falling = (rng.random((N, T)) < np.linspace(0.95, 0.3, T)).astype(float)
  identity = 32.0 - 2.0 * np.arange(T) + rng.normal(0, 1, (N, T))
  r = _fake_result(falling, identity)
  r["oracle"] = dict(_fake_result(np.ones((N, T)), identity + 3.0), context="oracle",
                     identity_gap=stats.paired_gap(identity, identity + 3.0))
  flat = _fake_result(np.ones((N, T)), np.full((N, T), 30.0) + rng.normal(0, 1, (N, T)))
  tab = report.table({"i": r, "iv": flat}, T)
  assert re.search(r"\| i fake \| \d+ \[\d+,\d+\] \|", tab)         # success
  assert re.search(r"\| \d+ \[\d+,\d+\] n=\d+ \|", tab)                                # conditional
  assert re.search(r"\| \d+\.\d \[\d+\.\d,\d+\.\d\] \|", tab)                         # PSNR
  assert "/ -3.0 [-3.0,-3.0] |" in tab                                                 # the gap
  assert "| i fake | 64 | 10 | 100 | 3 + 3 oracle |" in tab
  line = report.drift_sentence("i", r)
  s = r["stats"]
  assert f"edit success falls from {report.pct(s['success'], 1, '%')} at turn 1 to " \
         f"{report.pct(s['success'], T, '%')} at turn {T};" in line
  assert f"identity PSNR falls from {report.db(s['identity_psnr'], 1, ' dB')} at turn 1" in line
  assert "ground-truth turns as context" in line
  still = report.drift_sentence("iv", flat)
  assert "edit success goes from 100% [94,100] at turn 1 to 100% [94,100] at turn 4 (the intervals overlap)" in still


@pytest.fixture(scope="module")
def tiny():
  """A tiny distill config, its graphdef, random parameters and two held-out 2-turn sequences."""
  cfg = distill_config.get_config("smoke")
  cfg.model = tiny_model(text_len=64)
  graphdef = nnx.split(build(cfg.model, nnx.Rngs(0)))[0]
  params = random_model(cfg.model)[0]
  seqs = mt.heldout(2, 2, cfg.data.res, cfg.model.text_len)
  return cfg, graphdef, params, seqs


def test_oracle_turn_writes_the_ground_truth_and_scores_the_prediction(tiny):
  cfg, graphdef, params, seqs = tiny
  runner = mt._Memory(mt.SYSTEMS["i"], cfg, graphdef, params, 2, 2)
  ae = make_autoencoder(cfg.model)
  rng = jax.random.key(3)
  gt = seqs["images"][:, 1]
  own_pred, own_mem = runner.turn(runner.start(seqs["images"][:, 0]), seqs["tokens"][:, 0], rng)
  pred, mem = runner.oracle_turn(runner.start(seqs["images"][:, 0]), seqs["tokens"][:, 0], rng, gt)
  np.testing.assert_allclose(pred, own_pred, atol=1e-5)      # the same sample ...
  np.testing.assert_allclose(mem.last_latent, ae.encode(jnp.asarray(gt)), atol=1e-6)  # ... the truth
  assert int(mem.writes) == int(own_mem.writes) == 1
  assert not np.allclose(own_mem.last_latent, mem.last_latent, atol=1e-2)
  # own context: the model's own sample (before decoding clips it to the image range)
  np.testing.assert_allclose(np.clip(own_mem.last_latent, -1, 1), ae.encode(own_pred), atol=1e-5)
  # the turn's keys/values are those of the image written with its instruction
  start = runner.start(seqs["images"][:, 0])
  again = inference.write_image(params, graphdef, start, jnp.asarray(gt), jnp.asarray(seqs["tokens"][:, 0]))
  np.testing.assert_allclose(again.window_k, mem.window_k, atol=1e-5)

  own = mt.run_system(runner, seqs, context="own", batch_size=2)[0]
  oracle = mt.run_system(runner, seqs, context="oracle", batch_size=2)[0]
  assert own["success"].shape == oracle["success"].shape == (2, 2)
  np.testing.assert_allclose(own["identity_psnr"][:, 0], oracle["identity_psnr"][:, 0], atol=1e-3)
  assert not np.allclose(own["identity_psnr"][:, 1], oracle["identity_psnr"][:, 1], atol=1e-3)


def test_oracle_context_of_the_single_turn_and_bidirectional_baselines(tiny):
  cfg, graphdef, params, seqs = tiny
  rng, gt = jax.random.key(0), seqs["images"][:, 1]
  bidir = mt._Bidir(cfg, graphdef, params)
  state = bidir.start(seqs["images"][:, 0])
  pred, (hist, htok) = bidir.oracle_turn(state, seqs["tokens"][:, 0], rng, gt)
  assert pred.shape == gt.shape and hist.shape[1] == htok.shape[1] == 2
  np.testing.assert_allclose(hist[:, -1], bidir.ae.encode(jnp.asarray(gt)), atol=1e-6)
  single = mt._Single(cfg, graphdef, params)
  pred, nxt = single.oracle_turn(single.start(seqs["images"][:, 0]), seqs["tokens"][:, 0], rng, gt)
  assert pred.shape == gt.shape and nxt.dtype == jnp.uint8
  np.testing.assert_array_equal(nxt, gt)


def _reference(path, cfg, params):
  """A reference checkpoint of random weights (what `export` writes, without a run)."""
  from safetensors.numpy import save_file

  from anchoredit_jax.checkpoint import REFERENCE_PARAMS, flat_params
  os.makedirs(path)
  save_file({k: np.asarray(a) for k, a in flat_params(params).items()}, os.path.join(path, REFERENCE_PARAMS))
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(cfg.to_json())
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump({"step": 0}, f)


def test_benchmark_both_contexts_writes_intervals_gap_and_times(tiny, tmp_path, capsys):
  from benchmark import multiturn as cli
  cfg, _, params, _ = tiny
  _reference(str(tmp_path / "w" / "distill"), cfg, params)
  out = tmp_path / "mt"
  cli.main([f"--weights={tmp_path / 'w'}", f"--runs={tmp_path / 'none'}", "--systems=i,iv",
            "--sequences=3", "--baseline-sequences=2", "--turns=2", "--batch-size=2",
            "--context=both", f"--out={out}"])
  printed = capsys.readouterr().out
  assert "i: 3 sequences x 2 turns, oracle context:" in printed and "benchmark took" in printed
  got = json.loads((out / "results.json").read_text())
  assert got["context"] == "both" and got["wall_seconds"] > 0
  i, iv = got["systems"]["i"], got["systems"]["iv"]
  assert i["stats"]["sequences"] == 3 and iv["stats"]["sequences"] == 2
  assert i["context"] == "own" and i["oracle"]["context"] == "oracle"
  assert i["wall_seconds"] > 0 and i["oracle"]["wall_seconds"] > 0
  for key in ("success", "conditional_success", "all_correct", "identity_psnr", "preserved_psnr"):
    assert len(i["oracle"]["stats"][key]["ci"]) == 2, key
  gap = i["oracle"]["identity_gap"]["value"]
  assert abs(gap[0]) < 1e-3 and abs(gap[1]) > 1e-3   # turn 1 sees the same context in both
  table = (out / "table.md").read_text()
  assert table.startswith("System i (")
  assert re.search(r"\| i AnchorEdit 4-step student \| [\d.]+ \[[\d.]+,[\d.]+\] / [\d.]+ \[", table)


def test_bad_context_is_a_one_line_error(tmp_path):
  p = subprocess.run([sys.executable, "-m", "benchmark.multiturn", "--context=truth",
                      f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert p.returncode == 2 and p.stderr.strip().splitlines() == [
      "error: --context must be one of own, oracle, both, got 'truth'"]
  with pytest.raises(ValueError, match="context must be one of"):
    mt.evaluate(["i"], [str(tmp_path)], context="truth")


def test_turn_noise_same_reuses_one_draw_for_every_turn(tiny):
  """--turn-noise same: every turn of a session samples from the noise of turn 1 (fresh: a new
  draw each turn; antithetic: turn 1's draw negated at every other turn), through the real
  memory runner."""
  cfg, graphdef, params, seqs = tiny
  real = mt._Memory(mt.SYSTEMS["i"], cfg, graphdef, params, 2, 2)
  seen = []

  class Recording:
    start, flip = staticmethod(real.start), staticmethod(real.flip)

    def turn(self, mem, tokens, rng):
      seen.append((np.asarray(jax.random.key_data(rng)), real.sampler.noise_sign))
      return real.turn(mem, tokens, rng)

  outs = {}
  for noise in ("fresh", "same", "antithetic"):
    seen.clear()
    m, outs[noise], _, _ = mt.run_system(Recording(), seqs, batch_size=2, turn_noise=noise)
    assert len(seen) == 2 and np.isfinite(m["identity_psnr"]).all()
    assert np.array_equal(seen[0][0], seen[1][0]) == (noise != "fresh")
    assert [s for _, s in seen] == ([1.0, -1.0] if noise == "antithetic" else [1.0, 1.0])
  assert real.sampler.noise_sign == 1.0  # left as it was
  np.testing.assert_array_equal(outs["same"][:, 0], outs["antithetic"][:, 0])  # turn 1 alike
  assert not np.array_equal(outs["same"][:, 1], outs["antithetic"][:, 1])      # turn 2 negated
  with pytest.raises(ValueError, match="turn_noise must be one of fresh, same"):
    mt.evaluate(["i"], ["/nonexistent"], turn_noise="again")
