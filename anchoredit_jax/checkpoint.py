"""Read a training run back: its config and the parameters of a saved step.

Two kinds of directory hold a model: a training run (config.json + orbax checkpoints/, made by
`anchoredit_jax.train`) and a reference checkpoint (config.json + params.safetensors + meta.json,
made from a run by `anchoredit_jax.export`). `load_params` reads either.
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from safetensors import SafetensorError
from safetensors.numpy import load_file

from anchoredit_jax import sharding as sh
from anchoredit_jax.models.model import abstract_split
from configs.common import model_config


def load_config(workdir) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run directory "
                            "(make one with python -m anchoredit_jax.train --workdir=...)")
  with open(path) as f:
    cfg = json.load(f)
  # model fields added since the run was made take their preset default
  cfg["model"] = {**json.loads(model_config(cfg.get("preset", "toy")).to_json()), **cfg.get("model", {})}
  return ml_collections.ConfigDict(cfg)


REFERENCE_PARAMS = "params.safetensors"


def is_reference(path) -> bool:
  return os.path.exists(os.path.join(path, REFERENCE_PARAMS))


def has_model(path) -> bool:
  """Whether `path` is a run with a saved step or a reference checkpoint."""
  return is_reference(path) or os.path.isdir(os.path.join(path, "checkpoints"))


def flat_params(params) -> dict:
  """{'dit/blocks/0/ffn/...': array} of a params pytree (the safetensors keys)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  key = lambda p: jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value")
  return {key(p): a for p, a in leaves}


def load_reference(path):
  """(cfg, graphdef, params float32, step) of a reference checkpoint, every array checked
  against the model its config.json builds."""
  cfg = load_config(path)
  graphdef, abstract = abstract_split(cfg.model)
  file = os.path.join(path, REFERENCE_PARAMS)
  try:
    arrays = load_file(file)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{file} could not be read ({str(e).splitlines()[0][:100]}); "
                     "re-download or re-export it") from e
  expect = flat_params(abstract)
  missing, extra = sorted(set(expect) - set(arrays)), sorted(set(arrays) - set(expect))
  if missing or extra:
    raise ValueError(f"{file} does not fit its config.json (missing {missing[:2]}, unexpected "
                     f"{extra[:2]}); it was exported from another model config")
  for k, a in expect.items():
    if arrays[k].shape != a.shape:
      raise ValueError(f"{file}: {k} has shape {list(arrays[k].shape)}, its config.json builds "
                       f"{list(a.shape)}; it was exported from another model config")
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  params = jax.tree_util.tree_unflatten(
      treedef, [jax.numpy.asarray(arrays[k], a.dtype) for k, a in zip(expect, leaves)])
  with open(os.path.join(path, "meta.json")) as f:
    step = json.load(f).get("step")
  return cfg, graphdef, params, step


def load_params(workdir, step=None, mesh=None):
  """(cfg, graphdef, params, step) of `step` (default: the newest) of the run in `workdir`, or of
  the reference checkpoint there. A run's parameters restore straight onto `mesh` (any mesh or
  process count; default: this process's first device), sharded by the run's own rules; the
  rest of its saved state (optimizer, EMA, teacher) is not read."""
  if is_reference(workdir):
    return load_reference(workdir)
  cfg = load_config(workdir)
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  try:  # closed on failure too: a manager left open prints a traceback at interpreter exit
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints yet")
    mesh = mesh or sh.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.local_devices()[:1])
    graphdef, abstract = abstract_split(cfg.model)
    target = {"params": sh.placed(abstract, sh.param_shardings(abstract, mesh, sh.config_rules(cfg)))}
    restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    state = mngr.restore(step, args=ocp.args.Composite(state=restore))["state"]
  finally:
    mngr.close()
  return cfg, graphdef, state["params"], step
