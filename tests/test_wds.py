"""Multi-turn WebDataset shards: the layout's rules, every defect skipped and counted, aspect-ratio
buckets, a resumed iterator that continues exactly, and two processes that agree on each batch's
bucket. The shards are tiny ones written here."""
import json
import os
import threading

import numpy as np
import pytest

from anchoredit_jax.data import batches, buckets as bk, export_wds, shapes, tfds_builder, wds
from anchoredit_jax import train
from anchoredit_jax.train import make_data
from anchoredit_jax.data.tokenize import detokenize
from configs import causal as causal_config
from tests.helpers import train_cli


def _img(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _sample(key, turns, h, w, seed=0):
  return {"key": key, "images": [_img(h, w, seed + t) for t in range(turns + 1)],
          "instructions": [f"edit {t} of {key}" for t in range(turns)]}


def _raw(key, turns, h=16, w=16, **change):
  """A sample as tar members, with members replaced (a value) or dropped (None)."""
  s = {"__key__": key, "json": json.dumps({"instructions": [{"en": f"en {t}", "zh": f"zh {t}"}
                                                            for t in range(turns)]}).encode()}
  for t in range(turns + 1):
    s[f"{t}.png"] = wds.encode_image(_img(h, w, t))
  for k, v in change.items():
    k = k.replace("_", ".")
    if v is None:
      s.pop(k, None)
    else:
      s[k] = v
  return s


def test_buckets_follow_the_authors_construction():
  b = bk.hw_buckets(1024)
  assert len(b) == 49 and (1024, 1024) in b and b[0] == (2048, 512) and b[-1] == (512, 2048)
  assert all(h * w <= 1024 ** 2 and h % 64 == 0 and w % 64 == 0 and max(h, w) <= 4 * min(h, w)
             for h, w in b)
  assert bk.pick(720, 1280, b) == (768, 1344) and bk.pick(500, 500, b) == (1024, 1024)
  with pytest.raises(ValueError, match="multiple of the step"):
    bk.hw_buckets(100)
  out = bk.crop_resize(_img(30, 60, 0), 64, 64)  # centre square of a wide image
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  same = _img(64, 128, 1)
  np.testing.assert_array_equal(bk.crop_resize(same, 64, 128), same)


def test_parse_keeps_good_samples_and_names_each_defect():
  good, d = wds.parse(_raw("a", 2), language="zh")
  assert d == [] and good["instructions"] == ["zh 0", "zh 1"] and len(good["images"]) == 3
  assert wds.parse(_raw("a", 2, **{"json": json.dumps({"instructions": [{"en": "x"}, "y"]}).encode()}),
                   language="zh")[0]["instructions"] == ["x", "y"]  # falls back to the other language
  cases = {
      "no_json": _raw("a", 2, json=None),
      "bad_json": _raw("a", 2, json=b"{not json"),
      "too_few_images": _raw("a", 2, **{"1_png": None, "2_png": None}),
      "gap_in_turns": _raw("a", 2, **{"1_png": None}),
      "instruction_count": _raw("a", 3, json=json.dumps({"instructions": [{"en": "x"}]}).encode()),
      "empty_instruction": _raw("a", 1, json=json.dumps({"instructions": [{"en": "  "}]}).encode()),
      "corrupt_image": _raw("a", 2, **{"2_png": b"\x89PNG not really"}),
  }
  for kind, raw in cases.items():
    assert wds.parse(raw) == (None, [kind]), kind
  cut, d = wds.parse(_raw("a", 4), max_turns=2)
  assert d == ["truncated"] and len(cut["images"]) == 3 and len(cut["instructions"]) == 2
  assert wds.parse(_raw("a", 1), max_turns=2, exact_turns=True) == (None, ["too_few_turns"])
  # stage 1 reads without max_turns: a config with data.exact_turns (as the authors' all are) keeps every sample
  assert wds.kept_turns(3, None, exact_turns=True) == (3, [])
  # the authors' other names of a frame: frame_3.jpg, x_3.JPEG
  ok, _ = wds.parse({"__key__": "k", "json": _raw("a", 1)["json"],
                     "frame_0.JPG": wds.encode_image(_img(8, 8, 0), "jpg"),
                     "frame_1.webp": wds.encode_image(_img(8, 8, 1), "webp")})
  assert ok is not None and len(ok["images"]) == 2


def test_shards_split_between_processes_and_read_by_seeking(tmp_path):
  for s in range(3):
    wds.write_shard(str(tmp_path / f"s{s}.tar"), [_sample(f"k{s}_{i}", 2, 16, 24) for i in range(2)])
  paths = wds.shard_list(str(tmp_path / "*.tar"))
  (tmp_path / "list.json").write_text(json.dumps({"resolved_files": [p.name for p in tmp_path.glob("*.tar")]}))
  assert wds.shard_list(str(tmp_path / "list.json")) == paths
  p0, p1 = wds.Source(paths, 0, 2), wds.Source(paths, 1, 2)
  assert [e.key for e in p0.entries] == ["k0_0", "k0_1", "k2_0", "k2_1"]
  assert [e.key for e in p1.entries] == ["k1_0", "k1_1"]
  got, _ = wds.parse(p1[1])
  assert got["instructions"] == ["edit 0 of k1_1", "edit 1 of k1_1"] and got["images"][0].shape == (16, 24, 3)
  with pytest.raises(ValueError, match="every process needs at least one"):
    wds.Source(paths, 3, 4)
  with pytest.raises(FileNotFoundError, match="no shards"):
    wds.shard_list(str(tmp_path / "none*.tar"))
  # a shard cut short keeps the samples before the damage and is counted
  data = (tmp_path / "s0.tar").read_bytes()
  (tmp_path / "cut.tar").write_bytes(data[:len(data) * 2 // 3])
  cut = wds.Source([str(tmp_path / "cut.tar")])
  assert cut.corrupt_shards == 1 and [e.key for e in cut.entries][0] == "k0_0"
  assert wds.parse(cut[0])[0] is not None and all(wds.parse(cut[i])[0] is None for i in range(1, len(cut)))
  # a damaged header in the middle (tarfile stops there quietly) is counted too
  first = wds.index_shard(str(tmp_path / "s0.tar"))[0][1].members[0][1] - 512  # k0_1's first header
  broken = bytearray(data)
  broken[first:first + 100] = b"\xff" * 100
  (tmp_path / "broken.tar").write_bytes(bytes(broken))
  hurt = wds.Source([str(tmp_path / "broken.tar")])
  assert hurt.corrupt_shards == 1 and [e.key for e in hurt.entries] == ["k0_0"]


def _mixed_shards(tmp_path):
  """Two shards of good samples in three shapes and turn counts, with every defect mixed in."""
  bad = [_raw("bad0", 2, json=None), _raw("bad1", 2, json=b"{"), _raw("bad2", 2, **{"1_png": None}),
         _raw("bad3", 2, **{"2_png": b"junk"}),
         _raw("bad4", 1, json=json.dumps({"instructions": [{"en": ""}]}).encode()), _raw("long", 4)]
  good = [_sample(f"g{i}", 2, *[(16, 16), (16, 40), (40, 16)][i % 3], seed=i) for i in range(18)]
  wds.write_shard(str(tmp_path / "a.tar"), good[:9] + bad[:3])
  wds.write_shard(str(tmp_path / "b.tar"), good[9:] + bad[3:])
  return wds.shard_list(str(tmp_path / "*.tar"))


def _batcher(source, **kw):
  kw = dict(batch_size=2, base=64, step=16, text_len=16, seed=3, max_turns=2) | kw
  return batches.BucketBatches(source, **kw)


def test_batches_are_one_bucket_each_and_count_what_was_skipped(tmp_path, capsys):
  it = _batcher(wds.Source(_mixed_shards(tmp_path)), num_epochs=1)
  out = list(it)
  assert len(out) == 9  # 18 good + 1 truncated = 19 samples; a half-full bucket is dropped
  shapes = {b["images"].shape for b in out}
  assert shapes == {(2, 3, 64, 64, 3), (2, 3, 32, 80, 3), (2, 3, 80, 32, 3)}  # 16x40 -> 32x80
  assert all(b["tokens"].shape == (2, 2, 16) and b["tokens"].dtype == np.int32 for b in out)
  assert it.counts == dict.fromkeys(wds.DEFECTS, 0) | dict(
      no_json=1, bad_json=1, gap_in_turns=1, corrupt_image=1, empty_instruction=1, truncated=1)
  assert it.variants == len(it.buckets) * 2
  err = capsys.readouterr().err
  assert err.count("data: ") == 6 and "bad3" in err and "further ones are only counted" in err


def test_a_restored_iterator_continues_exactly(tmp_path):
  source = wds.Source(_mixed_shards(tmp_path))
  ref = _batcher(source, num_epochs=3)
  want = [next(ref) for _ in range(20)]
  it = _batcher(source, num_epochs=3)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert any(state["pending"].values())  # samples were waiting in buckets
  again = _batcher(source, num_epochs=3)
  again.set_state(state)
  for a, b in zip(want[7:], [next(again) for _ in range(13)]):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert again.counts == ref.counts


def test_reader_processes_give_the_batches_of_threads_and_resume_only_as_saved(tmp_path):
  source = wds.Source(_mixed_shards(tmp_path))
  ref = _batcher(source, num_epochs=2)
  want = [next(ref) for _ in range(12)]
  it = _batcher(source, num_epochs=2, read_workers=2)
  got = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  again = _batcher(source, num_epochs=2, read_workers=2)
  again.set_state(state)
  got += [next(again) for _ in range(7)]
  for a, b in zip(want, got, strict=True):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert again.counts == ref.counts and again.counts["bad_json"] == 2  # carried over the resume
  again.close()
  with pytest.raises(ValueError, match="saved with data.workers=2; resume with that many"):
    _batcher(source, read_workers=0).set_state(state)
  with pytest.raises(ValueError, match="data.workers=-1"):
    _batcher(source, read_workers=-1)


def test_two_processes_agree_on_every_batch_shape(tmp_path):
  paths = _mixed_shards(tmp_path)
  barrier, slots, seen = threading.Barrier(2), [None, None], [[], []]

  def make_agree(p):
    def agree(fill):  # an all-gather between two threads
      slots[p] = fill
      barrier.wait()
      out = np.stack(slots)
      barrier.wait()
      return out
    return agree

  def run(p):
    it = _batcher(wds.Source(paths, p, 2), num_epochs=2, agree=make_agree(p))
    seen[p] = [b["images"].shape for b in it]

  threads = [threading.Thread(target=run, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads), "the processes deadlocked"
  assert seen[0] == seen[1] and len(seen[0]) >= 4 and len(set(seen[0])) >= 2
  with pytest.raises(ValueError, match="max_turns"):
    _batcher(wds.Source(paths), max_turns=None, agree=make_agree(0))
  with pytest.raises(ValueError, match="num_turns=0: a multi-turn batch needs at least one edit"):
    _batcher(wds.Source(paths), max_turns=0)


def test_pairs_for_stage_1_make_every_turn_its_own_example(tmp_path):
  wds.write_shard(str(tmp_path / "p.tar"), [_sample(f"s{i}", 3, 16, 16, seed=i) for i in range(3)])
  source = wds.Source([str(tmp_path / "p.tar")])
  out = list(_batcher(source, num_epochs=1, pairs=True, max_turns=None, batch_size=3))
  assert len(out) == 3 and all(b["images"].shape == (3, 2, 64, 64, 3) for b in out)  # 9 pairs
  assert all(b["tokens"].shape == (3, 1, 16) and b["edit_masks"].shape == (3, 1, 64, 64) for b in out)
  seen = {bytes(t) for b in out for t in b["tokens"][:, 0]}
  assert len(seen) == 9  # each (sample, turn) once
  it = _batcher(source, num_epochs=2, pairs=True, max_turns=None, batch_size=2)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it)["images"] for _ in range(3)]
  again = _batcher(source, num_epochs=2, pairs=True, max_turns=None, batch_size=2)
  again.set_state(state)
  for a in want:
    np.testing.assert_array_equal(a, next(again)["images"])


def test_shapesedit_exported_to_shards_reads_back_exactly(tmp_path):
  paths = export_wds.export(str(tmp_path), sequences=5, turns=3, res=32, per_shard=2)
  assert len(paths) == 3 and wds.shard_list(str(tmp_path / "shards.json")) == paths
  source = wds.Source(paths)
  assert len(source) == 5
  for i in range(5):
    got, defects = wds.parse(source[i])
    want = shapes.make_sequence(i, 3, 32, "train")
    assert defects == [] and got["key"] == f"train_{i:08d}"
    np.testing.assert_array_equal(np.stack(got["images"]), want["images"])  # PNG: lossless
    assert got["instructions"] == list(want["instructions"])
  before = {p: os.path.getmtime(p) for p in paths}
  os.remove(paths[1])
  export_wds.export(str(tmp_path), sequences=5, turns=3, res=32, per_shard=2)  # a rerun
  assert os.path.exists(paths[1]) and all(os.path.getmtime(p) == before[p] for p in (paths[0], paths[2]))


def test_stage_1_trains_on_shards_and_masked_switches_are_refused(tmp_path):
  """(Stage 2 on shards, with buckets through the Wan VAE: tests/test_wan_pipeline.py.)"""
  export_wds.export(str(tmp_path / "wds"), sequences=24, turns=3, res=32, per_shard=12)
  shards = f"--config.data.shards={tmp_path / 'wds' / 'shards.json'}"
  p = train_cli(tmp_path / "s1", "--config.data.source=wds", shards, "--config.train.steps=4",
                "--config.train.log_every=2")
  assert p.returncode == 0, p.stderr[-2000:]
  assert "aspect-ratio buckets" in p.stderr + p.stdout and "evaluation is ShapesEdit's" in p.stderr + p.stdout
  rows = [json.loads(l) for l in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["kind"] == "train"]
  assert train and train[-1]["data_shapes"] == 1 and train[-1]["data_no_json"] == 0
  assert train[-1]["data_truncated"] == 0  # stage 1 takes all 3 turns of a sample as pairs
  p = train_cli(tmp_path / "s3", "--config.data.source=wds", shards, "--config.model.copy_gate=True",
                f"--config.init_from={tmp_path / 's1'}", config="configs/causal.py:smoke")
  assert p.returncode == 2 and "needs exact edit masks" in p.stderr


def test_the_instructions_of_the_shards_are_collected_for_the_text_store(tmp_path):
  wds.write_shard(str(tmp_path / "a.tar"), [
      _raw("x", 2), _raw("y", 1, json=json.dumps({"instructions": ["  same in both  "]}).encode()),
      _raw("z", 1, json=b"{broken")])
  assert wds.instructions(str(tmp_path / "*.tar"), ("en",)) == ["en 0", "en 1", "same in both"]
  assert wds.instructions(str(tmp_path / "*.tar")) == ["en 0", "en 1", "same in both", "zh 0", "zh 1"]


def test_shards_converted_to_array_record_give_the_same_batches(tmp_path):
  export_wds.export(str(tmp_path / "wds"), sequences=6, turns=2, res=32)
  wds.write_shard(str(tmp_path / "wds" / "bad.tar"), [_raw("bad", 2, json=None)])
  assert tfds_builder.main(["--shards", str(tmp_path / "wds" / "*.tar"), "--out", str(tmp_path / "tfds")]) == 0
  frozen = tfds_builder.Frozen(str(tmp_path / "tfds"))
  assert len(frozen) == 6  # the bad sample was left out
  by_key = {}
  for i in range(6):
    s, _ = frozen.sample(i)
    by_key[s["instructions"][0] + s["instructions"][1]] = np.stack(s["images"])
  for i in range(6):
    want = shapes.make_sequence(i, 2, 32, "train")
    np.testing.assert_array_equal(by_key["".join(want["instructions"])], want["images"])
  cfg = causal_config.get_config("smoke")
  cfg.data.update(source="tfds", shards=str(tmp_path / "tfds"), num_turns=2)
  cfg.train.batch_size = 2
  batch = next(iter(make_data(cfg)))
  assert batch["images"].shape == (2, 3, 32, 32, 3) and batch["tokens"].shape[:2] == (2, 2)
  with pytest.raises(FileNotFoundError, match="holds no converted shards"):
    tfds_builder.Frozen(str(tmp_path / "nothing"))


def _fake_allgather(n):
  """An all-gather between n threads (each passes its array, all get them stacked)."""
  barrier, slots = threading.Barrier(n), [None] * n
  local = threading.local()

  def gather(x):
    slots[local.p] = np.asarray(x)
    barrier.wait()
    out = np.stack(slots)
    barrier.wait()
    return out
  return gather, local


def test_each_process_resumes_its_own_data_position(tmp_path):
  """Only process 0 writes a checkpoint's JSON, so the data position holds every process's own
  state; each resumes from its own, and another process count is refused."""
  paths = _mixed_shards(tmp_path)
  gather, local = _fake_allgather(2)
  agree = lambda fill: gather(fill)
  saved, want = [None, None], [None, None]

  def run(p):
    local.p = p
    it = _batcher(wds.Source(paths, p, 2), num_epochs=4, agree=agree)
    next(it)
    saved[p] = train.save_data_state(it, allgather=gather)
    want[p] = [next(it)["images"] for _ in range(3)]

  threads = [threading.Thread(target=run, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert saved[0] == saved[1] and len(json.loads(saved[0])["per_process"]) == 2

  def resume(p):
    local.p = p
    it = _batcher(wds.Source(paths, p, 2), num_epochs=4, agree=agree)
    train.restore_data_state(it, saved[0], p, 2)
    for a in want[p]:
      np.testing.assert_array_equal(a, next(it)["images"])
    want[p] = "ok"

  threads = [threading.Thread(target=resume, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert want == ["ok", "ok"]
  alone = _batcher(wds.Source(paths), num_epochs=1)
  with pytest.raises(ValueError, match="saved by 2 process.es.; resume it with that many, not 3"):
    train.restore_data_state(alone, saved[0], 0, 3)
  with pytest.raises(ValueError, match="saved by 1 process.es.; resume it with that many, not 2"):
    train.restore_data_state(alone, train.save_data_state(alone), 0, 2)


def test_data_that_cannot_make_batches_stops_with_a_reason(tmp_path):
  wds.write_shard(str(tmp_path / "bad.tar"), [_raw(f"b{i}", 2, json=None) for i in range(3)])
  with pytest.raises(ValueError, match="no usable sample in 3 reads .*no_json"):
    next(_batcher(wds.Source([str(tmp_path / "bad.tar")])))
  paths = _mixed_shards(tmp_path / "m") if (tmp_path / "m").mkdir() is None else None
  with pytest.raises(ValueError, match="samples wait in buckets that no batch fills"):
    for _ in range(20):
      next(_batcher(wds.Source(paths), batch_size=8, max_pending=5))


def test_an_export_does_not_mix_with_shards_of_other_flags(tmp_path):
  export_wds.export(str(tmp_path), sequences=2, turns=1, res=32, per_shard=1)
  more = export_wds.export(str(tmp_path), sequences=2, turns=1, res=32, per_shard=1, first=2)
  assert [os.path.basename(p) for p in more] == ["train-000000002.tar", "train-000000003.tar"]
  assert len(wds.Source(wds.shard_list(str(tmp_path / "*.tar")))) == 4
  with pytest.raises(ValueError, match="exported with .* not"):
    export_wds.export(str(tmp_path), sequences=2, turns=2, res=32, per_shard=1)


def test_a_random_language_is_drawn_per_sample_and_kept_on_every_read(tmp_path):
  wds.write_shard(str(tmp_path / "l.tar"), [_raw(f"l{i}", 2) for i in range(8)])
  it = _batcher(wds.Source(wds.shard_list(str(tmp_path / "*.tar"))), language="random", num_epochs=1)

  def language(i):
    _, items, _ = it.reader.load(i)
    return {detokenize(t).split(" ")[0] for t in items[0][1]["tokens"]}  # "en" or "zh", per turn

  drawn = [language(i) for i in range(8)]
  assert all(len(d) == 1 for d in drawn)  # one language for the whole sample
  assert {next(iter(d)) for d in drawn} == {"en", "zh"}  # both languages are drawn
  assert [language(i) for i in range(8)] == drawn  # and each sample keeps its own
  with pytest.raises(ValueError, match="language 'fr'"):
    _batcher(it.source, language="fr")
