"""Read a training run back: its config and the parameters of a saved step."""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp


def load_config(workdir) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run directory "
                            "(make one with python -m anchoredit_jax.train --workdir=...)")
  with open(path) as f:
    cfg = json.load(f)
  # model fields added since the run was made take their preset default
  from configs.common import model_config
  cfg["model"] = {**json.loads(model_config(cfg.get("preset", "toy")).to_json()), **cfg.get("model", {})}
  return ml_collections.ConfigDict(cfg)


def load_params(workdir, step=None):
  """(cfg, graphdef, params, step) of `step` (default: the newest) of the run in `workdir`."""
  from anchoredit_jax import sharding as sh
  from anchoredit_jax.train import Trainer  # deferred: train imports the stages

  cfg = load_config(workdir)
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  try:  # closed on failure too: a manager left open prints a traceback at interpreter exit
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints yet")
    tr = Trainer(cfg, sh.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          tr.abstract_state, tr.state_sh)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  finally:
    mngr.close()
  return cfg, tr.graphdef, state["params"], step
