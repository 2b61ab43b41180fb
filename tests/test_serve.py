"""The batching server: many trees' turns in one batch equal lone edits bit for bit, no compilation
after warm-up, back-pressure, dropped requests, idle trees moved to host memory."""
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax.models.model import build
from anchoredit_jax.serve import Busy, Engine, Sessions
from anchoredit_jax.session import EditTree
from configs import distill as distill_config
from tests.helpers import random_model, tiny_model

SAY = ["make the red circle blue", "move the blue circle up", "remove the green square",
       "add a small red square at the top left"]


@pytest.fixture(scope="module")
def run():
  cfg = distill_config.get_config("smoke")
  cfg.model = tiny_model(text_len=64)
  graphdef = nnx.split(build(cfg.model, nnx.Rngs(0)))[0]
  params = random_model(cfg.model)[0]
  return cfg, graphdef, params


def _source(i):
  return np.asarray(jax.random.randint(jax.random.key(i), (32, 32, 3), 0, 256), np.uint8)


@pytest.fixture(scope="module")
def engine(run):
  e = Engine(*run, buckets=(1, 2, 4, 8), max_wait_s=0.05)
  e.warmup()
  yield e
  e.close()


def test_batched_turns_of_many_trees_equal_lone_edits(run, engine):
  trees = [EditTree(*run, _source(i), seed=i) for i in range(6)]
  alone = [EditTree(*run, _source(i), seed=i) for i in range(6)]
  trees[0].edit(SAY[0])          # sessions at different turns and on different branches
  alone[0].edit(SAY[0])
  trees[0].undo()
  alone[0].undo()
  done = {}

  def client(i):
    for text in SAY[:3]:
      done.setdefault(i, []).append(engine.edit(trees[i], text))

  threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
  before = dict(engine.stats["sizes"])
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert all(len(done[i]) == 3 for i in range(6)), done
  for i in range(6):
    for nid, text in zip(done[i], SAY[:3]):
      ref = alone[i].edit(text)
      assert nid == ref
      np.testing.assert_array_equal(trees[i].node(nid).image, alone[i].node(ref).image)
  sizes = {b: n - before.get(b, 0) for b, n in engine.stats["sizes"].items()}
  assert any(b > 1 and n for b, n in sizes.items()), sizes  # some turns really ran together
  assert engine.compilations_after_warmup == 0


def test_a_full_queue_says_busy_and_a_given_up_request_is_dropped(run):
  e = Engine(*run, buckets=(1,), max_queue=2, start=False)  # no worker yet: requests stay queued
  tree = EditTree(*run, _source(0))
  futures = [e.submit(tree.request(SAY[0]), tree.nodes[0].memory) for _ in range(2)]
  with pytest.raises(Busy, match="busy: 2 edits are waiting"):
    e.submit(tree.request(SAY[0]), tree.nodes[0].memory)
  assert futures[0].cancel()
  e.start()
  image, memory, seconds = futures[1].result(timeout=120)
  assert image.shape == (32, 32, 3) and seconds > 0
  assert e.stats["dropped"] == 1 and e.stats["turns"] == 1
  e.close()
  with pytest.raises(RuntimeError, match="was closed"):
    e.submit(tree.request(SAY[0]), tree.nodes[0].memory)


def test_a_request_that_times_out_leaves_the_tree_as_it_was(run, engine):
  tree = EditTree(*run, _source(1))
  with pytest.raises(TimeoutError, match="did not finish within"):
    engine.edit(tree, SAY[0], timeout=1e-6)
  assert sorted(tree.nodes) == [0] and tree.current == 0
  time.sleep(0.2)
  assert engine.edit(tree, SAY[0]) == 2    # the timed-out edit's id stays unused


def test_idle_sessions_move_to_host_and_come_back(run, engine):
  sessions = Sessions(idle_s=60.0)
  tree = EditTree(*run, _source(2))
  sid = sessions.add(tree)
  engine.edit(sessions.get(sid), SAY[0])
  assert not tree.offloaded
  assert sessions.sweep(now=time.monotonic() + 61) == [sid] and tree.offloaded
  ref = EditTree(*run, _source(2))
  ref.edit(SAY[0])
  nid = engine.edit(sessions.get(sid), SAY[1])
  np.testing.assert_array_equal(tree.node(nid).image, ref.node(ref.edit(SAY[1])).image)
  with pytest.raises(KeyError, match="no session 'nope'"):
    sessions.get("nope")
  sessions.drop(sid)
  assert len(sessions) == 0
