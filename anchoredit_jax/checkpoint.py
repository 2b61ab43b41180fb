"""Read a training run back: its config and the parameters of a saved step.

Two kinds of directory hold a model: a training run (config.json + orbax checkpoints/, made by
`anchoredit_jax.train`) and a reference checkpoint (config.json + params.safetensors + meta.json,
made from a run by `anchoredit_jax.export`). `load_params` reads either.

A run's checkpoints carry checksums of their arrays (`save_step`); `restore_newest` verifies them
and falls back to the newest intact older step when the newest is damaged.
"""
import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp
from safetensors import SafetensorError
from safetensors.numpy import load_file

from anchoredit_jax import distributed, integrity, sharding as sh
from anchoredit_jax.errors import short
from anchoredit_jax.models.model import abstract_split, frozen_parts, gives_ema
from configs.common import model_config


# model fields that change how the model computes, not what its parameters are: a run may resume,
# or a stage start from one, with other values of these (another attention kernel on another device)
COMPUTE_ONLY = ("attention_kernel", "remat", "dtype", "gate_hard")


# model fields added after runs were already made, with the value those runs had without them
ADDED_FIELDS = {"copy_gate": False, "gate_from": "prev", "rope_stride": 1, "text_padding": "masked"}


def parameter_fields(model_cfg) -> dict:
  """The model config's fields that decide its parameters or what it has learned (all but
  COMPUTE_ONLY), as plain JSON; fields a config predates get the value it ran with."""
  fields = {**ADDED_FIELDS, **json.loads(model_cfg.to_json())}
  return {k: v for k, v in fields.items() if k not in COMPUTE_ONLY}


def load_config(workdir) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run directory "
                            "(make one with python -m anchoredit_jax.train --workdir=...)")
  try:
    with open(path) as f:
      cfg = json.load(f)
    # model fields added since the run was made: the value such runs had (ADDED_FIELDS), else
    # their preset's default (a preset's default may have changed since: wan's rope_stride)
    cfg["model"] = {**json.loads(model_config(cfg.get("preset", "toy")).to_json()), **ADDED_FIELDS,
                    **cfg.get("model", {})}
  except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not a config's shape
    raise ValueError(f"{path} is not a valid config ({short(e, 120)}); restore it from the run "
                     "or the repository") from e
  m = cfg["model"]
  if not (isinstance(m.get("dim"), int) and isinstance(m.get("heads"), int) and m["heads"] > 0
          and m["dim"] % m["heads"] == 0):
    raise ValueError(f"{path}: model.dim={m.get('dim')} is not divisible by model.heads="
                     f"{m.get('heads')}; restore the file from the run or the repository")
  return ml_collections.ConfigDict(cfg)


def config_fields(cfg) -> dict:
  """What a config must still say for weights saved under it: the model's parameter fields and
  the attention pattern it learned (causal.window, causal.anchor), as flat JSON."""
  out = {f"model.{k}": v for k, v in parameter_fields(cfg.model).items()}
  if "causal" in cfg:
    out.update({"causal.window": cfg.causal.window, "causal.anchor": cfg.causal.anchor})
  return out


def check_config_fields(where, cfg, saved, *, only="", against="its config.json",
                        fix="config.json was edited after the fact: restore it"):
  """Raise if `saved` (config_fields when the weights were saved; None for files written before
  they were kept) differs from `cfg`'s on a key starting with `only` (heads, say, which no
  array's shape shows)."""
  if saved is None:
    return
  saved = {**{f"model.{k}": v for k, v in ADDED_FIELDS.items()}, **saved}  # fields saved before
  now = config_fields(cfg)
  differ = sorted(k for k in set(now) | set(saved) if k.startswith(only) and now.get(k) != saved.get(k))
  if differ:
    k, more = differ[0], (f" (and {len(differ) - 1} more fields)" if len(differ) > 1 else "")
    raise ValueError(f"{where} was saved with {k}={saved.get(k)!r}, {against} has "
                     f"{now.get(k)!r}{more}; {fix}")


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
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  digest = meta.get("params_sha256")  # absent in exports made before it was recorded
  if digest and os.path.exists(file) and integrity.file_sha256(file) != digest:
    raise ValueError(f"{file} is damaged: its SHA-256 differs from the one in meta.json; "
                     "re-download or re-export it")
  try:
    arrays = load_file(file)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{file} could not be read ({short(e, 160)}); "
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
  check_config_fields(path, cfg, meta.get("config_fields"))
  return cfg, graphdef, params, meta.get("step")


def load_params(workdir, step=None, mesh=None):
  """(cfg, graphdef, params, step) of `step` (default: the newest) of the run in `workdir`, or of
  the reference checkpoint there. A run's parameters restore straight onto `mesh` (any mesh or
  process count; default: this process's first device), sharded by the run's own rules; the
  rest of its saved state (optimizer, teacher, critic) is not read. A run that keeps an EMA of
  its generator (stage 3b with dmd.ema_decay > 0) gives the EMA."""
  if is_reference(workdir):
    return load_reference(workdir)
  cfg = load_config(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # (the manager would make one)
    raise FileNotFoundError(f"{workdir} holds a config.json but neither {REFERENCE_PARAMS} nor "
                            "checkpoints/: point at a training run or a reference checkpoint")
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  try:  # closed on failure too: a manager left open prints a traceback at interpreter exit
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints yet")
    mesh = mesh or sh.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.local_devices()[:1])
    graphdef, abstract = abstract_split(cfg.model)
    try:  # the JSON first: a config.json edited since shows as such, not as unreadable arrays
      extra = mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"] or {}
    except Exception:  # noqa: BLE001  (read again below, with the arrays, and reported there)
      extra = {}
    check_config_fields(f"{workdir} step {step}", cfg, extra.get("config_fields"))
    target = {"params": sh.placed(abstract, sh.param_shardings(abstract, mesh, sh.config_rules(cfg)))}
    if gives_ema(cfg):
      frozen = frozen_parts(cfg.model)
      target["aux"] = {"ema": {k: v for k, v in target["params"].items() if k not in frozen}}
    restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    try:
      state = mngr.restore(step, args=ocp.args.Composite(state=restore))["state"]
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds on damaged files)
      fit = "" if extra.get("config_fields") else "does not fit its config.json or "
      raise ValueError(f"checkpoint {step} of {workdir} {fit}cannot be read ({short(e, 160)}); "
                       "resume the run (python -m anchoredit_jax.train) to fall back to an intact "
                       "step") from e
  finally:
    mngr.close()
  differ = integrity.mismatches(state, extra.get("checksums", {}))
  if differ:
    raise ValueError(f"checkpoint {step} of {workdir} is damaged: {len(differ)} parameter array(s) "
                     f"differ from their saved checksums (e.g. {differ[0]}); resume the run (python -m "
                     "anchoredit_jax.train) to move it aside and fall back to an intact step")
  params = state["params"]
  if gives_ema(cfg):
    params = type(params)({**params, **state["aux"]["ema"]})
  return cfg, graphdef, params, step


def save_step(mngr, step, state, extra: dict):
  """Save `state` and the JSON `extra` as `step`, with the checksums of every array of the state."""
  directory = os.fspath(mngr.directory)
  need = sum(x.nbytes for x in jax.tree.leaves(state))  # orbax compresses: an upper bound
  free = shutil.disk_usage(directory).free if os.path.isdir(directory) else None  # local disks only
  if free is not None and free < need:
    raise ValueError(f"No space left on device: the checkpoint of step {step} needs up to "
                     f"{need / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free in {directory}")
  extra = {**extra, "checksums": integrity.tree_checksums(state)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          extra=ocp.args.JsonSave(extra)), force=True)


class Damaged(Exception):
  """A checkpoint that cannot be restored, or restores to other bits than it was saved with."""


def _saved_keys(mngr, step):
  """The top-level keys of the saved state of `step`, or None if its metadata cannot be read."""
  try:
    tree = mngr.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    return set(tree) if tree else None
  except Exception:  # noqa: BLE001  (a damaged checkpoint fails in many ways; it is then restored to see)
    return None


def restore_step(mngr, step, target: dict, optional=()):
  """(state, extra) of `step`, verified against its checksums and for finite parameters. Keys of
  `target` named in `optional` that the checkpoint lacks (written before they existed) are left
  out of the returned state. Raises Damaged with the reason."""
  keys = _saved_keys(mngr, step)
  if keys is not None:
    target = {k: v for k, v in target.items() if k in keys or k not in optional}
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds on damaged files)
    raise Damaged(f"cannot be read: {short(e, 160)}") from e
  state, extra = restored["state"], restored["extra"]
  if extra is None:
    raise Damaged("its extra/ item (data position, checksums) is missing")
  differ = integrity.mismatches(state, extra.get("checksums", {}))
  if differ:
    raise Damaged(f"{len(differ)} array(s) differ from the checksums saved with them "
                  f"(e.g. {differ[0]}): the files were changed after they were written")
  bad = integrity.nonfinite(state["params"])
  if bad:
    raise Damaged(f"{len(bad)} parameter array(s) hold NaN/Inf (e.g. {bad[0]})")
  return state, extra


def restore_newest(mngr, workdir, target: dict, optional=()):
  """(step, state, extra) of the newest intact checkpoint of the run in `workdir`, or None if it
  has none. Damaged newer ones are named in one line each and moved to <workdir>/damaged/ (kept,
  not deleted) so the run can write those steps again; if every checkpoint is damaged nothing is
  moved and ValueError names them."""
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      state, extra = restore_step(mngr, step, target, optional)
    except Damaged as e:
      damaged.append((step, str(e)))
      continue
    for bad, why in damaged:
      dst = _move_aside(workdir, bad)
      distributed.say(f"checkpoint {bad} of {workdir} is damaged ({why}); moved it to {dst} and "
                      f"resumed from step {step}, the newest intact one")
    if damaged:
      mngr.reload()
    return step, state, extra
  if damaged:
    bad, why = damaged[0]
    raise ValueError(f"no intact checkpoint in {workdir}/checkpoints: step {bad}: {why}" +
                     (f"; and {len(damaged) - 1} older ones are damaged too" if len(damaged) > 1 else "") +
                     "; move that checkpoints/ folder away to start the run over")
  return None


def _move_aside(workdir, step) -> str:
  src = os.path.join(workdir, "checkpoints", str(step))
  dst = os.path.join(workdir, "damaged", str(step))
  n = 1
  while os.path.exists(dst):
    dst, n = os.path.join(workdir, "damaged", f"{step}.{n}"), n + 1
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
  distributed.barrier(f"moved checkpoint {step}")
  return dst
