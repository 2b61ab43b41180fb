"""The edit tree: undo, redo, branches, prune; linear edits equal EditSession's; save and load go
on bit for bit on every branch; bad ids, bad folders and foreign trees are refused by name."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax.inference import EditSession
from anchoredit_jax.models.model import build
from anchoredit_jax.session import EditTree
from configs import distill as distill_config
from tests.helpers import random_model, tiny_model

SAY = ["make the red circle blue", "move the blue circle up", "remove the green square",
       "add a small red square at the top left", "make the blue circle smaller"]


@pytest.fixture(scope="module")
def run():
  cfg = distill_config.get_config("smoke")
  cfg.model = tiny_model(text_len=64)
  graphdef = nnx.split(build(cfg.model, nnx.Rngs(0)))[0]
  params = random_model(cfg.model)[0]
  src = np.asarray(jax.random.randint(jax.random.key(5), (32, 32, 3), 0, 256), np.uint8)
  return cfg, graphdef, params, src


def test_a_path_without_undo_gives_the_turns_of_an_edit_session(run):
  tree, session = EditTree(*run), EditSession(*run)
  for text in SAY[:3]:
    np.testing.assert_array_equal(tree.node(tree.edit(text)).image, session.edit(text))
  assert tree.path() == [0, 1, 2, 3] and tree.turn() == 3
  assert all(tree.node(i).seconds > 0 for i in (1, 2, 3)) and tree.node(0).seconds == 0


def test_undo_redo_branch_and_prune(run):
  tree = EditTree(*run)
  a = tree.edit(SAY[0])
  b = tree.edit(SAY[1])
  assert tree.undo() == a and tree.current == a
  assert tree.redo() == b
  tree.undo()
  c = tree.edit(SAY[2])                    # a second child of a
  assert tree.node(a).children == [b, c] and tree.path(c) == [0, a, c]
  assert tree.undo() == a and tree.redo() == c  # redo goes to the child made last
  tree.goto(b)
  tree.goto(a)
  assert tree.redo() == b                  # ... or visited last
  d = tree.branch(0, SAY[3])               # from the source
  assert tree.path(d) == [0, d] and tree.current == d
  # the same parent, instruction and noise give the same turn: b's memory was not consumed by c
  again = EditTree(*run)
  again.edit(SAY[0])
  np.testing.assert_array_equal(again.node(again.edit(SAY[1])).image, tree.node(b).image)
  assert not np.array_equal(tree.node(b).image, tree.node(c).image)
  tree.goto(c)
  assert tree.prune(a) == sorted([a, b, c]) and tree.current == 0
  assert sorted(tree.nodes) == [0, d] and tree.node(0).children == [d]
  e = tree.edit(SAY[4])
  assert e == d + 1                        # ids are never reused
  tree.goto(0)
  with pytest.raises(ValueError, match="nothing to undo"):
    tree.undo()
  with pytest.raises(ValueError, match=f"no node {b} in this tree"):
    tree.node(b)
  with pytest.raises(ValueError, match="cannot be pruned"):
    tree.prune(0)
  tree.goto(e)
  with pytest.raises(ValueError, match="nothing to redo"):
    tree.redo()
  with pytest.raises(ValueError, match="empty instruction"):
    tree.edit("  ")
  assert sorted(tree.nodes) == [0, d, e]  # refused edits leave no node behind


def test_a_saved_tree_goes_on_bit_for_bit_on_every_branch(run, tmp_path):
  cfg, graphdef, params, _ = run
  tree = EditTree(*run, seed=3)
  a = tree.edit(SAY[0])
  b = tree.edit(SAY[1])
  c = tree.branch(a, SAY[2])
  tree.offload()                           # host memories save and edit like device ones
  tree.save(tmp_path / "t")
  assert sorted(os.listdir(tmp_path / "t")) == ["images", "memories.safetensors", "tree.json"]
  assert json.load(open(tmp_path / "t" / "tree.json"))["nodes"][2]["parent"] == a
  back = EditTree.load(tmp_path / "t", cfg, graphdef, params)
  assert back.current == c and sorted(back.nodes) == [0, a, b, c] and back.seed == 3
  for n in (0, a, b, c):
    np.testing.assert_array_equal(back.node(n).image, tree.node(n).image)
    for x, y in zip(jax.tree.leaves(back.node(n).memory), jax.tree.leaves(tree.node(n).memory)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for n in (b, c, 0):                      # go on from every leaf and from the source
    one, two = tree.edit(SAY[3], n), back.edit(SAY[3], n)
    assert one == two
    np.testing.assert_array_equal(tree.node(one).image, back.node(two).image)
  with pytest.raises(ValueError, match="exists; pass overwrite=True"):
    tree.save(tmp_path / "t")
  tree.save(tmp_path / "t", overwrite=True)
  assert len(EditTree.load(tmp_path / "t", cfg, graphdef, params).nodes) == 7
  assert sorted(os.listdir(tmp_path)) == ["t"]  # no .partial or .old left behind


def test_bad_folders_and_foreign_trees_are_one_line_errors(run, tmp_path):
  cfg, graphdef, params, _ = run
  with pytest.raises(ValueError, match="is not a readable saved edit tree"):
    EditTree.load(tmp_path / "missing", cfg, graphdef, params)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "keep.txt").write_text("mine")
  tree = EditTree(*run)
  tree.edit(SAY[0])
  with pytest.raises(ValueError, match="is not a saved edit tree; it is left as it is"):
    tree.save(tmp_path / "other", overwrite=True)
  assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
  tree.save(tmp_path / "t")
  (tmp_path / "t" / "memories.safetensors").write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match="could not be read as safetensors|not a readable saved edit tree"):
    EditTree.load(tmp_path / "t", cfg, graphdef, params)
  tree.save(tmp_path / "u")
  wider = cfg.copy_and_resolve_references()
  wider.model.dim = cfg.model.dim * 2
  with pytest.raises(ValueError, match="model.dim"):
    EditTree.load(tmp_path / "u", wider, graphdef, params)
  meta = json.load(open(tmp_path / "u" / "tree.json"))
  json.dump({**meta, "stage": "causal"}, open(tmp_path / "u" / "tree.json", "w"))
  with pytest.raises(ValueError, match="was saved by a causal model"):
    EditTree.load(tmp_path / "u", cfg, graphdef, params)
