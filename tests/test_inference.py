"""Editing sessions: one compilation for every turn, exact resume, bad input."""
import jax
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax import inference
from anchoredit_jax.data import pipeline
from anchoredit_jax.editing import encode, write_turn
from anchoredit_jax.stages.causal import rollout_inputs, training_context
from anchoredit_jax.inference import EditSession, Sampler
from anchoredit_jax.models.model import build
from configs import distill as distill_config
from tests.helpers import random_model, tiny_model

INSTRUCTIONS = ["make the red circle blue", "move the blue circle up", "remove the green square",
                "add a small red square at the top left", "make the blue circle smaller"]


def _session(**kw):
  cfg = distill_config.get_config("smoke")
  cfg.model = tiny_model(text_len=64)
  graphdef = nnx.split(build(cfg.model, nnx.Rngs(0)))[0]
  params = random_model(cfg.model)[0]
  src = np.asarray(jax.random.randint(jax.random.key(5), (32, 32, 3), 0, 256), np.uint8)
  return cfg, graphdef, params, EditSession(cfg, graphdef, params, src, **kw)


def test_edit_turn_compiles_once_for_ten_turns():
  inference.edit_turn.clear_cache()
  *_, s = _session()
  s.edit(INSTRUCTIONS[0])
  assert inference.edit_turn._cache_size() == 1
  for i in range(9):
    s.edit(INSTRUCTIONS[(i + 1) % len(INSTRUCTIONS)])
  assert inference.edit_turn._cache_size() == 1 and s.turn == 10
  assert int(s.memory.writes) == 10  # every turn went into the window (the anchor holds the source)


def test_resumed_session_gives_the_same_turns(tmp_path):
  cfg, graphdef, params, s = _session()
  for i in range(5):
    s.edit(INSTRUCTIONS[i])
  s.save(tmp_path / "s.npz")
  resumed = EditSession.load(tmp_path / "s.npz", cfg, graphdef, params)
  assert resumed.turn == 5 and [h[0] for h in resumed.history] == [h[0] for h in s.history]
  later = [s.edit(t) for t in INSTRUCTIONS]
  again = [resumed.edit(t) for t in INSTRUCTIONS]
  for a, b in zip(later, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(later[0], later[1])  # turns really differ


def test_teacher_path_differs_from_student_and_both_give_images():
  *_, student = _session()
  *_, teacher = _session(sampler=Sampler("teacher", steps=3, guidance=2.0, shift=3.0))
  a, b = student.edit(INSTRUCTIONS[0]), teacher.edit(INSTRUCTIONS[0])
  assert a.shape == b.shape == (32, 32, 3) and a.dtype == np.uint8
  assert not np.array_equal(a, b)


def test_bad_inputs_raise_one_line_errors():
  cfg, graphdef, params, s = _session()
  with pytest.raises(ValueError, match="empty instruction"):
    s.edit("   ")
  with pytest.raises(ValueError, match="at most 62"):
    s.edit("x" * 100)
  with pytest.raises(ValueError, match=r"uint8 \[32,32,3\]"):
    EditSession(cfg, graphdef, params, np.zeros((16, 16, 3), np.uint8))
  assert s.turn == 0  # nothing was applied


def test_training_and_inference_write_the_source_under_the_same_instruction():
  """The convention of every preset (README, "Starting from Wan2.1"): the source turn is written
  under the empty instruction, by stage 2's rollout as by an editing session, so the anchor a
  session edits from is the one training built (the authors' training and inference differ here)."""
  cfg, graphdef, params, _ = _session()
  model = nnx.merge(graphdef, params)
  ex = pipeline.example_from_seed(0, split="train", res=32, num_turns=2, text_len=cfg.model.text_len)
  batch = {k: ex[k][None] for k in ("images", "tokens", "edit_masks", "identity_masks")}
  src, empty, mem0, _ = rollout_inputs(model, cfg, batch)
  x, t = training_context(jax.random.key(0), src, cfg.causal, model.autoencoder, source=True)
  trained = write_turn(model, mem0, x, encode(model, empty), t)
  session = EditSession(cfg, graphdef, params, np.asarray(ex["images"][0]), window=mem0.window)
  for a, b in ((trained.anchor_k, session.memory.anchor_k), (trained.anchor_v, session.memory.anchor_v),
               (trained.anchor_latent, session.memory.anchor_latent)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
