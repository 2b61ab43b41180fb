"""The commands users run: the three stages in order with the smoke preset, then `edit`, and the
one-line errors of each for bad input."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)


def last_line(p):
  return p.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Smoke stage 1 -> 2 -> 3, each started by its own command from the one before."""
  d = tmp_path_factory.mktemp("runs")
  s1, s2, s3 = d / "s1", d / "s2", d / "s3"
  missing = run("anchoredit_jax.train", "--config=configs/causal.py:smoke", f"--workdir={s2}",
                f"--config.init_from={s1}")
  assert missing.returncode != 0 and "configs/pretrain.py:smoke" in last_line(missing)
  p = run("anchoredit_jax.train", "--config=configs/pretrain.py:smoke", f"--workdir={s1}",
          "--config.train.steps=3", "--config.eval.pairs=0")
  assert p.returncode == 0, p.stderr[-2000:]
  wrong = run("anchoredit_jax.train", "--config=configs/distill.py:smoke", f"--workdir={d / 'x'}",
              f"--config.init_from={s1}")
  assert wrong.returncode != 0 and "is a pretrain run" in last_line(wrong)
  for stage, src, dst in (("causal", s1, s2), ("distill", s2, s3)):
    p = run("anchoredit_jax.train", f"--config=configs/{stage}.py:smoke", f"--workdir={dst}",
            f"--config.init_from={src}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"initialised from {src}" in p.stdout and '"step": 4' in p.stdout
    summary = json.loads(p.stdout.strip().splitlines()[-1])  # multi-turn held-out evaluation
    assert 0.0 <= summary["success_turn3"] <= 1.0 and summary["identity_psnr_turn1"] > 0
  more = run("anchoredit_jax.train", "--config=configs/distill.py:smoke", f"--workdir={s3}",
             f"--config.init_from={s2}", "--config.train.steps=6")  # resumes, EMA and teacher too
  assert more.returncode == 0 and "resuming" in more.stdout and '"step": 6' in more.stdout, more.stderr[-2000:]
  return d


def test_dmd_follows_the_chain_and_resumes_to_the_same_parameters(runs, image, tmp_path):
  """Stage 3b from the distill run (generator) and the causal run (real score, critic); two
  steps, then two more after a resume, equal four in one run (the generator EMA it gives too);
  the result edits like stage 3."""
  from benchmark.faults import final_params
  dmd = ["anchoredit_jax.train", "--config=configs/dmd.py:smoke", f"--config.init_from={runs / 's3'}",
         f"--config.dmd.real_from={runs / 's2'}", "--config.eval.pairs=0", "--config.dmd.ema_decay=0.5"]
  wrong = run(*dmd, f"--workdir={tmp_path / 'x'}", f"--config.dmd.real_from={tmp_path / 'none'}")
  assert wrong.returncode == 2 and "dmd.real_from=" in last_line(wrong), wrong.stderr[-2000:]
  assert "configs/causal.py:smoke" in last_line(wrong) and not (tmp_path / "x").exists()
  whole, split = tmp_path / "whole", tmp_path / "split"
  p = run(*dmd, f"--workdir={whole}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert f"initialised from {runs / 's3'}" in p.stdout and f"dmd.real_from from {runs / 's2'}" in p.stdout
  first = run(*dmd, f"--workdir={split}", "--config.train.steps=2")
  more = run(*dmd, f"--workdir={split}")
  assert first.returncode == 0 and more.returncode == 0, (first.stderr + more.stderr)[-2000:]
  assert "resuming" in more.stdout and '"step": 4' in more.stdout
  a, b = final_params(str(whole)), final_params(str(split))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  out = tmp_path / "edit"
  e = run("anchoredit_jax.edit", f"--checkpoint={whole}", f"--image={image}",
          "--instruction=make the red circle blue", f"--out={out}")
  assert e.returncode == 0 and (out / "turn_01.png").exists(), e.stderr[-2000:]


@pytest.fixture
def image(tmp_path):
  path = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path)
  return path


def test_stages_3_and_3b_train_on_shards_read_by_two_processes(runs, tmp_path):
  """Stage 3 (from the causal run) and stage 3b (from the distill run) on WebDataset shards, the
  samples read by two grain worker processes in stage 3; a sample with broken JSON among them is
  skipped and its count reaches metrics.jsonl."""
  from anchoredit_jax.data import export_wds, wds
  export_wds.export(str(tmp_path / "wds"), sequences=12, turns=3, res=32, per_shard=6)
  png = wds.encode_image(np.zeros((32, 32, 3), np.uint8))
  wds.write_shard(str(tmp_path / "wds" / "bad.tar"), [{"__key__": "bad", "json": b"{", "0.png": png, "1.png": png}])
  own = ["--config.data.source=wds", f"--config.data.shards={tmp_path / 'wds'}/*.tar",
         "--config.train.steps=2", "--config.train.log_every=1", "--config.eval.pairs=0"]
  for name, stage, extra in (("s3", "distill", [f"--config.init_from={runs / 's2'}", "--config.data.workers=2"]),
                             ("s3b", "dmd", [f"--config.init_from={runs / 's3'}", f"--config.dmd.real_from={runs / 's2'}"])):
    p = run("anchoredit_jax.train", f"--config=configs/{stage}.py:smoke", f"--workdir={tmp_path / name}", *own, *extra)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "aspect-ratio buckets" in p.stdout + p.stderr and "data: bad_json in" in p.stderr
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == 2 and train[-1]["data_bad_json"] >= 1 and train[-1]["data_shapes"] == 1


def test_edit_writes_every_turn_strip_and_timings(runs, image, tmp_path):
  out = tmp_path / "out"
  texts = ["make the red circle blue", "move the blue circle up", "remove the blue circle"]
  p = run("anchoredit_jax.edit", f"--checkpoint={runs / 's3'}", f"--image={image}",
          *[f"--instruction={t}" for t in texts], f"--out={out}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["session.json", "session.npz", "strip.png", "turn_00.png",
                                     "turn_01.png", "turn_02.png", "turn_03.png"]
  meta = json.loads((out / "session.json").read_text())
  assert meta["instructions"] == texts and len(meta["turn_seconds"]) == 3
  assert meta["sampler"]["kind"] == "student" and meta["sampler"]["steps"] == 2
  assert Image.open(out / "strip.png").size == (4 * 128, 128 + 14)
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # an ordinary directory, not a private one


def test_edit_notices_and_errors(runs, image, tmp_path):
  ck = f"--checkpoint={runs / 's3'}"
  out = tmp_path / "out"
  cases = [
      ([ck, f"--image={tmp_path / 'nope.png'}", "--instruction=a"], "not found"),
      ([ck, f"--image={ROOT}/setup.py", "--instruction=a"], "could not be read"),
      ([ck, f"--image={image}", "--instruction= "], "instruction 1 is empty"),
      ([ck, f"--image={image}", "--instruction=" + "x" * 100], "at most 62"),
      ([f"--checkpoint={runs / 's1'}", f"--image={image}", "--instruction=a"], "is a pretrain run"),
      ([f"--checkpoint={tmp_path}", f"--image={image}", "--instruction=a"], "not a training run"),
      ([ck, f"--image={image}", "--instruction=a", "--teacher", "--steps=0"], "at least 1 Euler step"),
      ([ck, f"--image={image}", "--instruction=a", "--teacher", "--guidance=nan"], "give a finite scale"),
  ]
  for args, msg in cases:
    p = run("anchoredit_jax.edit", *args, f"--out={out}")
    assert p.returncode == 2 and msg in last_line(p), (args, p.stderr[-1500:])
    assert "Traceback" not in p.stderr and not out.exists()
  other = tmp_path / "other"  # a run whose config.json no longer matches its checkpoint
  shutil.copytree(runs / "s3", other)
  cfg = json.loads((other / "config.json").read_text())
  cfg["model"]["dim"] *= 2
  (other / "config.json").write_text(json.dumps(cfg))
  p = run("anchoredit_jax.edit", f"--checkpoint={other}", f"--image={image}", "--instruction=a", f"--out={out}")
  assert p.returncode == 2 and "was saved with model.dim=" in last_line(p) and "restore it" in last_line(p)
  assert not out.exists()
  gray = tmp_path / "gray.png"
  Image.fromarray(np.full((48, 48), 128, np.uint8)).save(gray)
  p = run("anchoredit_jax.edit", ck, f"--image={gray}", "--instruction=make it red", f"--out={out}")
  assert p.returncode == 0, p.stderr[-1500:]
  assert "notice: converted L image to RGB" in p.stderr and "notice: resized 48x48" in p.stderr
  p = run("anchoredit_jax.edit", ck, f"--image={gray}", "--instruction=again", f"--out={out}")
  assert p.returncode == 2 and "not an empty directory" in last_line(p)
  for bad_out, msg in (("", "--out is empty"), (f"{ROOT}/setup.py/out", "cannot be written")):
    p = run("anchoredit_jax.edit", ck, f"--image={image}", "--instruction=a", f"--out={bad_out}")
    assert p.returncode == 2 and msg in last_line(p), p.stderr[-1500:]
    assert "turn/s" not in p.stderr and "s/turn" not in p.stderr  # no turn was computed (no progress bar)


def test_edit_scales_16_bit_crops_non_square_and_warns_of_missing_referents(runs, tmp_path):
  """A 16-bit grayscale PNG keeps its levels (scaled, not clipped to 0/255), a 64x40 image is
  centre-cropped with a notice, and an instruction naming no ShapesEdit object gets a warning."""
  wide = tmp_path / "wide16.png"
  levels = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (40, 1))
  Image.fromarray(levels).save(wide)
  from anchoredit_jax.edit import load_image
  img, notices = load_image(str(wide), 32)
  # the middle 40 of 64 columns of a 0..65535 ramp: about 50..205 (clipping would give 0 and 255)
  assert len(np.unique(img)) > 16 and 40 < img.min() < 60 and 195 < img.max() < 215, np.unique(img)
  out = tmp_path / "out"
  p = run("anchoredit_jax.edit", f"--checkpoint={runs / 's3'}", f"--image={wide}",
          "--instruction=make the red circle blue", "--instruction=make the purple star green",
          f"--out={out}")
  assert p.returncode == 0, p.stderr[-1500:]
  assert "notice: scaled I;16" in p.stderr and "notice: centre-cropped 64x40 image to 40x40" in p.stderr
  assert "warning: turn 1: 'make the red circle blue': no red object" in p.stderr  # a gray image
  assert "warning: turn 2: 'make the purple star green' names none of the shapes" in p.stderr


def test_edited_or_incomplete_checkpoint_folders_are_named(runs, image, tmp_path):
  out = tmp_path / "out"
  for name, change, msg in (
      ("heads5", lambda c: c["model"].update(heads=5), "model.dim=64 is not divisible by model.heads=5"),
      ("heads1", lambda c: c["model"].update(heads=1), "was saved with model.heads="),
      ("window", lambda c: c["causal"].update(window=3), "was saved with causal.window="),
      ("notjson", None, "is not a valid config"),
      ("onlyconfig", None, "neither params.safetensors nor checkpoints/"),
  ):
    d = tmp_path / name
    shutil.copytree(runs / "s3", d)
    cfg = json.loads((d / "config.json").read_text())
    if change:
      change(cfg)
      (d / "config.json").write_text(json.dumps(cfg))
    elif name == "notjson":
      (d / "config.json").write_text('{"model": ')
    else:
      shutil.rmtree(d / "checkpoints")
    p = run("anchoredit_jax.edit", f"--checkpoint={d}", f"--image={image}", "--instruction=a", f"--out={out}")
    assert p.returncode == 2 and msg in last_line(p) and "Traceback" not in p.stderr, (name, p.stderr[-1500:])
    if name == "notjson":
      assert str(d / "config.json") in last_line(p)
    if name == "onlyconfig":
      assert not (d / "checkpoints").exists()
    assert not out.exists()


def test_edit_session_refuses_what_it_cannot_use(runs, tmp_path):
  from anchoredit_jax.checkpoint import load_params
  from anchoredit_jax.inference import EditSession
  cfg, graphdef, params, _ = load_params(str(runs / "s3"))
  session = EditSession(cfg, graphdef, params, np.zeros((32, 32, 3), np.uint8))
  for bad in (None, 5):
    with pytest.raises(TypeError, match="an instruction is a string"):
      session.edit(bad)
  with pytest.raises(ValueError, match="give a path ending in .npz"):
    session.save(tmp_path)
  session.save(tmp_path / "s.npz")
  with pytest.raises(ValueError, match="exists; pass overwrite=True"):
    session.save(tmp_path / "s.npz")
  session.save(tmp_path / "s.npz", overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["s.npz"]
  assert EditSession.load(tmp_path / "s.npz", cfg, graphdef, params).turn == 0
  cfg2, graphdef2, params2, _ = load_params(str(runs / "s2"))
  with pytest.raises(ValueError, match="was saved by a distill model"):
    EditSession.load(tmp_path / "s.npz", cfg2, graphdef2, params2)
  (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:500])
  with pytest.raises(ValueError, match="is not a readable saved session"):
    EditSession.load(tmp_path / "cut.npz", cfg, graphdef, params)


@pytest.fixture(scope="module")
def refs(runs):
  """The smoke runs exported as reference checkpoints, as `make reproduce` does with the toy."""
  out = runs / "refs"
  for stage, run_dir in (("pretrain", "s1"), ("causal", "s2"), ("distill", "s3")):
    p = run("anchoredit_jax.export", f"--run={runs / run_dir}", f"--out={out / stage}")
    assert p.returncode == 0, p.stderr[-2000:]
  return out


def test_export_keeps_parameters_and_provenance(runs, refs, tmp_path):
  from anchoredit_jax.checkpoint import load_params
  import jax
  _, g_run, p_run, step = load_params(str(runs / "s3"))
  _, g_ref, p_ref, ref_step = load_params(str(refs / "distill"))
  assert g_run == g_ref and step == ref_step == 6
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_run)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)  # float16 storage
  meta = json.loads((refs / "distill" / "meta.json").read_text())
  assert meta["stage"] == "distill" and meta["dtype"] == "float16"
  # the first start and the resume are both recorded, each with its command and commit
  assert [p["start_step"] for p in meta["provenance"]] == [0, 4]
  assert all("configs/distill.py:smoke" in p["command"] for p in meta["provenance"])
  assert all(p["commit"] is None or len(p["commit"]) == 40 for p in meta["provenance"])
  assert sorted(os.listdir(refs / "distill")) == ["config.json", "meta.json", "metrics.jsonl",
                                                  "params.safetensors"]
  p = run("anchoredit_jax.export", f"--run={tmp_path}", f"--out={tmp_path / 'ref'}")
  assert p.returncode == 2 and "not a training run" in last_line(p) and not (tmp_path / "ref").exists()
  # training into a reference checkpoint is refused and writes nothing there
  before = sorted(os.listdir(refs / "distill"))
  p = run("anchoredit_jax.train", "--config=configs/distill.py:smoke", f"--workdir={refs / 'distill'}",
          f"--config.init_from={runs / 's2'}")
  assert p.returncode == 2 and "is a reference checkpoint, not a run" in last_line(p), p.stderr[-1500:]
  assert sorted(os.listdir(refs / "distill")) == before


def test_multiturn_benchmark_runs_every_system_it_has_weights_for(refs, tmp_path):
  out = tmp_path / "mt"
  p = run("benchmark.multiturn", f"--weights={refs}", f"--runs={tmp_path / 'none'}",
          "--systems=i,iii,v,vi,vii", "--sequences=2", "--turns=3", f"--out={out}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert "skipped iii: no weights" in p.stdout
  res = json.loads((out / "results.json").read_text())["systems"]
  assert list(res) == ["i", "v", "vi", "vii"]
  for r in res.values():
    assert len(r["per_turn"]["success"]) == 3 and len(r["per_turn"]["identity_psnr"]) == 3
  # a full cache carries every turn; the anchor + window memory a fixed number
  assert res["v"]["state_bytes"] > res["i"]["state_bytes"]
  assert sorted(os.listdir(out)) == ["contact.png", "drift.png", "results.json", "table.md"]
  assert "| i AnchorEdit 4-step student |" in (out / "table.md").read_text()
  bad = run("benchmark.multiturn", "--systems=i,x", f"--out={out}")
  assert bad.returncode == 2 and "unknown systems ['x']" in last_line(bad)


def test_multiturn_all_trains_the_missing_variant(runs, refs, tmp_path):
  root = tmp_path / "runs"
  root.mkdir()
  os.symlink(runs / "s1", root / "pretrain")
  args = ("benchmark.multiturn", "--all", "--preset=smoke", f"--weights={refs}", f"--runs={root}",
          "--systems=iii", "--sequences=2", "--turns=2", f"--out={tmp_path / 'mt'}")
  p = run(*args)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.count("training:") == 2 and "self_rollout=False" in p.stdout
  cfg = json.loads((root / "distill_tf" / "config.json").read_text())
  assert cfg["stage"] == "distill" and cfg["causal"]["self_rollout"] is False
  res = json.loads((tmp_path / "mt" / "results.json").read_text())["systems"]
  assert res["iii"]["weights"] == str(root / "distill_tf")
  again = run(*args)  # finished runs are not retrained
  assert again.returncode == 0 and "training:" not in again.stdout


def test_quickstart_report_from_reference_checkpoints(refs, tmp_path):
  work = tmp_path / "qs"
  p = run("anchoredit_jax.quickstart", f"--weights={refs}", f"--workdir={work}", "--turns=3",
          "--sequences=2", "--teacher-steps=2")
  assert p.returncode == 0, p.stderr[-2000:]
  report = (work / "report.md").read_text()
  for piece in ("![session](session.png)", "| i AnchorEdit 4-step student |", "| vii bidirectional",
                "| distill | 6 |", "System i (AnchorEdit 4-step student, its own outputs as context, 2 "
                "held-out sequences): edit success ", "With the ground-truth turns as context"):
    assert piece in report, piece
  assert re.search(r"\| i AnchorEdit 4-step student \| \d+ \[\d+,\d+\] \|", report)  # intervals
  for f in ("session.png", "drift.png", "contact.png", "results.json"):
    assert (work / f).exists(), f
  p = run("anchoredit_jax.quickstart", f"--weights={tmp_path / 'none'}", f"--workdir={work}")
  assert p.returncode == 2 and "make reproduce" in last_line(p)
