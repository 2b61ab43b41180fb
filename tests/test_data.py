"""ShapesEdit data: generator invariants, exact masks, grain pipeline and the TFDS builder."""
import shlex

import numpy as np
import pytest
from PIL import Image

from anchoredit_jax.data import pipeline, preview, shapes
from anchoredit_jax.data.shapes import Edit


def _assert_scene_ok(scene):
  keys = [o.key for o in scene.objects]
  assert len(set(keys)) == len(keys)
  assert 1 <= len(keys) <= shapes.MAX_OBJECTS
  for i, a in enumerate(scene.objects):
    assert shapes._inside(a)
    for b in scene.objects[i + 1:]:
      assert shapes._apart(a, b)


def test_deterministic_by_seed():
  a = shapes.make_sequence(7, 5, 32)
  b = shapes.make_sequence(7, 5, 32)
  c = shapes.make_sequence(8, 5, 32)
  assert np.array_equal(a["images"], b["images"])
  assert a["instructions"] == b["instructions"]
  assert np.array_equal(a["ops"], b["ops"])
  assert not np.array_equal(a["images"], c["images"])


def test_output_layout():
  seq = shapes.make_sequence(3, 4, 48)
  assert seq["images"].shape == (5, 48, 48, 3) and seq["images"].dtype == np.uint8
  assert seq["ops"].shape == (4,) and seq["ops"].dtype == np.int32
  assert seq["edit_masks"].shape == (4, 48, 48) and seq["edit_masks"].dtype == bool
  assert seq["identity_masks"].shape == (4, 48, 48) and seq["identity_masks"].dtype == bool
  assert len(seq["instructions"]) == 4 and len(seq["scenes"]) == 5


@pytest.mark.parametrize("background", ["procedural", "photo"])
def test_resolution_independent(background):
  scene = shapes.make_sequence(11, 1, 32, background=background)["scenes"][0]
  small = shapes.render(scene, 32)                                        # [32, 32, 3]
  big = shapes.render(scene, 128).reshape(32, 4, 32, 4, 3).mean((1, 3))  # [32, 32, 3]
  assert np.abs(small - big).mean() < 0.01


@pytest.mark.parametrize("split,background", [("train", "procedural"), ("heldout", "photo")])
def test_scene_invariants_over_many_seeds(split, background):
  for seed in range(60):
    seq = shapes.make_sequence(seed, 6, 32, split, background=background)
    for scene in seq["scenes"]:
      _assert_scene_ok(scene)
    assert seq["edit_masks"].any(axis=(1, 2)).all()  # every edit is visible


@pytest.mark.parametrize("op", shapes.OPS)
def test_each_op_changes_exactly_the_masked_pixels(op):
  sampled = []
  for seed in range(10):
    seq = shapes.make_sequence(seed, 3, 32, ops=(op,))
    images, masks = seq["images"].astype(int), seq["edit_masks"]
    for t in range(3):
      outside = ~masks[t]
      assert np.array_equal(images[t + 1][outside], images[t][outside])
      assert np.all(np.any(images[t + 1][masks[t]] != images[t][masks[t]], axis=-1))
    sampled += seq["ops"].tolist()
  # The restriction holds except where impossible (e.g. add into a full scene), then falls back.
  assert sampled.count(shapes.OPS.index(op)) >= len(sampled) // 3


def test_only_requested_op_when_possible():
  seq = shapes.make_sequence(5, 8, 32, ops=("move", "recolour"))
  assert set(seq["ops"].tolist()) <= {0, 1}  # recolour is always possible, so no fallback


def test_identity_masks_monotone():
  seq = shapes.make_sequence(2, 10, 32)
  ident, edit = seq["identity_masks"], seq["edit_masks"]
  assert np.array_equal(ident[0], ~edit[0])
  for t in range(1, 10):
    assert not np.any(ident[t] & ~ident[t - 1])  # shrinks
    assert np.array_equal(ident[t], ident[t - 1] & ~edit[t])
  # Identity pixels equal the source image at every turn.
  src = seq["images"][0]
  for t in range(10):
    assert np.array_equal(seq["images"][t + 1][ident[t]], src[ident[t]])


def test_instructions_name_the_target():
  for seed in range(20):
    seq = shapes.make_sequence(seed, 4, 32)
    for t, text in enumerate(seq["instructions"]):
      before, after = seq["scenes"][t], seq["scenes"][t + 1]
      op = shapes.OPS[seq["ops"][t]]
      if op == "add":
        new = set(after.objects) - set(before.objects)
        (o,) = new
        assert f"{o.colour} {o.shape}" in text
      else:
        gone = {o.key for o in before.objects} - {o.key for o in after.objects}
        touched = [o for o in before.objects if o not in after.objects]
        (o,) = touched
        assert f"the {o.colour} {o.shape}" in text
        if op in ("recolour", "remove"):
          assert o.key in gone


def test_describe_templates_and_moves():
  scene = shapes.Scene(shapes.Background("procedural", ((.5,) * 3, (.5,) * 3, 0., (0., 0.), 0.,
                                                        (0.,) * 3)),
                       (shapes.Obj("circle", "red", "small", 0.5, 0.5),))
  rng = np.random.default_rng(0)
  texts = {shapes.describe(Edit("move", ("red", "circle"), direction="left"), rng)
           for _ in range(50)}
  assert len(texts) >= 3 and all("the red circle" in t and "left" in t for t in texts)
  moved = shapes.apply_edit(scene, Edit("move", ("red", "circle"), direction="up"))
  assert moved.objects[0].cy == pytest.approx(0.25)  # exactly a quarter side (8 px at res 32)
  added = shapes.apply_edit(scene, Edit("add", colour="blue", shape="square", size="small",
                                        place="top left"))
  assert added.objects[1].cx == pytest.approx(1 / 6) and added.objects[1].cy == pytest.approx(1 / 6)
  assert "in the center" in " ".join(
      shapes.describe(Edit("add", colour="blue", shape="square", size="small", place="center"),
                      np.random.default_rng(i)) for i in range(20))


def test_splits_differ_and_photos_disjoint():
  train = [shapes.make_sequence(s, 1, 32, "train") for s in range(10)]
  held = [shapes.make_sequence(s, 1, 32, "heldout") for s in range(10)]
  for a, b in zip(train, held):
    assert not np.array_equal(a["images"], b["images"])
  assert not set(shapes.PHOTOS["train"]) & set(shapes.PHOTOS["heldout"])
  for s in range(40):
    bg = shapes.make_sequence(s, 1, 32, "train", background="photo")["scenes"][0].background
    assert bg.params[0] in shapes.PHOTOS["train"]
    bg = shapes.make_sequence(s, 1, 32, "heldout", background="photo")["scenes"][0].background
    assert bg.params[0] in shapes.PHOTOS["heldout"]


def test_bad_inputs_raise_value_errors_naming_the_field():
  scene = shapes.make_sequence(0, 1, 32)["scenes"][0]
  missing = next((c, s) for c in shapes.COLOURS for s in shapes.SHAPES
                 if (c, s) not in [o.key for o in scene.objects])
  cases = [
      ("op", lambda: Edit("explode", ("red", "circle"))),
      ("target", lambda: shapes.apply_edit(scene, Edit("remove", missing))),
      ("res", lambda: shapes.render(scene, 16)),
      ("res", lambda: shapes.render(scene, 2048)),
      ("res", lambda: shapes.make_sequence(0, 1, 31)),
      ("split", lambda: shapes.make_sequence(0, 1, 32, split="test")),
      ("colour", lambda: Edit("recolour", scene.objects[0].key, colour="teal")),
      ("colour", lambda: Edit("add", colour="teal", shape="circle", size="small", place="top")),
      ("shape", lambda: Edit("add", colour="red", shape="hexagon", size="small", place="top")),
      ("direction", lambda: Edit("move", scene.objects[0].key, direction="sideways")),
      ("place", lambda: Edit("add", colour="red", shape="circle", size="small", place="middle")),
      ("num_turns", lambda: shapes.make_sequence(0, 0, 32)),
      ("num_turns", lambda: shapes.make_sequence(0, 33, 32)),
      ("ops", lambda: shapes.make_sequence(0, 1, 32, ops=("warp",))),
      ("background", lambda: shapes.make_sequence(0, 1, 32, background="video")),
  ]
  for field, fn in cases:
    with pytest.raises(ValueError, match=field):
      fn()


def test_thirty_two_turns():
  seq = shapes.make_sequence(123, 32, 32)
  assert seq["images"].shape == (33, 32, 32, 3)
  assert len(seq["instructions"]) == 32
  for scene in seq["scenes"]:
    _assert_scene_ok(scene)


def test_make_pair():
  pair = shapes.make_pair(4, 32)
  assert pair["images"].shape == (2, 32, 32, 3)
  assert np.array_equal(pair["images"], shapes.make_sequence(4, 1, 32)["images"])


# ----------------------------------------------------------------------------- grain pipeline

_KW = dict(split="train", res=32, num_turns=2, batch_size=4, text_len=64, seed=0,
           process_index=0, process_count=1)


def test_pipeline_shapes_and_dtypes():
  batch = next(iter(pipeline.make_dataset(**_KW)))
  assert batch["images"].shape == (4, 3, 32, 32, 3) and batch["images"].dtype == np.uint8
  assert batch["tokens"].shape == (4, 2, 64) and batch["tokens"].dtype == np.int32
  assert batch["ops"].shape == (4, 2) and batch["ops"].dtype == np.int32
  for k in ("edit_masks", "identity_masks"):
    assert batch[k].shape == (4, 2, 32, 32) and batch[k].dtype == bool
  assert set(batch) == {"images", "tokens", "ops", "edit_masks", "identity_masks"}


def test_pipeline_element_matches_make_sequence():
  ds = pipeline.make_map_dataset(split="heldout", res=32, num_turns=2, text_len=64, seed=0,
                                 shuffle=False, process_index=0, process_count=1)
  ref = shapes.make_sequence(3, 2, 32, "heldout")
  assert np.array_equal(ds[3]["images"], ref["images"])


def test_pipeline_checkpoint_resume():
  it = iter(pipeline.make_dataset(**_KW))
  for _ in range(3):
    next(it)
  state = pipeline.save_iterator_state(it)
  assert isinstance(state, str)
  expected = next(it)
  fresh = iter(pipeline.make_dataset(**_KW))
  pipeline.restore_iterator_state(fresh, state)
  got = next(fresh)
  for k in expected:
    assert np.array_equal(expected[k], got[k]), k


def test_reader_processes_give_the_same_batches_and_a_resume_on_threads_is_refused():
  it = iter(pipeline.make_dataset(**_KW, worker_processes=2))
  want, got = next(iter(pipeline.make_dataset(**_KW))), next(it)
  assert all(np.array_equal(want[k], got[k]) for k in got)
  state = pipeline.save_iterator_state(it)
  it.close()
  with pytest.raises(ValueError, match="data.workers among them"):
    pipeline.restore_iterator_state(iter(pipeline.make_dataset(**_KW)), state)


def test_process_sharding_is_disjoint():
  import grain
  base = grain.MapDataset.range(100)
  shards = [set(pipeline.shard_indices(base, p, 3)) for p in range(3)]
  assert sum(len(s) for s in shards) == 100
  assert set.union(*shards) == set(range(100))
  assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
  # Through the full dataset: shuffled shards of two processes never share a sequence seed.
  a = pipeline.make_map_dataset(split="train", res=32, num_turns=1, text_len=64, seed=0,
                                num_sequences=40, process_index=0, process_count=2)
  b = pipeline.make_map_dataset(split="train", res=32, num_turns=1, text_len=64, seed=0,
                                num_sequences=40, process_index=1, process_count=2)
  imgs_a = {a[i]["images"].tobytes() for i in range(len(a))}
  imgs_b = {b[i]["images"].tobytes() for i in range(len(b))}
  assert len(a) == len(b) == 20 and not imgs_a & imgs_b
  with pytest.raises(ValueError, match="process_index"):
    pipeline.shard_indices(base, 3, 3)


# ----------------------------------------------------------------------------- TFDS builder

def test_tfds_tiny_builder_roundtrip(tmp_path):
  from anchoredit_jax.data import tfds_builder
  builder = tfds_builder.build(str(tmp_path), "r32_t2_tiny")
  records = list(tmp_path.rglob("*.array_record-*"))
  assert {p.name.split(".")[0] for p in records} == {"shapes_edit-train", "shapes_edit-heldout"}
  src = tfds_builder.data_source(str(tmp_path), "r32_t2_tiny", "heldout")
  assert len(src) == builder.builder_config.num_heldout
  ex = tfds_builder.decode_example(src[1])
  ref = shapes.make_sequence(int(ex["seed"]), 2, 32, "heldout")
  assert np.array_equal(ex["images"], ref["images"])
  assert ex["instructions"] == ref["instructions"]
  assert np.array_equal(ex["ops"], ref["ops"])
  assert np.array_equal(ex["edit_masks"], ref["edit_masks"])
  assert np.array_equal(ex["identity_masks"], ref["identity_masks"])


def test_global_batches_do_not_depend_on_the_process_count():
  """Two processes' batches, stacked, are the one-process batch: same sequences, same order."""
  kw = dict(split="train", res=32, num_turns=1, text_len=64, seed=3, num_sequences=64,
            worker_threads=1, prefetch_batches=1)
  one = iter(pipeline.make_dataset(batch_size=8, process_index=0, process_count=1, **kw))
  two = [iter(pipeline.make_dataset(batch_size=4, process_index=p, process_count=2, **kw))
         for p in range(2)]
  for _ in range(3):
    whole, halves = next(one), [next(it) for it in two]
    np.testing.assert_array_equal(whole["images"], np.concatenate([h["images"] for h in halves]))
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_dataset(batch_size=4, process_index=2, process_count=2, **kw)


def test_preview_writes_a_heldout_source_png_and_its_edit_command(tmp_path):
  out = tmp_path / "in.png"
  cmd = preview.source_png(str(out), seed=3, turns=4, res=32)
  seq = shapes.make_sequence(3, 4, 32, split="heldout")
  np.testing.assert_array_equal(np.asarray(Image.open(out)), seq["images"][0])
  words = shlex.split(cmd)
  assert words[:3] == ["python", "-m", "anchoredit_jax.edit"]
  assert [words[i + 1] for i, w in enumerate(words) if w == "--instruction"] == seq["instructions"]
  assert words[words.index("--image") + 1] == str(out)
