"""Ahead-of-time compile for a target topology (anchoredit_jax/aot.py) and golden wan1.3b shardings.

tests/golden/wan1.3b_shardings.json holds the PartitionSpec of every wan1.3b parameter on a
(data=2, fsdp=2, tensor=2) mesh of the 8 fake CPU devices, so a change to the logical axis names
or the rules is a visible diff. After an intended change, regenerate it and commit it with the change:
  UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_aot.py -k golden
"""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from anchoredit_jax import aot
from anchoredit_jax import sharding as sh
from anchoredit_jax.models.model import abstract_split
from anchoredit_jax.train import make_data
from configs import causal, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "wan1.3b_shardings.json")
BIG = 1 << 20  # elements; every parameter larger than this must be split over some mesh axis
# The frozen Wan VAE's convolutions carry no logical axis names yet, so they are replicated
# (127M float32 parameters, ~0.5 GiB a device). Naming them belongs in models/wan_vae.py.
REPLICATED_OK = ("vae/",)


@pytest.fixture(scope="module")
def wan_params():
  """({path: spec as list}, {path: shape}) of wan1.3b's parameters, without allocating them."""
  cfg = pretrain.get_config("wan1.3b")
  _, params = abstract_split(cfg.model)
  mesh = sh.make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = sh.param_shardings(params, mesh, tuple(tuple(r) for r in cfg.sharding.rules))
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
  specs = {name(p): [list(a) if isinstance(a, tuple) else a for a in s.spec]
           for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  shapes = {name(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert specs.keys() == shapes.keys()
  return specs, shapes


def test_wan13b_param_shardings_match_golden(wan_params):
  specs, _ = wan_params
  if os.environ.get("UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:  # one parameter a line, so a change is a one-line diff
      f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(specs[k])}" for k in sorted(specs))
              + "\n}\n")
  with open(GOLDEN) as f:
    golden = json.load(f)
  changed = sorted(k for k in specs.keys() & golden.keys() if specs[k] != golden[k])
  added, removed = sorted(specs.keys() - golden.keys()), sorted(golden.keys() - specs.keys())
  assert not (changed or added or removed), (
      f"wan1.3b shardings differ from {GOLDEN} (UPDATE_GOLDEN=1 rewrites it): "
      f"changed {[(k, golden[k], specs[k]) for k in changed[:5]]} ({len(changed)}), "
      f"added {added[:5]} ({len(added)}), removed {removed[:5]} ({len(removed)})")


def test_every_big_wan13b_param_is_sharded(wan_params):
  specs, shapes = wan_params
  big = {k for k, s in shapes.items() if math.prod(s) > BIG}
  replicated = sorted(k for k in big if not any(specs[k]))
  assert len(big) > 100 and specs["dit/blocks/ffn/fc1/kernel"] == [None, "fsdp", "tensor"]
  assert [k for k in replicated if not k.startswith(REPLICATED_OK)] == []
  # the exemption stays only while it is needed: once the VAE is sharded, drop REPLICATED_OK
  assert replicated, "no large parameter is replicated any more: empty REPLICATED_OK"


def test_topology_names():
  t = aot.parse_topology("v5p-128")  # 128 TensorCores = 64 megacore chips, one 4x4x4 cube
  assert (t.chip, t.devices, t.shape) == ("v5p", 64, (4, 4, 4))
  assert aot.parse_topology("v5litepod-16") == aot.Target("v5litepod-16", "v5e", 16, (4, 4))
  assert aot.parse_topology("v4-32").devices == 16 and aot.parse_topology("v4-32").shape == (2, 2, 4)
  assert aot.parse_topology("v5e-8").shape == (2, 4) and aot.parse_topology("v6e-256").shape == (16, 16)
  assert aot.parse_topology("v5p:4x4x8").devices == 128 and aot.parse_topology("h100:8").devices == 8
  for bad in ("tpu-8", "v5p-127", "v5p:4x4", "v5e-12", "cpu:0", "h100:2x2"):
    with pytest.raises(ValueError):
      aot.parse_topology(bad)


@pytest.mark.parametrize("stage", [pretrain, causal])
def test_abstract_batch_is_what_make_data_yields(stage):
  cfg = stage.get_config("smoke")
  real = next(iter(make_data(cfg)))
  spec = aot.abstract_batch(cfg, None)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == \
      {k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()}


def test_cli_compiles_causal_smoke_on_fake_devices(capsys, tmp_path):
  # in this process: cpu:8 is what conftest already gave JAX (another count needs a fresh one)
  out = tmp_path / "aot.json"
  rc = aot.main(["--config=configs/causal.py:smoke", "--topology=cpu:8", "--hbm-gib=1",
                 f"--out={out}", "--config.train.batch_size=8"])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "fallback: 8 fake CPU devices, memory from the CPU compiler" in text
  for row in ("arguments", "outputs", "temporaries", "generated code", "total", "FLOPs per step"):
    assert f"  {row}" in text
  assert "verdict: fits" in text
  (r,) = json.loads(out.read_text())["stages"]
  assert r["stage"] == "causal" and r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert r["memory"]["arguments"] > 0 and r["memory"]["temporaries"] > 0
  assert 0 < r["total"] < 2 ** 30 and r["model_flops"] > 0 and r["xla_flops_per_device"] > 0


def test_cli_exits_nonzero_when_it_does_not_fit():
  # a fresh process: the fake-device count (4, not conftest's 8) is set by the CLI itself;
  # --stages reads pretrain.py beside the given causal.py with the same preset
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  p = subprocess.run([sys.executable, "-m", "anchoredit_jax.aot", "--config=configs/causal.py:smoke",
                      "--stages=pretrain", "--topology=cpu:4", "--hbm-gib=0.0001"],
                     cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 1, p.stdout + p.stderr
  assert "== pretrain (configs/pretrain.py:smoke) on fallback: 4 fake CPU devices" in p.stdout
  assert "mesh data=4 fsdp=1 tensor=1" in p.stdout
  assert "verdict: DOES NOT FIT: needs " in p.stdout and "the chip has 0.00" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--topology=tpu-9"], "error: unknown topology 'tpu-9'"),
    (["--topology=cpu:8", "--mesh=data=3,fsdp=1,tensor=1"], "error: mesh: axes"),
    (["--topology=cpu:8", "--mesh=data=two"], "error: --mesh"),
    (["--topology=cpu:8", "--stages=nope"], "error: config file configs/nope.py does not exist"),
    (["--topology=cpu:8", "--config.train.batch_size=3"], "error: train.batch_size=3 does not split"),
    (["--topology=cpu:8", "--verbose"], "error: unrecognised arguments: --verbose"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, args, message):
  rc = aot.main(["--config=configs/pretrain.py:smoke", *args])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_tpu_topology_through_libtpu(capsys):
  pytest.importorskip("libtpu")  # the optional TPU extra: a compile-only TPU slice on this host
  assert aot.main(["--config=configs/pretrain.py:smoke", "--topology=v5litepod-8"]) == 0
  text = capsys.readouterr().out
  assert "TPU topology v5litepod-8 (2x4) via libtpu" in text and "of 15.75 GiB HBM" in text


def test_splash_attention_compiles_to_the_tpu_kernel(capsys):
  """On a TPU target the splash kernel is the Mosaic custom call, one per device block (not the
  interpret mode the CPU tests run), and it moves no attention operand between devices."""
  pytest.importorskip("libtpu")
  import jax.numpy as jnp
  from anchoredit_jax.models.attention import attend
  devices, how = aot.tpu_devices(aot.parse_topology("v5litepod-8"))
  assert devices, how
  mesh = sh.make_mesh(dict(data=4, fsdp=1, tensor=2), devices)
  b, s, m, h, k = 4, 1560, 3 * 1560, 12, 128  # a Wan-1.3B turn attending to anchor + window of 2
  arg = lambda shape, names, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh.named(mesh, names))
  q = arg((b, s, h, k), (sh.BATCH, None, sh.HEADS, None))
  kv = arg((b, m + s, h, k), (sh.BATCH, None, sh.HEADS, None))
  mask = arg((b, s, m + s), (sh.BATCH, None, None), jnp.bool_)
  with sh.use_mesh(mesh, sh.DEFAULT_RULES):
    hlo = jax.jit(lambda q, k, v, mask: attend(q, k, v, mask, "splash")).lower(q, kv, kv, mask).compile().as_text()
  assert "tpu_custom_call" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo


def test_small_preset_fits_one_h100_in_every_stage():
  # stage 2 of `small` once needed ~340 GiB and ran out of memory on an H200 (remat "dots" fixed
  # it); the CPU compiler's estimate stands in for the GPU's here
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  p = subprocess.run([sys.executable, "-m", "anchoredit_jax.aot", "--config=configs/causal.py:small",
                      "--stages=causal,distill", "--topology=h100:1"],
                     cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert p.stdout.count("verdict: fits") == 2
