"""The reference checkpoints kept in the repository (checkpoints/toy) load, fit their configs,
and say how they were made; broken copies give one-line errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from anchoredit_jax import train
from anchoredit_jax.checkpoint import load_config, load_params
from configs import causal as causal_config

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "toy")
STAGES = ("pretrain", "causal", "distill")


@pytest.mark.parametrize("stage", STAGES)
def test_reference_checkpoint_fits_its_config(stage):
  path = os.path.join(ROOT, stage)
  cfg, _, params, step = load_params(path)  # every array's name and shape checked on load
  assert cfg.stage == stage and cfg.preset == "toy"
  leaves = jax.tree.leaves(params)
  assert all(a.dtype == np.float32 and np.isfinite(np.asarray(a)).all() for a in leaves)
  assert sum(a.size for a in leaves) > 1_000_000
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  assert meta["step"] == step and meta["stage"] == stage and len(meta["params_sha256"]) == 64
  assert meta["provenance"] and all(p["command"] and p["commit"] for p in meta["provenance"])
  assert f"configs/{stage}.py" in meta["provenance"][-1]["command"]
  assert os.path.getsize(os.path.join(path, "train.log")) > 0


def test_reference_checkpoints_fit_the_size_budget():
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
  assert total <= 20_000_000, total


def test_broken_reference_copies_give_one_line_errors(tmp_path):
  bad = tmp_path / "distill"
  shutil.copytree(os.path.join(ROOT, "distill"), bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["model"]["ffn_dim"] += 8
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="exported from another model config"):
    load_params(str(bad))
  shutil.copy(os.path.join(ROOT, "distill", "config.json"), bad / "config.json")
  with open(bad / "params.safetensors", "r+b") as f:  # one flipped bit, deep in the data
    f.seek(os.path.getsize(bad / "params.safetensors") // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 4]))
  with pytest.raises(ValueError, match="params.safetensors is damaged: its SHA-256 differs"):
    load_params(str(bad))
  with open(bad / "params.safetensors", "r+b") as f:
    f.truncate(1000)
  meta = json.loads((bad / "meta.json").read_text())
  del meta["params_sha256"]  # as in exports made before it was recorded: safetensors notices
  (bad / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="could not be read"):
    load_params(str(bad))


def test_a_run_older_than_a_model_field_loads_with_the_value_it_had(tmp_path):
  """A wan run saved before text_padding and rope_stride existed computed with masked padding
  and stride 1, whatever the preset's defaults are now; resuming it under the new defaults is
  refused by the field's name, with the flag that resumes it."""
  cfg = causal_config.get_config("wan1.3b")
  saved = json.loads(cfg.to_json())
  del saved["model"]["text_padding"], saved["model"]["rope_stride"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  old = load_config(tmp_path)
  assert (old.model.text_padding, old.model.rope_stride) == ("masked", 1)
  assert (cfg.model.text_padding, cfg.model.rope_stride) == ("attend", 4)
  with pytest.raises(ValueError, match=r"made with model.rope_stride=1 \(this config: 4, and 1 more "
                     r"fields\); resume it with --config.model.rope_stride=1"):
    train._check_config(str(tmp_path), cfg)
